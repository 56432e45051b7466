"""A site agent driven by the learned MARL policy (`--policy marl`) on the live path: real
nats-server, perception and scheduler; the agents' answers come from the numpy runtime over each
site's local view (itself, its k nearest neighbours, the pool-wide per-service summary)."""

import asyncio
import contextlib
import types

import grpc
import numpy as np
import pytest

from agents.executor import MemoryExecutor, units
from agents.marl_site import MarlSitePolicy
from agents.runtime import shipped_policy_path
from agents.site_agent import SiteAgent
from agents.site_policies import make_site_policy
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import Bus, subjects
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

from support.line_pool import line_site

pytestmark = pytest.mark.integration
# a line of five sites, 5 ms apart: each has neighbours nearer and farther
SITES = ("a", "b", "c", "d", "e")


def site_of(i: int) -> common.Site:
    return line_site(SITES, i)


def spec(name: str) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, trace="code", expected_rate_rps=2.0,
                                       slo=common.SloTargets(ttft_ms=500, tpot_ms=50), min_replicas=2,
                                       max_replicas=8, gpus_per_replica=1, ingress_site_id="c")

@contextlib.asynccontextmanager
async def live_line(url: str, policy_name: str = "marl", weights: dict[str, float] | None = None):
    """Perception, a scheduler and an agent per site of the line (`policy_name`, ingress `weights`),
    a watcher's bus and a scheduler stub; everything stopped on the way out."""
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2)).start()
    scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=1.0)).start()
    bus = await Bus.connect(url, "agents")
    agents = []
    for i, sid in enumerate(SITES):
        site = site_of(i)
        site.ingress_weight = (weights or {}).get(sid, site.ingress_weight)
        agents.append(await SiteAgent(bus, sid, MemoryExecutor(site), make_site_policy(policy_name),
                                      heartbeat_s=0.2).start())
    watcher = await Bus.connect(url, "test")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    try:
        yield types.SimpleNamespace(perception=perception, scheduler=scheduler, agents=agents, watcher=watcher,
                                    stub=scheduler_pb2_grpc.SchedulerServiceStub(channel))
    finally:
        await channel.close()
        for a in agents:
            await a.stop()
        await bus.close()
        await watcher.close()
        await scheduler.stop()
        await perception.stop()



def test_local_view_holds_the_site_its_neighbours_and_the_rest_of_the_pool():
    policy = make_site_policy("marl")
    assert isinstance(policy, MarlSitePolicy) and policy.name == "marl"
    snap = ppb.Snapshot(sequence=1)
    for i in range(len(SITES)):
        status = ppb.SiteStatus(site=site_of(i), state=common.SITE_STATE_UP)
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


def _pool_snapshot() -> ppb.Snapshot:
    snap = ppb.Snapshot(sequence=1)
    for i in range(len(SITES)):
        status = ppb.SiteStatus(site=site_of(i), state=common.SITE_STATE_UP)
        status.gpu_pools.add(gpu_type="H100", count=16, used=2 + i, hbm_gb=80)
        if i % 2 == 0:
            status.services.add(workload_id="svc-1", replicas=2, request_rate_rps=1.0 + i, utilization=0.3 * i)
        snap.sites.append(status)
    snap.services.add(workload_id="svc-1", replicas=6, request_rate_rps=9.0, requests=100, requests_ok=80)
    return snap


def _offers() -> list[spb.Offer]:
    offers = []
    for n in range(3):
        offer = spb.Offer(offer_id=f"o{n}", workload_id=f"svc-new{n}", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE,
                         units=2, gpus_per_unit=1)
        offer.inference_service.CopyFrom(spec(f"new{n}"))
        offers.append(offer)
    return offers


def test_sites_of_one_process_answer_a_round_together_as_each_would_alone():
    """The batched path (one view of the process's sites, one forward pass) gives each site the
    observation its own local view gives — where the two views hold the same information (one GPU
    type, the same services) — and so the same answers."""
    snap = _pool_snapshot()
    policies = [make_site_policy("marl") for _ in SITES]
    for policy in policies:
        policy.snapshot = snap
        policy.book.learn("svc-1", spec("chat"))
    offers = _offers()
    for o in offers:
        policies[0].book.learn(o.workload_id, o.inference_service)
    mine = [(site_of(i), None, True) for i in range(len(SITES))]
    for extra in (None, offers[0]):
        more = {"extra": extra.inference_service, "extra_id": extra.workload_id} if extra else {}
        view, wids = policies[0].view_of(mine, **more)
        assert view.site_ids == [*SITES, "_rest"]
        _, rows, _ = policies[0].runtime.choices(view)
        for i, policy in enumerate(policies):
            own, own_wids = policy.view(site_of(i), None, True, **more)
            _, own_rows, _ = policy.runtime.choices(own, [0])
            assert own_wids == wids
            assert np.allclose(rows.site[i], own_rows.site[0]) and np.allclose(rows.svc[i], own_rows.svc[0]), SITES[i]
    members = [(policy, site_of(i), None, True) for i, policy in enumerate(policies)]
    together = MarlSitePolicy.answer_sites(members, offers)
    alone = [policy.answer_round(offers, site_of(i), None, True) for i, policy in enumerate(policies)]
    assert together == alone
    assert all(r.startswith("marl") for answers in together for *_, r in answers)


def test_an_offered_service_is_decided_on_the_kept_view_as_on_a_fresh_one():
    """`wants` (the offer path: the view without the offered service is kept and the service
    added to it) decides as the whole view built for that offer does — on the first offer, on
    view (the whole view decides). On `marl_v1`, whose decisions are pinned (test_marl_pinned) and
    cover both answers here: the shipped `marl_v2` wants every offered service at every site of
    this small pool, so it would not exercise the "nowhere" branch."""
    policy = make_site_policy(f"marl:{shipped_policy_path().parent / 'marl_v1.npz'}")
    policy.book.learn("svc-1", spec("chat"))
    mine = [(site_of(i), None, True) for i in range(len(SITES))]
    offers = _offers()
    for o in offers:
        policy.book.learn(o.workload_id, o.inference_service)

    def fresh(wid: str, s: common.InferenceServiceSpec) -> np.ndarray:
        view, wids = policy.view_of(mine, extra=s, extra_id=wid)
        return policy.runtime.act(view).replica_delta[: len(mine), wids.index(wid)] > 0

    bases, seen = [], set()
    for snap in (_pool_snapshot(), _pool_snapshot()):  # equal content, a new message: rebuilt
        policy.snapshot = snap
        for rate in (0.5, 20.0, 200.0):
            for o in offers:
                s = common.InferenceServiceSpec()
                s.CopyFrom(o.inference_service)
                s.expected_rate_rps = rate
                got = policy.wants(mine, o.workload_id, s)
                assert (got == fresh(o.workload_id, s)).all()
                seen.update(got.tolist())
                bases.append(policy._base)
    assert bases[0] is bases[8] and bases[9] is bases[-1] and bases[0] is not bases[9]
    # a training spec learned (its shards count in the view's training GPUs): rebuilt
    policy.book.learn("job-1", common.TrainingJobSpec(name="ft", model="7b", params_b=7, shards=2, gpus_per_shard=1))
    policy.wants(mine, offers[0].workload_id, offers[0].inference_service)
    assert policy._base is not bases[-1]
    assert seen == {True, False}  # a heavy service is wanted at its ingress, a light one nowhere
    # svc-1 runs at three of the sites already: it is in the kept view's services
    assert (policy.wants(mine, "svc-1", spec("chat")) == fresh("svc-1", spec("chat"))).all()


def test_a_round_past_its_deadline_is_answered_without_the_policy():
    snap = _pool_snapshot()
    policy = make_site_policy("marl")
    policy.snapshot = snap
    offers = _offers()
    for o in offers:
        policy.book.learn(o.workload_id, o.inference_service)
    import time

    answers = MarlSitePolicy.answer_sites([(policy, site_of(0), None, True)], offers, deadline=time.time() - 1)[0]
    assert [r.split(":")[0] for *_, r in answers] == ["marl out of time"] * len(offers)
    assert all(units == 2 and cost >= 1000 for units, _, cost, _ in answers)  # greedy price + RELUCTANT


def test_policy_names():
    assert make_site_policy("greedy").name == "greedy"
    assert make_site_policy(f"marl:{shipped_policy_path()}").name == "marl"
    with pytest.raises(ValueError, match="marl:/nowhere"):
        make_site_policy("marl:/nowhere/policy.npz")
    with pytest.raises(ValueError, match="known: greedy, marl"):
        make_site_policy("oracle")


async def test_marl_driven_agents_place_a_deployment(nats_server):
    async with live_line(nats_server.url) as live:
        reasons: list[str] = []

        async def on_answer(ev):
            reasons.extend(p.reason for p in ev.payload.proposals)

        async def on_answers(ev):  # the agents of one process answer a round in one message
            reasons.extend(p.reason for a in ev.payload.answers for p in a.proposals)

        placed: list[spb.PlacementCommitted] = []

        async def on_placement(ev):
            placed.append(ev.payload)

        await live.watcher.subscribe(subjects.SITE_ANSWER, on_answer, consumer="test-answers")
        await live.watcher.subscribe(subjects.SITE_ANSWERS, on_answers, consumer="test-answers-batch")
        await live.watcher.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-placements")
        for _ in range(100):
            if len(live.scheduler.coordinator.inventory.up) == len(SITES):
                break
            await asyncio.sleep(0.1)
        w = (await live.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("chat")))).workload
        for _ in range(100):
            if any(m.placement.workload_id == w.workload_id for m in placed):
                break
            await asyncio.sleep(0.1)
        # the deploy's own commit (generation 1: the policy may rescale it right after)
        mine = [m.placement for m in placed if m.placement.workload_id == w.workload_id and m.placement.generation == 1]
        assert sum(p.replicas for p in mine) == 2, placed
        stored = (await live.stub.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id))).workload
        assert stored.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)
        # every answer came from the learned policy, and each agent ran it
        assert reasons and all(r.startswith("marl") for r in reasons if r), reasons
        assert all(a.policy.name == "marl" and a.policy.decisions > 0 for a in live.agents)
        # the applied placement shows in the agents' telemetry → snapshot → the policies' view: the
        # snapshot's replicas are what the sites run (the policy may rescale the service meanwhile)
        def at_sites() -> int:
            return sum(units(a.executor.placements[w.workload_id]) for a in live.agents
                       if w.workload_id in a.executor.placements)

        def in_snapshot() -> int | None:
            events = live.perception.events
            latest = events.latest if events else None
            return next((s.replicas for s in (latest.services if latest else []) if s.workload_id == w.workload_id), None)

        for _ in range(50):
            if in_snapshot() == at_sites():
                break
            await asyncio.sleep(0.1)
        assert at_sites() >= 1 and in_snapshot() == at_sites(), (in_snapshot(), at_sites())


@pytest.mark.parametrize("policy_name", ["marl", "greedy"])
async def test_a_spread_service_starts_near_its_demand_not_at_the_first_site_ids(nats_server, policy_name):
    """A service without an ingress site (its demand enters all over the pool) is placed where the
    sites' ingress weights say its demand enters: the agents price it by their mean latency to the
    demand and the scheduler takes one replica per site, cheapest first — here the two far end sites
    of the line, which hold nearly all the demand, not the two first site ids."""
    weights = {"a": 0.1, "b": 0.1, "c": 0.2, "d": 4.0, "e": 5.0}
    async with live_line(nats_server.url, policy_name, weights) as live:
        placed: list[spb.PlacementCommitted] = []

        async def on_placement(ev):
            placed.append(ev.payload)

        await live.watcher.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-placements")
        for _ in range(100):  # every site known, and every agent holds a snapshot with their weights
            if len(live.scheduler.coordinator.inventory.up) == len(SITES) and all(
                    a.policy.snapshot is not None and len(a.policy.snapshot.sites) == len(SITES) for a in live.agents):
                break
            await asyncio.sleep(0.1)
        spread = common.InferenceServiceSpec()
        spread.CopyFrom(spec("spread"))
        spread.ingress_site_id = ""
        w = (await live.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spread))).workload
        for _ in range(100):
            if any(m.placement.workload_id == w.workload_id for m in placed):
                break
            await asyncio.sleep(0.1)
        by_site = {m.placement.site_id: m.placement.replicas for m in placed if m.placement.workload_id == w.workload_id}
        assert by_site == {"d": 1, "e": 1}, by_site


async def test_the_sites_wishes_to_scale_are_coordinated_by_the_scheduler(nats_server):
    """The shipped marl goes through the pool's coordination live too: its agents send SCALE
    proposals with what they saw of the service's pool (`ScaleContext`), and the scheduler grants
    them together within the pool's uncovered demand. Here the service's demand is covered (the
    in-memory sites report none): every site that wants another replica — marl_v2's weights, which
    without coordination rescale the service right after placing it — is held, and the service keeps
    the replicas it was placed with."""
    async with live_line(nats_server.url) as live:
        wishes: list = []

        async def on_proposal(ev):
            if ev.payload.kind == site_pb.PROPOSAL_KIND_SCALE:
                wishes.append(ev.payload)

        await live.watcher.subscribe(subjects.SITE_PROPOSAL, on_proposal, consumer="test-proposals")
        counters = live.scheduler.coordinator.counters
        assert live.agents[0].policy.runtime.coordinated
        for _ in range(100):
            if len(live.scheduler.coordinator.inventory.up) == len(SITES):
                break
            await asyncio.sleep(0.1)
        w = (await live.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("chat")))).workload
        for _ in range(100):  # placed, and the sites asked to add more of it and were held
            if wishes and counters["scale_held"] >= 2:
                break
            await asyncio.sleep(0.1)
        assert wishes and all(p.HasField("context") for p in wishes), wishes
        assert counters["scale_held"] >= 2 and counters["scale_committed"] == 0
        stored = (await live.stub.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id))).workload
        assert sum(p.replicas for p in stored.placements) == 2 and stored.generation == 1
