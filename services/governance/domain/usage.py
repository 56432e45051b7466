"""Usage accounting (pure): GPU-hours and cost per tenant and per workload over a time range.

Built from placement events: a shard or replica starts holding GPUs when its placement is
committed and stops when it is released (scaled down, cancelled, finished, or its site failed).
Each holding is an interval; a query sums the overlap of every interval with the asked range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from cncbrain.errors import InvalidArgument


@dataclass(slots=True)
class Allocation:
    unit_id: str
    workload_id: str
    tenant_id: str
    site_id: str
    gpu_type: str
    gpus: int
    price_per_gpu_hour: float
    start: float  # seconds since the epoch
    end: float | None = None  # None while held

    def overlap_hours(self, t0: float, t1: float, now: float) -> float:
        end = self.end if self.end is not None else now
        seconds = min(end, t1) - max(self.start, t0)
        return max(seconds, 0.0) / 3600.0


@dataclass(frozen=True, slots=True)
class UsageLine:
    """Usage of one tenant or workload (and GPU type) over the asked range."""

    tenant_id: str
    workload_id: str  # "" on a per-tenant line
    gpu_type: str  # "" when summed over types
    gpu_hours: float
    cost_usd: float


@dataclass(slots=True)
class UsageBook:
    """All allocations seen, open and closed."""

    allocations: list[Allocation] = field(default_factory=list)
    _open: dict[str, Allocation] = field(default_factory=dict)

    def start(self, alloc: Allocation) -> None:
        """A placement was committed. Committing a unit that is still held moves it: the old
        holding ends where the new one starts (idempotent for a replayed identical event)."""
        held = self._open.get(alloc.unit_id)
        if held is not None:
            if (held.site_id, held.gpu_type, held.gpus, held.start) == (
                alloc.site_id, alloc.gpu_type, alloc.gpus, alloc.start
            ):
                return
            held.end = max(alloc.start, held.start)
        self._open[alloc.unit_id] = alloc
        self.allocations.append(alloc)

    def stop(self, unit_id: str, at: float) -> bool:
        held = self._open.pop(unit_id, None)
        if held is None:
            return False
        held.end = max(at, held.start)
        return True

    def stop_site(self, site_id: str, at: float) -> list[str]:
        units = [u for u, a in self._open.items() if a.site_id == site_id]
        for u in units:
            self.stop(u, at)
        return units

    def stop_workload(self, workload_id: str, at: float) -> list[str]:
        units = [u for u, a in self._open.items() if a.workload_id == workload_id]
        for u in units:
            self.stop(u, at)
        return units

    def open_allocations(self) -> Iterator[Allocation]:
        return iter(self._open.values())

    def query(
        self,
        t0: float,
        t1: float,
        now: float,
        tenant_id: str | None = None,
        workload_id: str | None = None,
        by_gpu_type: bool = False,
    ) -> tuple[list[UsageLine], list[UsageLine]]:
        """Return (per-tenant lines, per-workload lines) for [t0, t1), filtered as asked."""
        if t1 < t0:
            raise InvalidArgument("the end of the range is before its start")
        tenants: dict[tuple[str, str], list[float]] = {}
        workloads: dict[tuple[str, str, str], list[float]] = {}
        for a in self.allocations:
            if tenant_id and a.tenant_id != tenant_id:
                continue
            if workload_id and a.workload_id != workload_id:
                continue
            hours = a.overlap_hours(t0, t1, now) * a.gpus
            if hours <= 0:
                continue
            gtype = a.gpu_type if by_gpu_type else ""
            cost = hours * a.price_per_gpu_hour
            for key, table in (((a.tenant_id, gtype), tenants), ((a.tenant_id, a.workload_id, gtype), workloads)):
                acc = table.setdefault(key, [0.0, 0.0])  # type: ignore[arg-type]
                acc[0] += hours
                acc[1] += cost
        tenant_lines = [UsageLine(t, "", g, v[0], v[1]) for (t, g), v in sorted(tenants.items())]
        workload_lines = [UsageLine(t, w, g, v[0], v[1]) for (t, w, g), v in sorted(workloads.items())]
        return tenant_lines, workload_lines
