"""Supervision of the processes of an embedded brain (`cncbrain up`): a child that ends without
being asked — a crash, `kill -9`, an exit of its own — is started again, at once the first time,
then after a growing pause (0.25 s doubling to 4 s) while it keeps crashing; a line says each
time what happened. A child that crashes `max_crashes` times within `window_s`, or that cannot
listen on its port (exit status `EXIT_PORT_IN_USE`: restarting would not help), stops the
supervisor with `GaveUp` and a message naming it, its last exit status and its last log lines.

A child added with a `spare` start has a warm spare: a second process of the same command, started
once the child has run `SPARE_AFTER_S`, that does its imports and loading and then waits
(`wait_to_take_over`). When the child ends, the spare takes its place at once — told so on its stdin —
instead of a new process paying for its start-up (imports alone take 1-5 s on a loaded 2-core
machine), and a new spare is started later. A spare does nothing else while it waits: no port, no
connection.

Children die with their supervisor, even one killed with SIGKILL that cannot stop them: each is
started with `die_with_parent` (Linux `PR_SET_PDEATHSIG`: the kernel sends it SIGTERM when the
thread that started it ends), and `stop` signals each child's whole process group (they run in
sessions of their own), so nothing they started themselves is left either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cncbrain.errors import CncError

log = logging.getLogger(__name__)

EXIT_PORT_IN_USE = 98
"""Exit status of a service that could not listen on its port (EADDRINUSE's number on Linux)."""
BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Pause before the n-th restart within the window (the last one repeats)."""
SPARE_ENV = "CNC_SPARE"
"""Set (to 1) in a spare's environment: it prepares, then waits for `TAKE_OVER` on its stdin."""
TAKE_OVER = b"take over\n"
SPARE_AFTER_S = 5.0
"""A spare starts once its child has run this long (not beside the child's own start, for the CPU)."""


def is_spare() -> bool:
    """Whether this process was started as a spare (see the module's docstring)."""
    return os.environ.get(SPARE_ENV) == "1"


def wait_to_take_over() -> bool:
    """In a spare, after its preparation: block until the supervisor says to take over (True), or
    until it is gone (stdin closed: False, the spare should exit)."""
    return sys.stdin.buffer.readline() == TAKE_OVER


_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"  # the parent ended before that: we are an orphan
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` made into a command whose process the kernel sends SIGTERM when the thread of this
    process that starts it ends (a `cncbrain up` killed with SIGKILL included): a bare Python (no
    site, ~25 ms) sets Linux's `PR_SET_PDEATHSIG`, which an exec keeps, and execs `argv` in the same
    process (same pid); a parent already gone by then is noticed.

    Not a `preexec_fn`: with one, `subprocess` forks (instead of vfork) and runs the parent's
    at-fork handlers in the child, and gRPC's crash there (SIGABRT, SIGSEGV) when another thread of
    the parent is in a gRPC call — a third of the children of a busy parent died before their exec."""
    return [sys.executable, "-I", "-S", "-c", _WITH_PARENT, str(os.getpid()), *argv]


class GaveUp(CncError):
    """A child keeps crashing, or cannot listen on its port: the brain stops."""


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    restarts: int = 0
    started_at: float | None = None
    """monotonic time of its last start"""
    min_pause_s: float = 0.0
    """Wait at least this long before restarting it (a service with a standby: the standby takes
    over first, the restarted one becomes the standby)."""
    on_exit: Callable[[int], None] | None = None
    """Called with its pid once it is found ended, before it is started again (`Supervisor.add`)."""
    start_spare: Callable[[], subprocess.Popen[bytes]] | None = None
    """Starts a spare of it (stdin a pipe, `SPARE_ENV` set); None: it has none."""
    spare: subprocess.Popen[bytes] | None = None
    spare_at: float | None = None
    """monotonic time its last spare was started"""

    def tail(self, lines: int = 5) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n  " + "\n  ".join(text) if text else ""


def describe(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


class Supervisor:
    """Starts children and keeps them running; call `poll()` often (every 0.1 s)."""

    def __init__(self, *, max_crashes: int = 5, window_s: float = 60.0, say: Callable[[str], None] | None = None):
        self.max_crashes = max_crashes
        self.window_s = window_s
        self.children: dict[str, Child] = {}
        self.say = say or (lambda line: log.warning("%s", line))
        self.stopping = False

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]], log_path: Path | None = None,
            min_pause_s: float = 0.0, on_exit: Callable[[int], None] | None = None,
            spare: Callable[[], subprocess.Popen[bytes]] | None = None) -> Child:
        """`on_exit(pid)`: called as soon as the child is found ended (reaped), before it is started
        again; an exception it raises is said, not raised. `spare`: starts a spare of it (its
        stdin a pipe, `SPARE_ENV` set in its environment), which takes its place when it ends."""
        child = self.children[name] = Child(name, start, log_path, min_pause_s=min_pause_s, on_exit=on_exit,
                                            start_spare=spare)
        return child

    def start(self, name: str) -> subprocess.Popen[bytes]:
        child = self.children[name]
        proc = child.proc = child.start()
        child.started_at = time.monotonic()
        child.restart_at = None
        return proc

    def start_all(self) -> None:
        for name in self.children:
            self.start(name)

    def exited(self) -> Child | None:
        """A child that has ended (for the start-up phase, when nothing is restarted yet)."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def poll(self, now: float | None = None) -> list[str]:
        """Restart what ended; returns the names restarted. Raises `GaveUp`."""
        if self.stopping:
            return []
        now = time.monotonic() if now is None else now
        restarted = []
        for child in self.children.values():
            if child.proc is not None and (status := child.proc.poll()) is not None:
                pid = child.proc.pid
                self._ended(child, status, now)
                if child.on_exit is not None:
                    try:
                        child.on_exit(pid)
                    except Exception as exc:
                        self.say(f"{child.name}: after its end: {exc!r}")
            due = child.proc is None and child.restart_at is not None and now >= child.restart_at
            if due and self._restart(child):
                restarted.append(child.name)
            self._keep_spare(child, now)
        return restarted

    def _keep_spare(self, child: Child, now: float) -> None:
        """A spare for `child` once it has run `SPARE_AFTER_S` (and as long since the last spare)."""
        if child.start_spare is None:
            return
        if child.spare is not None and (status := child.spare.poll()) is not None:
            self.say(f"{child.name}'s spare ended ({describe(status)}); another in {SPARE_AFTER_S:g} s")
            child.spare = None
        if child.spare is not None or child.proc is None or child.started_at is None:
            return
        if now - child.started_at < SPARE_AFTER_S or (child.spare_at is not None and now - child.spare_at < SPARE_AFTER_S):
            return
        child.spare_at = now
        try:
            child.spare = child.start_spare()
        except Exception as exc:  # tried again after the pause; the child runs on without
            self.say(f"{child.name}: its spare could not be started: {exc}")

    def _take_spare(self, child: Child) -> subprocess.Popen[bytes] | None:
        """The child's spare, told to take over; None when it has none ready."""
        spare, child.spare = child.spare, None
        if spare is None or spare.poll() is not None or spare.stdin is None:
            return None
        try:
            spare.stdin.write(TAKE_OVER)
            spare.stdin.close()
        except OSError:  # it ended meanwhile
            _reap(spare, 1.0)
            return None
        return spare

    def _ended(self, child: Child, status: int, now: float) -> None:
        child.proc = None
        if status == EXIT_PORT_IN_USE:
            raise GaveUp(f"{child.name} cannot listen on its port (in use: another brain started at the same "
                         f"moment?); stopping{child.tail()}")
        while child.crashes and now - child.crashes[0] > self.window_s:
            child.crashes.popleft()
        child.crashes.append(now)
        if len(child.crashes) >= self.max_crashes:
            raise GaveUp(f"{child.name} ended {len(child.crashes)} times within {self.window_s:.0f} s (last: "
                         f"{describe(status)}); stopping the brain{child.tail()}")
        pause = max(child.min_pause_s, BACKOFF_S[min(len(child.crashes) - 1, len(BACKOFF_S) - 1)])
        child.restart_at = now + pause
        last = child.tail(1).strip() if status > 0 else ""  # why it stopped, in its own words
        self.say(f"{child.name} ended ({describe(status)}{f': {last[:200]}' if last else ''}); restarting it"
                 + (f" in {pause:g} s" if pause else "") + f" ({len(child.crashes)} of {self.max_crashes} "
                 f"allowed within {self.window_s:.0f} s)")

    def _restart(self, child: Child) -> bool:
        if (proc := self._take_spare(child)) is not None:
            child.proc, child.started_at, child.restart_at = proc, time.monotonic(), None
            child.restarts += 1
            self.say(f"{child.name}: its spare took over (pid {proc.pid})")
            return True
        try:
            proc = self.start(child.name)
        except Exception as exc:  # could not even start: counts as a crash, tried again after the pause
            self.say(f"{child.name} could not be started: {exc}")
            self._ended(child, 1, time.monotonic())
            return False
        child.restarts += 1
        self.say(f"{child.name} started again (pid {proc.pid})")
        return True

    def stop(self, order: list[str], grace_s: float = 8.0) -> None:
        """SIGTERM in `order` (the rest after), then wait up to `grace_s`; SIGKILL what is left; then
        SIGKILL what is left of each child's process group (what it started and left behind)."""
        self.stopping = True
        names = [n for n in order if n in self.children] + [n for n in self.children if n not in order]
        groups = {}
        for child in self.children.values():  # a spare has nothing to finish
            if child.spare is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.spare.kill()
                _reap(child.spare, 1.0)
                child.spare = None
        for name in names:
            proc = self.children[name].proc
            if proc is not None and proc.poll() is None:
                groups[name] = _own_group(proc)
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in names:
            proc = self.children[name].proc
            if proc is not None:
                _reap(proc, max(0.1, deadline - time.monotonic()))
                self.children[name].proc = None
        for group in groups.values():
            if group is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)


def _own_group(proc: subprocess.Popen[bytes]) -> int | None:
    """The process group a child leads (started in a session of its own), else None."""
    try:
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return None
    return group if group == proc.pid else None


def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
