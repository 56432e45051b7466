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
    assert a.held and not standby.done()
    a.check()
    standby.cancel()
    await asyncio.gather(standby, return_exceptions=True)
    await a.release()
    await bus_a.close()
    await bus_b.close()
