"""WatchWorkloads: a tenant follows every event of its own workloads over gRPC, never another
tenant's, and resumes after the last sequence it saw without losing or repeating one."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import bearer_metadata

from support.tenants import one_site_pool, tenant_with_token

pytestmark = pytest.mark.integration


def service(name: str) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, min_replicas=1, max_replicas=1,
                                       gpus_per_replica=1, slo=common.SloTargets(ttft_ms=500, tpot_ms=50),
                                       allowed_gpu_types=["H100"])


async def read(stream, n: int, timeout_s: float = 10.0) -> list[spb.WatchWorkloadsResponse]:
    out = []
    while len(out) < n:
        out.append(await asyncio.wait_for(stream.read(), timeout_s))
    return out


async def test_a_tenant_watches_only_its_own_workloads_and_resumes_after_a_sequence(brain, admin):
    servers, channels, operator = brain
    _, _, lab = await tenant_with_token(channels, operator, "lab", 8)
    _, _, rival = await tenant_with_token(channels, operator, "rival", 8)
    await one_site_pool(admin, channels, operator, servers["scheduler"])
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])
    mine, theirs = bearer_metadata(lab.token), bearer_metadata(rival.token)
    w1 = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service("one")),
                                            metadata=mine)).workload
    other = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service("two")),
                                               metadata=theirs)).workload
    await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=other.workload_id), metadata=theirs)
    await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w1.workload_id), metadata=mine)

    watch = stub.WatchWorkloads(spb.WatchWorkloadsRequest(), metadata=mine)
    seen = await read(watch, 2)  # ACCEPTED (no site answers offers here), CANCELLED
    watch.cancel()
    assert {r.event.workload_id for r in seen} == {w1.workload_id}
    assert [r.event.kind for r in seen] == [spb.WORKLOAD_EVENT_KIND_ACCEPTED, spb.WORKLOAD_EVENT_KIND_CANCELLED]
    assert seen[0].sequence < seen[1].sequence

    # resume after the first: the rest, and then live events of a new workload; never the rival's
    resumed = stub.WatchWorkloads(spb.WatchWorkloadsRequest(after_sequence=seen[0].sequence), metadata=mine)
    assert [r.sequence for r in await read(resumed, 1)] == [seen[1].sequence]
    w2 = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service("three")),
                                            metadata=mine)).workload
    await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service("four")), metadata=theirs)
    await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w2.workload_id), metadata=mine)
    live = await read(resumed, 2)
    resumed.cancel()
    assert [r.event.workload_id for r in live] == [w2.workload_id, w2.workload_id]

    operator_view = stub.WatchWorkloads(spb.WatchWorkloadsRequest(), metadata=bearer_metadata(operator))
    everything = await read(operator_view, 5)
    operator_view.cancel()
    assert other.workload_id in {r.event.workload_id for r in everything}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await read(stub.WatchWorkloads(spb.WatchWorkloadsRequest()), 1)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
