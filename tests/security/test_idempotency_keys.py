"""A tenant's idempotency key (`request_id`) is its own: another tenant using the same key gets its
own workload — it can neither learn that the key was used nor take it first and lock the owner out."""

from __future__ import annotations

import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import bearer_metadata

from support.specs import chat_spec
from support.tenants import one_site_pool, tenant_with_token

pytestmark = pytest.mark.integration


async def test_two_tenants_with_the_same_request_id_each_get_their_own_workload(brain, admin):
    servers, channels, operator = brain
    _, _, lab = await tenant_with_token(channels, operator, "lab", 8)
    _, _, rival = await tenant_with_token(channels, operator, "rival", 8)
    await one_site_pool(admin, channels, operator, servers["scheduler"])
    sched = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])

    async def deploy(issued) -> spb.Workload:
        return (await sched.DeployInferenceService(spb.DeployInferenceServiceRequest(
            service=chat_spec(), request_id="deploy-chat-1"), metadata=bearer_metadata(issued.token))).workload

    first = await deploy(rival)  # rival takes lab's predictable key first
    mine = await deploy(lab)
    assert mine.workload_id != first.workload_id and mine.inference_service.tenant == "lab"
    again = await deploy(lab)  # and the key still does its job for each: a retry is the same workload
    assert again.workload_id == mine.workload_id
    assert (await deploy(rival)).workload_id == first.workload_id
