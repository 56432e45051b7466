"""Perception shows a tenant the pool's capacity but only its own workloads' details: another
tenant's services, jobs and forecasts are not in its sites, snapshots or answers."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.auth import bearer_metadata
from cncbrain.bus import KV_WORKLOADS, subjects

from support.tenants import enroll_a, tenant_with_token

pytestmark = pytest.mark.integration
OWNER = {"svc-lab": "lab", "svc-rival": "rival", "job-rival": "rival"}


async def test_a_tenant_sees_only_its_own_workloads_through_perception(brain, admin):
    servers, channels, operator = brain
    _, _, lab = await tenant_with_token(channels, operator, "lab", 4)
    await tenant_with_token(channels, operator, "rival", 4)
    kv = await admin.kv(KV_WORKLOADS)  # the scheduler's records say whose each workload is
    for wid, tenant in OWNER.items():
        w = spb.Workload(workload_id=wid)
        if wid.startswith("job"):
            w.training_job.CopyFrom(common.TrainingJobSpec(name=wid, tenant=tenant))
        else:
            w.inference_service.CopyFrom(common.InferenceServiceSpec(name=wid, tenant=tenant))
        await kv.put(wid, w.SerializeToString())
    await enroll_a(channels, operator)
    site = common.Site(site_id="a", gpu_pools=[common.GpuPool(gpu_type="H100", count=8, hbm_gb=80)])
    await admin.publish(subjects.SITE_REGISTERED, site_pb.SiteRegistered(site=site, agent_id="t"), site="a")
    telemetry = site_pb.SiteTelemetry(site_id="a", available=True, gpu_pools=site.gpu_pools, services=[
        site_pb.ServiceLoad(workload_id="svc-lab", replicas=1, request_rate_rps=1.0),
        site_pb.ServiceLoad(workload_id="svc-rival", replicas=3, request_rate_rps=9.0)],
        jobs=[site_pb.JobProgress(workload_id="job-rival", shards_running=2, progress=0.5)])
    stub = perception_pb2_grpc.PerceptionServiceStub(channels["perception"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # telemetry every 0.2 s until a snapshot carries it
        await admin.publish(subjects.SITE_TELEMETRY, telemetry, site="a")
        snap = (await stub.GetSnapshot(ppb.GetSnapshotRequest(), metadata=bearer_metadata(operator))).snapshot
        if snap.services and snap.sites and snap.sites[0].jobs:
            break
        await asyncio.sleep(0.2)
    assert {s.workload_id for s in snap.services} == {"svc-lab", "svc-rival"}  # the operator sees all

    md = bearer_metadata(lab.token)
    mine = (await stub.GetSnapshot(ppb.GetSnapshotRequest(), metadata=md)).snapshot
    assert [s.workload_id for s in mine.services] == ["svc-lab"]
    assert [s.workload_id for s in mine.sites[0].services] == ["svc-lab"] and not mine.sites[0].jobs
    assert [p.count for p in mine.sites[0].gpu_pools] == [8]  # the pool's capacity stays visible
    for listed in ((await stub.ListSites(ppb.ListSitesRequest(), metadata=md)).sites,
                   [(await stub.GetSite(ppb.GetSiteRequest(site_id="a"), metadata=md)).site]):
        assert [s.workload_id for s in listed[0].services] == ["svc-lab"] and not listed[0].jobs
    watch = stub.WatchSnapshots(ppb.WatchSnapshotsRequest(), metadata=md)
    first = await asyncio.wait_for(watch.read(), 5)
    watch.cancel()
    assert {s.workload_id for s in first.snapshot.services} <= {"svc-lab"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetForecast(ppb.GetForecastRequest(workload_id="svc-rival"), metadata=md)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # as if it did not exist
