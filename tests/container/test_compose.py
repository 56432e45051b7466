"""deploy/docker-compose.yml for real: build the image, bring the stack up with podman-compose, wait
for every health check, deploy an inference service and submit a training job through the published
gRPC port, see their placements on NATS, tear everything down and find nothing left."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from brain_client import PlacementWatch, deploy, scheduler_channel, submit, wait_state
from compose_stack import Stack

from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

SERVICES = {"nats", "perception", "scheduler", "governance", "emulator", "agents"}
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

        await watch.start(stack.nats_urls)
        async with scheduler_channel(stack.scheduler) as channel:
            stub = pb_grpc.SchedulerServiceStub(channel)
            service_id = await deploy(stub, "chat")
            job_id = await submit(stub, "pretrain")
            placed = await watch.wait_for({service_id, job_id})
            assert sum(e.placement.replicas for e in placed[service_id]) >= 1
            shards = sorted(i for e in placed[job_id] for i in e.placement.shard_indices)
            assert shards == [0, 1]  # gang: all shards or none
            for workload_id in (service_id, job_id):
                await wait_state(stub, workload_id, PLACED)

            # The README's way in: the CLI on the host, pointed at the published ports...
            env = dict(os.environ, CNC_NATS_URL=stack.nats_urls[0], CNC_PERCEPTION_ADDR=stack.perception,
                       CNC_SCHEDULER_ADDR=stack.scheduler)
            for args in (["sites"], ["deploy", "--name", "cli-chat", "--model", "8b", "--max-replicas", "2"],
                         ["workloads", "--json"]):
                out = subprocess.run([sys.executable, "-m", "cncbrain.cli", *args], env=env,
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, f"cncbrain {' '.join(args)}: {out.stderr}"
            assert service_id in out.stdout and job_id in out.stdout
            # ...and the CLI inside the image, on the compose network.
            token = stack.exec("governance", "cat", "/var/lib/cncbrain/operator.token").strip()
            assert token, "governance issued no operator token"
            inside = stack.exec("scheduler", "cncbrain", "workloads", "--json", "--scheduler", "scheduler:50062")
            assert service_id in inside
    except BaseException:
        print(f"stack logs: {log_dir}")
        raise
    finally:
        await watch.close()
        stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
