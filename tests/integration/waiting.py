"""Polling helper of the integration tests (imported as `waiting`: pytest puts this folder on the path)."""

from __future__ import annotations

import asyncio
import time


async def until(pred, timeout=20.0, what="condition", poll_s=0.1):
    """Await `pred()` every `poll_s` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await pred()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(poll_s)
