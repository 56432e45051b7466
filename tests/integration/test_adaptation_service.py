"""AdaptationService against a real nats-server and its real gRPC server. The scheduler's record
(KV `cnc-workloads`), perception's events and governance's projections are written by the test, so
each reaction can be forced and checked: recovery within policy, guardrails, planning, auth."""

import asyncio
import json

import grpc
import pytest

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.adaptation.v1 import adaptation_pb2_grpc
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain.auth import TOKENS_BUCKET, token_interceptors
from cncbrain.bus import KV_WORKLOADS, subjects
from cncbrain.bus.streams import KV_GOVERNANCE
from cncbrain.identity import Role, mint_token
from services.adaptation.server import AdaptationServer
from services.adaptation.settings import Settings

pytestmark = pytest.mark.integration

LINKS = {"a": {"b": 5.0, "c": 40.0}, "b": {"a": 5.0, "c": 35.0}, "c": {"a": 40.0, "b": 35.0}}


def snapshot(seq=1, down=(), loads=()):
    snap = ppb.Snapshot(sequence=seq, sim_time_s=seq * 10.0)
    for sid in "abc":
        site = common.Site(site_id=sid, region="eu" if sid != "c" else "us",
                           gpu_pools=[common.GpuPool(gpu_type="H100", count=8, price_usd_per_hour=4.0)],
                           links=[common.Link(peer_site_id=p, latency_ms=ms, bandwidth_gbps=10)
                                  for p, ms in LINKS[sid].items()])
        status = ppb.SiteStatus(site=site, state=common.SITE_STATE_DOWN if sid in down else common.SITE_STATE_UP)
        for wid, rate, requests, ok in loads:
            if sid == "a":
                status.services.append(ppb.cnc_dot_site_dot_v1_dot_events__pb2.ServiceLoad(
                    workload_id=wid, request_rate_rps=rate, requests=requests, requests_ok=ok))
        snap.sites.append(status)
    return snap


def service(wid="svc1", tenant="acme", replicas=3, site="a", ingress="b", lo=1, hi=8):
    spec = common.InferenceServiceSpec(name=wid, model="7b", params_b=7, min_replicas=lo, max_replicas=hi,
                                       gpus_per_replica=1, tenant=tenant, ingress_site_id=ingress)
    w = spb.Workload(workload_id=wid, kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, state=spb.WORKLOAD_STATE_RUNNING,
                     inference_service=spec, generation=1)
    w.placements.append(common.Placement(workload_id=wid, kind=w.kind, site_id=site, replicas=replicas,
                                         gpu_type="H100", gpus_per_unit=1, generation=1))
    return w


class Harness:
    def __init__(self, bus):
        self.bus = bus
        self.actions: list[apb.AdaptationAction] = []
        self.got = asyncio.Event()

    async def on_action(self, ev):
        self.actions.append(ev.payload)
        self.got.set()

    async def wait(self, n=1, timeout=5.0):
        async def enough():
            while len(self.actions) < n:
                self.got.clear()
                await self.got.wait()
        await asyncio.wait_for(enough(), timeout)
        return self.actions


@pytest.fixture
async def world(nats_server, bus):
    operator, op_rec = mint_token(Role.OPERATOR, None)
    tenant, t_rec = mint_token(Role.TENANT, "acme")
    tokens = await bus.kv(TOKENS_BUCKET)
    await tokens.put(op_rec.token_id, op_rec.to_json())
    await tokens.put(t_rec.token_id, t_rec.to_json())
    gov = await bus.kv(KV_GOVERNANCE)
    await gov.put("tenant.acme", json.dumps({"quota": {}, "policy": {"allowed_sites": ["b", "c"]}}).encode())
    await gov.put("tenant.residency", json.dumps({"quota": {}, "policy": {"allowed_regions": ["us"]}}).encode())
    wl = await bus.kv(KV_WORKLOADS)
    for w in (service(), service("svc2", tenant="residency", replicas=2)):
        await wl.put(w.workload_id, w.SerializeToString())
    server = await AdaptationServer(Settings(nats_url=nats_server.url, grpc_port=0, guardrails_enabled=False)).start()
    h = Harness(bus)
    await bus.subscribe(subjects.ADAPTATION_ACTION, h.on_action, consumer="test-actions")
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot())
    for _ in range(100):
        if server.adapter.snapshot is not None and server.gate.sites:
            break
        await asyncio.sleep(0.02)
    channels = []

    def stub(token):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=token_interceptors(token))
        channels.append(ch)
        return adaptation_pb2_grpc.AdaptationServiceStub(ch)

    yield server, h, stub, operator, tenant
    for ch in channels:
        await ch.close()
    await server.stop()


async def test_site_down_replaces_replicas_within_each_tenants_policy(world, bus):
    server, h, stub, operator, _ = world
    await bus.publish(subjects.PERCEPTION_SITE_STATE, ppb.SiteStateChanged(
        site_id="a", state=common.SITE_STATE_DOWN, reason="no heartbeat"), site="a")
    actions = {a.workload_id: a for a in await h.wait(2)}
    a1 = actions["svc1"]
    assert a1.kind == apb.ACTION_KIND_REPLACE_REPLICAS and a1.site_id == "a" and a1.base_generation == 1
    placed = {p.site_id: p.replicas for p in a1.placements}
    assert placed == {"a": 0, "b": 3}  # nearest to the ingress, inside acme's sites
    assert "site a is down" in a1.reason
    a2 = actions["svc2"]
    assert {p.site_id: p.replicas for p in a2.placements} == {"a": 0, "c": 2}  # the only US site
    # Listed, filterable, and not planned twice while the scheduler has not applied it.
    listed = await stub(operator).ListActions(apb.ListActionsRequest(site_id="a"))
    assert {a.workload_id for a in listed.actions} == {"svc1", "svc2"}
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot(2, down="a"))
    await asyncio.sleep(0.3)
    assert len(h.actions) == 2


async def test_tenant_sees_only_its_own_actions_and_policies(world, bus):
    server, h, stub, operator, tenant = world
    await bus.publish(subjects.PERCEPTION_SITE_STATE, ppb.SiteStateChanged(
        site_id="a", state=common.SITE_STATE_DOWN), site="a")
    await h.wait(2)
    mine = await stub(tenant).ListActions(apb.ListActionsRequest())
    assert [a.workload_id for a in mine.actions] == ["svc1"]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(tenant).GetAutoscalingPolicy(apb.GetAutoscalingPolicyRequest(workload_id="svc2"))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(None).ListActions(apb.ListActionsRequest())
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(tenant).TriggerRebalance(apb.TriggerRebalanceRequest())
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_autoscaling_policy_round_trip_and_validation(world):
    server, h, stub, operator, tenant = world
    got = await stub(tenant).GetAutoscalingPolicy(apb.GetAutoscalingPolicyRequest(workload_id="svc1"))
    assert not got.explicit and got.policy.max_replicas == 8  # from the service's spec
    new = apb.AutoscalingPolicy(min_replicas=2, max_replicas=5, enabled=True)
    await stub(tenant).SetAutoscalingPolicy(apb.SetAutoscalingPolicyRequest(workload_id="svc1", policy=new))
    got = await stub(tenant).GetAutoscalingPolicy(apb.GetAutoscalingPolicyRequest(workload_id="svc1"))
    assert got.explicit and (got.policy.min_replicas, got.policy.max_replicas) == (2, 5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(tenant).SetAutoscalingPolicy(apb.SetAutoscalingPolicyRequest(
            workload_id="svc1", policy=apb.AutoscalingPolicy(min_replicas=6, max_replicas=2)))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "replica bounds" in info.value.details()


async def test_guardrails_scale_up_on_a_breach_with_the_reason(world, bus):
    server, h, stub, operator, _ = world
    server.settings.guardrails_enabled = True
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot(5, loads=[("svc1", 20.0, 200, 40)]))
    (action,) = [a for a in await h.wait(1) if a.workload_id == "svc1"]
    assert action.kind == apb.ACTION_KIND_EMERGENCY_SCALE_UP
    assert action.from_replicas == 3 and action.to_replicas > 3
    assert "SLO attainment 20%" in action.reason
    assert all(p.site_id in ("a", "b", "c") for p in action.placements)


async def test_plan_parallelism_over_grpc(world):
    server, h, stub, operator, tenant = world
    s = stub(tenant)
    resp = await s.PlanParallelism(apb.PlanParallelismRequest(
        kind=apb.PLAN_KIND_INFERENCE, model="70b", gpus=[apb.GpuGroup(site_id="x", gpu_type="L40S", count=2)]))
    (plan,) = resp.inference
    assert plan.precision == "fp8" and plan.tensor_parallel == 2 and "do not fit" in plan.reason
    resp = await s.PlanParallelism(apb.PlanParallelismRequest(kind=apb.PLAN_KIND_TRAINING, model="7b"))
    assert resp.training[0].gpus_used >= 1  # planned on the free GPUs of the pool
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.PlanParallelism(apb.PlanParallelismRequest(kind=apb.PLAN_KIND_TRAINING, model="nope"))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.PlanParallelism(apb.PlanParallelismRequest(
            kind=apb.PLAN_KIND_INFERENCE, model="70b", gpus=[apb.GpuGroup(gpu_type="T4", count=1)]))
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
