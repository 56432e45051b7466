"""Governance's signed checkpoint (services/governance/checkpoint.py), on the brain's authenticated
NATS as governance's own identity: a start from the checkpoint plus the entries after it gives the
state a fold of the whole ledger gives; a checkpoint not signed by governance, one whose state was
changed under its signature, or one of another ledger is ignored with a log line, and the start
folds the whole ledger."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cncbrain.bus import Bus
from cncbrain.bus.subjects import LEDGER_STREAM
from cncbrain.governance.policy import Placement, Quota, WorkloadDemand
from cncbrain.identity import Role
from cncbrain.signing import Signer, ensure_signing_key
from services.governance.checkpoint import encode
from services.governance.domain.state import Tenant
from services.governance.events import Governor
from services.governance.settings import Settings

pytestmark = pytest.mark.integration
EVERY = 20


@pytest.fixture
async def start(secure_nats, secrets, monkeypatch):
    """`await start(every)`: a Governor on its own connection as `governance` (stopped at the end)."""
    ensure_signing_key(secrets)
    monkeypatch.setenv("CNC_SECRETS_DIR", str(secrets))
    running: list[tuple[Bus, Governor]] = []

    async def make(every: int) -> Governor:
        bus = await Bus.connect(secure_nats.url, "governance", identity="governance", secrets_dir=secrets)
        gov = Governor(bus, Settings(nats_url=secure_nats.url, grpc_port=0, checkpoint_every=every,
                                     ledger_deny_delete=False))
        await gov.start()
        running.append((bus, gov))
        return gov

    async def stop(gov: Governor) -> None:
        for bus, g in [r for r in running if r[1] is gov]:
            await g.stop()
            await bus.close()
            running.remove((bus, g))

    make.stop = stop  # type: ignore[attr-defined]
    yield make
    for bus, gov in running:
        await gov.stop()
        await bus.close()


async def fill(gov: Governor, rounds: int, tag: str) -> None:
    """Every kind of change the state folds: tenants, quotas, tokens issued and revoked, admissions,
    placements committed and released, workloads ended, sites enrolled."""
    t0 = 1.7e9
    for i in range(rounds):
        tenant = f"{tag}-tenant-{i % 3}"
        if tenant not in gov.state.tenants:
            await gov.submit(lambda s, t=tenant: (None, [s.create_tenant(t, quota=Quota({"H100": 64}, 64, 1e4))]), "op")
        token = await gov.submit(lambda s, t=tenant: (None, [s.issue_token(Role.TENANT, t)[1]]), "op")
        if i % 2:
            await gov.submit(lambda s, tid=token[1][0].subject: (None, [s.revoke_token(tid)]), "op")
        wid = f"{tag}w{i}"
        await gov.submit(lambda s, t=tenant, w=wid: (None, [s.admit(WorkloadDemand(w, t, "inference", 2, "H100"))[1]]),
                         "op")
        p = Placement(wid, tenant, f"{wid}@s{i % 4}", f"s{i % 4}", "eu", "H100", 2, 3.5)
        await gov.submit(lambda s, p=p, i=i: (None, [s.placement_committed(p, t0 + i)]), "scheduler")
        if i % 3 == 0:
            await gov.submit(lambda s, p=p, i=i: (None, [s.placement_released(p.unit_id, p.workload_id, p.tenant_id,
                                                                                t0 + i + 0.5, "scaled down")]),
                             "scheduler")
        elif i % 3 == 1:
            await gov.submit(lambda s, t=tenant, w=wid, i=i: (None, [s.workload_ended(w, t, t0 + i + 0.7, "cancelled")]),
                             "scheduler")
        if i % 7 == 0:
            await gov.submit(lambda s, i=i: (None, [s.enroll_site(f"s{i % 4}", "eu", {"H100": (8, 3.5)})]), "op")
        if i % 5 == 0:
            await gov.submit(lambda s, t=tenant, i=i: (None, [s.set_quota(t, Quota({"H100": 32 + i}, None, None))]), "op")


async def settled(gov: Governor) -> None:
    """Wait for a checkpoint being written to be stored."""
    for _ in range(200):
        if gov._checkpointing is None or gov._checkpointing.done():
            return
        await asyncio.sleep(0.05)


async def test_a_start_from_the_checkpoint_gives_the_state_of_the_whole_fold(start, caplog):
    caplog.set_level(logging.INFO, logger="services.governance.events")
    writer = await start(EVERY)
    await fill(writer, 12, "a")
    await settled(writer)
    checkpointed = writer._checkpointed
    assert checkpointed >= EVERY  # written while the ledger grew
    await fill(writer, 3, "b")  # entries after the last checkpoint
    await settled(writer)
    length = writer.head.length
    assert length > writer._checkpointed
    await start.stop(writer)

    caplog.clear()
    resumed = await start(EVERY)
    assert f"a checkpoint at entry {resumed._checkpointed}, then" in caplog.text
    assert 0 < length - resumed._checkpointed < EVERY + 16
    assert resumed.load_verification.ok
    got = resumed.head, resumed.state.to_dict(), resumed.state.usage, resumed.state.holdings
    # and it goes on from there
    await resumed.submit(lambda s: (None, [s.create_tenant("late-tenant")]), "op")
    assert resumed.head.length == length + 1
    await start.stop(resumed)
    full = await start(0)  # no checkpoints: the whole ledger folded
    assert f"{length + 1} stored entries folded from the start" in caplog.text
    assert full.load_verification.ok
    full.state.tenants.pop("late-tenant")
    assert got[0].length == length and full.head.length == length + 1
    assert got[1] == full.state.to_dict()
    assert got[2] == full.state.usage and got[3] == full.state.holdings


async def test_a_forged_or_altered_checkpoint_is_refused_and_the_ledger_folded(start, caplog):
    caplog.set_level(logging.INFO, logger="services.governance.events")
    writer = await start(EVERY)
    await fill(writer, 8, "a")
    await settled(writer)
    genuine = await writer.store.read_checkpoint()
    assert genuine
    head, seq = writer.head, writer.store.last_seq
    forged_state = writer.state.snapshot()
    forged_state["tenants"].append(["mallory", "mallory", {"gpus_by_type": {}, "max_gpus": 10**6,
                                                           "max_cost_per_hour": None}, _policy(), time.time()])
    await start.stop(writer)
    full_state = None
    for blob, why in [
        (encode(forged_state, head, seq, Signer(Ed25519PrivateKey.generate()), time.time()),
         "its manifest is not signed by governance"),  # another key
        (_with_body(genuine, forged_state), "its state is not the one its signed manifest names"),  # altered body
        (b"garbage", "not a checkpoint"),
    ]:
        gov = await start(0)  # the ledger's own fold, to compare; writes no checkpoint
        full_state = gov.state.to_dict()
        await gov.store.write_checkpoint(blob)
        await start.stop(gov)
        caplog.clear()
        loaded = await start(EVERY)
        assert f"the stored checkpoint is refused ({why}" in caplog.text
        assert "folded from the start" in caplog.text
        assert "mallory" not in loaded.state.tenants
        assert loaded.state.to_dict() == full_state
        await start.stop(loaded)


async def test_a_checkpoint_of_another_ledger_is_ignored(start, caplog, admin):
    caplog.set_level(logging.INFO, logger="services.governance.events")
    writer = await start(EVERY)
    await fill(writer, 8, "a")
    await settled(writer)
    assert writer._checkpointed >= EVERY
    await start.stop(writer)
    # the ledger is replaced (an operator rebuilt the stream): the checkpoint no longer describes it
    await admin.js.delete_stream(LEDGER_STREAM.name)
    caplog.clear()
    gov = await start(EVERY)
    assert "is not of this ledger (stale or from another); folding the whole ledger" in caplog.text
    assert gov.head.length == 0 and not gov.state.tenants


def _policy() -> dict:
    from cncbrain.governance.policy import PlacementPolicy, policy_to_dict

    return policy_to_dict(PlacementPolicy())


def _with_body(blob: bytes, state: dict) -> bytes:
    import json
    import zlib

    from services.governance.domain.state import as_json

    manifest, _, _ = blob.partition(b"\n")
    return manifest + b"\n" + zlib.compress(json.dumps(as_json(state)).encode())


def test_tenant_round_trip_keeps_every_field():
    from services.governance.domain.state import GovernanceState

    s = GovernanceState()
    s.tenants["t"] = Tenant("t", "T", Quota({"H100": 3}, 5, 7.5), created_at=1.5)
    assert GovernanceState.from_dict(s.to_dict()).tenants == s.tenants
