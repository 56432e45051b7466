"""deploy/docker-compose.yml for real: build the image, bring the stack up with podman-compose, wait
for every health check, deploy an inference service and submit a training job through the published
gRPC port, see their placements on NATS, tear everything down and find nothing left."""

from __future__ import annotations

import time

import pytest
from brain_client import PlacementWatch, deploy, scheduler_channel, submit, wait_state
from compose_stack import Stack

from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

SERVICES = {"nats", "perception", "scheduler", "emulator", "agents"}
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
    except BaseException:
        print(f"stack logs: {log_dir}")
        raise
    finally:
        await watch.close()
        stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
