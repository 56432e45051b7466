"""Reconciliation: a placement a site rejects or never confirms is taken off that site within
three reconciler ticks — placed elsewhere, shrunk to the sites that run it, or FAILED after the
allowed attempts — and the workload's message says which site did what."""

import asyncio

import grpc
import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import subjects
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings

from support.fake_agents import FakeAgents
from support.specs import chat_spec as service_spec
from support.specs import snapshot


class FakeSites:
    """Applies every placement as its site's executor would: `behaviour[site]` is "ok", "reject"
    or "silent" (never reports)."""

    def __init__(self, bus, behaviour):
        self.bus, self.behaviour = bus, behaviour
        self.seen = []

    async def start(self):
        await self.bus.subscribe(subjects.SCHEDULER_PLACEMENT, self.on_placement, consumer="fake-sites")

    async def on_placement(self, ev):
        p = ev.payload.placement
        self.seen.append((p.site_id, p.generation, p.replicas))
        how = self.behaviour.get(p.site_id, "ok")
        if how == "silent" and (p.replicas or p.shard_indices):
            return
        report = site_pb.PlacementApplied(placement=p, ok=how != "reject" or not p.replicas,
                                          error="only 0 of 2 replicas fit" if how == "reject" else "")
        await self.bus.publish(subjects.SITE_APPLIED, report, site=p.site_id)


@pytest.fixture
async def scheduler(nats_server, bus):
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0, offer_timeout_s=0.3,
                                            retry_interval_s=0.1, reconcile_s=0.2, apply_timeout_ticks=3,
                                            placement_timeout_s=20)).start()
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snapshot({"a": 4, "b": 4, "c": 4}))
    await asyncio.wait_for(server.coordinator.sites_known.wait(), 5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await channel.close()
    await server.stop()


async def until_state(stub, wid, states, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        if w.state in states or asyncio.get_running_loop().time() > deadline:
            return w
        await asyncio.sleep(0.05)


async def deploy(stub, **kw):
    # demand entering at a: filled cheapest site first (a service without an ingress site starts
    # one replica per site, which these reconciliation cases are not about)
    kw.setdefault("ingress_site_id", "a")
    resp = await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec(**kw)))
    return resp.workload.workload_id


async def test_a_rejected_placement_is_placed_elsewhere_and_says_why(scheduler, bus):
    _, stub = scheduler
    # a is the cheapest, so it wins first; it rejects (its own view of its GPUs differs)
    await FakeAgents(bus, {"a": 4, "b": 4, "c": 4}, {"a": 1.0, "b": 2.0, "c": 3.0}).start()
    sites = FakeSites(bus, {"a": "reject"})
    await sites.start()
    wid = await deploy(stub, min_replicas=2, max_replicas=2)
    w = await until_state(stub, wid, (spb.WORKLOAD_STATE_RUNNING,))
    assert w.state == spb.WORKLOAD_STATE_RUNNING, w
    assert [p.site_id for p in w.placements if p.replicas] == ["b"]
    assert ("a", 2, 0) in sites.seen  # a was told to drop it (a new generation with none there)
    events = await bus.events_since(subjects.SCHEDULER_WORKLOAD, 0, workload=wid)
    said = [e.payload.message for e in events if e.payload.state == spb.WORKLOAD_STATE_PENDING]
    assert "site a rejected it (only 0 of 2 replicas fit); placing it again elsewhere (attempt 2 of 3)" in said


async def test_a_placement_never_confirmed_is_taken_off_that_site(scheduler, bus):
    _, stub = scheduler
    await FakeAgents(bus, {"a": 4, "b": 4, "c": 4}, {"a": 1.0, "b": 2.0, "c": 3.0}).start()
    await FakeSites(bus, {"a": "silent"}).start()
    wid = await deploy(stub, min_replicas=2, max_replicas=2)
    w = await until_state(stub, wid, (spb.WORKLOAD_STATE_RUNNING,))
    assert w.state == spb.WORKLOAD_STATE_RUNNING
    assert [p.site_id for p in w.placements if p.replicas] == ["b"]


async def test_a_service_keeping_its_minimum_elsewhere_only_loses_the_failed_site(scheduler, bus):
    server, stub = scheduler
    await FakeAgents(bus, {"a": 2, "b": 2, "c": 2}, {"a": 1.0, "b": 2.0, "c": 3.0}).start()
    sites = FakeSites(bus, {"a": "reject"})
    await sites.start()
    wid = await deploy(stub, min_replicas=2, max_replicas=8)
    resp = await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))
    assert resp.workload.state in (spb.WORKLOAD_STATE_PENDING, spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)
    # min 2 replicas: placed as 2 at a (cheapest); a rejects → withdrawn, placed at b
    w = await until_state(stub, wid, (spb.WORKLOAD_STATE_RUNNING,))
    assert [p.site_id for p in w.placements if p.replicas] == ["b"]
    # now scale up at c and have c reject: the service keeps its 2 replicas at b
    co = server.coordinator
    sites.behaviour = {"c": "reject"}
    await co.on_scale(site_pb.Proposal(site_id="c", kind=site_pb.PROPOSAL_KIND_SCALE, workload_id=wid,
                                       units=1, gpu_type="H100"))
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        if "withdrawn from c" in w.message:
            break
        await asyncio.sleep(0.05)
    assert "site c rejected it" in w.message and "2 replicas remain" in w.message, w.message
    assert w.state == spb.WORKLOAD_STATE_RUNNING
    assert {p.site_id: p.replicas for p in w.placements if p.replicas} == {"b": 2}


async def test_a_workload_every_site_rejects_fails_saying_why(scheduler, bus):
    _, stub = scheduler
    await FakeAgents(bus, {"a": 4, "b": 4, "c": 4}, {"a": 1.0, "b": 2.0, "c": 3.0}).start()
    await FakeSites(bus, {"a": "reject", "b": "reject", "c": "reject"}).start()
    wid = await deploy(stub, min_replicas=2, max_replicas=2)
    w = await until_state(stub, wid, (spb.WORKLOAD_STATE_FAILED,), timeout=20)
    assert w.state == spb.WORKLOAD_STATE_FAILED, w
    assert "rejected it (only 0 of 2 replicas fit)" in w.message and "placed 3 times" in w.message, w.message
    assert not any(p.replicas for p in w.placements)
