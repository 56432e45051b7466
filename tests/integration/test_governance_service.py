"""GovernanceService end to end: a real nats-server, the real gRPC server on loopback, real tokens.

Covers the denied cases (no token, bad token, revoked token, tenant touching another tenant,
tenant calling operator methods), admission refusals with their status codes, usage computed from
the scheduler's placement events, restart from the ledger, and a ledger tampered in JetStream.
"""

import asyncio
import sys
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain.auth import TOKENS_BUCKET, token_interceptors
from cncbrain.bus import subjects
from cncbrain.kvfeed import KvFollower
from services.governance.events import Governor
from services.governance.server import GovernanceServer
from services.governance.settings import Settings

from support.specs import site_status, snapshot
from support.waiting import ended_within

pytestmark = pytest.mark.integration

SITES = {  # site: (region, gpu type, count, price)
    "ams": ("eu", "H100", 16, 4.0),
    "fra": ("eu", "A100-80GB", 8, 2.5),
    "nyc": ("us", "H100", 64, 3.0),
    "sea": ("us", "L4", 32, 0.8),
}


def pool_snapshot():
    return snapshot(site_status(sid, n, gpu_type=gpu, region=region, price=price)
                    for sid, (region, gpu, n, price) in SITES.items())


class Brain:
    def __init__(self, server, operator_token):
        self.server = server
        self.operator_token = operator_token
        self.target = f"127.0.0.1:{server.port}"
        self.channels = []

    def stub(self, token):
        ch = grpc.aio.insecure_channel(self.target, interceptors=token_interceptors(token))
        self.channels.append(ch)
        return governance_pb2_grpc.GovernanceServiceStub(ch)

    async def close(self):
        for ch in self.channels:
            await ch.close()


async def start(nats_server, tmp_path, **kw):
    settings = Settings(nats_url=nats_server.url, grpc_port=0, bootstrap_token_file=tmp_path / "operator.token",
                        ledger_deny_delete=False, **kw)
    server = await GovernanceServer(settings).start()
    return Brain(server, (tmp_path / "operator.token").read_text().strip())


@pytest.fixture
async def brain(nats_server, bus, tmp_path):
    b = await start(nats_server, tmp_path)
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, pool_snapshot())
    for _ in range(100):
        if b.server.governor.state.pool_known:
            break
        await asyncio.sleep(0.02)
    yield b
    await b.close()
    await b.server.stop()


async def code_of(call):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def make_tenant(op, tenant_id, quota=None, policy=None):
    await op.CreateTenant(gpb.CreateTenantRequest(tenant_id=tenant_id, quota=quota or gpb.Quota(),
                                                 policy=policy or gpb.PlacementPolicy()))
    resp = await op.IssueToken(gpb.IssueTokenRequest(role=gpb.ROLE_TENANT, tenant_id=tenant_id))
    return resp.token


async def test_calls_without_a_valid_token_are_unauthenticated_but_health_is_open(brain):
    code, detail = await code_of(brain.stub(None).ListTenants(gpb.ListTenantsRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in detail
    code, _ = await code_of(brain.stub("tok_0123456789abcdef.not-the-secret-of-any-token").WhoAmI(gpb.WhoAmIRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    code, _ = await code_of(brain.stub("garbage").WhoAmI(gpb.WhoAmIRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(brain.target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    who = await brain.stub(brain.operator_token).WhoAmI(gpb.WhoAmIRequest())
    assert who.role == gpb.ROLE_OPERATOR


async def test_absurd_quotas_names_and_texts_are_refused_naming_the_field_quoting_little(brain):
    op = brain.stub(brain.operator_token)
    big = "x" * 10_000
    cases = [
        (gpb.CreateTenantRequest(tenant_id="lab", quota=gpb.Quota(max_cost_usd_per_hour=float("nan"))),
         "quota.max_cost_usd_per_hour"),
        (gpb.CreateTenantRequest(tenant_id="lab", quota=gpb.Quota(max_cost_usd_per_hour=1e300)),
         "quota.max_cost_usd_per_hour"),
        (gpb.CreateTenantRequest(tenant_id="lab", quota=gpb.Quota(max_gpus=4_000_000_000)), "quota.max_gpus"),
        (gpb.CreateTenantRequest(tenant_id="lab", policy=gpb.PlacementPolicy(max_cost_usd_per_hour=-1)),
         "policy.max_cost_usd_per_hour"),
        (gpb.CreateTenantRequest(tenant_id=big), "10000 characters"),
        (gpb.CreateTenantRequest(tenant_id="lab", display_name=big), "display_name"),
    ]
    for request, says in cases:
        code, detail = await code_of(op.CreateTenant(request))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and says in detail, detail
        assert len(detail) < 400
    code, detail = await code_of(op.GetTenant(gpb.GetTenantRequest(tenant_id=big)))
    assert len(detail) < 300
    assert not (await op.ListTenants(gpb.ListTenantsRequest())).tenants


async def test_tenants_are_isolated_and_revocation_is_immediate(brain):
    op = brain.stub(brain.operator_token)
    acme_token = await make_tenant(op, "acme")
    await make_tenant(op, "globex")
    acme = brain.stub(acme_token)
    assert (await acme.WhoAmI(gpb.WhoAmIRequest())).tenant_id == "acme"
    assert (await acme.GetTenant(gpb.GetTenantRequest(tenant_id="acme"))).tenant.tenant_id == "acme"
    code, detail = await code_of(acme.GetTenant(gpb.GetTenantRequest(tenant_id="globex")))
    assert code is grpc.StatusCode.PERMISSION_DENIED and "globex" in detail
    code, _ = await code_of(acme.CreateTenant(gpb.CreateTenantRequest(tenant_id="evil")))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = await code_of(acme.IssueToken(gpb.IssueTokenRequest(role=gpb.ROLE_OPERATOR)))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = await code_of(acme.AdmitWorkload(gpb.AdmitWorkloadRequest(workload_id="w", tenant_id="globex", gpus=1)))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    # Tokens are listed without secrets, then revoked.
    listed = await acme.ListTokens(gpb.ListTokensRequest())
    assert [t.tenant_id for t in listed.tokens] == ["acme"]
    assert acme_token.split(".")[1] not in str(listed)
    await op.RevokeToken(gpb.RevokeTokenRequest(token_id=acme_token.split(".")[0]))
    code, detail = await code_of(acme.WhoAmI(gpb.WhoAmIRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "revoked" in detail
    code, _ = await code_of(op.CreateTenant(gpb.CreateTenantRequest(tenant_id="acme")))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    code, _ = await code_of(op.CreateTenant(gpb.CreateTenantRequest(tenant_id="Not Valid")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_admission_refuses_over_quota_and_outside_policy_with_reasons(brain):
    op = brain.stub(brain.operator_token)
    eu_only = gpb.PlacementPolicy(allowed_regions=["eu"])
    token = await make_tenant(op, "acme", gpb.Quota(gpus=[gpb.GpuQuota(gpu_type="H100", max_gpus=8)]), eu_only)
    acme = brain.stub(token)

    def admit(wid, gpus, types=("H100",)):
        return acme.AdmitWorkload(gpb.AdmitWorkloadRequest(
            workload_id=wid, tenant_id="acme", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, gpus=gpus,
            gpus_per_unit=1, gpu_types=list(types)))

    ok = await admit("w1", 6)
    assert ok.decision.verdict == gpb.VERDICT_ADMITTED and list(ok.decision.eligible_sites) == ["ams"]
    code, detail = await code_of(admit("w2", 4))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "H100 GPUs would be 10, quota is 8" in detail
    code, detail = await code_of(admit("w3", 1, ("L4",)))  # L4 exists only in the US
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "no site" in detail
    tenant = (await acme.GetTenant(gpb.GetTenantRequest(tenant_id="acme"))).tenant
    assert tenant.gpus_in_use == 6
    kinds = [e.kind for e in (await op.ListLedgerEntries(gpb.ListLedgerEntriesRequest(kind="admission"))).entries]
    assert kinds == ["admission"] * 3  # refusals are audited too


async def test_usage_and_quota_follow_the_schedulers_placement_events(brain, bus):
    op = brain.stub(brain.operator_token)
    token = await make_tenant(op, "acme", gpb.Quota(gpus=[gpb.GpuQuota(gpu_type="H100", max_gpus=4)]))
    acme = brain.stub(token)
    await acme.AdmitWorkload(gpb.AdmitWorkloadRequest(workload_id="svc1", tenant_id="acme", gpus=2, gpu_types=["H100"],
                                                     kind=common.WORKLOAD_KIND_INFERENCE_SERVICE))
    t0 = time.time() - 7200

    def event(state, placements, at):
        ev = spb.WorkloadEvent(workload_id="svc1", state=state, placements=placements, generation=1)
        ev.at.FromNanoseconds(int(at * 1e9))
        return ev

    placed = [common.Placement(workload_id="svc1", site_id="nyc", replicas=2, gpu_type="H100", gpus_per_unit=1),
              common.Placement(workload_id="svc1", site_id="ams", replicas=1, gpu_type="H100", gpus_per_unit=1)]
    await bus.publish(subjects.SCHEDULER_WORKLOAD, event(spb.WORKLOAD_STATE_PLACED, placed, t0), workload="svc1")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, event(spb.WORKLOAD_STATE_RUNNING, placed[:1], t0 + 3600),
                      workload="svc1")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, event(spb.WORKLOAD_STATE_CANCELLED, [], t0 + 5400), workload="svc1")
    for _ in range(200):
        if not brain.server.governor.state.holdings.get("acme"):
            break
        await asyncio.sleep(0.02)
    usage = await acme.GetUsage(gpb.GetUsageRequest(tenant_id="acme"))
    (line,) = usage.tenants
    # nyc: 2 GPUs x 1.5 h x $3; ams: 1 GPU x 1 h x $4
    assert line.gpu_hours == pytest.approx(3.0 + 1.0, rel=1e-3)
    assert line.cost_usd == pytest.approx(9.0 + 4.0, rel=1e-3)
    assert [w.workload_id for w in usage.workloads] == ["svc1"]
    code, _ = await code_of(acme.GetUsage(gpb.GetUsageRequest(tenant_id="globex")))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    kinds = [e.kind for e in (await op.ListLedgerEntries(gpb.ListLedgerEntriesRequest(subject="svc1"))).entries]
    assert kinds == ["admission", "workload.ended"]
    placements = (await op.ListLedgerEntries(gpb.ListLedgerEntriesRequest(kind="placement.committed"))).entries
    assert sorted(e.subject for e in placements) == ["svc1@ams", "svc1@nyc"]


async def test_placement_check_keeps_residency(brain):
    op = brain.stub(brain.operator_token)
    token = await make_tenant(op, "acme", policy=gpb.PlacementPolicy(allowed_sites=["ams"]))
    acme = brain.stub(token)
    outside = common.Placement(workload_id="w", site_id="nyc", replicas=1, gpu_type="H100", gpus_per_unit=1)
    inside = common.Placement(workload_id="w", site_id="ams", replicas=2, gpu_type="H100", gpus_per_unit=1)
    bad = await acme.CheckPlacement(gpb.CheckPlacementRequest(workload_id="w", tenant_id="acme",
                                                             placements=[inside, outside]))
    assert bad.decision.verdict == gpb.VERDICT_POLICY_VIOLATION and "nyc" in bad.decision.reasons[0]
    good = await acme.CheckPlacement(gpb.CheckPlacementRequest(workload_id="w", tenant_id="acme", placements=[inside]))
    assert good.decision.verdict == gpb.VERDICT_ADMITTED


async def test_state_survives_a_restart_and_the_operator_token_is_kept(nats_server, tmp_path):
    b = await start(nats_server, tmp_path)
    op = b.stub(b.operator_token)
    token = await make_tenant(op, "acme", gpb.Quota(max_gpus=3))
    await b.close()
    await b.server.stop()
    b2 = await start(nats_server, tmp_path)
    try:
        assert b2.operator_token == b.operator_token
        acme = b2.stub(token)
        tenant = (await acme.GetTenant(gpb.GetTenantRequest(tenant_id="acme"))).tenant
        assert tenant.quota.max_gpus == 3
        result = await b2.stub(b2.operator_token).VerifyLedger(gpb.VerifyLedgerRequest())
        assert result.ok and result.length == 3  # operator token, tenant, tenant token
    finally:
        await b2.close()
        await b2.server.stop()


async def test_a_token_record_the_ledger_does_not_have_is_removed_at_start(nats_server, bus, tmp_path):
    tokens = await bus.kv(TOKENS_BUCKET)
    await tokens.put("tok_0123456789abcdef", b'{"role": "operator"}')
    b = await start(nats_server, tmp_path)
    try:
        assert "tok_0123456789abcdef" not in await bus.kv_items(TOKENS_BUCKET)
    finally:
        await b.close()
        await b.server.stop()


async def test_verify_ledger_names_the_tampered_entries(brain, bus):
    op = brain.stub(brain.operator_token)
    for i in range(6):
        await op.CreateTenant(gpb.CreateTenantRequest(tenant_id=f"tenant-{i}"))
    clean = await op.VerifyLedger(gpb.VerifyLedgerRequest())
    assert clean.ok and clean.length == 7 and clean.entries_checked == 7
    js = bus.js
    # The six creations went in one at a time: one stored block per entry here. Change entry 3:
    # take its block out of the stream and put back a forged copy (what an attacker with
    # JetStream access can do; the ledger itself never rewrites).
    msg = await js.get_msg(subjects.LEDGER_STREAM.name, seq=4)
    block = gpb.LedgerBlock()
    block.ParseFromString(msg.data)
    assert [e.index for e in block.entries] == [3]
    block.entries[0].payload_json = block.entries[0].payload_json.replace("tenant-2", "tenant-x")
    await js.delete_msg(subjects.LEDGER_STREAM.name, 4)
    await js.publish(subjects.GOVERNANCE_LEDGER.template, block.SerializeToString(), headers={"Nats-Msg-Id": "forged"})
    result = await op.VerifyLedger(gpb.VerifyLedgerRequest())
    assert not result.ok
    changed = {i.index for i in result.issues if i.kind == "changed"}
    assert changed == {3}
    # Remove entry 5 as well.
    await js.delete_msg(subjects.LEDGER_STREAM.name, 6)
    result = await op.VerifyLedger(gpb.VerifyLedgerRequest())
    assert {i.index for i in result.issues if i.kind == "removed"} == {5}
    assert {i.index for i in result.issues if i.kind == "changed"} == {3}
    code, _ = await code_of(brain.stub(None).VerifyLedger(gpb.VerifyLedgerRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_stop_ends_although_a_nats_request_drops_the_cancel():
    """On Python 3.11 `asyncio.wait_for` (which every nats-py request awaits) returns the result and
    drops a cancel that lands in the turn its future completes. Governor.stop() used to hang when that
    happened to the projection loop's KV put of the head (the loop went round and waited forever)."""
    gov = Governor(SimpleNamespace(js=None, counters=Counter()), Settings(nats_url="nats://unused:4222"))
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    in_put = asyncio.Event()
    swallowed = []

    async def no_projection(dirty):
        return None

    async def write_head(head):  # as LedgerStore.write_head -> kv.put -> nc.request -> wait_for
        in_put.set()
        await asyncio.wait_for(reply, 30)
        swallowed.append(True)  # reached only if the cancel was dropped

    gov._project = no_projection
    gov.store.write_head = write_head
    gov.projector = asyncio.create_task(gov._project_loop())
    gov._project_wanted.set()
    await asyncio.wait_for(in_put.wait(), 5)
    loop.call_soon(reply.set_result, None)  # the reply lands in the same turn as stop()'s cancel
    await ended_within(gov.stop(), 5, gov.projector)
    if sys.version_info < (3, 12):
        assert swallowed, "the race was not reproduced"


async def test_kv_follower_stop_ends_although_updates_drops_the_cancel():
    """The same race in KvFollower: `KeyWatcher.updates()` is a `wait_for` on its queue."""
    queue = asyncio.Queue()
    applied = []

    class Watcher:
        async def updates(self, timeout):
            return await asyncio.wait_for(queue.get(), timeout)

        async def stop(self):
            return None

    class Kv:
        async def watchall(self):
            return Watcher()

        async def status(self):  # an empty bucket
            return SimpleNamespace(stream_info=SimpleNamespace(state=SimpleNamespace(last_seq=0, messages=0)))

    queue.put_nowait(None)  # the initial load: no entries
    follower = KvFollower(Kv(), applied.append, "test-follower")
    await follower.start()
    await asyncio.sleep(0)  # the follow task waits in updates()
    loop = asyncio.get_running_loop()
    loop.call_soon(queue.put_nowait, "an update")  # arrives in the same turn as stop()'s cancel
    await ended_within(follower.stop(), 5, follower._task)
    if sys.version_info < (3, 12):
        assert applied == ["an update"], "the race was not reproduced"


async def test_only_tenants_holdings_are_projected_for_the_gates(brain, bus):
    """The gates (scheduler, adaptation) follow `cnc-governance` for tenants' quotas, policies and
    holdings; a workload without a tenant (an operator's) is never checked, so its holding is not
    written there — nor is the ledger head, which has a bucket of its own."""
    from cncbrain.bus.streams import KV_GOVERNANCE
    from services.governance.ledger_store import HEAD_BUCKET, HEAD_KEY

    op = brain.stub(brain.operator_token)
    await make_tenant(op, "acme")
    await op.AdmitWorkload(gpb.AdmitWorkloadRequest(workload_id="svc-t", tenant_id="acme", gpus=1, gpu_types=["H100"],
                                                   kind=common.WORKLOAD_KIND_INFERENCE_SERVICE))
    for wid in ("svc-t", "svc-op"):  # svc-op: no admission, no tenant (an operator's deploy)
        placed = common.Placement(workload_id=wid, site_id="nyc", replicas=1, gpu_type="H100", gpus_per_unit=1)
        ev = spb.WorkloadEvent(workload_id=wid, state=spb.WORKLOAD_STATE_PLACED, generation=1, placements=[placed])
        ev.at.GetCurrentTime()
        await bus.publish(subjects.SCHEDULER_WORKLOAD, ev, workload=wid)
    for _ in range(200):
        held = brain.server.governor.state.holdings
        if "svc-t" in held.get("acme", {}) and "svc-op" in held.get("_none", {}):
            break
        await asyncio.sleep(0.02)
    await brain.server.governor.settled()
    keys = set(await bus.kv_items(KV_GOVERNANCE))
    assert "holding.acme.svc-t" in keys
    assert not any(k.startswith("holding._none.") for k in keys) and HEAD_KEY not in keys
    assert HEAD_KEY in await bus.kv_items(HEAD_BUCKET)


async def test_a_head_an_older_brain_kept_in_the_governance_bucket_is_moved(nats_server, bus, tmp_path):
    """Before the head had a bucket of its own it was `ledger.head` in `cnc-governance`: the anchor
    moves (tampering with the tail stays visible), and stale operator holdings go."""
    from cncbrain.bus.streams import KV_GOVERNANCE
    from services.governance.ledger_store import HEAD_BUCKET, HEAD_KEY

    b = await start(nats_server, tmp_path)
    length = (await b.stub(b.operator_token).VerifyLedger(gpb.VerifyLedgerRequest())).length
    await b.close()
    await b.server.stop()
    head = (await (await bus.kv(HEAD_BUCKET)).get(HEAD_KEY)).value
    await (await bus.kv(HEAD_BUCKET)).delete(HEAD_KEY)
    old = await bus.kv(KV_GOVERNANCE)
    await old.put(HEAD_KEY, head)
    await old.put("holding._none.svc-old", b'{"reserved_gpus": {}, "reserved_cost_per_hour": 0, "placed": {}}')
    b2 = await start(nats_server, tmp_path)
    try:
        result = await b2.stub(b2.operator_token).VerifyLedger(gpb.VerifyLedgerRequest())
        assert result.ok and result.length == length
        assert (await (await bus.kv(HEAD_BUCKET)).get(HEAD_KEY)).value == head
        keys = set(await bus.kv_items(KV_GOVERNANCE))
        assert HEAD_KEY not in keys and "holding._none.svc-old" not in keys
    finally:
        await b2.close()
        await b2.server.stop()
