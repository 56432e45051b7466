"""deploy/docker-compose.yml for real: build the image, bring the stack up with podman-compose, wait
for every health check; NATS admits only the brain's keys, over TLS (an anonymous client and a
plain one are refused; every process is connected with its own identity); the sites are enrolled
and the ledger is signed by governance; deploy an inference service and submit a training job
through the published gRPC port, see their placements on NATS, tear everything down and find
nothing left."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import nats
import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc

from support.brain_client import PlacementWatch, deploy, monitor, quiet, scheduler_channel, submit, wait_state
from support.compose_stack import Stack
from support.nats_probe import plain_exchange

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

SERVICES = {"nats", "governance", "perception", "scheduler", "adaptation", "emulator", "agents",
            "secrets", "provision", "enroll"}  # the last three: one-shot, ended with 0
IDENTITIES = {"governance", "perception", "scheduler", "adaptation", "emulator", "agents-compose"}
PLACED = {spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING}


async def check_nats_security(stack: Stack, kit) -> None:
    """Only the brain's keys, only over TLS, each process as itself."""
    from cnc.governance.v1 import governance_pb2 as gpb
    from cnc.governance.v1 import governance_pb2_grpc
    from cncbrain.bus.connection import connect_options
    from cncbrain.signing import load_verifier

    url = stack.nats_urls[0]
    host, port = url.removeprefix("nats://").split(":")
    info, answer = plain_exchange(host, int(port))  # a client without TLS: never served
    assert info["tls_required"] and info["auth_required"], info
    assert b"PONG" not in answer and b"+OK" not in answer, answer
    with pytest.raises(nats.errors.Error) as anonymous:  # over TLS, trusting the CA, but no key
        await nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=quiet,
                           **connect_options(None, None, kit / "tls" / "ca.pem"))
    assert "authorization" in str(anonymous.value).lower(), anonymous.value
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know the brain's
        await nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=quiet,
                           **connect_options("admin", kit))
    # Every connection is TLS and authenticated with a key of the brain; each process with its own.
    identities = {key: name for name, key in stack.identities().items()}
    connz = monitor(stack.monitor(), "/connz?auth=1&limit=1024")["connections"]
    assert connz and all(c.get("tls_version") for c in connz), [c.get("name") for c in connz if not c.get("tls_version")]
    connected = {identities.get(c.get("authorized_user", ""), "?") for c in connz}
    assert connected >= IDENTITIES and "?" not in connected, connected
    # Governance holds its signing key: the sites' enrollments are signed ledger entries.
    async with scheduler_channel(stack.governance, stack.operator_token()) as channel:
        ledger = governance_pb2_grpc.GovernanceServiceStub(channel)
        enrolled = (await ledger.ListLedgerEntries(gpb.ListLedgerEntriesRequest(kind="site.enrolled", limit=100),
                                                    timeout=10)).entries
        assert len({e.payload_json for e in enrolled}) >= 11, enrolled
        verifier = load_verifier(kit)
        signed = [e for e in enrolled if e.signature]
        assert signed and all(verifier.valid(e.hash.encode(), e.signature) for e in signed)


async def test_single_node_stack(image, log_dir, tmp_path):
    stack = Stack(image, log_dir=log_dir)
    watch = PlacementWatch()
    try:
        started = time.monotonic()
        stack.up()
        stack.wait_healthy()
        print(f"{stack.project}: up and healthy in {time.monotonic() - started:.1f} s")
        services = {name.removeprefix(f"{stack.project}_").rsplit("_", 1)[0] for name in stack.containers()}
        assert services >= SERVICES

        token = stack.operator_token()
        assert token, "governance issued no operator token"
        kit = stack.operator_kit(tmp_path / "operator")
        await check_nats_security(stack, kit)
        async with grpc.aio.insecure_channel(stack.scheduler) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await deploy(scheduler_pb2_grpc.SchedulerServiceStub(anonymous), "no-token")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        await watch.start(stack.nats_urls, kit)
        async with scheduler_channel(stack.scheduler, token) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            service_id = await deploy(stub, "chat")
            job_id = await submit(stub, "pretrain")
            placed = await watch.wait_for({service_id, job_id})
            assert sum(e.placement.replicas for e in placed[service_id]) >= 1
            shards = sorted(i for e in placed[job_id] for i in e.placement.shard_indices)
            assert shards == [0, 1]  # gang: all shards or none
            for workload_id in (service_id, job_id):
                await wait_state(stub, workload_id, PLACED)

            # The README's way in: the CLI on the host, pointed at the published ports. The operator
            # makes a tenant and gives it a token; the tenant deploys with it.
            def cli_env(token: str) -> dict[str, str]:
                return dict(os.environ, CNC_NATS_URL=stack.nats_urls[0], CNC_PERCEPTION_ADDR=stack.perception,
                            CNC_SCHEDULER_ADDR=stack.scheduler, CNC_GOVERNANCE_ADDR=stack.governance,
                            CNC_TOKEN=token, CNC_SECRETS_DIR=str(kit), CNC_NATS_TLS_CA=str(kit / "tls" / "ca.pem"))

            def cli(*args: str, token: str) -> str:
                out = subprocess.run([sys.executable, "-m", "cncbrain.cli", *args], env=cli_env(token),
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, f"cncbrain {' '.join(args)}: {out.stderr}"
                return out.stdout

            cli("sites", token=token)
            cli("tenants", "create", "acme", "--name", "ACME", "--max-gpus", "64", token=token)
            tenant_token = cli("tokens", "issue", "--tenant", "acme", token=token).strip()
            watcher = subprocess.Popen(
                [sys.executable, "-m", "cncbrain.cli", "watch", "--count", "1", "--json", "cnc.scheduler.placement.>"],
                env=cli_env(token), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # It says so once subscribed (core NATS: what is published before that, it does not see).
            assert "watching" in await asyncio.to_thread(watcher.stderr.readline)
            cli("deploy", "--name", "cli-chat", "--model", "8b", "--max-replicas", "2", "--tenant", "acme",
                token=tenant_token)
            cli("submit", "--name", "cli-train", "--model", "7b", "--shards", "2", "--gpus-per-shard", "4",
                "--tenant", "acme", token=tenant_token)
            watched, errors = watcher.communicate(timeout=60)
            assert watcher.returncode == 0 and "placement" in watched, errors
            mine = cli("workloads", "--json", token=tenant_token)
            assert "cli-chat" in mine and "cli-train" in mine and service_id not in mine  # its own work only
            everything = cli("workloads", "--json", token=token)
            assert service_id in everything and job_id in everything and "cli-chat" in everything
            # ...and the CLI inside the image, on the compose network.
            inside = stack.exec("scheduler", "cncbrain", "workloads", "--json", "--scheduler", "scheduler:50062")
            assert service_id in inside
            # Operations: every process's /metrics inside the network, the web page on loopback.
            for service in ("scheduler", "perception", "agents", "emulator", "governance", "adaptation"):
                text = stack.exec(service, "python3", "-c", "import urllib.request as u; print(u.urlopen("
                                  "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())")
                assert f'cnc_build_info{{process="{service}"' in text, (service, text[:500])
                assert service != "scheduler" or "cnc_scheduler_commits_total" in text
            page = urllib.request.urlopen(stack.web, timeout=10).read().decode()
            assert "CNC Brain" in page
            request = urllib.request.Request(stack.web + "api/state", headers={"Authorization": f"Bearer {token}"})
            state = json.loads(urllib.request.urlopen(request, timeout=10).read())
            assert len(state["sites"]) == 11 and any(w["workload_id"] == service_id for w in state["workloads"])
    except BaseException:
        print(f"stack logs: {log_dir}")
        raise
    finally:
        await watch.close()
        stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
