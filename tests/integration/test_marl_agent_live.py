"""A site agent driven by the learned MARL policy (`--policy marl`) on the live path: real
nats-server, perception and scheduler; the agents' answers come from the numpy runtime over each
site's local view (itself, its k nearest neighbours, the pool-wide per-service summary)."""

import asyncio

import grpc
import numpy as np
import pytest

from agents.executor import MemoryExecutor
from agents.marl_site import MarlSitePolicy
from agents.site_agent import SiteAgent, make_site_policy
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2
from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.bus import Bus, subjects
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

pytestmark = pytest.mark.integration
# a line of five sites, 5 ms apart: each has neighbours nearer and farther
SITES = ("a", "b", "c", "d", "e")


def site_of(i: int) -> common.Site:
    site = common.Site(site_id=SITES[i], gpu_pools=[common.GpuPool(gpu_type="H100", count=16, hbm_gb=80)])
    for j, peer in enumerate(SITES):
        if j != i:
            site.links.append(common.Link(peer_site_id=peer, latency_ms=5.0 * abs(i - j), bandwidth_gbps=100))
    return site


def spec(name: str) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, trace="code", expected_rate_rps=2.0,
                                       slo=common.SloTargets(ttft_ms=500, tpot_ms=50), min_replicas=2,
                                       max_replicas=8, gpus_per_replica=1, ingress_site_id="c")


def test_local_view_holds_the_site_its_neighbours_and_the_rest_of_the_pool():
    policy = make_site_policy("marl")
    assert isinstance(policy, MarlSitePolicy) and policy.name == "marl"
    snap = perception_pb2.Snapshot(sequence=1)
    for i in range(len(SITES)):
        status = perception_pb2.SiteStatus(site=site_of(i), state=common.SITE_STATE_UP)
        status.gpu_pools.add(gpu_type="H100", count=16, used=2, hbm_gb=80)
        status.services.add(workload_id="svc-1", replicas=2, request_rate_rps=1.0, utilization=0.5)
        snap.sites.append(status)
    snap.services.add(workload_id="svc-1", replicas=10, request_rate_rps=5.0, requests=100, requests_ok=90)
    policy.book.learn("svc-1", spec("chat"))
    policy.snapshot = snap
    view, wids = policy.view(site_of(0), None, True)
    k = policy.k
    assert view.site_ids[: 1 + k] == ["a", "b", "c", "d"][: 1 + k] and view.site_ids[-1] == "_rest"
    assert wids == ["svc-1"]
    # pool-wide figures are those of the summary, whatever the view leaves out
    assert view.replicas[:, 0].sum() == 10 and np.isclose(view.demand_rps[:, 0].sum(), 5.0)
    assert np.isclose(view.slo_recent[0], 0.9)
    assert not view.site_up[-1] and view.total_gpus[-1].sum() == 0
    delta, accept = policy.decide(view)
    assert delta.shape == (1,) and delta[0] in (-1, 0, 1)


def test_policy_names():
    from agents.runtime import shipped_policy_path

    assert make_site_policy("greedy").name == "greedy"
    assert make_site_policy(f"marl:{shipped_policy_path()}").name == "marl"
    with pytest.raises(ValueError, match="marl:/nowhere"):
        make_site_policy("marl:/nowhere/policy.npz")
    with pytest.raises(ValueError, match="known: greedy, marl"):
        make_site_policy("oracle")


async def test_marl_driven_agents_place_a_deployment(nats_server):
    url = nats_server.url
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2)).start()
    scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=1.0)).start()
    bus = await Bus.connect(url, "agents")
    agents = []
    for i, sid in enumerate(SITES):
        agents.append(await SiteAgent(bus, sid, MemoryExecutor(site_of(i)), make_site_policy("marl"),
                                      heartbeat_s=0.2).start())
    watcher = await Bus.connect(url, "test")
    reasons: list[str] = []

    async def on_answer(ev):
        reasons.extend(p.reason for p in ev.payload.proposals)

    placed: list[pb.PlacementCommitted] = []

    async def on_placement(ev):
        placed.append(ev.payload)

    await watcher.subscribe(subjects.SITE_ANSWER, on_answer, consumer="test-answers")
    await watcher.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-placements")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        for _ in range(100):
            if len(scheduler.coordinator.ledger.up) == len(SITES):
                break
            await asyncio.sleep(0.1)
        w = (await stub.DeployInferenceService(pb.DeployInferenceServiceRequest(service=spec("chat")))).workload
        for _ in range(100):
            if any(m.placement.workload_id == w.workload_id for m in placed):
                break
            await asyncio.sleep(0.1)
        mine = [m.placement for m in placed if m.placement.workload_id == w.workload_id]
        assert sum(p.replicas for p in mine) == 2, placed
        stored = (await stub.GetWorkload(pb.GetWorkloadRequest(workload_id=w.workload_id))).workload
        assert stored.state in (pb.WORKLOAD_STATE_PLACED, pb.WORKLOAD_STATE_RUNNING)
        # every answer came from the learned policy, and each agent ran it
        assert reasons and all(r.startswith("marl") for r in reasons if r), reasons
        assert all(a.policy.name == "marl" and a.policy.decisions > 0 for a in agents)
        # the applied placement shows in the agents' telemetry → snapshot → the policies' view
        for _ in range(50):
            if any(s.workload_id == w.workload_id for s in (perception.events.latest.services if perception.events else [])):
                break
            await asyncio.sleep(0.1)
        assert any(s.workload_id == w.workload_id and s.replicas == 2 for s in perception.events.latest.services)
    finally:
        await channel.close()
        for a in agents:
            await a.stop()
        await bus.close()
        await watcher.close()
        await scheduler.stop()
        await perception.stop()
