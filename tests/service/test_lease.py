"""The lease behind active-standby: one active instance; a standby takes over once the active stops
renewing, never while it merely could not see the renewals; a deposed active is fenced and stops;
an instance restarted under its own name takes its lease back at once."""

import asyncio

import pytest

from cncbrain import aio, lease
from cncbrain.bus import Bus
from cncbrain.lease import Lease, LeaseLost

TTL, RENEW = 1.0, 0.2


@pytest.fixture(autouse=True)
def no_lease_left():
    yield
    lease._held = None


async def kv_of(url, name):
    bus = await Bus.connect(url, name, ensure=False)
    return bus, await bus.kv(lease.bucket_of("scheduler"))


async def test_one_active_the_standby_takes_over_when_it_stops_renewing(nats_server):
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    a = Lease(kv_a, "scheduler", "a", TTL, RENEW)
    b = Lease(kv_b, "scheduler", "b", TTL, RENEW)
    assert await a.acquire()
    standby = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(3 * TTL)
    assert not standby.done()  # a renews: b waits
    a._task.cancel()  # a hangs (or is killed): no more renewals
    assert await asyncio.wait_for(standby, 5 * TTL)
    with pytest.raises(LeaseLost):
        a.check()  # its last renewal is too old to write
    # a comes back to life: its next renewal finds b's lease; it stops its process
    a._task = aio.background(a._keep(), "lease-a")
    await asyncio.wait_for(aio.fatal_event().wait(), 5 * TTL)
    assert not a.held and b.held
    await b.release()
    await bus_a.close()
    await bus_b.close()


async def test_a_supervisor_frees_the_lease_of_a_process_it_reaped_and_only_that_one(nats_server):
    """`up` reaped the active's process (it knows it is dead): freeing its lease hands over at once;
    a pid that does not hold the lease, or one on another host, frees nothing."""
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    a = Lease(kv_a, "scheduler", "a", 60.0, RENEW)  # a TTL no test waits out
    assert await a.acquire()
    a._task.cancel()  # killed: no more renewals
    standby = asyncio.ensure_future(Lease(kv_b, "scheduler", "b", 60.0, RENEW).acquire())
    await asyncio.sleep(0.5)
    import os

    assert await lease.release_dead(kv_b, os.getpid() + 1) == ""  # not the holder
    assert await lease.release_dead(kv_b, os.getpid(), host="elsewhere") == ""
    assert not standby.done()
    assert await lease.release_dead(kv_b, os.getpid()) == "a"
    assert await asyncio.wait_for(standby, 5.0)
    lease._held = None
    await bus_a.close()
    await bus_b.close()


async def test_a_release_hands_over_at_once_and_a_restart_under_the_same_name_takes_it_back(nats_server):
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    a = Lease(kv_a, "scheduler", "scheduler", TTL, RENEW)
    assert await a.acquire()
    a._task.cancel()  # killed without releasing
    again = Lease(kv_b, "scheduler", "scheduler", TTL, RENEW)  # the supervisor's restart, same name
    assert await asyncio.wait_for(again.acquire(), TTL / 2)
    other = Lease(kv_a, "scheduler", "scheduler-2", TTL, RENEW)
    waiting = asyncio.ensure_future(other.acquire())
    await asyncio.sleep(0.3)
    await again.release()
    assert await asyncio.wait_for(waiting, TTL)  # no TTL to wait out after a release
    await other.release()
    await bus_a.close()
    await bus_b.close()


async def test_a_nats_restart_does_not_hand_the_lease_over(nats_server):
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    a = Lease(kv_a, "scheduler", "a", TTL, RENEW)
    b = Lease(kv_b, "scheduler", "b", TTL, RENEW)
    assert await a.acquire()
    standby = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(TTL)
    nats_server.kill()
    await asyncio.sleep(2 * TTL)  # nobody renews, nobody sees anything
    nats_server.start()
    await asyncio.sleep(4 * TTL)  # a reconnects and renews before b has seen it stale for a TTL
    await still_active(a, standby, bus_a, bus_b)


class Link:
    """A lease bucket behind a link that goes away: while it is down a request waits until it is
    back (as nats-py holds a request while it reconnects) — a read answers what it read when it was
    asked, a renewal goes through `lag` seconds after the link is back."""

    def __init__(self, kv, up: asyncio.Event, lag: float = 0.0) -> None:
        self.kv, self.up, self.lag = kv, up, lag

    def __getattr__(self, name):
        return getattr(self.kv, name)

    async def get(self, key):
        entry = await self.kv.get(key)
        await self.up.wait()
        return entry

    async def update(self, key, value, last=None):
        if not self.up.is_set():
            await self.up.wait()
            await asyncio.sleep(self.lag)
        return await self.kv.update(key, value, last=last)


async def test_a_standby_read_held_through_an_outage_does_not_count_as_watching(nats_server):
    """A standby's read that waited out an outage answers the revision it saw before; the holder
    could not renew meanwhile either, so the wait is not a TTL without renewals: the holder's first
    renewal after the outage (a moment after the standby's answer) keeps the lease."""
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    up = asyncio.Event()
    up.set()
    a = Lease(Link(kv_a, up, lag=0.1), "scheduler", "a", TTL, RENEW)
    assert await a.acquire()
    standby = asyncio.ensure_future(Lease(Link(kv_b, up), "scheduler", "b", TTL, RENEW).acquire())
    await asyncio.sleep(TTL)
    up.clear()
    await asyncio.sleep(2 * TTL)
    up.set()
    await asyncio.sleep(2 * TTL)
    await still_active(a, standby, bus_a, bus_b)


async def still_active(a, standby, *buses) -> None:
    """`a` still holds the lease and may write, the standby still waits; then clean up."""
    assert a.held and not aio.fatal_event().is_set() and not standby.done()
    a.check()
    standby.cancel()
    await asyncio.gather(standby, return_exceptions=True)
    await a.release()
    for bus in buses:
        await bus.close()


class LosesReplies:
    """A lease bucket whose next `lose` renewals are written but never answered (a reply lost while
    a NATS node leaves or rejoins the cluster), or, with `send=False`, never even sent."""

    def __init__(self, kv, lose: int, send: bool = True) -> None:
        self.kv, self.lose, self.send = kv, lose, send

    def __getattr__(self, name):
        return getattr(self.kv, name)

    async def update(self, key, value, last=None):
        if self.lose:
            self.lose -= 1
            if self.send:
                await self.kv.update(key, value, last=last)
            await asyncio.sleep(3600)
        return await self.kv.update(key, value, last=last)


@pytest.mark.parametrize("send", [True, False], ids=["written-unanswered", "never-sent"])
async def test_a_renewal_whose_reply_is_lost_is_sent_again_within_the_ttl(nats_server, send):
    """One renewal that gets no answer must not keep the active from writing for the bus's request
    timeout (5 s, longer than the TTL): it is sent again after `attempt_s`; one that landed
    unanswered is recognised as this lease's own (not taken for another holder's), so the active
    neither stops nor loses its lease, and a writer waiting on the fence gets through."""
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    bus_b, kv_b = await kv_of(nats_server.url, "b")
    flaky = LosesReplies(kv_a, lose=0, send=send)
    a = Lease(flaky, "scheduler", "a", 3.0, 0.5)
    assert await a.acquire()
    standby = asyncio.ensure_future(Lease(kv_b, "scheduler", "b", 3.0, 0.5).acquire())
    for _ in range(3):
        await lease.wait_fence()
        flaky.lose = 1
        await asyncio.sleep(0.6)  # the next renewal goes out and its reply is lost
        await lease.wait_fence()  # a write waits for the renewal sent again, not for 5 s
    await asyncio.sleep(3.5)  # longer than the TTL: the standby still sees renewals
    await still_active(a, standby, bus_a, bus_b)


async def test_a_write_waits_for_a_renewal_under_way_but_not_for_a_lost_lease(nats_server):
    bus_a, kv_a = await kv_of(nats_server.url, "a")
    a = Lease(kv_a, "scheduler", "a", TTL, RENEW)
    assert await a.acquire()
    a.renewed_at -= TTL  # as if renewals had been held up: too old to write now
    with pytest.raises(LeaseLost):
        a.check()
    await lease.wait_fence()  # the next renewal (RENEW later) lets it through
    a.held = False  # lost: no renewal will come, no waiting
    with pytest.raises(LeaseLost):
        await lease.wait_fence(timeout_s=60)
    a._task.cancel()
    await bus_a.close()
