"""Retention of ended workloads (`ended_retention_s`): an ended workload older than the period is
gone from the scheduler's record and from the `cnc-workloads` bucket (also for a restarted
scheduler and the bucket's followers); one that has not ended never is, however old; a bad value
is refused naming the variable."""

import asyncio
import time

import grpc
import nats.js.errors
import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import KV_WORKLOADS, subjects
from cncbrain.errors import UsageError
from cncbrain.kvfeed import KvFollower
from cncbrain.settings import load_settings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import DAY_S, Settings

from support.fake_agents import FakeAgents
from support.specs import chat_spec as service_spec
from support.specs import snapshot

RETENTION_S = 3600.0


async def start_scheduler(nats_server, bus):
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0, offer_timeout_s=0.3,
                                            retry_interval_s=0.1, ended_retention_s=RETENTION_S)).start()
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot({"a": 4}))
    await asyncio.wait_for(server.coordinator.sites_known.wait(), 5)
    return server


async def running(stub, server, name):
    w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
        service=service_spec(name=name)))).workload
    for _ in range(200):
        if server.coordinator.store.get(w.workload_id).state == spb.WORKLOAD_STATE_RUNNING:
            return w.workload_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not run")


async def test_an_ended_workload_past_its_retention_is_gone_and_a_running_one_stays(nats_server, bus):
    await FakeAgents(bus, {"a": 4}, {"a": 1}).start()

    async def site(ev):  # applies every placement at once
        await bus.publish(subjects.SITE_APPLIED, site_pb.PlacementApplied(placement=ev.payload.placement, ok=True),
                          site=ev.payload.placement.site_id)

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, site, consumer="test-retention-site")
    kv = await bus.kv(KV_WORKLOADS)
    seen: dict[str, bytes] = {}
    follower = KvFollower(kv, lambda e: seen.__setitem__(e.key, e.value), "test-follower")
    await follower.start()
    server = await start_scheduler(nats_server, bus)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        co = server.coordinator
        keep, end = await running(stub, server, "keep"), await running(stub, server, "end")
        await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=end))
        # not yet past the period: nothing goes
        assert await co.expire_ended(time.time() + RETENTION_S - 60) == []
        # a day past it: the ended one goes; the running one — older still — stays
        assert await co.expire_ended(time.time() + RETENTION_S + DAY_S) == [end]
        assert co.store.get(end) is None and end not in co.locks
        assert co.store.get(keep).state == spb.WORKLOAD_STATE_RUNNING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=end))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "kept 3600 s after its end" in err.value.details()
        listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest())).workloads
        assert [w.workload_id for w in listed] == [keep]
        with pytest.raises(nats.js.errors.KeyNotFoundError):  # KeyDeletedError is one
            await kv.get(end)
        assert (await kv.get(keep)).value
        for _ in range(100):  # a follower of the bucket sees the removal
            if not seen.get(end):
                break
            await asyncio.sleep(0.05)
        assert not seen.get(end) and seen.get(keep)
        # the removal's marker carries a TTL (the server drops it after MARKER_TTL_S)
        marker = await bus.js.get_last_msg(f"KV_{KV_WORKLOADS}", f"$KV.{KV_WORKLOADS}.{end}")
        assert marker.headers["KV-Operation"] == "PURGE" and marker.headers["Nats-TTL"]
        # nothing more to remove; the running one is never removed, however far the clock goes
        assert await co.expire_ended(time.time() + 3650 * DAY_S) == []
    finally:
        await channel.close()
        await server.stop()
        await follower.stop()
    # a restarted scheduler does not find it either
    server = await start_scheduler(nats_server, bus)
    try:
        assert server.coordinator.store.get(end) is None
        assert server.coordinator.store.get(keep).state == spb.WORKLOAD_STATE_RUNNING
    finally:
        await server.stop()


@pytest.mark.parametrize("value", ["-1", "0", "59", "nan", "inf", "1e12", "7d"])
def test_a_bad_retention_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("CNC_SCHEDULER_ENDED_RETENTION_S", value)
    with pytest.raises(UsageError, match="CNC_SCHEDULER_ENDED_RETENTION_S"):
        load_settings(Settings)


def test_the_default_keeps_an_ended_workload_a_week(monkeypatch):
    monkeypatch.delenv("CNC_SCHEDULER_ENDED_RETENTION_S", raising=False)
    assert load_settings(Settings).ended_retention_s == 7 * DAY_S
    monkeypatch.setenv("CNC_SCHEDULER_ENDED_RETENTION_S", "86400")
    assert load_settings(Settings).ended_retention_s == DAY_S


async def test_a_bucket_from_before_message_ttls_still_loses_the_record(nats_server, bus, caplog):
    """A `cnc-workloads` bucket created without per-message TTLs (an older brain's): the record is
    removed all the same, its marker stays (as a deleted key's always did), said once."""
    from nats.js import api

    await bus.js.delete_stream(f"KV_{KV_WORKLOADS}")
    await bus.js.add_stream(api.StreamConfig(name=f"KV_{KV_WORKLOADS}", subjects=[f"$KV.{KV_WORKLOADS}.>"],
                                             max_msgs_per_subject=1, allow_rollup_hdrs=True, deny_delete=True,
                                             storage=api.StorageType.FILE))
    bus._kv.pop(KV_WORKLOADS, None)
    await FakeAgents(bus, {"a": 4}, {"a": 1}).start()

    async def site(ev):
        await bus.publish(subjects.SITE_APPLIED, site_pb.PlacementApplied(placement=ev.payload.placement, ok=True),
                          site=ev.payload.placement.site_id)

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, site, consumer="test-retention-site-old")
    server = await start_scheduler(nats_server, bus)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        a, b = await running(stub, server, "one"), await running(stub, server, "two")
        for wid in (a, b):
            await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=wid))
        assert sorted(await server.coordinator.expire_ended(time.time() + RETENTION_S + 1)) == sorted([a, b])
        kv = await bus.kv(KV_WORKLOADS)
        for wid in (a, b):
            with pytest.raises(nats.js.errors.KeyNotFoundError):
                await kv.get(wid)
        assert caplog.text.count("does not allow message TTLs") == 1
    finally:
        await channel.close()
        await server.stop()
