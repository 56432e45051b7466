"""The scheduler's pure logic: spec validation, the capacity ledger, arbitration of the site
agents' proposals (gang: all units or none), and the transitions of a workload's record and its
placement generations. No gRPC, no NATS.

Records are the contract's `Workload` message: the state of record is stored as that protobuf in
KV, so the domain works on it directly instead of on a copy.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus.subjects import TOKEN

TRAINING = common.WORKLOAD_KIND_TRAINING_JOB
INFERENCE = common.WORKLOAD_KIND_INFERENCE_SERVICE
PENDING, PLACED, RUNNING = pb.WORKLOAD_STATE_PENDING, pb.WORKLOAD_STATE_PLACED, pb.WORKLOAD_STATE_RUNNING
COMPLETED, FAILED, CANCELLED = pb.WORKLOAD_STATE_COMPLETED, pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_CANCELLED
ACTIVE = (PLACED, RUNNING)
ENDED = (COMPLETED, FAILED, CANCELLED)
MAX_UNITS = 4096
MAX_GPUS_PER_UNIT = 64
BYTES_PER_PARAM_SERVE = 2.0  # bf16 weights
BYTES_PER_PARAM_TRAIN = 16.0  # weights, grads, Adam state (docs/cost-model.md)


class SpecError(ValueError):
    """A workload spec is malformed; `field` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _name(value: str, field_name: str) -> None:
    if not value or not TOKEN.match(value):
        raise SpecError(field_name, f"{value!r} must be 1..64 characters of [A-Za-z0-9_-]")


def validate_inference(spec: common.InferenceServiceSpec) -> None:
    _name(spec.name, "service.name")
    if not spec.model:
        raise SpecError("service.model", "required")
    if not 0 < spec.params_b <= 10_000:
        raise SpecError("service.params_b", f"{spec.params_b} is not in (0, 10000] billion parameters")
    if not spec.HasField("slo") or spec.slo.ttft_ms <= 0 or spec.slo.tpot_ms <= 0:
        raise SpecError("service.slo", "ttft_ms and tpot_ms must both be > 0")
    if spec.expected_rate_rps < 0 or not math.isfinite(spec.expected_rate_rps):
        raise SpecError("service.expected_rate_rps", "must be a finite number >= 0")
    if spec.min_replicas < 1:
        raise SpecError("service.min_replicas", "must be >= 1")
    if spec.max_replicas < spec.min_replicas or spec.max_replicas > MAX_UNITS:
        raise SpecError("service.max_replicas", f"must be in [min_replicas, {MAX_UNITS}]")
    if not 1 <= spec.gpus_per_replica <= MAX_GPUS_PER_UNIT:
        raise SpecError("service.gpus_per_replica", f"must be in 1..{MAX_GPUS_PER_UNIT}")
    if spec.ingress_site_id:
        _name(spec.ingress_site_id, "service.ingress_site_id")
    if spec.trace not in ("", "conv", "code"):
        raise SpecError("service.trace", f"{spec.trace!r} is not 'conv' or 'code'")


def validate_training(spec: common.TrainingJobSpec) -> None:
    _name(spec.name, "job.name")
    if not spec.model:
        raise SpecError("job.model", "required")
    if not 0 < spec.params_b <= 10_000:
        raise SpecError("job.params_b", f"{spec.params_b} is not in (0, 10000] billion parameters")
    if not 1 <= spec.shards <= MAX_UNITS:
        raise SpecError("job.shards", f"must be in 1..{MAX_UNITS}")
    if not 1 <= spec.gpus_per_shard <= MAX_GPUS_PER_UNIT:
        raise SpecError("job.gpus_per_shard", f"must be in 1..{MAX_GPUS_PER_UNIT}")
    if not spec.tokens > 0 or not math.isfinite(spec.tokens):
        raise SpecError("job.tokens", "must be a finite number > 0")
    if spec.gang_timeout_s < 0:
        raise SpecError("job.gang_timeout_s", "must be >= 0 (0: the scheduler's default)")


def workload_id(kind: int, request_id: str = "") -> str:
    """`svc-…`/`job-…`; derived from the client's idempotency key when it gives one."""
    prefix = "job" if kind == TRAINING else "svc"
    digest = hashlib.sha256(request_id.encode()).hexdigest()[:16] if request_id else uuid.uuid4().hex[:16]
    return f"{prefix}-{digest}"


def new_workload(spec: common.InferenceServiceSpec | common.TrainingJobSpec, request_id: str, now_ns: int) -> pb.Workload:
    if isinstance(spec, common.TrainingJobSpec):
        validate_training(spec)
        w = pb.Workload(kind=TRAINING, training_job=spec)
    else:
        validate_inference(spec)
        w = pb.Workload(kind=INFERENCE, inference_service=spec)
    w.workload_id = workload_id(w.kind, request_id)
    w.state = PENDING
    w.request_id = request_id
    w.created_at.FromNanoseconds(now_ns)
    w.updated_at.FromNanoseconds(now_ns)
    return w


def same_spec(a: pb.Workload, b: pb.Workload) -> bool:
    return a.WhichOneof("spec") == b.WhichOneof("spec") and getattr(a, a.WhichOneof("spec")) == getattr(
        b, b.WhichOneof("spec")
    )


@dataclass(frozen=True)
class Need:
    """What placing a workload asks of the pool."""

    units: int
    gpus_per_unit: int
    allowed_gpu_types: tuple[str, ...]
    min_hbm_gb: float
    ingress_site_id: str = ""


def need_of(w: pb.Workload) -> Need:
    if w.kind == TRAINING:
        j = w.training_job
        hbm = j.params_b * 1e9 * BYTES_PER_PARAM_TRAIN / j.gpus_per_shard / 1e9
        return Need(j.shards, j.gpus_per_shard, tuple(j.allowed_gpu_types), hbm)
    s = w.inference_service
    # Weights plus ~20 % for KV cache and activations, spread over the replica's GPUs.
    hbm = s.params_b * 1e9 * BYTES_PER_PARAM_SERVE * 1.2 / s.gpus_per_replica / 1e9
    return Need(s.min_replicas, s.gpus_per_replica, tuple(s.allowed_gpu_types), hbm, s.ingress_site_id)


@dataclass
class Ledger:
    """GPUs per site and type: installed (from perception) and committed (from the records)."""

    capacity: dict[str, dict[str, int]] = field(default_factory=dict)
    hbm_gb: dict[str, float] = field(default_factory=dict)
    used: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    up: set[str] = field(default_factory=set)

    def set_site(self, site_id: str, pools: Iterable[common.GpuPool], up: bool) -> None:
        self.capacity[site_id] = {p.gpu_type: p.count for p in pools}
        for p in pools:
            if p.hbm_gb:
                self.hbm_gb[p.gpu_type] = p.hbm_gb
        (self.up.add if up else self.up.discard)(site_id)

    def free(self, site_id: str, gpu_type: str) -> int:
        return self.capacity.get(site_id, {}).get(gpu_type, 0) - self.used[site_id][gpu_type]

    def total(self, allowed: Iterable[str] = ()) -> int:
        allowed = set(allowed)
        return sum(n for pools in self.capacity.values() for t, n in pools.items() if not allowed or t in allowed)

    def take(self, p: common.Placement, sign: int = 1) -> None:
        units = p.replicas if p.kind == INFERENCE else len(p.shard_indices)
        self.used[p.site_id][p.gpu_type] += sign * units * p.gpus_per_unit

    def rebuild(self, records: Iterable[pb.Workload]) -> None:
        self.used = defaultdict(lambda: defaultdict(int))
        for w in records:
            if w.state in ACTIVE:
                for p in w.placements:
                    self.take(p)


def arbitrate(need: Need, proposals: Iterable[site_pb.Proposal], ledger: Ledger) -> dict[str, tuple[str, int]] | None:
    """Fill the need from the cheapest proposals (ties by site id) within the ledger's free GPUs.

    Returns {site: (gpu_type, units)} covering every unit, or None (all or none: nothing is
    reserved for a partial answer, so a gang never holds GPUs it cannot use).
    """
    remaining = need.units
    allocation: dict[str, tuple[str, int]] = {}
    for p in sorted(proposals, key=lambda p: (p.cost, p.site_id)):
        if remaining == 0:
            break
        if p.units == 0 or p.site_id in allocation or p.site_id not in ledger.up:
            continue
        if need.allowed_gpu_types and p.gpu_type not in need.allowed_gpu_types:
            continue
        room = ledger.free(p.site_id, p.gpu_type) // need.gpus_per_unit
        grant = min(p.units, remaining, room)
        if grant > 0:
            allocation[p.site_id] = (p.gpu_type, grant)
            remaining -= grant
    return allocation if remaining == 0 else None


def commit_placement(w: pb.Workload, allocation: dict[str, tuple[str, int]], now_ns: int) -> list[common.Placement]:
    """First placement of a pending workload: bump the generation, record one entry per site."""
    need = need_of(w)
    w.generation += 1
    del w.placements[:]
    shard = 0
    for site_id in sorted(allocation):
        gpu_type, units = allocation[site_id]
        p = common.Placement(
            workload_id=w.workload_id, kind=w.kind, site_id=site_id, generation=w.generation,
            gpu_type=gpu_type, gpus_per_unit=need.gpus_per_unit,
        )
        if w.kind == TRAINING:
            p.shard_indices.extend(range(shard, shard + units))
            shard += units
        else:
            p.replicas = units
        w.placements.append(p)
    w.state = PLACED
    w.message = f"placed {need.units} {'shards' if w.kind == TRAINING else 'replicas'} on {len(allocation)} site(s)"
    w.updated_at.FromNanoseconds(now_ns)
    return list(w.placements)


def units_of(w: pb.Workload) -> int:
    return sum(p.replicas if p.kind == INFERENCE else len(p.shard_indices) for p in w.placements)


class ScaleRefused(ValueError):
    pass


def scale(w: pb.Workload, site_id: str, wanted: int, gpu_type: str, ledger: Ledger, now_ns: int) -> common.Placement:
    """Set a service's replicas at one site (a site agent's SCALE proposal); returns the changed entry."""
    if w.kind != INFERENCE:
        raise ScaleRefused("only inference services scale")
    if w.state not in ACTIVE:
        raise ScaleRefused(f"workload is {pb.WorkloadState.Name(w.state)}")
    spec = w.inference_service
    current = next((p for p in w.placements if p.site_id == site_id), None)
    have = current.replicas if current else 0
    total = units_of(w)
    wanted = max(0, min(wanted, spec.max_replicas - (total - have)))
    if total - have + wanted < spec.min_replicas:
        wanted = spec.min_replicas - (total - have)
    if wanted == have:
        raise ScaleRefused("no change within the replica bounds")
    gpu_type = current.gpu_type if current and current.replicas else gpu_type
    if spec.allowed_gpu_types and gpu_type not in spec.allowed_gpu_types:
        raise ScaleRefused(f"GPU type {gpu_type} not allowed")
    if site_id not in ledger.up:
        raise ScaleRefused(f"site {site_id} is not up")
    extra = (wanted - have) * spec.gpus_per_replica
    if extra > 0 and ledger.free(site_id, gpu_type) < extra:
        raise ScaleRefused(f"site {site_id} has {ledger.free(site_id, gpu_type)} free {gpu_type}")
    w.generation += 1
    if current is None:
        current = w.placements.add(
            workload_id=w.workload_id, kind=w.kind, site_id=site_id, gpus_per_unit=spec.gpus_per_replica
        )
    if current.replicas:
        ledger.take(current, -1)
    current.replicas = wanted
    current.gpu_type = gpu_type
    current.generation = w.generation
    ledger.take(current)
    w.updated_at.FromNanoseconds(now_ns)
    w.message = f"{site_id}: {have} -> {wanted} replicas"
    return current


def end(w: pb.Workload, state: int, message: str, now_ns: int) -> list[common.Placement]:
    """Cancel/complete/fail: every site's entry goes to zero in a new generation."""
    w.generation += 1
    for p in w.placements:
        p.replicas = 0
        del p.shard_indices[:]
        p.generation = w.generation
    w.state = state
    w.message = message
    w.updated_at.FromNanoseconds(now_ns)
    return list(w.placements)


def withdraw(w: pb.Workload, message: str, now_ns: int) -> list[common.Placement]:
    """Take back a first placement that was published but not recorded in full (a commit cut
    short): every site's entry goes to zero in a new generation (returned, to publish) and the
    workload waits for placement again, with no placements."""
    released = []
    for p in end(w, PENDING, message, now_ns):
        copy = common.Placement()
        copy.CopyFrom(p)
        released.append(copy)
    del w.placements[:]
    return released
