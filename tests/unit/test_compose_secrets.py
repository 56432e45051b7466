"""What the compose stacks' `secrets` container runs (deploy/docker-compose.yml): every process gets
its own folder with only what it needs, and nats-server accepts deploy/nats/*.conf with the
`nats-server` folder (its authorization block, the CA, each node's certificate)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cncbrain.natsserver import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("governance", "scheduler", "perception", "adaptation", "emulator", "agents-compose", "admin")


def make(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    exports = [a for p in PROCESSES for a in ("--export", f"{p}={tmp_path / 'out' / p}")]
    return subprocess.run([sys.executable, "-m", "cncbrain.commands.credentials", "--out", str(tmp_path / "all"),
                           "--scenario", "abilene", "--host", "agents-compose", "--nats-tls", "nats nats-2 nats-3",
                           "--owner", f"{os.getuid()}:{os.getgid()}", *exports,
                           "--export", f"nats-server={tmp_path / 'out' / 'nats'}",
                           "--export", f"public={tmp_path / 'out' / 'public'}", *extra],
                          capture_output=True, text=True)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_each_process_gets_only_its_own_key_and_nats_server_accepts_the_compose_configuration(tmp_path):
    made = make(tmp_path)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    assert files(out / "scheduler") == {"nats/scheduler.nk", "governance.pub", "tls/ca.pem"}
    assert files(out / "governance") == {"nats/governance.nk", "governance.pub", "tls/ca.pem", "governance/signing.key"}
    assert files(out / "agents-compose") == {"nats/agents-compose.nk", "governance.pub", "tls/ca.pem"}
    assert files(out / "public") == {"nats/identities.json", "governance.pub", "tls/ca.pem"}
    assert files(out / "nats") == {"auth.conf", "ca.pem", *(f"nats-{n}.{x}" for n in ("nats", "nats-2", "nats-3")
                                                              for x in ("pem", "key"))}
    assert not any(p.name == "ca.key" for p in out.rglob("*"))  # the CA's key stays in the master folder
    for path in out.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    # nats-server takes both compose configurations with this node's files (as the containers mount them)
    binary, _ = find_nats_server()
    etc = tmp_path / "etc"
    shutil.copytree(out / "nats", etc / "secrets")
    for conf in ("nats.conf", "cluster.conf"):
        shutil.copy(ROOT / "deploy" / "nats" / conf, etc / conf)
        env = {**os.environ, "NATS_SERVER_NAME": "nats-2", "NATS_CLUSTER_NAME": "cnc", "NATS_JS_MAX_MEMORY": "64MB",
               "NATS_JS_MAX_FILE": "1GB", "NATS_CLIENT_ADVERTISE": "nats-2:4222",
               "NATS_TLS_CERT": str(etc / "secrets" / "nats-nats-2.pem"),
               "NATS_TLS_KEY": str(etc / "secrets" / "nats-nats-2.key"), "NATS_TLS_CA": str(etc / "secrets" / "ca.pem")}
        check = subprocess.run([binary, "-c", str(etc / conf), "-t"], capture_output=True, text=True, env=env)
        assert check.returncode == 0 and "is valid" in check.stdout + check.stderr, (conf, check.stderr)

    # a second start keeps every key and certificate
    before = {p: p.read_bytes() for p in (out / "scheduler" / "nats" / "scheduler.nk", out / "nats" / "nats-nats.pem")}
    again = make(tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize(("args", "message"), [
    (["--export", "nobody=x"], "no such identity"),
    (["--export", "governance"], "expected WHO=DIR"),
    (["--owner", "cnc"], "UID[:GID]"),
    (["--nats-tls", "../x"], "node name"),
])
def test_bad_secrets_arguments_are_named(tmp_path, args, message):
    bad = subprocess.run([sys.executable, "-m", "cncbrain.commands.credentials", "--out", str(tmp_path / "s"), *args],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr


def test_only_the_services_that_call_on_their_own_behalf_and_the_operators_one_shot_hold_the_operator_token():
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    holders = {name for name, svc in compose["services"].items()
               if any(str(v).startswith("operator-token:") for v in svc.get("volumes", []))
               or "CNC_TOKEN_FILE" in (svc.get("environment") or {}) or "CNC_TOKEN" in (svc.get("environment") or {})}
    # governance writes it; scheduler and adaptation call governance and perception with it; `enroll`
    # is the operator's own one-shot. A site agent, the emulator or perception never holds it.
    assert holders == {"governance", "scheduler", "adaptation", "enroll"}
