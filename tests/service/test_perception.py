"""PerceptionService against a real nats-server and a real gRPC server, fed by the test as the
site agents would feed it."""

import asyncio

import grpc
import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import subjects
from services.perception.domain import HoltForecaster
from services.perception.server import PerceptionServer
from services.perception.settings import Settings


@pytest.fixture
async def perception(nats_server):
    server = await PerceptionServer(Settings(nats_url=nats_server.url, grpc_port=0, tick_s=0.1,
                                             heartbeat_timeout_s=0.5)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, perception_pb2_grpc.PerceptionServiceStub(channel)
    await channel.close()
    await server.stop()


async def register(bus, sid):
    site = common.Site(site_id=sid, name=sid.upper(), region="us",
                       gpu_pools=[common.GpuPool(gpu_type="A100-80GB", count=8)])
    await bus.publish(subjects.SITE_REGISTERED, site_pb.SiteRegistered(site=site, agent_id="t"), site=sid)


async def eventually(fn, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await fn()
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_sites_register_go_down_without_heartbeat_and_come_back(perception, bus):
    server, stub = perception
    changes = []

    async def on_change(ev):
        changes.append((ev.params["site"], ev.payload.state))

    await bus.subscribe(subjects.PERCEPTION_SITE_STATE, on_change, consumer="t-changes", replay=True)
    await register(bus, "east")
    await register(bus, "west")

    async def both_listed():
        sites = (await stub.ListSites(ppb.ListSitesRequest())).sites
        assert [s.site.site_id for s in sites] == ["east", "west"]

    await eventually(both_listed)
    for _ in range(15):  # east keeps beating, west is silent
        await bus.publish(subjects.SITE_HEARTBEAT, site_pb.Heartbeat(site_id="east"), site="east")
        await asyncio.sleep(0.1)

    async def west_down():
        down = (await stub.ListSites(ppb.ListSitesRequest(state=common.SITE_STATE_DOWN))).sites
        assert [s.site.site_id for s in down] == ["west"]

    await eventually(west_down)
    await bus.publish(subjects.SITE_HEARTBEAT, site_pb.Heartbeat(site_id="west"), site="west")

    async def west_up():
        site = (await stub.GetSite(ppb.GetSiteRequest(site_id="west"))).site
        assert site.state == common.SITE_STATE_UP

    await eventually(west_up)
    await eventually(lambda: _assert(("west", common.SITE_STATE_UP) in changes[2:]))
    assert ("west", common.SITE_STATE_DOWN) in changes
    assert ("east", common.SITE_STATE_DOWN) not in changes


async def _assert(cond):
    assert cond


async def test_snapshot_watch_and_forecast_from_telemetry(perception, bus):
    server, stub = perception
    await register(bus, "east")
    await eventually(lambda: _assert("east" in server.picture.sites))
    stream = stub.WatchSnapshots(ppb.WatchSnapshotsRequest())
    for rate in (10.0, 12.0, 14.0, 16.0):
        t = site_pb.SiteTelemetry(site_id="east", gpu_utilization=0.5,
                                  services=[site_pb.ServiceLoad(workload_id="svc-1", replicas=2, request_rate_rps=rate)])
        await bus.publish(subjects.SITE_TELEMETRY, t, site="east")
        await bus.publish(subjects.SITE_HEARTBEAT, site_pb.Heartbeat(site_id="east"), site="east")
        await asyncio.sleep(0.12)
    seqs = []
    async for resp in stream:
        seqs.append(resp.snapshot.sequence)
        if len(seqs) == 3:
            break
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    snap = (await stub.GetSnapshot(ppb.GetSnapshotRequest())).snapshot
    assert snap.sites[0].services[0].workload_id == "svc-1" and snap.sites_up == 1
    f = (await stub.GetForecast(ppb.GetForecastRequest(workload_id="svc-1", horizon_ticks=3))).forecast
    assert len(f.predicted_rps) == 3 and f.predicted_rps[2] > f.predicted_rps[0] > 10  # rising trend
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetForecast(ppb.GetForecastRequest(workload_id="svc-unknown"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSite(ppb.GetSiteRequest(site_id="nowhere"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_restart_remembers_registered_sites(nats_server, bus):
    settings = Settings(nats_url=nats_server.url, grpc_port=0, tick_s=0.1)
    first = await PerceptionServer(settings).start()
    await register(bus, "north")
    await eventually(lambda: _assert("north" in first.picture.sites))
    await first.stop()
    second = await PerceptionServer(settings).start()
    try:
        assert "north" in second.picture.sites
    finally:
        await second.stop()


async def test_a_garbled_site_record_is_skipped_with_its_key_named(nats_server, bus, caplog):
    settings = Settings(nats_url=nats_server.url, grpc_port=0, tick_s=0.1)
    first = await PerceptionServer(settings).start()
    await register(bus, "north")
    await eventually(lambda: _assert("north" in first.picture.sites))
    await first.stop()
    kv = await bus.kv("cnc-sites")
    await kv.put("south", b"\xff\x00 not a site")
    second = await PerceptionServer(settings).start()
    try:
        assert "north" in second.picture.sites and "south" not in second.picture.sites
        assert "south" in caplog.text and (await kv.get("south")).value == b"\xff\x00 not a site"
    finally:
        await second.stop()


def test_holt_follows_a_ramp_and_never_goes_negative():
    f = HoltForecaster(0.5, 0.3)
    for x in range(0, 100, 10):
        f.update(float(x))
    assert 90 < f.predict(1)[0] < 110
    g = HoltForecaster(0.9, 0.9)
    for x in (100.0, 50.0, 0.0, 0.0):
        g.update(x)
    assert min(g.predict(10)) == 0.0
    with pytest.raises(ValueError):
        HoltForecaster(0.0, 0.5)
