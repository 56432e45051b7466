"""Parallelism planning (pure): fit a model to the GPUs it gets, under the twin's cost model.

Training (`plan_training`): given a model and GPU groups (site, type, count) with the links between
sites, search tensor- (TP), pipeline- (PP) and data-parallel (DP) degrees, the micro-batch and
ZeRO-1 on/off; keep the plans whose per-GPU memory fits and return the one with the highest
estimated tokens/s. Two layouts are weighed when more than one site is used:

- `dp_across_sites`: each model replica (TP x PP GPUs) stays inside one site; the gradient
  all-reduce of 2 B/param crosses the WAN every step;
- `pp_across_sites`: pipeline stages are spread over sites; only stage-boundary activations cross
  the WAN (2 x micro-batches x b·s·h·2 bytes per DP rank per step) and the all-reduce stays inside
  each site.

Step time = 6·N·tokens / (GPUs · peak · MFU · TP efficiency) / (1 − bubble) + all-reduce + WAN
activation traffic; the bubble is (p−1)/(m+p−1), the all-reduce 2(n−1)/n · S/B over the slowest
link (docs/cost-model.md). Memory per GPU = model state (16 B/param, or 4 + 12/DP with ZeRO-1) / (TP·PP)
+ activations 34·s·b·h/TP per layer (TP + sequence parallel + selective recompute, Korthikanti
et al.) for the PP micro-batches a 1F1B stage holds.

Inference (`plan_inference`): per GPU group, TP x PP degree and precision for one replica; bf16 is
kept whenever some degree fits, 8-bit weights (FP8, INT8 where the GPU has no FP8) only when
nothing fits in bf16 — the plan says so. Among fitting plans the one with the most tokens/s over
the whole group wins (replicas that fit x tokens/s each), fewer GPUs per replica on ties, subject to
the TPOT/TTFT SLO when given. Times come from the twin (`prefill_s`, `decode_step_s`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cncbrain.errors import FailedPrecondition, InvalidArgument
from cncbrain.twin import costmodel
from cncbrain.twin.costmodel import GpuType, ModelSpec

TP_DEGREES = (1, 2, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8)
PRECISIONS = ("bf16", "fp8")
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34  # Korthikanti: 34·s·b·h/t with TP + SP + selective recompute
PP_HOP_LATENCY_S = 20e-6  # one stage-to-stage send inside a site
DEFAULT_BATCH_TOKENS = 4 * 2**20
DEFAULT_SEQ_LEN = 4096
"""A training plan's global batch (tokens) and sequence when the request names none: Llama 2's 4M
tokens and 4,096-token context (docs/cost-model.md)."""


class PlanError(FailedPrecondition):
    """The model does not fit the GPUs given; the message says why."""


class PlanRequestError(InvalidArgument, PlanError):
    """The request is malformed: an unknown GPU type or model, a negative count, a batch shorter
    than one sequence."""


@dataclass(frozen=True, slots=True)
class GpuGroup:
    """GPUs of one type at one site available to the workload."""

    site_id: str
    gpu_type: str
    count: int


@dataclass(frozen=True, slots=True)
class LinkSpec:
    latency_ms: float
    bandwidth_gbps: float


Links = Mapping[tuple[str, str], LinkSpec]


def link_between(links: Links, a: str, b: str) -> LinkSpec:
    if a == b:
        return LinkSpec(0.005, costmodel.INTRA_SITE_BW_GBPS)
    found = links.get((a, b)) or links.get((b, a))
    if found is None:
        raise PlanError(f"no link known between sites {a} and {b}")
    return found


# ---- training --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    tp: int
    pp: int
    dp: int
    micro_batch: int  # sequences per micro-batch
    micro_batches: int  # per step, per DP rank
    zero1: bool
    precision: str
    layout: str  # "single_site" | "dp_across_sites" | "pp_across_sites"
    gpus_used: int
    gpus_by_site: Mapping[str, int]
    gpu_types: tuple[str, ...]
    tokens_per_s: float
    step_s: float
    compute_s: float
    bubble_fraction: float
    allreduce_s: float
    wan_activation_s: float
    memory_per_gpu_gb: float
    memory_limit_gb: float
    notes: tuple[str, ...] = ()

    @property
    def mfu(self) -> float:
        """Achieved share of peak (of the slowest GPU type), for comparison with docs/cost-model.md."""
        return self.compute_s / self.step_s * costmodel.TRAIN_MFU * float(costmodel.tp_efficiency(self.tp))


@dataclass(frozen=True, slots=True)
class _Island:
    site_id: str
    gpu: GpuType
    count: int


def _islands(groups: Sequence[GpuGroup]) -> list[_Island]:
    out = []
    for g in groups:
        if g.count < 0:
            raise PlanRequestError(f"GPU count of {g.site_id}/{g.gpu_type} is negative")
        try:
            gpu = costmodel.gpu(g.gpu_type)
        except KeyError as exc:
            raise PlanRequestError(str(exc.args[0])) from None
        if g.count:
            out.append(_Island(g.site_id, gpu, g.count))
    if not out:
        raise PlanError("no GPUs given")
    return out


def _candidate_sets(islands: list[_Island]) -> list[tuple[_Island, ...]]:
    """Which islands a plan may use: each alone, each GPU type together, and all together."""
    sets: dict[tuple[int, ...], tuple[_Island, ...]] = {}

    def add(members: Iterable[int]) -> None:
        key = tuple(sorted(members))
        if key:
            sets[key] = tuple(islands[i] for i in key)

    for i in range(len(islands)):
        add([i])
    by_type: dict[str, list[int]] = {}
    for i, isl in enumerate(islands):
        by_type.setdefault(isl.gpu.name, []).append(i)
    for members in by_type.values():
        add(members)
    by_site: dict[str, list[int]] = {}
    for i, isl in enumerate(islands):
        by_site.setdefault(isl.site_id, []).append(i)
    for members in by_site.values():
        add(members)
    add(range(len(islands)))
    return list(sets.values())


def _train_memory(m: ModelSpec, tp: int, pp: int, dp: int, b: int, seq: int, zero1: bool, in_flight: int) -> float:
    state_per_param = (4.0 + 12.0 / dp) if zero1 else float(costmodel.TRAIN_BYTES_PER_PARAM)
    state = state_per_param * m.params / (tp * pp)
    layers_per_stage = math.ceil(m.layers / pp)
    acts = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * seq * b * m.hidden / tp * layers_per_stage * in_flight
    return state + acts


def plan_training(
    m: ModelSpec,
    groups: Sequence[GpuGroup],
    links: Links | None = None,
    *,
    global_batch_tokens: float = DEFAULT_BATCH_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    top: int = 1,
) -> list[TrainingPlan]:
    """The best `top` training plans, best first; `PlanError` when nothing fits."""
    links = links or {}
    if seq_len <= 0 or global_batch_tokens < seq_len:
        raise PlanRequestError("global_batch_tokens must be at least one sequence of seq_len tokens")
    islands = _islands(groups)
    sequences = int(global_batch_tokens // seq_len)
    tokens_step = sequences * seq_len
    plans: list[TrainingPlan] = []
    best_mem_short: tuple[float, str] | None = None
    for members in _candidate_sets(islands):
        sites = sorted({i.site_id for i in members})
        if any(a < c and (a, c) not in links and (c, a) not in links for a in sites for c in sites):
            continue  # sites without a known link between them are not planned together
        slow = min(members, key=lambda i: i.gpu.tflops).gpu
        mem_limit = min(i.gpu.mem_gb for i in members) * costmodel.GB * costmodel.USABLE_MEMORY
        for tp in TP_DEGREES:
            if tp > costmodel.GPUS_PER_NODE or any(i.count < tp for i in members):
                continue
            for pp in _pp_degrees(m.layers):
                layouts = ["dp_across_sites"] + (["pp_across_sites"] if len(sites) > 1 else [])
                for layout in layouts:
                    for dp, by_site, n_used in _layout_fits(members, tp, pp, layout):
                        for b in MICRO_BATCHES:
                            mb = sequences // (dp * b)
                            if mb < 1:
                                continue
                            in_flight = min(pp, mb)
                            for zero1 in (False, True):
                                if zero1 and dp == 1:
                                    continue
                                mem = _train_memory(m, tp, pp, dp, b, seq_len, zero1, in_flight)
                                if mem > mem_limit:
                                    short = mem / mem_limit
                                    if best_mem_short is None or short < best_mem_short[0]:
                                        best_mem_short = (short, f"TP{tp} PP{pp} DP{dp} on {slow.name}")
                                    continue
                                plans.append(_score_training(
                                    m, members, links, sites, by_site, layout, tp, pp, dp, b, mb, zero1,
                                    n_used, tokens_step * mb * dp * b / sequences, mem, mem_limit, slow, seq_len))
                                break  # without ZeRO-1 fits: ZeRO-1 would only add the same plan
    if not plans:
        detail = f"; closest was {best_mem_short[1]} at {best_mem_short[0]:.1f}x the memory" if best_mem_short else ""
        raise PlanError(f"{m.name} does not fit the given GPUs for training{detail}")
    plans.sort(key=lambda p: (-p.tokens_per_s, p.gpus_used, p.tp * p.pp))
    return plans[:top]


def _pp_degrees(layers: int) -> list[int]:
    return [p for p in (1, 2, 4, 8, 16, 32) if p <= layers]


def _layout_fits(members: Sequence[_Island], tp: int, pp: int, layout: str):
    """Yield (dp, GPUs used by site, GPUs used) for the layout on these islands."""
    unit = tp * pp
    if layout == "dp_across_sites":
        by_site: dict[str, int] = {}
        dp = 0
        for isl in members:
            k = isl.count // unit
            if k:
                dp += k
                by_site[isl.site_id] = by_site.get(isl.site_id, 0) + k * unit
        if dp:
            yield dp, by_site, dp * unit
        return
    # pp_across_sites: each site hosts whole stages (TP x DP GPUs each); stages add up to PP.
    if pp < 2:
        return
    for dp in sorted({1, 2, 4, 8, 16, 32, 64}):
        stage = tp * dp
        room = [(isl, isl.count // stage) for isl in members]
        if sum(k for _, k in room) < pp:
            continue
        left = pp
        by_site = {}
        for isl, k in sorted(room, key=lambda r: -r[1]):
            take = min(k, left)
            if take:
                by_site[isl.site_id] = by_site.get(isl.site_id, 0) + take * stage
                left -= take
        if left == 0 and len(by_site) > 1:
            yield dp, by_site, pp * stage


def _score_training(
    m: ModelSpec, members: Sequence[_Island], links: Links, sites: list[str], by_site: Mapping[str, int],
    layout: str, tp: int, pp: int, dp: int, b: int, mb: int, zero1: bool, n_used: int, tokens_step: float,
    mem: float, mem_limit: float, slow: GpuType, seq_len: int,
) -> TrainingPlan:
    used_sites = sorted(by_site)
    flops = 6.0 * m.params * tokens_step
    compute = float(flops / (n_used * slow.tflops * 1e12 * costmodel.TRAIN_MFU * costmodel.tp_efficiency(tp)))
    bubble = costmodel.pipeline_bubble(pp, mb)
    step_compute = compute / (1.0 - bubble)
    notes = []
    wan = 0.0
    if layout == "dp_across_sites" and len(used_sites) > 1:
        slowest = min((link_between(links, a, c) for a in used_sites for c in used_sites if a < c),
                      key=lambda lk: lk.bandwidth_gbps)
        # Every stage's gradients cross the slowest WAN link: 2 B/param in all.
        allreduce = costmodel.ring_allreduce_s(2.0 * m.params, dp, slowest.bandwidth_gbps, slowest.latency_ms / 1e3)
        notes.append(f"gradient all-reduce over the WAN at {slowest.bandwidth_gbps:g} Gbit/s")
    else:
        allreduce = costmodel.ring_allreduce_s(2.0 * m.params / (tp * pp), dp, costmodel.INTRA_SITE_BW_GBPS, 5e-6)
        if layout == "pp_across_sites":
            hops = [link_between(links, a, c) for a, c in zip(used_sites, used_sites[1:], strict=False)]
            act_bytes = b * seq_len * m.hidden * 2.0 * dp  # per micro-batch, per boundary, all DP ranks
            for lk in hops:
                wan += 2 * mb * act_bytes / (lk.bandwidth_gbps * 1e9 / 8) + 2 * (mb + pp - 1) * lk.latency_ms / 1e3
            notes.append(f"{len(hops)} pipeline boundary(ies) cross the WAN")
    pp_hops = 2 * (mb + pp - 1) * PP_HOP_LATENCY_S if pp > 1 else 0.0
    step = step_compute + allreduce + wan + pp_hops
    return TrainingPlan(
        tp=tp, pp=pp, dp=dp, micro_batch=b, micro_batches=mb, zero1=zero1, precision="bf16",
        layout="single_site" if len(used_sites) == 1 else layout, gpus_used=n_used, gpus_by_site=dict(by_site),
        gpu_types=tuple(sorted({i.gpu.name for i in members if i.site_id in by_site})),
        tokens_per_s=tokens_step / step, step_s=step, compute_s=compute, bubble_fraction=bubble,
        allreduce_s=allreduce, wan_activation_s=wan, memory_per_gpu_gb=mem / costmodel.GB,
        memory_limit_gb=mem_limit / costmodel.GB, notes=tuple(notes))


# ---- inference -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferencePlan:
    site_id: str
    gpu_type: str
    tp: int
    pp: int
    precision: str
    gpus_per_replica: int
    replicas: int  # replicas of this shape the group holds
    max_batch: int
    tokens_per_s_per_replica: float
    ttft_s: float  # prefill of `prompt_tokens` at batch 1
    tpot_s: float  # decode step at `max_batch`
    weights_gb: float
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tokens_per_s(self) -> float:
        return self.replicas * self.tokens_per_s_per_replica


def _replica_options(m: ModelSpec, g: GpuType, count: int, precision: str, ctx: float, prompt: float,
                     ttft_slo_s: float | None, tpot_slo_s: float | None):
    for tp in TP_DEGREES:
        for pp in (1, 2, 4):
            n = tp * pp
            if n > count or tp > costmodel.GPUS_PER_NODE or (pp > 1 and tp < min(costmodel.GPUS_PER_NODE, count // pp)):
                # PP only once TP cannot grow inside the node (or the group is too small for it).
                continue
            if costmodel.kv_capacity_tokens(m, g, n, precision) <= 0:
                continue
            batch_cap = min(costmodel.MAX_BATCH * pp, int(costmodel.kv_capacity_tokens(m, g, n, precision) // max(ctx, 1.0)))
            if batch_cap < 1:
                continue
            ttft = float(costmodel.prefill_s(m, g, tp, prompt, precision)) + (pp - 1) * PP_HOP_LATENCY_S
            if ttft_slo_s is not None and ttft > ttft_slo_s:
                continue
            batch = batch_cap
            while batch >= 1:
                micro = max(1, math.ceil(batch / pp))
                tpot = float(costmodel.decode_step_s(m, g, tp, micro, ctx, precision)) + (pp - 1) * PP_HOP_LATENCY_S
                if tpot_slo_s is None or tpot <= tpot_slo_s:
                    break
                batch = batch // 2 if batch > 1 else 0
            if batch < 1:
                continue
            yield tp, pp, batch, batch / tpot, ttft, tpot


def plan_inference(
    m: ModelSpec,
    groups: Sequence[GpuGroup],
    *,
    context_tokens: float = 2048,
    prompt_tokens: float = 1024,
    ttft_slo_s: float | None = None,
    tpot_slo_s: float | None = None,
    allow_lower_precision: bool = True,
) -> list[InferencePlan]:
    """Best replica shape per GPU group, best group first; `PlanError` when no group can serve."""
    islands = _islands(groups)
    out = []
    refusals = []
    bf16_bytes = costmodel.weight_bytes(m, "bf16")
    for isl in islands:
        chosen = None
        for precision in PRECISIONS if allow_lower_precision else ("bf16",):
            opts = list(_replica_options(m, isl.gpu, isl.count, precision, context_tokens, prompt_tokens,
                                         ttft_slo_s, tpot_slo_s))
            if not opts:
                continue
            tp, pp, batch, tps, ttft, tpot = max(
                opts, key=lambda o: ((isl.count // (o[0] * o[1])) * o[3], -(o[0] * o[1])))
            n = tp * pp
            w_gb = costmodel.weight_bytes(m, precision) / costmodel.GB
            if precision == "bf16":
                reason = (f"bf16 weights ({w_gb:.0f} GB) fit {n} x {isl.gpu.name} ({isl.gpu.mem_gb:g} GB each) "
                          f"at TP{tp}" + (f" x PP{pp}" if pp > 1 else ""))
            else:
                reason = (f"bf16 weights ({bf16_bytes / costmodel.GB:.0f} GB) do not fit {isl.count} x {isl.gpu.name} "
                          f"({isl.gpu.mem_gb:g} GB each) with room for KV cache"
                          + (" within the SLO" if ttft_slo_s or tpot_slo_s else "")
                          + f"; 8-bit weights ({w_gb:.0f} GB) fit at TP{tp}" + (f" x PP{pp}" if pp > 1 else ""))
            notes = []
            if pp > 1:
                notes.append("pipeline stages span nodes inside the site; per-token latency is unchanged, "
                             "throughput comes from micro-batches in flight")
            if isl.gpu.nvlink_gbps < 100 and tp > 1:
                notes.append(f"{isl.gpu.name} has no NVLink: tensor-parallel all-reduces go over PCIe")
            chosen = InferencePlan(isl.site_id, isl.gpu.name, tp, pp, precision, n, isl.count // n, batch, tps,
                                   ttft, tpot, w_gb, reason, tuple(notes))
            break
        if chosen is None:
            refusals.append(f"{isl.count} x {isl.gpu.name} at {isl.site_id}")
        else:
            out.append(chosen)
    if not out:
        slo = " within the SLO" if ttft_slo_s or tpot_slo_s else ""
        raise PlanError(f"{m.name} cannot be served{slo} on any group: {', '.join(refusals)}")
    rank = {p: i for i, p in enumerate(PRECISIONS)}
    out.sort(key=lambda p: (rank[p.precision], -p.tokens_per_s, p.gpus_per_replica))
    return out


def resolve_model(name: str = "", params_b: float = 0.0) -> ModelSpec:
    """A model by name, or the twin's model class nearest in size to `params_b`, scaled to it."""
    if name:
        try:
            return costmodel.model(name)
        except KeyError:
            if params_b <= 0:
                raise PlanRequestError(f"unknown model {name!r} and no params_b given; known: {', '.join(costmodel.MODELS)}") from None
    if params_b <= 0:
        raise PlanRequestError("give a model name or its size in billions of parameters")
    base = min(costmodel.MODELS.values(), key=lambda s: abs(math.log(s.params_b / params_b)))
    if math.isclose(base.params_b, params_b, rel_tol=0.05):
        return base
    layers = max(1, round(base.layers * params_b / base.params_b))
    return ModelSpec(name or f"{params_b:g}b", params_b, layers, base.hidden,
                     base.kv_bytes_per_token * layers / base.layers)
