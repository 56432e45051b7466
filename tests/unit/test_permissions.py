"""The permission table against the bus's registries: every stream and bucket has an owner that
creates it; every subject a role publishes is granted; nats-server accepts the rendered config."""

import subprocess

import services.governance.ledger_store as ledger_store
from cncbrain import lease
from cncbrain.auth import TOKENS_BUCKET
from cncbrain.bus import streams, subjects
from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR, ensure_identities, load_identities, seed_file
from cncbrain.bus.permissions import BUCKET_OWNERS, OBJECT_OWNERS, STREAM_OWNERS, grant_for, may_create
from cncbrain.natsserver import find_nats_server
from services.adaptation.events import ADAPTATION_BUCKET


def test_every_stream_and_bucket_has_an_owner_that_creates_it():
    names = {s.name for s in subjects.STREAMS}
    assert names == set(STREAM_OWNERS)
    buckets = {*streams.BUCKETS, TOKENS_BUCKET, streams.KV_GOVERNANCE, ledger_store.HEAD_BUCKET,
               ADAPTATION_BUCKET, *lease.BUCKETS}
    assert buckets == set(BUCKET_OWNERS)
    for stream, owner in STREAM_OWNERS.items():
        assert may_create(owner, stream)
        assert not may_create("site-x", stream)
    for bucket, owner in BUCKET_OWNERS.items():
        assert may_create(owner, f"KV_{bucket}")
        others = {o for o in BUCKET_OWNERS.values() if o != owner}
        assert not any(may_create(o, f"KV_{bucket}") for o in others)
    assert set(OBJECT_OWNERS) == {ledger_store.CHECKPOINT_BUCKET}
    for bucket, owner in OBJECT_OWNERS.items():
        assert may_create(owner, f"OBJ_{bucket}")
        assert not any(may_create(o, f"OBJ_{bucket}") for o in {*BUCKET_OWNERS.values(), "site-x"} - {owner})


def test_the_only_purge_a_service_may_make_is_of_its_own_object_store():
    for identity in ("governance", "scheduler", "perception", "adaptation", "emulator", "site-x"):
        purges = [p for p in grant_for(identity).publish if ".STREAM.PURGE." in p or ".STREAM.DELETE." in p
                  or ".STREAM.UPDATE." in p or ".MSG.DELETE." in p]
        assert purges == (["$JS.API.STREAM.PURGE.OBJ_cnc-ledger-checkpoint"] if identity == "governance" else [])


def test_a_site_publishes_only_its_own_subjects():
    g = grant_for("site-chicago")
    own = [s for s in g.publish if s.startswith("cnc.site.")]
    assert own and all(s.startswith("cnc.site.chicago.") for s in own)
    assert not any(s.startswith(("$KV.", "cnc.scheduler", "cnc.perception", "cnc.governance")) for s in g.publish)
    assert not any("STREAM.CREATE" in s or "STREAM.DELETE" in s for s in g.publish)
    assert "cnc.scheduler.placement.>" not in g.subscribe


def test_credentials_are_kept_private_and_reused(tmp_path):
    first = ensure_identities(tmp_path, ["admin", "scheduler", "site-a"])
    assert seed_file(tmp_path, "scheduler").stat().st_mode & 0o777 == 0o600
    again = ensure_identities(tmp_path, ["scheduler", "site-b"])
    assert again["scheduler"] == first["scheduler"]  # a restart authenticates as before
    assert set(load_identities(tmp_path)) == {"admin", "scheduler", "site-a", "site-b"}
    binary, _ = find_nats_server()
    conf = tmp_path / "server.conf"
    conf.write_text("listen: 127.0.0.1:4222\njetstream {}\n" + (tmp_path / NATS_DIR / AUTH_FILE).read_text())
    check = subprocess.run([binary, "-c", str(conf), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_docs_show_the_permission_table_as_it_is():
    from pathlib import Path

    from cncbrain.bus.permissions import markdown_table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert markdown_table() in doc, "regenerate the table in docs/security.md from cncbrain.bus.permissions.markdown_table()"


def test_the_credentials_command_makes_a_folder_nats_server_accepts(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "cncbrain.commands.credentials", "--out", str(tmp_path / "s"),
                          "--sites", "a", "b"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(load_identities(tmp_path / "s")) == {"admin", "governance", "scheduler", "perception", "adaptation",
                                                    "emulator", "site-a", "site-b"}
    assert (tmp_path / "s" / "governance" / "signing.key").stat().st_mode & 0o777 == 0o600
    bad = subprocess.run([sys.executable, "-m", "cncbrain.commands.credentials", "--out", str(tmp_path / "t"),
                          "--sites", "no good"], capture_output=True, text=True)
    assert bad.returncode != 0 and "site id" in bad.stderr
