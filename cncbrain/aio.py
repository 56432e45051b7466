"""The event loop of every process of the brain (services, site agents, emulator, CLI, benchmarks).

`run(coro)` runs a coroutine to completion on uvloop (libuv's event loop) when it is installed,
else on the standard asyncio loop; `CNC_EVENT_LOOP=asyncio` forces the standard one (to compare,
or where uvloop misbehaves). Every hop of the deploy path is an event-loop wake-up, a socket read
and a write in some process, and uvloop does those with less Python. What it buys end to end is
measured with `CNC_EVENT_LOOP=asyncio` against the default (docs/live-brain.md, fourth pass).

grpc.aio and nats-py both run on it unchanged. Tests keep pytest-asyncio's standard loop, so both
loops are exercised.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cncbrain.errors import CncError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for the standard loop (setting, or uvloop not installed)."""
    choice = os.environ.get("CNC_EVENT_LOOP", "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        raise UsageError(f"CNC_EVENT_LOOP: {choice!r} is not one of uvloop, asyncio")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    return "uvloop" if loop_factory() is not None else "asyncio"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` on the brain's event loop (see the module docstring)."""
    try:
        factory = loop_factory()
    except CncError:
        coro.close()  # never started: no "coroutine was never awaited" warning beside the message
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# --- background tasks that must not die silently ------------------------------------------------

_fatal: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}


def fatal_event() -> asyncio.Event:
    """Set when a `background` task of this process (this event loop) died of an exception: the
    process's main coroutine waits on it beside its stop signal and ends with a non-zero status
    (`cncbrain.grpcserver.wait_for_stop`), so a supervisor restarts it instead of it running on
    without the task."""
    loop = asyncio.get_running_loop()
    event = _fatal.get(loop)
    if event is None:
        for old in [lp for lp in _fatal if lp.is_closed()]:
            del _fatal[old]
        event = _fatal[loop] = asyncio.Event()
    return event


def background(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Run `coro` as a task that lives as long as its process. Its loop must handle its own errors
    (log and go on); an exception that still ends it is logged as CRITICAL with its traceback and
    takes the process down (`fatal_event`). Ending by returning or by a cancel is normal."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    fatal = fatal_event()

    def ended(t: asyncio.Task[Any]) -> None:
        if t.cancelled() or t.exception() is None:
            return
        exc = t.exception()
        log.critical("background task %s died: %r; stopping the process", name, exc, exc_info=exc)
        fatal.set()

    task.add_done_callback(ended)
    return task


def settle(future: asyncio.Future[T], result: T | None = None, exc: BaseException | None = None) -> bool:
    """Resolve `future` with `exc` or `result` unless it is resolved already — e.g. cancelled by a
    caller that gave up waiting (a gRPC deadline). Returns whether it was resolved here."""
    if future.done():
        return False
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
    return True
