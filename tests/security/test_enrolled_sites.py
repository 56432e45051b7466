"""Enrolled sites only: a site whose agent connects (it holds a key) but that no operator enrolled
never counts and never receives work; an enrolled site counts with at most its enrolled GPUs, and
usage is billed at its enrolled price, not the one it reports."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agents.executor import MemoryExecutor
from agents.site_agent import SiteAgent
from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.auth import bearer_metadata
from cncbrain.bus import Bus, subjects
from cncbrain.bus.envelope import make_headers as envelope_headers
from cncbrain.bus.permissions import site_identity

from support.tenants import tenant_with_token

pytestmark = pytest.mark.integration


async def test_a_site_no_operator_enrolled_never_counts_and_prices_are_the_enrolled_ones(
        brain, admin, secure_nats, secrets):
    servers, channels, operator = brain
    gov, md, lab = await tenant_with_token(channels, operator, "lab", 64)
    await gov.EnrollSite(gpb.EnrollSiteRequest(site=gpb.SiteEnrollment(site_id="a", region="us", gpus=[
        gpb.EnrolledGpus(gpu_type="H100", max_count=8, price_usd_per_hour=4.0)])), metadata=md)
    placed_at: list[str] = []

    async def on_placement(ev):
        if ev.payload.placement.replicas:
            placed_at.append(ev.payload.placement.site_id)

    await admin.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="test-placements")
    buses, agents = [], []
    for sid in ("a", "b"):  # both hold keys and report 512 H100 at a cent an hour; only a is enrolled
        bus = await Bus.connect(secure_nats.url, f"agent-{sid}", identity=site_identity(sid), secrets_dir=secrets,
                                ensure=False)
        site = common.Site(site_id=sid, region="us", gpu_pools=[
            common.GpuPool(gpu_type="H100", count=512, hbm_gb=80, price_usd_per_hour=0.01)])
        buses.append(bus)
        agents.append(await SiteAgent(bus, sid, MemoryExecutor(site), heartbeat_s=0.2).start())
    try:
        perception = perception_pb2_grpc.PerceptionServiceStub(channels["perception"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sites = (await perception.ListSites(ppb.ListSitesRequest(), metadata=md)).sites
            if sites:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # b's registration and heartbeats have long arrived too
        sites = (await perception.ListSites(ppb.ListSitesRequest(), metadata=md)).sites
        assert [s.site.site_id for s in sites] == ["a"]
        assert [(p.count, p.price_usd_per_hour) for p in sites[0].site.gpu_pools] == [(8, 4.0)]

        sched = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])
        tmd = bearer_metadata(lab.token)
        ids = []
        for name in ("one", "two", "three"):  # 12 GPUs asked; a may offer 8
            ids.append((await sched.DeployInferenceService(spb.DeployInferenceServiceRequest(
                service=common.InferenceServiceSpec(
                    name=name, model="7b", params_b=7, min_replicas=4, max_replicas=4, gpus_per_replica=1,
                    slo=common.SloTargets(ttft_ms=500, tpot_ms=50), allowed_gpu_types=["H100"])),
                metadata=tmd)).workload.workload_id)
        deadline = time.monotonic() + 10
        while len(placed_at) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert placed_at == ["a", "a"]  # two services fit a's 8 enrolled GPUs; none ever goes to b
        assert agents[1].counters["placements_applied"] == 0
        entries = (await gov.ListLedgerEntries(gpb.ListLedgerEntriesRequest(kind="placement.committed", limit=50),
                                               metadata=md)).entries
        assert {json.loads(e.payload_json)["price_per_gpu_hour"] for e in entries} == {4.0}
        enrolled = [e for e in (await gov.ListLedgerEntries(gpb.ListLedgerEntriesRequest(kind="site.enrolled"),
                                                            metadata=md)).entries]
        assert [e.subject for e in enrolled] == ["a"] and enrolled[0].actor != "governance"
    finally:
        for agent in agents:
            await agent.stop()
        for bus in buses:
            await bus.close()


async def test_sites_enroll_issues_the_agents_key_and_admits_it(brain, secrets, tmp_path):
    import os
    import sys

    from cncbrain.bus.credentials import load_identities, public_key

    servers, channels, operator = brain
    key = tmp_path / "out" / "c.nk"
    env = {**os.environ, "CNC_TOKEN": operator, "CNC_SECRETS_DIR": str(secrets)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cncbrain.commands.sites", "enroll", "c", "--gpus", "H100=4@3.5", "--region", "eu",
        "--key-out", str(key), "--governance", f"127.0.0.1:{servers['governance'].port}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "enrolled c: H100 ≤ 4 at $3.5/GPU-h" in out.decode()
    assert key.stat().st_mode & 0o777 == 0o600
    assert load_identities(secrets)["site-c"] == public_key(key.read_bytes())
    terms = servers["governance"].governor.state.enrolled["c"]
    assert terms["nats_public_key"] == public_key(key.read_bytes()) and terms["region"] == "eu"
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cncbrain.commands.sites", "enroll", "d", "--gpus", "H100=lots",
        "--governance", f"127.0.0.1:{servers['governance'].port}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(bad.communicate(), 60)
    assert bad.returncode != 0 and "TYPE=COUNT@USD" in err.decode()


async def test_an_agent_host_answers_only_for_the_sites_registered_to_it(brain, admin, attacker):
    servers, channels, operator = brain
    co = servers["scheduler"].coordinator
    host, b = await attacker("agents-h"), await attacker("site-b")
    site = common.Site(site_id="a", gpu_pools=[common.GpuPool(gpu_type="H100", count=8)])
    reg_a = site_pb.SiteRegistered(site=site, agent_id="agents-h")
    await host.nc.publish("cnc.site.a.registered", reg_a.SerializeToString(), headers=envelope_headers(reg_a))
    reg_b = site_pb.SiteRegistered(site=common.Site(site_id="b"), agent_id="agent-b")
    await b.nc.publish("cnc.site.b.registered", reg_b.SerializeToString(), headers=envelope_headers(reg_b))
    await host.nc.publish("cnc.site.b.answer", b"")  # the host may not speak for b at all
    assert await host.refused("cnc.site.b.answer")
    await b.nc.publish("cnc.site.b.answers", b"")  # nor may a site send a batch
    assert await b.refused("cnc.site.b.answers")
    deadline = time.monotonic() + 5
    while co.agent_of.get("a") != "agents-h" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert co.agent_of["a"] == "agents-h"
    co.inventory.set_site("a", site.gpu_pools, True)
    co.inventory.set_site("c", site.gpu_pools, True)  # known to the scheduler, registered by no one
    batch = site_pb.OfferAnswers(round_id="r1", agent_id="agents-h", answers=[
        site_pb.OfferAnswer(round_id="r1", site_id=s) for s in ("a", "c")])
    before = co.counters["answers_refused"]
    await host.nc.publish("cnc.site.agents-h.answers", batch.SerializeToString(), headers=envelope_headers(batch))
    deadline = time.monotonic() + 5
    while co.counters["answers_refused"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert co.counters["answers_refused"] - before == 1  # c's answer; a's is taken (a late one here)
