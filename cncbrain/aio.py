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

from cncbrain.errors import CncError

log = logging.getLogger(__name__)
T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for the standard loop (setting, or uvloop not installed)."""
    choice = os.environ.get("CNC_EVENT_LOOP", "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        raise CncError(f"CNC_EVENT_LOOP: {choice!r} is not one of uvloop, asyncio")
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
