"""SchedulerService: translates tenant requests to the coordinator and domain (proto ⇄ domain).
Refusals are raised (`cncbrain.errors`); the server's error interceptor answers their status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain import limits, metrics
from cncbrain.auth import bearer_of, optional_principal
from cncbrain.bus import Event, subjects
from cncbrain.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from cncbrain.workload import tenant_of
from services.scheduler import domain
from services.scheduler.coordinator import Coordinator
from services.scheduler.governance import AdmissionRefused

WATCH_BACKLOG = 10_000
"""Events a WatchWorkloads reader may fall behind by before it is told to resume."""
TERMINAL_EVENTS = (
    spb.WORKLOAD_EVENT_KIND_COMPLETED,
    spb.WORKLOAD_EVENT_KIND_FAILED,
    spb.WORKLOAD_EVENT_KIND_CANCELLED,
)


ADMISSION_REASONS = {grpc.StatusCode.RESOURCE_EXHAUSTED: "quota", grpc.StatusCode.FAILED_PRECONDITION: "policy",
                     grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.PERMISSION_DENIED: "permission"}
"""`cnc_scheduler_admission_denials_total{reason}` by the status governance refused with."""


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.co = coordinator

    async def _accept(self, spec, request_id: str, context: grpc.aio.ServicerContext) -> spb.Workload:
        if request_id:
            limits.name("request_id", request_id)
        hooks = self.co.governance
        hooks.claim(spec)  # the workload belongs to the caller's tenant
        w = domain.new_workload(spec, request_id, time.time_ns())
        if w.kind == domain.INFERENCE and spec.ingress_site_id and not self.co.inventory.capacity:
            raise Unavailable("scheduler: the pool is not known yet (no snapshot from perception); retry")
        domain.check_placeable(w, self.co.inventory)
        need = domain.need_of(w)
        total = self.co.inventory.total(need.allowed_gpu_types)
        if self.co.inventory.capacity and need.units * need.gpus_per_unit > total:
            raise ResourceExhausted(
                f"asks {need.units}×{need.gpus_per_unit} GPUs; the whole pool has {total} of the allowed types")
        if request_id and (known := self.co.store.get(w.workload_id)) is not None:
            hooks.check_owner(known)  # an idempotency key names the caller's own workload only
        try:
            await hooks.admit(w, bearer_of(context))
        except AdmissionRefused as exc:
            metrics.ADMISSION_DENIALS.labels(ADMISSION_REASONS.get(exc.status, "other")).inc()
            raise
        return await self.co.accept(w)

    async def SubmitTrainingJob(self, request: spb.SubmitTrainingJobRequest, context) -> spb.SubmitTrainingJobResponse:
        if not request.HasField("job"):
            raise InvalidArgument("job: required")
        return spb.SubmitTrainingJobResponse(workload=await self._accept(request.job, request.request_id, context))

    async def DeployInferenceService(
        self, request: spb.DeployInferenceServiceRequest, context
    ) -> spb.DeployInferenceServiceResponse:
        if not request.HasField("service"):
            raise InvalidArgument("service: required")
        return spb.DeployInferenceServiceResponse(
            workload=await self._accept(request.service, request.request_id, context)
        )

    def _find(self, workload_id: str) -> spb.Workload:
        if not workload_id:
            raise InvalidArgument("workload_id: required")
        w = self.co.store.get(workload_id)
        if w is None:
            raise NotFound(f"no workload {limits.quote(workload_id)} (an ended workload is kept "
                           f"{self.co.settings.ended_retention_s:g} s after its end)")
        self.co.governance.check_owner(w)
        return w

    async def GetWorkload(self, request: spb.GetWorkloadRequest, context) -> spb.GetWorkloadResponse:
        return spb.GetWorkloadResponse(workload=self._find(request.workload_id))

    async def ListWorkloads(self, request: spb.ListWorkloadsRequest, context) -> spb.ListWorkloadsResponse:
        if request.state not in spb.WorkloadState.values():
            raise InvalidArgument(f"state: unknown value {request.state}")
        items = [
            w for w in self.co.store.records.values()
            if request.state in (spb.WORKLOAD_STATE_UNSPECIFIED, w.state) and request.kind in (0, w.kind)
            and self.co.governance.visible(w)
        ]
        items.sort(key=lambda w: w.created_at.ToNanoseconds(), reverse=True)
        return spb.ListWorkloadsResponse(workloads=items)

    async def CancelWorkload(self, request: spb.CancelWorkloadRequest, context) -> spb.CancelWorkloadResponse:
        self._find(request.workload_id)
        caller = optional_principal()
        w = await self.co.cancel(request.workload_id, caller.token_id if caller else "")
        return spb.CancelWorkloadResponse(workload=w)

    async def WatchWorkload(self, request: spb.WatchWorkloadRequest, context) -> AsyncIterator[spb.WatchWorkloadResponse]:
        self._find(request.workload_id)
        queue: asyncio.Queue[spb.WorkloadEvent] = asyncio.Queue()

        async def on_event(event: Event) -> None:
            queue.put_nowait(event.payload)

        sub = await self.co.bus.subscribe(
            subjects.SCHEDULER_WORKLOAD, on_event, consumer="scheduler-watch", replay=True,
            workload=request.workload_id,
        )
        try:
            while True:
                ev = await queue.get()
                yield spb.WatchWorkloadResponse(event=ev)
                if ev.kind in TERMINAL_EVENTS:
                    return
        finally:
            await self.co.bus.unsubscribe(sub)

    async def WatchWorkloads(self, request: spb.WatchWorkloadsRequest,
                             context) -> AsyncIterator[spb.WatchWorkloadsResponse]:
        caller = optional_principal()
        queue: asyncio.Queue[tuple[spb.WorkloadEvent, int]] = asyncio.Queue(maxsize=WATCH_BACKLOG)
        overflow = asyncio.Event()

        def mine(workload_id: str) -> bool:
            if caller is None or caller.is_operator:
                return True
            w = self.co.store.get(workload_id)
            return w is not None and tenant_of(w) == caller.tenant_id

        async def on_event(event: Event, sequence: int) -> None:
            if mine(event.payload.workload_id):
                try:
                    queue.put_nowait((event.payload, sequence))
                except asyncio.QueueFull:  # a reader this far behind resumes from its last sequence
                    overflow.set()

        sub = await self.co.bus.follow(subjects.SCHEDULER_WORKLOAD, on_event, after_sequence=request.after_sequence)
        try:
            while True:
                if overflow.is_set() and queue.empty():
                    raise ResourceExhausted(f"more than {WATCH_BACKLOG} events behind; resume with after_sequence")
                ev, sequence = await queue.get()
                yield spb.WatchWorkloadsResponse(event=ev, sequence=sequence)
        finally:
            await self.co.bus.unsubscribe(sub)
