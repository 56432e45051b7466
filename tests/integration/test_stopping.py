"""A service's background loop ends on stop() even when the cancel is dropped: on Python 3.11
`asyncio.wait_for` (which every nats-py request awaits) returns the result and drops a cancel that
lands in the turn its future completes (fixed in 3.12). The scheduler's placer and perception's
ticker also end on a stopping flag set before the cancel (as Governor.stop, test_governance_service)."""

import asyncio
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from services.perception.domain import PoolPicture
from services.perception.events import PerceptionEvents
from services.scheduler.coordinator import Coordinator
from services.scheduler.settings import Settings

from support.waiting import ended_within

pytestmark = pytest.mark.integration


async def test_the_placer_ends_although_a_wait_drops_the_cancel():
    co = Coordinator(SimpleNamespace(counters=Counter()), Settings(nats_url="nats://unused:4222"))
    co.waiting["w"] = SimpleNamespace(not_before=time.time() + 100)  # not due: wait_for with a timeout
    co._placer = asyncio.create_task(co._place_loop())
    await asyncio.sleep(0.05)  # idle: in wait_for(wake.wait(), ~100 s)
    loop = asyncio.get_running_loop()
    loop.call_soon(co.wake.set)  # the wait ends in the same turn as stop()'s cancel
    await ended_within(co.stop(), 5, co._placer)


async def test_the_perception_ticker_ends_although_a_nats_request_drops_the_cancel():
    events = PerceptionEvents(SimpleNamespace(counters=Counter()), PoolPicture(), tick_s=0.01)
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    in_request = asyncio.Event()

    async def tick_once():  # as a tick whose publish is a nats-py request -> wait_for
        if not reply.done():
            in_request.set()
            await asyncio.wait_for(reply, 30)

    events.tick_once = tick_once
    events._task = asyncio.create_task(events._ticker())
    await asyncio.wait_for(in_request.wait(), 5)
    loop.call_soon(reply.set_result, None)  # the reply lands in the same turn as stop()'s cancel
    await ended_within(events.stop(), 5, events._task)
