"""Executors: what a site agent uses to apply committed placements to its site.

| kind | what it drives |
| --- | --- |
| `emulated` | the site as emulated by the digital twin (`cncbrain emulate`), over NATS request/reply |
| `memory` | nothing: it records placements against a declared inventory (dry runs, tests, benchmarks) |
| `slurm` | a Slurm cluster: a job per replica, a heterogeneous job per gang (`agents.executor_slurm`) |
| `kubernetes` | designed, not built (docs/executors.md) |

An executor answers its site's inventory, applies a placement (absolute: replicas / shards at the
site) and yields telemetry; `fresh` says whether it came up without state (the agent then replays
its site's placements from the stream, the latest of each workload). What it learns about a
placement after `apply` returned (a kept placement applied later, a failed job, giving up on a
workload) it tells through `on_report`; telemetry whose GPU counts differ from the inventory (a node
down or drained) makes the agent register the site again with those counts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb

TelemetrySink = Callable[[site_pb.SiteTelemetry], Awaitable[None]]
ReportSink = Callable[[common.Placement, bool, str, bool], Awaitable[None]]
"""(placement, ok, error, failed): `failed` — the site gave up on the workload."""


class Executor(Protocol):
    kind: str
    fresh: bool

    async def start(self, on_telemetry: TelemetrySink, on_report: ReportSink | None = None) -> None: ...
    async def inventory(self) -> common.Site: ...
    async def apply(self, placement: spb.PlacementCommitted) -> tuple[bool, str]: ...
    def available(self) -> bool: ...
    def last_telemetry(self) -> site_pb.SiteTelemetry | None: ...
    async def stop(self) -> None: ...


def units(p: common.Placement) -> int:
    return p.replicas if p.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE else len(p.shard_indices)


class MemoryExecutor:
    """Keeps placements in memory against a fixed inventory; reports them as telemetry."""

    kind = "memory"

    def __init__(self, site: common.Site) -> None:
        self.site = site
        self.fresh = True
        self.placements: dict[str, common.Placement] = {}
        self.started = time.monotonic()
        self._telemetry: site_pb.SiteTelemetry | None = None

    async def start(self, on_telemetry: TelemetrySink, on_report: ReportSink | None = None) -> None:
        self.on_telemetry = on_telemetry

    async def inventory(self) -> common.Site:
        return self.site

    def used(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.placements.values():
            out[p.gpu_type] = out.get(p.gpu_type, 0) + units(p) * p.gpus_per_unit
        return out

    async def apply(self, placement: spb.PlacementCommitted) -> tuple[bool, str]:
        p = placement.placement
        capacity = {g.gpu_type: g.count for g in self.site.gpu_pools}
        used = self.used()
        old = self.placements.get(p.workload_id)
        if old is not None:
            used[old.gpu_type] -= units(old) * old.gpus_per_unit
        need = units(p) * p.gpus_per_unit
        if need > capacity.get(p.gpu_type, 0) - used.get(p.gpu_type, 0):
            return False, f"{need} {p.gpu_type} GPUs asked, {capacity.get(p.gpu_type, 0) - used.get(p.gpu_type, 0)} free"
        if units(p) == 0:
            self.placements.pop(p.workload_id, None)
        else:
            self.placements[p.workload_id] = p
        self._telemetry = None
        return True, ""

    def available(self) -> bool:
        return True

    def last_telemetry(self) -> site_pb.SiteTelemetry:
        if self._telemetry is None:
            self._telemetry = self._measure()
        self._telemetry.sim_time_s = time.monotonic() - self.started
        return self._telemetry

    def _measure(self) -> site_pb.SiteTelemetry:
        used = self.used()
        t = site_pb.SiteTelemetry(site_id=self.site.site_id, available=True,
                                  sim_time_s=time.monotonic() - self.started)
        t.observed_at.GetCurrentTime()
        total = 0
        for g in self.site.gpu_pools:
            pool = common.GpuPool()
            pool.CopyFrom(g)
            pool.used = used.get(g.gpu_type, 0)
            total += g.count
            t.gpu_pools.append(pool)
        t.gpu_utilization = sum(used.values()) / total if total else 0.0
        for p in self.placements.values():
            if p.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE:
                t.services.append(site_pb.ServiceLoad(workload_id=p.workload_id, replicas=p.replicas, slo_attainment=1.0))
            else:
                t.jobs.append(site_pb.JobProgress(workload_id=p.workload_id, shards_running=len(p.shard_indices)))
        return t

    async def stop(self) -> None:
        return None
