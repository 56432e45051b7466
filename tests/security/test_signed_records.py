"""Token records honoured only when governance vouches for them, on all four services: the four run
in this process with NATS credentials (each its own identity) and auth on; the attacker writes the
token bucket with write access (as `admin`: what an identity that got to write there could do)."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.adaptation.v1 import adaptation_pb2_grpc
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import TOKENS_BUCKET, bearer_metadata
from cncbrain.identity import Role, TokenRecord, hash_secret
from cncbrain.signing import Signer

from support.tenants import tenant_with_token

pytestmark = pytest.mark.integration


async def status_of(channels, name: str, token: str) -> grpc.StatusCode:
    """The status of one cheap authenticated call to service `name` with `token`."""
    md = bearer_metadata(token)
    ch = channels[name]
    calls = {
        "governance": lambda: governance_pb2_grpc.GovernanceServiceStub(ch).WhoAmI(gpb.WhoAmIRequest(), metadata=md),
        "perception": lambda: perception_pb2_grpc.PerceptionServiceStub(ch).ListSites(
            ppb.ListSitesRequest(), metadata=md),
        "scheduler": lambda: scheduler_pb2_grpc.SchedulerServiceStub(ch).ListWorkloads(
            spb.ListWorkloadsRequest(), metadata=md),
        "adaptation": lambda: adaptation_pb2_grpc.AdaptationServiceStub(ch).ListActions(
            apb.ListActionsRequest(), metadata=md),
    }
    try:
        await calls[name]()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def all_statuses(channels, token):
    return {name: await status_of(channels, name, token) for name in channels}


async def eventually(channels, token, code, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = await all_statuses(channels, token)
        if set(got.values()) == {code} or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_forged_token_records_are_refused_by_all_four_services(brain, admin):
    servers, channels, operator = brain
    assert set((await eventually(channels, operator, grpc.StatusCode.OK)).values()) == {grpc.StatusCode.OK}
    kv = await admin.kv(TOKENS_BUCKET)
    forged = {
        "tok_00000000000000aa": None,  # no signature at all
        "tok_00000000000000bb": Signer(Ed25519PrivateKey.generate()),  # signed, not with governance's key
    }
    tokens = []
    for token_id, signer in forged.items():
        secret = "s" * 43
        record = TokenRecord(token_id, hash_secret(secret), Role.OPERATOR, None, time.time(), "forged")
        await kv.put(token_id, signer.seal(record.to_dict()) if signer else record.to_json())
        tokens.append(f"{token_id}.{secret}")
    await asyncio.sleep(0.5)  # every feed has seen both records by now
    for token in tokens:
        assert set((await all_statuses(channels, token)).values()) == {grpc.StatusCode.UNAUTHENTICATED}
    refused = [servers[n].auth_feed.refused for n in ("perception", "scheduler")] + [servers["adaptation"].feed.refused]
    assert refused == [2, 2, 2]


async def test_revocation_holds_on_every_service_within_a_second_and_cannot_be_replayed(brain, admin):
    servers, channels, operator = brain
    gov, md, issued = await tenant_with_token(channels, operator, "lab", 4)
    token, token_id = issued.token, issued.info.token_id
    # IssueToken writes the record before answering: usable everywhere at once
    assert set((await eventually(channels, token, grpc.StatusCode.OK)).values()) == {grpc.StatusCode.OK}
    kv = await admin.kv(TOKENS_BUCKET)
    before = (await kv.get(token_id)).value  # governance's own signed record, not yet revoked
    await gov.RevokeToken(gpb.RevokeTokenRequest(token_id=token_id), metadata=md)
    returned = time.monotonic()
    got = await eventually(channels, token, grpc.StatusCode.UNAUTHENTICATED, timeout_s=1.0)
    within = time.monotonic() - returned
    assert set(got.values()) == {grpc.StatusCode.UNAUTHENTICATED}, (got, within)
    # replaying the signed record of before the revocation does not bring the token back
    await kv.put(token_id, before)
    await asyncio.sleep(0.5)
    assert set((await all_statuses(channels, token)).values()) == {grpc.StatusCode.UNAUTHENTICATED}
    assert json.loads(before)["_sig"]


async def test_a_tenants_policy_cannot_be_widened_through_the_bus(brain, admin, attacker):
    servers, channels, operator = brain
    gov = governance_pb2_grpc.GovernanceServiceStub(channels["governance"])
    md = bearer_metadata(operator)
    policy = gpb.PlacementPolicy(allowed_sites=["a"], restrict_sites=True)
    await gov.CreateTenant(gpb.CreateTenantRequest(tenant_id="lab", quota=gpb.Quota(max_gpus=2), policy=policy),
                           metadata=md)
    gates = {"scheduler": servers["scheduler"].coordinator.governance.gate, "adaptation": servers["adaptation"].gate}

    async def seen(check, timeout_s=5.0):
        deadline = time.monotonic() + timeout_s
        while not all(check(g) for g in gates.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return all(check(g) for g in gates.values())

    assert await seen(lambda g: "lab" in g.tenants and g.tenants["lab"].quota.max_gpus == 2)
    wide = {"tenant_id": "lab", "quota": {"gpus_by_type": {}, "max_gpus": 24, "max_cost_per_hour": None},
            "policy": {"allowed_regions": None, "allowed_sites": None, "allowed_gpu_types": None,
                       "max_cost_per_hour": None}}
    site = await attacker("site-a")  # a site's identity may not write governance's bucket at all
    await site.nc.publish("$KV.cnc-governance.tenant.lab", json.dumps(wide).encode())
    assert await site.refused("$KV.cnc-governance.tenant.lab")
    kv = await admin.kv("cnc-governance")  # with write access, unsigned or signed by another key
    await kv.put("tenant.lab", json.dumps(wide).encode())
    await kv.put("tenant.lab", Signer(Ed25519PrivateKey.generate()).seal(wide))
    assert await seen(lambda g: g.refused >= 2)
    for gate in gates.values():
        view = gate.tenants["lab"]
        assert view.quota.max_gpus == 2 and view.policy.allowed_sites == frozenset({"a"})
        assert not gate.allows("w1", "lab", "b", "H100")
