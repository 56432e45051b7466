"""Waiting for a condition in the tests that run servers."""

from __future__ import annotations

import asyncio
import inspect
import time


async def until(pred, timeout=20.0, what="condition", poll_s=0.1):
    """Check `pred()` every `poll_s` (awaited when it is a coroutine) until it returns something truthy
    (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(poll_s)


async def ended_within(stop, timeout_s, loop_task):
    """Run `stop` as a task; fail if it has not ended within `timeout_s` (not cancelling it: a
    cancelled stop() would cancel the loop task again and pass)."""
    stopping = asyncio.ensure_future(stop)
    await asyncio.wait({stopping}, timeout=timeout_s)
    hung = not stopping.done()
    if hung:  # clean up the task that missed its cancel
        loop_task.cancel()
        await asyncio.wait({stopping}, timeout=1)
    assert not hung, f"stop() still waiting after {timeout_s} s"
    assert loop_task.done()
