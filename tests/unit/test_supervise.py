"""Supervision: a child that ends is restarted (at once, then after growing pauses), the others left
alone; one that keeps crashing, or cannot listen on its port, stops the supervisor with a message;
children die with a supervisor killed with SIGKILL, and stopping ends what they left behind."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cncbrain.supervise import EXIT_PORT_IN_USE, GaveUp, Supervisor


def python(code):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def poll_until(sup, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.poll()
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met")


def test_a_killed_child_is_restarted_and_the_others_left_alone():
    lines = []
    sup = Supervisor(say=lines.append)
    sup.add("emulator", python("import time; time.sleep(60)"))
    sup.add("agents", python("import time; time.sleep(60)"))
    sup.start_all()
    try:
        first, agents = sup.children["emulator"].proc.pid, sup.children["agents"].proc.pid
        sup.children["emulator"].proc.kill()
        poll_until(sup, lambda: sup.children["emulator"].proc is not None and sup.children["emulator"].proc.pid != first)
        assert lines[0] == "emulator ended (signal SIGKILL); restarting it (1 of 5 allowed within 60 s)"
        assert sup.children["emulator"].restarts == 1
        assert sup.children["agents"].restarts == 0 and sup.children["agents"].proc.pid == agents
    finally:
        sup.stop([])


def gone(pid, timeout=10.0):
    """Whether process `pid` has ended (a zombie nobody reaps counts) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_children_die_with_a_supervisor_killed_with_sigkill(tmp_path):
    """`up` killed with SIGKILL cannot stop its children (each in a session of its own): the kernel
    ends them (PR_SET_PDEATHSIG)."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
from pathlib import Path
from cncbrain.supervise import die_with_parent
child = subprocess.Popen(die_with_parent([sys.executable, "-c", "import time; time.sleep(120)"]),
                         start_new_session=True)
Path({str(pid_file)!r}).write_text(str(child.pid))
time.sleep(120)
"""])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert not gone(child, 0.5)
        parent.kill()
        assert gone(child), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_children_started_while_the_parent_is_busy_in_grpc_reach_their_exec(tmp_path):
    """`up` (and a benchmark driving it) restarts children from a thread while others are in gRPC
    calls. Started with a `preexec_fn`, a third of them died before their exec (gRPC's at-fork
    handlers crashing in the forked child: SIGABRT, SIGSEGV), each counted as a crash of the
    service; `die_with_parent` starts none that way."""
    code = """
import asyncio, os, subprocess, threading
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from cncbrain.supervise import die_with_parent

async def busy(port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            await stub.Check(health_pb2.HealthCheckRequest())

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    calls = [asyncio.ensure_future(busy(port)) for _ in range(4)]
    codes = []
    spawner = threading.Thread(target=lambda: codes.extend(
        subprocess.Popen(die_with_parent(["true"]), start_new_session=True).wait() for _ in range(40)))
    spawner.start()
    while spawner.is_alive():
        await asyncio.sleep(0.05)
    print("exit statuses", sorted(set(codes)), "failed", sum(1 for c in codes if c), flush=True)
    os._exit(0)

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "exit statuses [0] failed 0" in out.stdout, out.stdout + out.stderr[-2000:]


def test_stop_ends_what_a_child_left_behind_in_its_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"

    def start():  # a child in a session of its own that starts a grandchild and ignores SIGTERM
        return subprocess.Popen([sys.executable, "-c", f"""
import signal, subprocess, sys, time
from pathlib import Path
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
Path({str(pid_file)!r}).write_text(str(grandchild.pid))
time.sleep(120)
"""], start_new_session=True)

    sup = Supervisor()
    sup.add("agents", start)
    sup.start_all()
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    sup.stop([], grace_s=2.0)
    assert gone(grandchild), "stop left the child's own child running"


def test_a_child_that_keeps_crashing_stops_the_supervisor_with_its_name_and_log(tmp_path):
    lines = []
    log = tmp_path / "perception.log"

    def start():
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-c", "import sys; print('cannot reach NATS'); sys.exit(3)"],
                                    stdout=out)

    sup = Supervisor(max_crashes=3, window_s=120, say=lines.append)
    sup.add("perception", start, log)
    sup.start_all()
    with pytest.raises(GaveUp, match="perception ended 3 times within 120 s \\(last: exit status 3\\)") as err:
        poll_until(sup, lambda: False)
    assert "cannot reach NATS" in str(err.value)  # its last log lines
    assert lines[0] == ("perception ended (exit status 3: cannot reach NATS); restarting it "
                        "(1 of 3 allowed within 120 s)")
    assert lines[1].startswith("perception started again (pid ")
    assert lines[2] == ("perception ended (exit status 3: cannot reach NATS); restarting it in 0.25 s "
                        "(2 of 3 allowed within 120 s)")


def test_a_child_that_cannot_listen_is_not_restarted():
    sup = Supervisor()
    sup.add("governance", python(f"import sys; sys.exit({EXIT_PORT_IN_USE})"))
    sup.start_all()
    with pytest.raises(GaveUp, match="governance cannot listen on its port"):
        poll_until(sup, lambda: False)
    assert sup.children["governance"].restarts == 0


def test_a_warm_spare_takes_over_at_once_and_is_replaced(tmp_path, monkeypatch):
    """A child with a spare: the spare prepares and waits (serving nothing); when the child dies it
    takes its place (no new start-up), and a new spare follows. A spare that dies is replaced
    without touching the child; a child whose spare is gone too is started afresh; stop leaves none."""
    import cncbrain.supervise as supervise

    monkeypatch.setattr(supervise, "SPARE_AFTER_S", 0.2)
    code = f"""
import os, sys, time
from pathlib import Path
from cncbrain.supervise import is_spare, wait_to_take_over
if is_spare():
    Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}").touch()
    if not wait_to_take_over():
        sys.exit(0)
Path({str(tmp_path)!r}, f"serving-{{os.getpid()}}").touch()
time.sleep(60)
"""

    def start(spare=False):
        env = {**__import__("os").environ, **({supervise.SPARE_ENV: "1"} if spare else {})}
        return subprocess.Popen([sys.executable, "-c", code], env=env,
                                stdin=subprocess.PIPE if spare else None)

    lines = []
    sup = Supervisor(say=lines.append)
    child = sup.add("agents", start, spare=lambda: start(True))
    sup.start_all()
    try:
        first = child.proc.pid
        poll_until(sup, lambda: child.spare is not None and (tmp_path / f"ready-{child.spare.pid}").exists())
        spare = child.spare.pid
        assert not (tmp_path / f"serving-{spare}").exists()  # waiting, not serving
        child.proc.kill()
        poll_until(sup, lambda: child.proc is not None and child.proc.pid == spare)
        assert f"agents: its spare took over (pid {spare})" in lines and first != spare
        poll_until(sup, lambda: (tmp_path / f"serving-{spare}").exists())
        poll_until(sup, lambda: child.spare is not None and child.spare.pid != spare)
        second = child.spare
        second.kill()  # a spare that dies: the child goes on, another spare follows
        poll_until(sup, lambda: child.spare is not None and child.spare.pid != second.pid)
        assert child.proc.pid == spare and any("agents's spare ended (signal SIGKILL)" in x for x in lines)
        third = child.spare
        third.kill()  # child and spare dead at once: a fresh start
        third.wait()
        child.proc.kill()
        poll_until(sup, lambda: child.proc is not None and child.proc.pid not in (spare, second.pid, third.pid))
        assert lines[-1].startswith("agents started again")
        poll_until(sup, lambda: child.spare is not None and child.spare.poll() is None)
        last = child.spare
    finally:
        sup.stop([])
    assert last.poll() is not None and child.proc is None
