"""SchedulerService against a real nats-server and a real gRPC server; the site agents are played
by the test (answering offers on the bus) so every arbitration outcome can be forced."""

import asyncio

import grpc
import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import subjects
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings

from support.fake_agents import FakeAgents
from support.specs import chat_spec as service_spec
from support.specs import snapshot


@pytest.fixture
async def scheduler(nats_server, bus):
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0, offer_timeout_s=0.5,
                                            retry_interval_s=0.1, default_gang_timeout_s=1.5)).start()
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot({"a": 4, "b": 4, "c": 2}))
    await asyncio.wait_for(server.coordinator.sites_known.wait(), 5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await channel.close()
    await server.stop()


async def placements_of(bus, wid, count, timeout=5.0):
    got = []
    done = asyncio.Event()

    async def on(ev):
        if ev.payload.placement.workload_id == wid:
            got.append(ev.payload)
            if len(got) >= count:
                done.set()

    sub = await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on, consumer="test-placements", replay=True)
    await asyncio.wait_for(done.wait(), timeout)
    await bus.unsubscribe(sub)
    return got


async def test_deploy_places_cheapest_sites_first_and_publishes_per_site(scheduler, bus):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 4, "b": 4, "c": 2}, {"a": 3.0, "b": 1.0, "c": 2.0}).start()
    resp = await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
        service=service_spec(min_replicas=5, ingress_site_id="b")))
    wid = resp.workload.workload_id
    assert resp.workload.state == spb.WORKLOAD_STATE_PENDING and wid.startswith("svc-")
    got = await placements_of(bus, wid, 2)
    by_site = {m.placement.site_id: m.placement.replicas for m in got}
    assert by_site == {"b": 4, "c": 1}
    assert all(m.inference_service.model == "llama-8b" for m in got)
    w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
    assert w.state == spb.WORKLOAD_STATE_PLACED and w.generation == 1


async def test_one_agent_process_answers_a_round_for_its_sites_in_one_message(scheduler, bus):
    """`OfferAnswers` (one message per agent process and round): each answer counts for its own,
    registered site only — an unknown site's answer and a proposal made for another site are refused."""
    server, stub = scheduler

    async def on_offer(ev):
        batch = site_pb.OfferAnswers(round_id=ev.payload.round_id, agent_id="agents-1")
        for sid, claimed, units, cost in (("a", "c", 4, 0.5), ("mallory", "mallory", 9, 0.1), ("b", "b", 4, 1.0),
                                          ("c", "c", 2, 2.0)):
            answer = site_pb.OfferAnswer(round_id=ev.payload.round_id, site_id=sid)
            for offer in ev.payload.offers:
                answer.proposals.add(site_id=claimed, kind=site_pb.PROPOSAL_KIND_ACCEPT_OFFER, offer_id=offer.offer_id,
                                     workload_id=offer.workload_id, units=units, gpu_type="H100", cost=cost)
            batch.answers.append(answer)
        await bus.publish(subjects.SITE_ANSWERS, batch, agent="agents-1")

    await bus.subscribe(subjects.SCHEDULER_OFFER, on_offer, consumer="fake-agent-process")
    resp = await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
        service=service_spec(min_replicas=5, ingress_site_id="b")))
    got = await placements_of(bus, resp.workload.workload_id, 2)
    assert {m.placement.site_id: m.placement.replicas for m in got} == {"b": 4, "c": 1}
    assert server.coordinator.counters["answers_refused"] >= 1  # mallory


async def test_training_gang_is_all_or_none_then_fails_after_timeout(scheduler, bus):
    server, stub = scheduler
    agents = FakeAgents(bus, {"a": 2, "b": 1}, {"a": 1.0, "b": 1.0})  # 3 of the 4 shards on offer
    await agents.start()
    job = common.TrainingJobSpec(name="pretrain", model="gpt-7b", params_b=1, shards=4, gpus_per_shard=1, tokens=1e9)
    wid = (await stub.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))).workload.workload_id
    events = [r.event async for r in stub.WatchWorkload(spb.WatchWorkloadRequest(workload_id=wid))]
    assert [e.kind for e in events] == [spb.WORKLOAD_EVENT_KIND_ACCEPTED, spb.WORKLOAD_EVENT_KIND_FAILED]
    assert events[-1].message.startswith("not placed within 2 s (")
    assert events[-1].message.endswith("4×1 GPUs): waiting for a gang of 4 shards: the site agents offered 3 of 4 shards")
    assert len(agents.offers) >= 2  # re-offered while waiting
    assert server.coordinator.inventory.used["a"]["H100"] == 0  # nothing held by the failed gang


async def pending_message(stub, wid, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        if w.message or loop.time() > deadline:
            return w
        await asyncio.sleep(0.05)


async def test_a_pending_workload_says_why_it_waits(scheduler, bus):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 0, "b": 0, "c": 0}, {"a": 1.0, "b": 1.0, "c": 1.0}).start()
    # a model no allowed GPU type can hold is refused at the API (tests/service/test_limits.py), never pending
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
            service=service_spec(name="giant", model="9000b", params_b=9000, min_replicas=1)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 21,600 GB" in err.value.details() and "no replica of at most 64 GPUs holds it" in err.value.details()
    shy = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
        service=service_spec(name="shy", min_replicas=2)))).workload.workload_id
    w = await pending_message(stub, shy)
    assert w.message == "the site agents offered 0 of 2 replicas"


async def test_training_gang_placed_across_sites_with_shard_indices(scheduler, bus):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 2, "b": 2, "c": 2}, {"a": 1.0, "b": 2.0, "c": 3.0}).start()
    job = common.TrainingJobSpec(name="ft", model="m", params_b=1, shards=3, gpus_per_shard=2, tokens=1e9)
    wid = (await stub.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))).workload.workload_id
    got = await placements_of(bus, wid, 2)
    shards = sorted(i for m in got for i in m.placement.shard_indices)
    assert shards == [0, 1, 2]
    assert {m.placement.site_id for m in got} == {"a", "b"}  # a has room for 2 shards of 2 GPUs


async def test_the_workload_template_reaches_each_site_with_its_placement(scheduler, bus):
    _, stub = scheduler
    await FakeAgents(bus, {"a": 2, "b": 2}, {"a": 1.0, "b": 2.0}).start()
    t = common.WorkloadTemplate(command="python3", args=["-m", "serve", "--port=0"], image="")
    t.env.add(name="MODEL_DIR", value="/models/llama")
    job = common.TrainingJobSpec(name="ft", model="m", params_b=1, shards=3, gpus_per_shard=1, tokens=1e9, template=t)
    wid = (await stub.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))).workload.workload_id
    got = await placements_of(bus, wid, 2)
    assert [m.training_job.template for m in got] == [t, t]
    bad = common.WorkloadTemplate(command="x")
    bad.env.add(name="CNC_WORKLOAD_ID", value="someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec(template=bad)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "service.template.env[0].name" in err.value.details()


@pytest.mark.parametrize("field,value,code", [
    ("min_replicas", 0, grpc.StatusCode.INVALID_ARGUMENT),
    ("name", "bad name!", grpc.StatusCode.INVALID_ARGUMENT),
    ("gpus_per_replica", 0, grpc.StatusCode.INVALID_ARGUMENT),
    ("max_replicas", 1000, grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_bad_specs_get_the_right_status_naming_the_field(scheduler, field, value, code):
    _, stub = scheduler
    spec = service_spec(**{field: value})
    if field == "max_replicas":
        spec.min_replicas = 1000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec))
    assert err.value.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert field in err.value.details()


async def test_unknown_ids_and_double_cancel(scheduler, bus):
    _, stub = scheduler
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetWorkload(spb.GetWorkloadRequest(workload_id="svc-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id="svc-nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await FakeAgents(bus, {"a": 4}, {"a": 1.0}).start()
    wid = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec()))).workload.workload_id
    await placements_of(bus, wid, 1)
    w = (await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=wid))).workload
    assert w.state == spb.WORKLOAD_STATE_CANCELLED
    zero = await placements_of(bus, wid, 2)
    assert zero[-1].placement.replicas == 0 and zero[-1].placement.generation == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=wid))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_bug_in_the_scheduler_is_internal_not_unavailable(scheduler, bus, monkeypatch, caplog):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 4}, {"a": 1.0}).start()
    wid = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec()))).workload.workload_id

    async def broken(workload_id, actor=""):
        return {}[workload_id]  # a programming error inside the handler's call

    monkeypatch.setattr(server.coordinator, "cancel", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=wid))
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert "KeyError" in err.value.details()
    assert any(r.exc_info and r.exc_info[0] is KeyError and "CancelWorkload" in r.getMessage() for r in caplog.records)


async def test_request_id_makes_deploy_idempotent(scheduler, bus):
    _, stub = scheduler
    req = spb.DeployInferenceServiceRequest(service=service_spec(), request_id="tenant-req-1")
    first = (await stub.DeployInferenceService(req)).workload
    second = (await stub.DeployInferenceService(req)).workload
    assert first.workload_id == second.workload_id
    listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest())).workloads
    assert [w.workload_id for w in listed] == [first.workload_id]
    other = spb.DeployInferenceServiceRequest(service=service_spec(model="other"), request_id="tenant-req-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DeployInferenceService(other)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_scale_proposal_within_bounds_and_capacity(scheduler, bus):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 4}, {"a": 1.0}).start()
    wid = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec()))).workload.workload_id
    await placements_of(bus, wid, 1)
    for sid, want in (("b", 9), ("c", 1)):  # b: capped by max_replicas 6 → 4 there
        await bus.publish(subjects.SITE_PROPOSAL, site_pb.Proposal(
            proposal_id=f"p-{sid}", site_id=sid, kind=site_pb.PROPOSAL_KIND_SCALE, workload_id=wid,
            units=want, gpu_type="H100"), site=sid)
    got = await placements_of(bus, wid, 2)
    w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
    per_site = {p.site_id: p.replicas for p in w.placements}
    assert sum(per_site.values()) <= 6
    assert per_site["a"] == 2 and per_site["b"] == 4
    assert got[-1].placement.site_id == "b"


async def _stored_pending(bus, spec):
    """A pending record in the state of record, as the scheduler's accept writes it."""
    import time

    from cncbrain.bus import KV_WORKLOADS
    from services.scheduler import domain

    w = domain.new_workload(spec, "", time.time_ns())
    await (await bus.kv(KV_WORKLOADS)).create(w.workload_id, w.SerializeToString())
    return w


async def _published_placement(bus, w, site, replicas, generation=1):
    """A placement event as a commit cut short left it: published, its record never written."""
    msg = spb.PlacementCommitted(placement=common.Placement(
        workload_id=w.workload_id, kind=w.kind, site_id=site, generation=generation, gpu_type="H100",
        gpus_per_unit=1, replicas=replicas), inference_service=w.inference_service)
    msg.committed_at.GetCurrentTime()
    await bus.publish(subjects.SCHEDULER_PLACEMENT, msg, event_id=f"{w.workload_id}/{generation}/{site}", site=site)


async def _restart_after_cut_short_commit(nats_server, bus, site, replicas):
    """A pending 3-replica service whose commit got `replicas` at `site` into the placement stream
    and no further; then a scheduler starts (agents answering: a cheapest, then b, then c)."""
    w = await _stored_pending(bus, service_spec(min_replicas=3, ingress_site_id="a"))
    await _published_placement(bus, w, site, replicas)
    agents = FakeAgents(bus, {"a": 4, "b": 4, "c": 2}, {"a": 1, "b": 2, "c": 3})
    await agents.start()
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0, offer_timeout_s=0.5,
                                            retry_interval_s=0.1)).start()
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot({"a": 4, "b": 4, "c": 2}))
    await asyncio.wait_for(server.coordinator.sites_known.wait(), 5)
    return w, agents, server


async def test_restart_rolls_forward_a_commit_whose_placements_went_out_but_not_its_record(nats_server, bus):
    """The record and the placements of a commit are written together; a scheduler stopped in
    between leaves the placements in the stream and the record pending. The next one adopts them
    instead of placing the workload a second time."""
    w, agents, server = await _restart_after_cut_short_commit(nats_server, bus, "b", 3)
    try:
        co = server.coordinator
        rec = co.store.get(w.workload_id)
        assert rec.state == spb.WORKLOAD_STATE_PLACED and rec.generation == 1
        assert [(p.site_id, p.replicas) for p in rec.placements] == [("b", 3)]
        assert co.counters["commits_rolled_forward"] == 1
        assert co.inventory.used["b"]["H100"] == 3  # its GPUs are taken
        await asyncio.sleep(0.3)
        assert all(o.workload_id != w.workload_id for o in agents.offers)  # never offered again
        stored = await (await bus.kv("cnc-workloads")).get(w.workload_id)
        assert spb.Workload.FromString(stored.value) == rec  # written, not only in memory
    finally:
        await server.stop()


async def test_restart_withdraws_a_partial_commit_and_places_the_workload_again(nats_server, bus):
    """Only part of a cut-short commit reached the stream (1 of 3 replicas): it is taken back (a
    zero placement at that site in a new generation) and the workload is offered again, all or none."""
    w, _, server = await _restart_after_cut_short_commit(nats_server, bus, "c", 1)
    try:
        co = server.coordinator
        assert co.counters["commits_withdrawn"] == 1
        got = await placements_of(bus, w.workload_id, 3)
        by_gen = {(m.placement.generation, m.placement.site_id): m.placement.replicas for m in got}
        assert by_gen[(1, "c")] == 1 and by_gen[(2, "c")] == 0  # the partial one, then its release
        assert by_gen[(3, "a")] == 3  # placed again, whole, at the cheapest site
        rec = co.store.get(w.workload_id)
        assert rec.state == spb.WORKLOAD_STATE_PLACED and rec.generation == 3
        assert co.inventory.used["c"]["H100"] == 0
    finally:
        await server.stop()


async def test_a_site_reporting_before_the_record_write_returned_still_makes_it_running(scheduler, bus):
    """Placements go out with the record's write, so a fast site can report `applied` before the
    write has returned; the report waits for the commit (the workload lock) and still counts."""
    server, stub = scheduler
    agents = FakeAgents(bus, {"a": 4}, {"a": 1})
    await agents.start()

    async def on_placement(ev):  # a site that reports at once
        report = site_pb.PlacementApplied(placement=ev.payload.placement, ok=True)
        await bus.publish(subjects.SITE_APPLIED, report, site=ev.payload.placement.site_id)

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-fast-site")
    w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec()))).workload
    for _ in range(100):
        if server.coordinator.store.get(w.workload_id).state == spb.WORKLOAD_STATE_RUNNING:
            break
        await asyncio.sleep(0.05)
    assert server.coordinator.store.get(w.workload_id).state == spb.WORKLOAD_STATE_RUNNING


async def test_the_record_reads_placed_once_its_placement_event_is_out(scheduler, bus):
    """The record's write and the placement events go out together; a client that reads the
    workload as soon as its placement arrives finds it placed, not still pending — even while the
    write is slow to return (here: held back 0.3 s)."""
    server, stub = scheduler
    agents = FakeAgents(bus, {"a": 4}, {"a": 1})
    await agents.start()
    states = []
    store = server.coordinator.store
    write = store.update

    async def slow_update(w):
        await asyncio.sleep(0.3)
        await write(w)

    store.update = slow_update

    async def on_placement(ev):
        got = await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=ev.payload.placement.workload_id))
        states.append(got.workload.state)

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-read-on-placement")
    for i in range(4):  # site a's 4 GPUs
        await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec(name=f"s{i}", min_replicas=1)))
    for _ in range(100):
        if len(states) == 4:
            break
        await asyncio.sleep(0.05)
    assert states == [spb.WORKLOAD_STATE_PLACED] * 4


async def test_a_garbled_record_is_skipped_with_its_key_named_and_left_in_place(nats_server, bus, caplog):
    """A record that is not a Workload does not keep the scheduler from starting with the others;
    the log names its key and the bytes stay in the bucket untouched."""
    good = await _stored_pending(bus, service_spec(min_replicas=1))
    kv = await bus.kv("cnc-workloads")
    await kv.put("svc-garbled", b"\xff\x00 not a workload")
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0)).start()
    try:
        store = server.coordinator.store
        assert store.unreadable == ["svc-garbled"] and store.get(good.workload_id) is not None
        assert "svc-garbled" in caplog.text
        assert (await kv.get("svc-garbled")).value == b"\xff\x00 not a workload"
    finally:
        await server.stop()


def test_a_spread_service_starts_one_replica_per_site_cheapest_first_then_fills_up():
    """Arbitration of a service without an ingress site (its demand enters all over the pool): one
    replica per site in price order first — the agents price it by their latency to the demand —
    then the rest cheapest first; a service with an ingress site fills the cheapest site first.
    A site's first usable proposal counts, never more than its free GPUs, all or none."""
    from services.scheduler.domain import Inventory, Need, arbitrate

    inventory = Inventory()
    for sid, n in {"a": 8, "b": 8, "c": 1, "d": 8}.items():
        inventory.set_site(sid, [common.GpuPool(gpu_type="H100", count=n)], up=True)
    inventory.set_site("down", [common.GpuPool(gpu_type="H100", count=8)], up=False)

    def prop(sid, cost, units=8, gpu="H100"):
        return site_pb.Proposal(site_id=sid, units=units, gpu_type=gpu, cost=cost)

    props = [prop("d", 40.0), prop("a", 5.0), prop("a", 1.0, gpu="A100"), prop("c", 2.0), prop("b", 9.0),
             prop("down", 0.0)]
    spread = Need(units=6, gpus_per_unit=1, allowed_gpu_types=("H100",), min_hbm_gb=0, spread=True)
    got = arbitrate(spread, props, inventory)
    assert got == {"c": ("H100", 1), "a": ("H100", 3), "b": ("H100", 1), "d": ("H100", 1)}
    ingress = Need(units=6, gpus_per_unit=1, allowed_gpu_types=("H100",), min_hbm_gb=0, ingress_site_id="a")
    assert arbitrate(ingress, props, inventory) == {"c": ("H100", 1), "a": ("H100", 5)}
    assert arbitrate(Need(units=26, gpus_per_unit=1, allowed_gpu_types=(), min_hbm_gb=0, spread=True), props, inventory) is None


def coordinated(sid: str, wid: str, units: int, priority: float, *, demand: float, capacity: float,
                rate: float = 20.0, sequence: int = 1) -> site_pb.Proposal:
    """A SCALE proposal of a coordinated policy: what the site saw of the service's pool."""
    return site_pb.Proposal(
        proposal_id=f"p-{sid}-{units}-{sequence}", site_id=sid, kind=site_pb.PROPOSAL_KIND_SCALE, workload_id=wid,
        units=units, gpu_type="H100", context=site_pb.ScaleContext(
            snapshot_sequence=sequence, pool_demand_rps=demand, pool_capacity_rps=capacity, replica_rps=rate,
            priority=priority))


async def placed_service(scheduler, bus) -> str:
    """A `chat` service placed with its two replicas at site a (the one site that answers)."""
    _, stub = scheduler
    await FakeAgents(bus, {"a": 4}, {"a": 1.0}).start()
    wid = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec()))).workload.workload_id
    await placements_of(bus, wid, 1)
    return wid


async def counted(counters, name: str, at_least: int) -> int:
    """The counter `name` once it reaches `at_least` (or after 2.5 s)."""
    for _ in range(50):
        if counters[name] >= at_least:
            break
        await asyncio.sleep(0.05)
    return counters[name]


async def test_coordinated_scale_proposals_add_only_what_the_pools_deficit_calls_for(scheduler, bus):
    """Three sites want one more replica each of a service whose pool lacks one replica's worth of
    capacity (demand 35 rps ÷ 0.7 = 50 wanted, 40 there, 20 per replica): only the most confident
    site's add is granted; asked again from the same snapshot, the grant counts as capacity and
    nothing more is added; and no site may remove one while that add is not in a snapshot yet."""
    server, stub = scheduler
    wid = await placed_service(scheduler, bus)
    counters = server.coordinator.counters
    held = counters["scale_held"]
    for sid, prio in (("a", 1.0), ("b", 3.0), ("c", 2.0)):
        have = 2 if sid == "a" else 0
        await bus.publish(subjects.SITE_PROPOSAL, coordinated(sid, wid, have + 1, prio, demand=35.0, capacity=40.0),
                          site=sid)
    got = await placements_of(bus, wid, 2)
    assert got[-1].placement.site_id == "b" and got[-1].placement.replicas == 1
    assert await counted(counters, "scale_held", held + 2) == held + 2
    # the same snapshot again: b's replica is not in its figures, the scheduler counts it
    for sid, want in (("c", 1), ("a", 1)):  # c adds, a removes one of its two
        await bus.publish(subjects.SITE_PROPOSAL, coordinated(sid, wid, want, 5.0, demand=35.0, capacity=40.0),
                          site=sid)
    assert await counted(counters, "scale_held", held + 4) == held + 4
    w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
    assert {p.site_id: p.replicas for p in w.placements} == {"a": 2, "b": 1}
    # a proposal without a context is applied on its own, as before
    await bus.publish(subjects.SITE_PROPOSAL, site_pb.Proposal(
        proposal_id="p-plain", site_id="c", kind=site_pb.PROPOSAL_KIND_SCALE, workload_id=wid, units=1,
        gpu_type="H100"), site="c")
    got = await placements_of(bus, wid, 3)
    assert got[-1].placement.site_id == "c" and got[-1].placement.replicas == 1


async def test_a_coordinated_proposal_with_absurd_pool_figures_is_refused_and_the_rest_still_granted(scheduler, bus):
    server, _ = scheduler
    wid = await placed_service(scheduler, bus)
    counters = server.coordinator.counters
    refused = counters["scale_refused"]
    forged = [coordinated("b", wid, 4, 9.0, demand=float("inf"), capacity=40.0),
              coordinated("c", wid, 2, float("nan"), demand=35.0, capacity=40.0),
              coordinated("a", wid, 3, 1.0, demand=35.0, capacity=-1.0)]
    for p in forged:
        await bus.publish(subjects.SITE_PROPOSAL, p, site=p.site_id)
    assert await counted(counters, "scale_refused", refused + 3) == refused + 3
    await bus.publish(subjects.SITE_PROPOSAL, coordinated("b", wid, 1, 1.0, demand=35.0, capacity=40.0), site="b")
    got = await placements_of(bus, wid, 2)
    assert got[-1].placement.site_id == "b" and got[-1].placement.replicas == 1
