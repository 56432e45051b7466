"""What the container tests do to a running brain from the host, through its published ports only:
deploy and submit over gRPC, read placement events from NATS, ask the NATS monitor."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import nats
from nats.js import api

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import token_interceptors
from cncbrain.bus.connection import connect_options

PLACEMENTS = "cnc.scheduler.placement.>"


async def quiet(exc: Exception) -> None:
    """nats-py prints every failed reconnect; a test that stops a node expects them."""


async def connect(servers: list[str], kit: Path) -> nats.NATS:
    """A client of the stack's NATS as the operator (`admin`, the key and CA of `kit`), over TLS."""
    options = connect_options("admin", kit, kit / "tls" / "ca.pem")
    return await nats.connect(servers=servers, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=quiet,
                              **options)


def inference_service(name: str = "chat") -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(
        name=name, model="llama-8b", params_b=8, slo=common.SloTargets(ttft_ms=500, tpot_ms=50),
        expected_rate_rps=5, min_replicas=1, max_replicas=4, gpus_per_replica=1,
    )


def training_job(name: str = "pretrain") -> common.TrainingJobSpec:
    return common.TrainingJobSpec(name=name, model="gpt-7b", params_b=7, shards=2, gpus_per_shard=4, tokens=1e9)


async def deploy(stub: scheduler_pb2_grpc.SchedulerServiceStub, name: str, timeout_s: float = 10,
                 retry_s: float = 20, retried: list[str] | None = None) -> str:
    """Deploy an inference service as the CLI does: with a request id of its own, sent again with
    the same id while the brain answers UNAVAILABLE or not at all, for up to `retry_s` (the CLI's
    `CNC_RETRY_S`, with its retry loop), so a failover costs time, not the workload, and never
    deploys it twice. Each answer that was retried is added to `retried` ("NAME: CODE details")."""
    from cncbrain.commands._live import RETRYABLE, call_retrying

    request = spb.DeployInferenceServiceRequest(service=inference_service(name), request_id=uuid.uuid4().hex)

    async def call() -> spb.DeployInferenceServiceResponse:
        try:
            return await stub.DeployInferenceService(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if retried is not None and exc.code() in RETRYABLE:
                retried.append(f"{name}: {exc.code().name} {(exc.details() or '')[:200]}")
            raise

    return (await call_retrying(call, f"deploy {name}", retry_s)).workload.workload_id


async def submit(stub: scheduler_pb2_grpc.SchedulerServiceStub, name: str, timeout_s: float = 10) -> str:
    request = spb.SubmitTrainingJobRequest(job=training_job(name), request_id=uuid.uuid4().hex)
    reply = await stub.SubmitTrainingJob(request, timeout=timeout_s)
    return reply.workload.workload_id


class PlacementWatch:
    """Every committed placement on the bus, from the stream's start (so none is missed)."""

    def __init__(self) -> None:
        self.by_workload: dict[str, list[spb.PlacementCommitted]] = {}
        self._nc: nats.NATS | None = None

    async def start(self, servers: list[str], kit: Path) -> PlacementWatch:
        self._nc = await connect(servers, kit)
        js = self._nc.jetstream()
        await js.subscribe(PLACEMENTS, cb=self._on_msg, ordered_consumer=True,
                           config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL))
        return self

    async def _on_msg(self, msg) -> None:
        event = spb.PlacementCommitted.FromString(msg.data)
        self.by_workload.setdefault(event.placement.workload_id, []).append(event)

    async def wait_for(self, workload_ids: set[str], timeout_s: float = 60) -> dict[str, list[spb.PlacementCommitted]]:
        deadline = time.monotonic() + timeout_s
        while not workload_ids <= self.by_workload.keys():
            if time.monotonic() > deadline:
                missing = sorted(workload_ids - self.by_workload.keys())
                raise AssertionError(f"no placement event within {timeout_s:.0f} s for {missing}")
            await asyncio.sleep(0.2)
        return {w: self.by_workload[w] for w in workload_ids}

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


async def wait_state(stub: scheduler_pb2_grpc.SchedulerServiceStub, workload_id: str, states: set[int],
                     timeout_s: float = 60) -> spb.Workload:
    deadline = time.monotonic() + timeout_s
    while True:
        workload = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=workload_id), timeout=5)).workload
        if workload.state in states:
            return workload
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{workload_id} is {spb.WorkloadState.Name(workload.state)} after {timeout_s:.0f} s: {workload.message}"
            )
        await asyncio.sleep(0.2)


def monitor(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=3) as reply:
        return json.loads(reply.read())


def scheduler_channel(target: str, token: str) -> grpc.aio.Channel:
    """A channel that sends `token` as the bearer token on every call (the stack checks tokens)."""
    return grpc.aio.insecure_channel(target, interceptors=token_interceptors(token))

