"""deploy/docker-compose.yml for real: build the image, bring the stack up with podman-compose, wait
for every health check, deploy an inference service and submit a training job through the published
gRPC port, see their placements on NATS, tear everything down and find nothing left."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from brain_client import PlacementWatch, deploy, scheduler_channel, submit, wait_state
from compose_stack import Stack

from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

SERVICES = {"nats", "governance", "perception", "scheduler", "adaptation", "emulator", "agents"}
PLACED = {pb.WORKLOAD_STATE_PLACED, pb.WORKLOAD_STATE_RUNNING}


async def test_single_node_stack(image, log_dir):
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
        async with grpc.aio.insecure_channel(stack.scheduler) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await deploy(pb_grpc.SchedulerServiceStub(anonymous), "no-token")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        await watch.start(stack.nats_urls)
        async with scheduler_channel(stack.scheduler, token) as channel:
            stub = pb_grpc.SchedulerServiceStub(channel)
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
                            CNC_TOKEN=token)

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
