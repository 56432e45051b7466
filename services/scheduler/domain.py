"""The scheduler's pure logic: spec validation, the GPU inventory (installed and committed GPUs per
site and type), arbitration of the site agents' proposals (gang: all units or none), and the
transitions of a workload's record and its placement generations. No gRPC, no NATS.

Records are the contract's `Workload` message: the state of record is stored as that protobuf in
KV, so the domain works on it directly instead of on a copy.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import limits
from cncbrain.errors import FailedPrecondition
from cncbrain.twin import costmodel
from cncbrain.workload import required_spec, spec_of

TRAINING = common.WORKLOAD_KIND_TRAINING_JOB
INFERENCE = common.WORKLOAD_KIND_INFERENCE_SERVICE
PENDING, PLACED, RUNNING = spb.WORKLOAD_STATE_PENDING, spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING
COMPLETED, FAILED, CANCELLED = spb.WORKLOAD_STATE_COMPLETED, spb.WORKLOAD_STATE_FAILED, spb.WORKLOAD_STATE_CANCELLED
ACTIVE = (PLACED, RUNNING)
ENDED = (COMPLETED, FAILED, CANCELLED)
MAX_UNITS = limits.MAX_UNITS
MAX_GPUS_PER_UNIT = limits.MAX_GPUS_PER_UNIT
BYTES_PER_PARAM_SERVE = 2.0  # bf16 weights
SERVE_OVERHEAD = 1.2  # weights plus ~20 % for KV cache and activations
BYTES_PER_PARAM_TRAIN = 16.0  # weights, grads, Adam state (docs/cost-model.md)
TRACES = ("", "conv", "code")

SpecError = limits.LimitError
"""A workload spec is malformed; `field` names the offending field."""


def _common(spec: common.InferenceServiceSpec | common.TrainingJobSpec, prefix: str) -> None:
    limits.name(f"{prefix}.name", spec.name)
    limits.text(f"{prefix}.model", spec.model)
    limits.number(f"{prefix}.params_b", spec.params_b, 0, limits.MAX_PARAMS_B, lo_open=True,
                  unit=" billion parameters")
    limits.entries(f"{prefix}.allowed_gpu_types", spec.allowed_gpu_types)
    if spec.tenant:
        limits.name(f"{prefix}.tenant", spec.tenant)


def validate_inference(spec: common.InferenceServiceSpec) -> None:
    _common(spec, "service")
    if not spec.HasField("slo"):
        raise SpecError("service.slo", "required (ttft_ms and tpot_ms)")
    limits.number("service.slo.ttft_ms", spec.slo.ttft_ms, 0, limits.MAX_TTFT_MS, lo_open=True, unit=" ms")
    limits.number("service.slo.tpot_ms", spec.slo.tpot_ms, 0, limits.MAX_TPOT_MS, lo_open=True, unit=" ms")
    limits.number("service.expected_rate_rps", spec.expected_rate_rps, 0, limits.MAX_RATE_RPS, unit=" requests/s")
    limits.integer("service.min_replicas", spec.min_replicas, 1, MAX_UNITS)
    if not spec.min_replicas <= spec.max_replicas <= MAX_UNITS:
        raise SpecError("service.max_replicas", f"{spec.max_replicas} is not in min_replicas..{MAX_UNITS} "
                                                f"({spec.min_replicas}..{MAX_UNITS})")
    limits.integer("service.gpus_per_replica", spec.gpus_per_replica, 1, MAX_GPUS_PER_UNIT)
    if spec.ingress_site_id:
        limits.name("service.ingress_site_id", spec.ingress_site_id)
    if spec.trace not in TRACES:
        raise SpecError("service.trace", f"{limits.quote(spec.trace)} is not 'conv' or 'code'")
    validate_template(spec.template, "service.template")


def validate_training(spec: common.TrainingJobSpec) -> None:
    _common(spec, "job")
    limits.integer("job.shards", spec.shards, 1, MAX_UNITS)
    limits.integer("job.gpus_per_shard", spec.gpus_per_shard, 1, MAX_GPUS_PER_UNIT)
    limits.number("job.tokens", spec.tokens, 0, limits.MAX_TOKENS, lo_open=True, unit=" tokens")
    limits.number("job.gang_timeout_s", spec.gang_timeout_s, 0, limits.MAX_GANG_TIMEOUT_S,
                  unit=" s (0: the scheduler's default)")
    validate_template(spec.template, "job.template")


# What a replica or shard runs (`WorkloadTemplate`): bounds that keep a batch script small and every
# value passable to exec() and a shell (no NUL), names the executors reserve left to them.
TEMPLATE_MAX_COMMAND = 1024
TEMPLATE_MAX_ARGS = 256
TEMPLATE_MAX_ENV = 128
TEMPLATE_MAX_VALUE = 4096
TEMPLATE_MAX_TOTAL = 65_536
TEMPLATE_MAX_IMAGE = 512
TEMPLATE_RESERVED_ENV = ("CNC_", "SLURM_")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(rf"(?:{_HOST}/)?{_PATH}(?:/{_PATH})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
                       r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")


_quote = limits.quote


def _template_text(value: str, field_name: str, max_len: int, *, lines: bool) -> None:
    """At most `max_len` characters, no control characters (tab and newline too when `lines`)."""
    if len(value) > max_len:
        raise SpecError(field_name, f"{_quote(value)} is longer than {max_len} characters")
    allowed = "\t\n" if lines else ""
    for c in value:
        if not c.isprintable() and c not in allowed and c != " ":
            raise SpecError(field_name, f"{_quote(value)} holds the control character {c!r}")


def validate_template(t: common.WorkloadTemplate, prefix: str) -> None:
    """A workload template a site can run: a command (or an image) with bounded arguments and a
    unique, well-formed environment that leaves the executor's own variables alone."""
    _template_text(t.command, f"{prefix}.command", TEMPLATE_MAX_COMMAND, lines=False)
    if t.command and t.command != t.command.strip():
        raise SpecError(f"{prefix}.command", f"{_quote(t.command)} starts or ends with white space")
    if t.image and (len(t.image) > TEMPLATE_MAX_IMAGE or not IMAGE_REF.fullmatch(t.image)):
        raise SpecError(f"{prefix}.image", f"{_quote(t.image)} is not an image reference "
                                           f"([registry/]name[:tag][@digest], at most {TEMPLATE_MAX_IMAGE} characters)")
    if (t.args or t.env) and not (t.command or t.image):
        raise SpecError(f"{prefix}.command", "required when args or env are given (or name an image)")
    if len(t.args) > TEMPLATE_MAX_ARGS:
        raise SpecError(f"{prefix}.args", f"{len(t.args)} arguments; at most {TEMPLATE_MAX_ARGS}")
    for i, a in enumerate(t.args):
        _template_text(a, f"{prefix}.args[{i}]", TEMPLATE_MAX_VALUE, lines=True)
    if len(t.env) > TEMPLATE_MAX_ENV:
        raise SpecError(f"{prefix}.env", f"{len(t.env)} variables; at most {TEMPLATE_MAX_ENV}")
    seen: set[str] = set()
    for i, e in enumerate(t.env):
        where = f"{prefix}.env[{i}]"
        if not ENV_NAME.fullmatch(e.name):
            raise SpecError(f"{where}.name", f"{_quote(e.name)} is not [A-Za-z_][A-Za-z0-9_]* of at most 128 characters")
        if e.name.upper().startswith(TEMPLATE_RESERVED_ENV):
            raise SpecError(f"{where}.name", f"{e.name!r}: names starting with "
                                             f"{' or '.join(TEMPLATE_RESERVED_ENV)} are set by the executor")
        if e.name in seen:
            raise SpecError(f"{where}.name", f"{e.name!r} is given twice")
        seen.add(e.name)
        _template_text(e.value, f"{where}.value", TEMPLATE_MAX_VALUE, lines=True)
    total = len(t.command) + len(t.image) + sum(map(len, t.args)) + sum(len(e.name) + len(e.value) for e in t.env)
    if total > TEMPLATE_MAX_TOTAL:
        raise SpecError(prefix, f"{total} characters in all; at most {TEMPLATE_MAX_TOTAL}")


def gpu_memory(inventory: Inventory) -> dict[str, float]:
    """The GPU types a workload may name and their memory in GB: the twin's catalogue and every
    type the pool reports (math.inf where a site did not say)."""
    memory = {name: g.mem_gb for name, g in costmodel.gpu_catalog().items()}
    for pools in inventory.capacity.values():
        for t in pools:
            memory.setdefault(t, inventory.hbm_gb.get(t) or math.inf)
    memory.update({t: gb for t, gb in inventory.hbm_gb.items() if gb})
    return memory


def check_placeable(w: spb.Workload, inventory: Inventory) -> None:
    """Refuse (SpecError) a workload no pool like this one could ever run: an unknown GPU type, an
    ingress site the pool does not have, or a model whose replica (with its GPUs) or training shard
    (weights, gradients and optimizer state over its GPUs) fits the memory of no allowed GPU type."""
    spec = required_spec(w)
    field = "job" if w.kind == TRAINING else "service"
    memory = gpu_memory(inventory)
    unknown = [t for t in spec.allowed_gpu_types if t not in memory]
    if unknown:
        raise SpecError(f"{field}.allowed_gpu_types", f"unknown GPU type {limits.quote(unknown[0])}; known: "
                                                      f"{', '.join(sorted(memory))}")
    if isinstance(spec, common.InferenceServiceSpec) and spec.ingress_site_id and inventory.capacity \
            and spec.ingress_site_id not in inventory.capacity:
        raise SpecError("service.ingress_site_id", f"{limits.quote(spec.ingress_site_id)} is not a site of the pool")
    # No list: any type of the pool (of the catalogue while the pool is not known yet).
    types = list(spec.allowed_gpu_types) or sorted({t for pools in inventory.capacity.values() for t in pools}) \
        or list(memory)
    if problem := memory_shortfall(need_of(w), memory, types, training=w.kind == TRAINING):
        raise SpecError(f"{field}.gpus_per_{'shard' if w.kind == TRAINING else 'replica'}", problem)


def memory_shortfall(need: Need, memory: dict[str, float], types: Iterable[str], *, training: bool) -> str:
    """'' when a unit of `need` (a replica with its GPUs, a training shard with its GPUs) fits the
    memory of one of `types` (GB by type in `memory`; a type it does not name counts as fitting);
    else the one message saying it fits none: what a unit needs, the largest of the types, and the
    least GPUs per unit that would do. The API's refusal and a waiting workload's reason both say this."""
    sizes = {t: memory.get(t, math.inf) for t in types}
    if not sizes:
        return ""
    largest = max(sorted(sizes), key=lambda t: sizes[t])
    gb = sizes[largest]
    if need.min_hbm_gb <= gb:
        return ""
    unit = "shard" if training else "replica"
    what = "weights, gradients and optimizer state" if training else "weights and KV cache"
    model = f" of a {need.params_b:g} B model" if need.params_b else ""
    total_gb = need.min_hbm_gb * need.gpus_per_unit
    least = math.ceil(total_gb / gb)
    fix = (f"give it at least {least} GPUs per {unit}" if least <= MAX_GPUS_PER_UNIT
           else f"no {unit} of at most {MAX_GPUS_PER_UNIT} GPUs holds it")
    return (f"fits no GPU's memory: a {unit}{model} needs {total_gb:,.0f} GB ({what}), {need.min_hbm_gb:,.0f} GB on "
            f"each of its {need.gpus_per_unit} GPU(s), but the largest allowed GPU type, {largest}, has {gb:g} GB: "
            f"{fix}")


def workload_id(kind: int, request_id: str = "", tenant: str = "") -> str:
    """`svc-…`/`job-…`; derived from the tenant's idempotency key when it gives one. The key is the
    tenant's own: another tenant's same key names another workload (it can neither take a key
    first and lock its owner out, nor learn that the key was used)."""
    prefix = "job" if kind == TRAINING else "svc"
    key = f"{tenant}/{request_id}" if tenant else request_id  # a tenant id has no '/'
    digest = hashlib.sha256(key.encode()).hexdigest()[:16] if request_id else uuid.uuid4().hex[:16]
    return f"{prefix}-{digest}"


def new_workload(spec: common.InferenceServiceSpec | common.TrainingJobSpec, request_id: str, now_ns: int) -> spb.Workload:
    if isinstance(spec, common.TrainingJobSpec):
        validate_training(spec)
        w = spb.Workload(kind=TRAINING, training_job=spec)
    else:
        validate_inference(spec)
        w = spb.Workload(kind=INFERENCE, inference_service=spec)
    w.workload_id = workload_id(w.kind, request_id, spec.tenant)
    w.state = PENDING
    w.request_id = request_id
    w.created_at.FromNanoseconds(now_ns)
    w.updated_at.FromNanoseconds(now_ns)
    return w


def same_spec(a: spb.Workload, b: spb.Workload) -> bool:
    return a.WhichOneof("spec") == b.WhichOneof("spec") and spec_of(a) == spec_of(b)


@dataclass(frozen=True)
class Need:
    """What placing a workload asks of the pool."""

    units: int
    gpus_per_unit: int
    allowed_gpu_types: tuple[str, ...]
    min_hbm_gb: float
    ingress_site_id: str = ""
    params_b: float = 0.0
    spread: bool = False
    """An inference service without an ingress site: its demand enters all over the pool."""


def need_of(w: spb.Workload) -> Need:
    if w.kind == TRAINING:
        j = w.training_job
        hbm = j.params_b * 1e9 * BYTES_PER_PARAM_TRAIN / j.gpus_per_shard / 1e9
        return Need(j.shards, j.gpus_per_shard, tuple(j.allowed_gpu_types), hbm, params_b=j.params_b)
    s = w.inference_service
    # Weights plus ~20 % for KV cache and activations, spread over the replica's GPUs.
    hbm = s.params_b * 1e9 * BYTES_PER_PARAM_SERVE * SERVE_OVERHEAD / s.gpus_per_replica / 1e9
    return Need(s.min_replicas, s.gpus_per_replica, tuple(s.allowed_gpu_types), hbm, s.ingress_site_id, s.params_b,
                spread=not s.ingress_site_id)


@dataclass
class Inventory:
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

    def rebuild(self, records: Iterable[spb.Workload]) -> None:
        self.used = defaultdict(lambda: defaultdict(int))
        for w in records:
            if w.state in ACTIVE:
                for p in w.placements:
                    self.take(p)


def arbitrate(need: Need, proposals: Iterable[site_pb.Proposal], inventory: Inventory) -> dict[str, tuple[str, int]] | None:
    """Fill the need from the cheapest proposals (ties by site id) within the inventory's free GPUs.

    A spread service (inference without an ingress site) is filled in two passes: first one unit
    per site, cheapest sites first (the agents price it by their latency to where its demand
    enters), then the rest, cheapest first — so its first replicas start near its demand, not all
    at the cheapest site.

    Returns {site: (gpu_type, units)} covering every unit, or None (all or none: nothing is
    reserved for a partial answer, so a gang never holds GPUs it cannot use).
    """
    remaining = need.units
    allocation: dict[str, tuple[str, int]] = {}
    ordered = sorted(proposals, key=lambda p: (p.cost, p.site_id))
    chosen: dict[str, site_pb.Proposal] = {}  # the first usable proposal of each site
    for p in ordered:
        if p.units == 0 or p.site_id in chosen or p.site_id not in inventory.up:
            continue
        if need.allowed_gpu_types and p.gpu_type not in need.allowed_gpu_types:
            continue
        chosen[p.site_id] = p
    for cap in ((1, None) if need.spread else (None,)):
        for p in chosen.values():
            if remaining == 0:
                break
            got = allocation.get(p.site_id, ("", 0))[1]
            room = inventory.free(p.site_id, p.gpu_type) // need.gpus_per_unit - got
            grant = min(p.units if cap is None else min(p.units, cap), got + remaining, got + room) - got
            if grant > 0:
                allocation[p.site_id] = (p.gpu_type, got + grant)
                remaining -= grant
    return allocation if remaining == 0 else None


NO_TYPE_WITHIN_QUOTA = "none-within-quota"
"""The type offered when a tenant's quota or policy leaves none (no site has it, so none answers)."""


@dataclass(frozen=True)
class Unplaced:
    """Why a workload waits, for a person (`text`) and for metrics (`code`: fits_no_gpu, quota,
    no_gpu_type, no_site_up, no_capacity, gang_incomplete, declined)."""

    code: str
    text: str


def _types(names: Iterable[str]) -> str:
    names = sorted(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def why_unplaced(need: Need, inventory: Inventory, proposals: Iterable[site_pb.Proposal], *, training: bool,
                 offered_types: Iterable[str] = (),
                 allowed: Callable[[str, str], bool] | None = None) -> Unplaced:
    """Why the last offer round did not place a workload, the most basic cause first: the GPU types
    the tenant may use; whether a unit fits any of their memories; sites up; free GPUs at the sites
    within policy (a unit's GPUs at one site, one type per site, as arbitration places them); then
    what the site agents answered. `offered_types`: the types offered (spec, policy and quota);
    `allowed(site, gpu_type)`: the placement policy (None: every site)."""
    unit = "shard" if training else "replica"
    g, n = need.gpus_per_unit, need.units
    gang = f"waiting for a gang of {n} shards: " if training else ""
    in_pool = {t for pools in inventory.capacity.values() for t, c in pools.items() if c > 0}
    types = set(offered_types) or set(need.allowed_gpu_types) or in_pool
    if NO_TYPE_WITHIN_QUOTA in types:
        return Unplaced("quota", f"the tenant's quota or placement policy leaves no GPU type with room for a "
                                 f"{unit} of {g} GPU(s)")
    present = types & in_pool
    if not present:
        return Unplaced("no_gpu_type", f"no site has GPUs of type {_types(types)}")
    fitting = {t for t in present if inventory.hbm_gb.get(t, math.inf) >= need.min_hbm_gb}
    if not fitting:
        return Unplaced("fits_no_gpu", memory_shortfall(need, inventory.hbm_gb, present, training=training))
    if not inventory.up:
        return Unplaced("no_site_up", f"{gang}no site is up ({len(inventory.capacity)} known)")
    room = 0
    for site in inventory.up:
        room += max((inventory.free(site, t) // g for t in fitting if allowed is None or allowed(site, t)), default=0)
    if room == 0:
        return Unplaced("no_capacity", f"{gang}no site within policy has {g} free {_types(fitting)} GPU(s)")
    if room < n:
        if training:
            return Unplaced("gang_incomplete", f"{gang}the sites within policy have room for {room} now "
                                               f"(all or none, {g} {_types(fitting)} GPU(s) each)")
        return Unplaced("no_capacity", f"waiting for capacity: the sites within policy have room for {room} of "
                                       f"{n} replicas of {g} {_types(fitting)} GPU(s)")
    proposals = list(proposals)
    if not proposals:
        return Unplaced("declined", f"{gang}no site agent answered the last offer in time")
    offered = sum(p.units for p in proposals)
    declines: dict[str, int] = {}
    for p in proposals:
        if not p.units and p.reason:
            declines[p.reason] = declines.get(p.reason, 0) + 1
    top = f"; most said: {max(declines, key=declines.__getitem__)}" if declines else ""
    return Unplaced("gang_incomplete" if training else "declined",
                    f"{gang}the site agents offered {offered} of {n} {unit}s{top}")


def commit_placement(w: spb.Workload, allocation: dict[str, tuple[str, int]], now_ns: int) -> list[common.Placement]:
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


def units_of(w: spb.Workload) -> int:
    return sum(p.replicas if p.kind == INFERENCE else len(p.shard_indices) for p in w.placements)


class ScaleRefused(FailedPrecondition):
    """A SCALE proposal (or a cancel) the workload's state, bounds or the site's capacity refuses."""


def scale(w: spb.Workload, site_id: str, wanted: int, gpu_type: str, inventory: Inventory, now_ns: int) -> common.Placement:
    """Set a service's replicas at one site (a site agent's SCALE proposal); returns the changed entry."""
    if w.kind != INFERENCE:
        raise ScaleRefused("only inference services scale")
    if w.state not in ACTIVE:
        raise ScaleRefused(f"workload is {spb.WorkloadState.Name(w.state)}")
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
    if site_id not in inventory.up:
        raise ScaleRefused(f"site {site_id} is not up")
    extra = (wanted - have) * spec.gpus_per_replica
    if extra > 0 and inventory.free(site_id, gpu_type) < extra:
        raise ScaleRefused(f"site {site_id} has {inventory.free(site_id, gpu_type)} free {gpu_type}")
    w.generation += 1
    if current is None:
        current = w.placements.add(
            workload_id=w.workload_id, kind=w.kind, site_id=site_id, gpus_per_unit=spec.gpus_per_replica
        )
    if current.replicas:
        inventory.take(current, -1)
    current.replicas = wanted
    current.gpu_type = gpu_type
    current.generation = w.generation
    inventory.take(current)
    w.updated_at.FromNanoseconds(now_ns)
    w.message = f"{site_id}: {have} -> {wanted} replicas"
    return current


def end(w: spb.Workload, state: spb.WorkloadState.ValueType, message: str, now_ns: int) -> list[common.Placement]:
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


def withdraw(w: spb.Workload, message: str, now_ns: int) -> list[common.Placement]:
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
