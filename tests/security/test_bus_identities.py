"""The bus as an attacker finds it: a raw nats-py client against the brain's nats-server, with no
credentials, with a key the server never admitted, or holding one identity's seed (a site's, a
service's). Every refusal is the server's own (authentication, subject permissions)."""

from __future__ import annotations

import asyncio
import json

import nats
import nats.errors
import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import envelope, subjects
from cncbrain.bus.credentials import new_seed

from support.nats_probe import round_trip

pytestmark = pytest.mark.integration


def event_headers(message) -> dict[str, str]:
    return envelope.make_headers(message)


async def nothing_on(admin, subject: str, attempt, wait_s: float = 0.3, expect: int = 0) -> list[str]:
    """Run `attempt()` while admin listens on `subject`; return what arrived (waiting up to 10 s for
    the `expect` messages that should, then `wait_s` for any that should not)."""
    got: list[str] = []

    async def on(msg):
        got.append(msg.subject)

    sub = await admin.nc.subscribe(subject, cb=on)
    await round_trip(admin.nc)
    await attempt()
    deadline = asyncio.get_running_loop().time() + 10
    while len(got) < expect and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(wait_s)
    await sub.unsubscribe()
    return got


async def test_anonymous_and_unknown_clients_cannot_connect(secure_nats):
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(secure_nats.url, allow_reconnect=False, connect_timeout=2)
    stranger = new_seed().decode()  # a well-formed key the server never admitted
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(secure_nats.url, allow_reconnect=False, connect_timeout=2, nkeys_seed_str=stranger)


async def test_site_cannot_publish_another_sites_telemetry_or_heartbeat(attacker, admin):
    a = await attacker("site-a")
    telemetry = site_pb.SiteTelemetry(site_id="b", available=True)

    async def forge():
        for event in ("telemetry", "heartbeat", "registered", "answer", "applied"):
            await a.nc.publish(f"cnc.site.b.{event}", telemetry.SerializeToString(), headers=event_headers(telemetry))

    assert await nothing_on(admin, "cnc.site.b.>", forge) == []
    for event in ("telemetry", "heartbeat", "registered", "answer", "applied"):
        assert await a.refused(f"cnc.site.b.{event}")

    async def own():  # the same client may speak for its own site: the refusal is about the site
        await a.nc.publish("cnc.site.a.telemetry", telemetry.SerializeToString())
        await round_trip(a.nc)

    assert await nothing_on(admin, "cnc.site.a.telemetry", own, expect=1) == ["cnc.site.a.telemetry"], a.errors


async def test_site_cannot_forge_placements_site_state_or_any_bucket(attacker, admin):
    a = await attacker("site-a")
    placement = spb.PlacementCommitted()
    placement.placement.workload_id, placement.placement.site_id, placement.placement.generation = "w1", "a", 99
    forged = {
        "cnc.scheduler.placement.a": placement.SerializeToString(),  # even for its own site
        "cnc.scheduler.workload.w1": b"",
        "cnc.perception.site_state.b": b"",  # "site b is down"
        "cnc.adaptation.action": b"",
        "cnc.governance.ledger": b"",
        "$KV.cnc-tokens.tok_0000000000000000": b"{}",
        "$KV.cnc-governance.tenant.lab": b"{}",
        "$KV.cnc-workloads.w1": b"",
        "$KV.cnc-sites.b": b"",
    }

    async def forge():
        for subject, data in forged.items():
            await a.nc.publish(subject, data)

    for pattern in ("cnc.>", "$KV.>"):
        assert await nothing_on(admin, pattern, forge) == []
    for subject in forged:
        assert await a.refused(subject), (subject, a.errors)
    for bucket, key in (("cnc-tokens", "tok_0000000000000000"), ("cnc-governance", "tenant.lab")):
        kv = await admin.kv(bucket)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(key)


async def test_site_reads_only_its_own_placements(attacker, admin):
    a = await attacker("site-a")
    got: list[str] = []

    async def on(msg):
        got.append(msg.subject)

    await a.nc.subscribe("cnc.scheduler.placement.b", cb=on)
    await a.nc.subscribe("cnc.scheduler.placement.>", cb=on)
    await a.nc.subscribe("_INBOX.scheduler.>", cb=on)  # another identity's replies
    assert await a.refused("cnc.scheduler.placement.b")
    assert await a.refused("cnc.scheduler.placement.>")
    assert await a.refused("_INBOX.scheduler.>")
    placement = spb.PlacementCommitted()
    placement.placement.site_id = "b"
    await admin.publish(subjects.SCHEDULER_PLACEMENT, placement, site="b")
    await asyncio.sleep(0.3)
    assert got == []
    # Nor through JetStream: no consumer on another site's placements, no message gets, no tokens.
    js = a.nc.jetstream(timeout=1.0)
    api_calls = {
        "$JS.API.CONSUMER.CREATE.CNC_PLACEMENTS.agent-a.cnc.scheduler.placement.b": {"stream_name": "CNC_PLACEMENTS"},
        "$JS.API.CONSUMER.CREATE.CNC_PLACEMENTS.agent-a-catchup.cnc.scheduler.placement.b": {"stream_name": "CNC_PLACEMENTS"},
        "$JS.API.CONSUMER.MSG.NEXT.CNC_PLACEMENTS.agent-b-catchup": {"batch": 1},
        "$JS.API.CONSUMER.CREATE.CNC_PLACEMENTS": {"stream_name": "CNC_PLACEMENTS"},
        "$JS.API.STREAM.MSG.GET.CNC_PLACEMENTS": {"seq": 1},
        "$JS.API.STREAM.INFO.KV_cnc-tokens": {},
        "$JS.API.DIRECT.GET.KV_cnc-tokens": {"seq": 1},
    }
    for subject, body in api_calls.items():
        with pytest.raises(nats.errors.TimeoutError):
            await a.nc.request(subject, json.dumps(body).encode(), timeout=0.3)
        assert await a.refused(subject), (subject, a.errors)
    with pytest.raises(Exception):  # noqa: B017 - whichever way nats-py reports it, no bucket
        await js.key_value("cnc-tokens")


async def test_only_governance_writes_tokens_tenants_and_ledger(attacker, admin):
    for identity in ("scheduler", "perception", "adaptation", "emulator"):
        svc = await attacker(identity)
        for subject in ("$KV.cnc-tokens.tok_0000000000000000", "$KV.cnc-governance.tenant.lab",
                        "$KV.cnc-ledger-head.ledger.head", "cnc.governance.ledger"):
            await svc.nc.publish(subject, b"{}")
            assert await svc.refused(subject), (identity, subject)
    gov = await attacker("governance")
    ack = await gov.nc.request("$KV.cnc-governance.tenant.lab", b"{}", timeout=2)
    assert b'"seq"' in ack.data  # the one identity that may


async def test_nobody_but_admin_deletes_purges_or_edits_streams(attacker):
    for identity in ("scheduler", "governance", "site-a"):
        svc = await attacker(identity)
        for subject in ("$JS.API.STREAM.DELETE.CNC_WORKLOADS", "$JS.API.STREAM.PURGE.CNC_LEDGER",
                        "$JS.API.STREAM.UPDATE.KV_cnc-tokens", "$JS.API.STREAM.MSG.DELETE.CNC_LEDGER"):
            with pytest.raises(nats.errors.TimeoutError):
                await svc.nc.request(subject, b"{}", timeout=0.3)
            assert await svc.refused(subject), (identity, subject)


async def test_a_restarted_adaptation_reads_its_own_actions_back(secure_nats, secrets, monkeypatch):
    """Adaptation's start reloads its recent actions from its own stream (CNC_ADAPTATION) through a
    consumer: its identity may create one. Without that grant every restart after its first action
    failed on a permission violation, seen as a 5 s timeout and retried for ever (the compose
    cluster's adaptation never served again after a kill)."""
    from cnc.adaptation.v1 import adaptation_pb2 as apb
    from cncbrain.bus import Bus
    from cncbrain.signing import ensure_signing_key
    from services.adaptation.server import AdaptationServer
    from services.adaptation.settings import Settings as AdaptationSettings

    ensure_signing_key(secrets)
    monkeypatch.setenv("CNC_SECRETS_DIR", str(secrets))
    before = await Bus.connect(secure_nats.url, "adaptation-before", identity="adaptation", secrets_dir=secrets)
    await before.publish(subjects.ADAPTATION_ACTION, apb.AdaptationAction(
        action_id="a-1", kind=apb.ACTION_KIND_SCALE_DOWN, workload_id="w-1", reason="before the restart"))
    await before.close()
    server = await asyncio.wait_for(
        AdaptationServer(AdaptationSettings(nats_url=secure_nats.url, grpc_port=0, auth_enabled=True)).start(), 30)
    try:
        assert [a.action_id for a in server.adapter.actions] == ["a-1"]
    finally:
        await server.stop()
