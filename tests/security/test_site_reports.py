"""A site speaks for its own work only. Its identity may publish on its own subjects alone (the
server's permissions), and a placement report there counts only for a placement at that site: a
site cannot fail or start another site's workload by naming it in a report on its own subject."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from agents.executor import MemoryExecutor
from agents.site_agent import SiteAgent
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.auth import bearer_metadata
from cncbrain.bus import Bus
from cncbrain.bus.envelope import make_headers
from cncbrain.bus.permissions import site_identity

from support.nats_probe import round_trip
from support.tenants import enroll_a, tenant_with_token

pytestmark = pytest.mark.integration


async def publish_as(client, subject: str, message) -> None:
    await client.nc.publish(subject, message.SerializeToString(), headers=make_headers(message))
    await round_trip(client.nc)


class HeldSite(MemoryExecutor):
    """Site a's executor: it applies a placement only once the test lets it."""

    def __init__(self, site: common.Site) -> None:
        super().__init__(site)
        self.go = asyncio.Event()

    async def apply(self, placement):
        await self.go.wait()
        return await super().apply(placement)


async def test_a_site_cannot_fail_or_start_a_workload_placed_at_another_site(brain, admin, attacker, secure_nats,
                                                                           secrets):
    servers, channels, operator = brain
    _, _, lab = await tenant_with_token(channels, operator, "lab", 8)
    await enroll_a(channels, operator)
    executor = HeldSite(common.Site(site_id="a", region="us", gpu_pools=[
        common.GpuPool(gpu_type="H100", count=8, hbm_gb=80, price_usd_per_hour=4.0)]))
    bus = await Bus.connect(secure_nats.url, "agent-a", identity=site_identity("a"), secrets_dir=secrets, ensure=False)
    agent = await SiteAgent(bus, "a", executor, heartbeat_s=0.2).start()
    try:
        sched = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])
        md = bearer_metadata(lab.token)
        spec = common.InferenceServiceSpec(name="chat", model="7b", params_b=7, min_replicas=1, max_replicas=1,
                                           gpus_per_replica=1, slo=common.SloTargets(ttft_ms=500, tpot_ms=50),
                                           allowed_gpu_types=["H100"])

        async def record(wid: str) -> spb.Workload:
            return (await sched.GetWorkload(spb.GetWorkloadRequest(workload_id=wid), metadata=md)).workload

        deadline = time.monotonic() + 20
        wid = ""
        while time.monotonic() < deadline:  # perception's first snapshot with site a may still be coming
            if not wid:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    wid = (await sched.DeployInferenceService(spb.DeployInferenceServiceRequest(
                        service=spec, request_id="chat-1"), metadata=md)).workload.workload_id
            if wid and (w := await record(wid)).state == spb.WORKLOAD_STATE_PLACED:
                break
            await asyncio.sleep(0.2)
        assert w.state == spb.WORKLOAD_STATE_PLACED and [p.site_id for p in w.placements] == ["a"]
        at_a = w.placements[0]
        co = servers["scheduler"].coordinator
        b = await attacker("site-b")
        seen = co.counters["apply_failed"]
        # b, on its own subject, says a gave up on the workload, then that a runs it
        await publish_as(b, "cnc.site.b.applied", site_pb.PlacementApplied(
            placement=at_a, ok=False, failed=True, error="forged by b"))
        await publish_as(b, "cnc.site.b.applied", site_pb.PlacementApplied(placement=at_a, ok=True))
        forged = common.Placement()
        forged.CopyFrom(at_a)
        forged.site_id = "b"  # and that it runs it itself
        await publish_as(b, "cnc.site.b.applied", site_pb.PlacementApplied(placement=forged, ok=True))
        deadline = time.monotonic() + 5
        while ((w := await record(wid)).state == spb.WORKLOAD_STATE_PLACED and co.counters["applied_refused"] < 2
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # b's third report has been handled too (the scheduler takes them in order)
        assert (await record(wid)).state == spb.WORKLOAD_STATE_PLACED, w.message
        assert co.counters["applied_refused"] == 2  # the two naming a; b's own report is about no placement at b
        assert co.counters["apply_failed"] == seen

        executor.go.set()  # the site that holds it is heard
        deadline = time.monotonic() + 10
        while (w := await record(wid)).state != spb.WORKLOAD_STATE_RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert w.state == spb.WORKLOAD_STATE_RUNNING
    finally:
        executor.go.set()
        await agent.stop()
        await bus.close()
