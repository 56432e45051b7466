"""Governance enforced on the live path: real nats-server, real perception, scheduler and
governance gRPC servers with auth on, site agents with the memory executor.

A tenant whose residency policy allows 2 of 6 sites gets every replica there and nowhere else; a
deployment beyond its quota is refused with RESOURCE_EXHAUSTED; tenants cannot see each other's
workloads; calls without a token are refused; the ledger records the admissions and placements.
"""


import grpc
import pytest

from agents.executor import MemoryExecutor
from agents.site_agent import SiteAgent
from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import token_interceptors
from cncbrain.bus import Bus
from services.governance.server import GovernanceServer
from services.governance.settings import Settings as GovernanceSettings
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

from support.specs import inference_spec
from support.waiting import until

pytestmark = pytest.mark.integration
SITES = {"us-east": "us", "us-west": "us", "us-north": "us", "us-south": "us", "eu-ams": "eu", "eu-fra": "eu"}


def spec(name, replicas, tenant=""):
    return inference_spec(name, replicas, allowed_gpu_types=["H100"], tenant=tenant)


@pytest.fixture
async def brain(nats_server, tmp_path):
    url = nats_server.url
    governance = await GovernanceServer(GovernanceSettings(
        nats_url=url, grpc_port=0, bootstrap_token_file=tmp_path / "operator.token")).start()
    gov_target = f"127.0.0.1:{governance.port}"
    operator = (tmp_path / "operator.token").read_text().strip()
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2,
                                                           heartbeat_timeout_s=30, auth_enabled=True)).start()
    agent_bus = await Bus.connect(url, "agents")
    agents = []
    for sid, region in SITES.items():
        site = common.Site(site_id=sid, region=region,
                           gpu_pools=[common.GpuPool(gpu_type="H100", count=8, hbm_gb=80, price_usd_per_hour=4.0)])
        agents.append(await SiteAgent(agent_bus, sid, MemoryExecutor(site), heartbeat_s=0.2).start())
    scheduler = await SchedulerServer(SchedulerSettings(
        nats_url=url, grpc_port=0, offer_timeout_s=0.5, retry_interval_s=0.2, auth_enabled=True,
        governance_target=gov_target, governance_token=operator)).start()
    await until(lambda: _ready(scheduler, governance), 15, "sites known to scheduler and governance")
    channels = []

    def stubs(token):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}", interceptors=token_interceptors(token))
        gch = grpc.aio.insecure_channel(gov_target, interceptors=token_interceptors(token))
        channels.extend([ch, gch])
        return scheduler_pb2_grpc.SchedulerServiceStub(ch), governance_pb2_grpc.GovernanceServiceStub(gch)

    yield stubs, operator, scheduler, governance
    for ch in channels:
        await ch.close()
    await scheduler.stop()
    for a in agents:
        await a.stop()
    await agent_bus.close()
    await perception.stop()
    await governance.stop()


async def _ready(scheduler, governance):
    gate = scheduler.coordinator.governance.gate
    return (len(scheduler.coordinator.inventory.up) == len(SITES) and len(gate.sites) == len(SITES)
            and len(governance.governor.state.pool) == len(SITES))


async def tenant(gov, tenant_id, **kw):
    await gov.CreateTenant(gpb.CreateTenantRequest(tenant_id=tenant_id, **kw))
    return (await gov.IssueToken(gpb.IssueTokenRequest(role=gpb.ROLE_TENANT, tenant_id=tenant_id))).token


async def placed(sched, wid):
    async def check():
        w = (await sched.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        return w if w.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING) else None
    return await until(check, 15, f"{wid} placed")


async def test_residency_and_quota_hold_on_the_live_path(brain):
    stubs, operator, scheduler, governance = brain
    _, op_gov = stubs(operator)
    bank_token = await tenant(op_gov, "eu-bank", policy=gpb.PlacementPolicy(allowed_regions=["eu"]),
                              quota=gpb.Quota(gpus=[gpb.GpuQuota(gpu_type="H100", max_gpus=12)]))
    other_token = await tenant(op_gov, "acme")
    bank, bank_gov = stubs(bank_token)
    other, _ = stubs(other_token)

    # Residency: 10 replicas, only the two EU sites may take them (8 GPUs each).
    w = (await bank.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("chat", 10)))).workload
    assert w.inference_service.tenant == "eu-bank"  # stamped from the token
    w = await placed(bank, w.workload_id)
    sites = {p.site_id: p.replicas for p in w.placements if p.replicas}
    assert set(sites) <= {"eu-ams", "eu-fra"} and sum(sites.values()) == 10

    # Quota: 10 of 12 H100 held; 4 more are refused with the reason, 2 more are fine.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("more", 4)))
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "H100 GPUs would be 14, quota is 12" in info.value.details()
    small = (await bank.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("small", 2)))).workload
    small = await placed(bank, small.workload_id)
    assert {p.site_id for p in small.placements if p.replicas} <= {"eu-ams", "eu-fra"}

    # Policy that leaves nowhere to run is refused at submit.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("huge", 17)))
    assert info.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)

    # Isolation: another tenant neither sees nor touches these workloads; no token, no call.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await other.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await other.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w.workload_id))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await other.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec("x", 1, tenant="eu-bank")))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert (await other.ListWorkloads(spb.ListWorkloadsRequest())).workloads == []
    nobody, _ = stubs(None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await nobody.ListWorkloads(spb.ListWorkloadsRequest())
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED

    # The ledger holds the admissions and the committed placements, and verifies.
    async def ledgered():
        entries = (await op_gov.ListLedgerEntries(gpb.ListLedgerEntriesRequest(limit=1000))).entries
        committed = {e.subject for e in entries if e.kind == "placement.committed"}
        return entries if {f"{w.workload_id}@eu-ams", f"{w.workload_id}@eu-fra"} & committed else None

    entries = await until(ledgered, 10, "placements in the ledger")
    verdicts = [e.payload_json for e in entries if e.kind == "admission"]
    assert sum('"verdict":"admitted"' in v for v in verdicts) == 2
    assert sum('"verdict":"quota_exceeded"' in v for v in verdicts) >= 1
    assert all(e.subject.split("@")[1].startswith("eu-") for e in entries if e.kind == "placement.committed")
    assert (await op_gov.VerifyLedger(gpb.VerifyLedgerRequest())).ok
    usage = await bank_gov.GetUsage(gpb.GetUsageRequest())
    assert usage.tenants and usage.tenants[0].tenant_id == "eu-bank" and usage.tenants[0].gpu_hours > 0
