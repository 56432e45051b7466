"""A ledger no one but governance can extend: an entry appended with a perfectly valid hash chain
but without governance's signature is named by `ledger verify` (also against an earlier head) and
never folded into governance's state; a deleted ledger stream is "ledger removed", exit 1; the
ledger names the token behind a change, cancels included."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import bearer_metadata
from cncbrain.bus import subjects
from cncbrain.identity import hash_secret
from cncbrain.signing import Signer
from services.governance.domain.ledger import LedgerHead
from services.governance.ledger_store import to_proto

from support.tenants import one_site_pool, tenant_with_token

pytestmark = pytest.mark.integration


async def cli(*args: str, token: str) -> subprocess.CompletedProcess:
    """`cncbrain ledger ARGS` in a child process (this event loop keeps serving governance meanwhile)."""
    env = {**os.environ, "CNC_TOKEN": token}
    env.pop("CNC_SECRETS_DIR", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cncbrain.commands.ledger", *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def forge_entry(admin, head: LedgerHead, signer: Signer | None = None) -> str:
    """Append an operator-token entry chained onto `head`, as one block; returns the token."""
    secret = "f" * 43
    entry = head.next_entry("token.issued", "governance", "tok_00000000000000ff", {
        "token_id": "tok_00000000000000ff", "secret_sha256": hash_secret(secret), "role": "operator",
        "tenant_id": None, "created_at": time.time(), "description": "forged"}, time.time_ns())
    if signer is not None:
        entry.signature = signer.sign(entry.hash.encode())
    block = gpb.LedgerBlock(entries=[to_proto(entry)])
    await admin.js.publish(subjects.GOVERNANCE_LEDGER.template, block.SerializeToString(), stream=subjects.LEDGER_STREAM.name,
                           headers={"Cnc-Type": gpb.LedgerBlock.DESCRIPTOR.full_name})
    return f"tok_00000000000000ff.{secret}"


async def test_an_appended_entry_with_a_valid_chain_but_no_signature_is_flagged(brain, admin, tmp_path):
    servers, channels, operator = brain
    gov = governance_pb2_grpc.GovernanceServiceStub(channels["governance"])
    md = bearer_metadata(operator)
    await gov.CreateTenant(gpb.CreateTenantRequest(tenant_id="lab", quota=gpb.Quota(max_gpus=4)), metadata=md)
    earlier = await gov.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=md)
    assert earlier.ok and earlier.length >= 2
    head = LedgerHead(earlier.length, earlier.head_hash)
    forged_token = await forge_entry(admin, head)
    now = await gov.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=md)
    assert not now.ok and [(i.index, i.kind) for i in now.issues] == [(earlier.length, "unsigned")]
    against = await gov.VerifyLedger(gpb.VerifyLedgerRequest(expected_length=head.length,
                                                             expected_head_hash=head.hash), metadata=md)
    assert not against.ok and [i.kind for i in against.issues] == ["unsigned"]
    address = f"127.0.0.1:{servers['governance'].port}"
    out = await cli("verify", "--governance", address, token=operator)
    assert out.returncode == 1 and f"entry {earlier.length}: unsigned" in out.stdout, out.stdout + out.stderr
    out = await cli("verify", "--governance", address, "--expect", f"{head.length}:{head.hash}", token=operator)
    assert out.returncode == 1 and "unsigned" in out.stdout
    # a restarted governance does not fold it in: the forged operator token is no token
    await servers["governance"].stop()
    restarted = await type(servers["governance"])(servers["governance"].settings).start()
    servers["governance"] = restarted
    async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as ch:
        stub = governance_pb2_grpc.GovernanceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.WhoAmI(gpb.WhoAmIRequest(), metadata=bearer_metadata(forged_token))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # its own next entries are signed and stored after the forged one; only that one is named
        await stub.CreateTenant(gpb.CreateTenantRequest(tenant_id="lab2", quota=gpb.Quota(max_gpus=1)), metadata=md)
        after = await stub.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=md)
        assert [(i.index, i.kind) for i in after.issues] == [(earlier.length, "unsigned")], after
        assert after.length == earlier.length + 1 and after.entries_checked == earlier.length + 2


async def test_an_entry_signed_with_another_key_is_flagged(brain, admin):
    servers, channels, operator = brain
    gov = governance_pb2_grpc.GovernanceServiceStub(channels["governance"])
    md = bearer_metadata(operator)
    earlier = await gov.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=md)
    await forge_entry(admin, LedgerHead(earlier.length, earlier.head_hash), Signer(Ed25519PrivateKey.generate()))
    now = await gov.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=md)
    assert [(i.index, i.kind) for i in now.issues] == [(earlier.length, "unsigned")]


async def test_a_deleted_ledger_stream_is_reported_removed(brain, admin):
    servers, channels, operator = brain
    await admin.js.delete_stream(subjects.LEDGER_STREAM.name)
    gov = governance_pb2_grpc.GovernanceServiceStub(channels["governance"])
    resp = await gov.VerifyLedger(gpb.VerifyLedgerRequest(), metadata=bearer_metadata(operator))
    assert not resp.ok and resp.issues[0].kind == "removed" and resp.issues[0].detail.startswith("ledger removed")
    out = await cli("verify", "--governance", f"127.0.0.1:{servers['governance'].port}", token=operator)
    assert out.returncode == 1 and out.stdout.startswith("ledger removed"), out.stdout + out.stderr
    assert "Traceback" not in out.stderr


async def test_the_ledger_names_the_token_behind_a_cancel(brain, admin):
    servers, channels, operator = brain
    gov, md, issued = await tenant_with_token(channels, operator, "lab", 8)
    await one_site_pool(admin, channels, operator, servers["scheduler"])
    sched = scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"])
    tmd = bearer_metadata(issued.token)
    w = (await sched.DeployInferenceService(spb.DeployInferenceServiceRequest(service=common.InferenceServiceSpec(
        name="chat", model="7b", params_b=7, min_replicas=1, max_replicas=1, gpus_per_replica=1,
        slo=common.SloTargets(ttft_ms=500, tpot_ms=50), allowed_gpu_types=["H100"])), metadata=tmd)).workload
    await sched.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w.workload_id), metadata=tmd)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = (await gov.ListLedgerEntries(gpb.ListLedgerEntriesRequest(subject=w.workload_id, limit=50),
                                               metadata=md)).entries
        ended = [e for e in entries if e.kind == "workload.ended"]
        if ended:
            break
        await asyncio.sleep(0.1)
    assert [e.actor for e in entries if e.kind == "admission"] == [issued.info.token_id]
    assert [e.actor for e in ended] == [issued.info.token_id]
