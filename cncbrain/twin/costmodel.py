"""The cost model of the digital twin: GPU types, model classes and the formulas that turn them
into prefill/decode/training times and memory needs.

Every figure comes from the files in `cncbrain/data/gpu_specs/` (read at import) or from the
published figures collected, each with its source, in `docs/cost-model.md`; efficiency constants
are calibrated so that the model reproduces the TensorRT-LLM / NIM reference figures within a
factor of 1.5 (see `tests/unit/test_costmodel.py`). Functions here are pure and vectorise over numpy arrays.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

GB = 1e9

# --- efficiency constants (calibrated, see docs/cost-model.md) -------------------------------
PREFILL_MFU = 0.65
"""Share of peak tensor FLOP/s a prefill reaches (compute-bound regime)."""
DECODE_BW_EFF = 0.80
"""Share of peak HBM bandwidth a decode step reaches (memory-bound regime)."""
PREFILL_OVERHEAD_S_PER_LAYER = 0.15e-3
"""Fixed cost per layer of one prefill forward (kernel launches, TP syncs, scheduling)."""
DECODE_OVERHEAD_S_PER_LAYER = 0.02e-3
"""Fixed cost per layer of one decode step (CUDA graphs make it small)."""
TP_COMM_PENALTY = 0.10
"""Tensor-parallel efficiency is 1 / (1 + penalty·(tp − 1)): per-layer all-reduces over NVLink/PCIe."""
MAX_BATCH = 64
"""Largest decode batch a replica runs (engine setting; the KV cache may allow fewer)."""
USABLE_MEMORY = 0.90
"""Share of GPU memory usable for weights + KV cache (the rest: runtime, fragmentation)."""
TRAIN_MFU = 0.40
"""Training MFU (Llama-2 on A100 ≈ 38–43 %, Llama-3 on H100 38–43 %; docs/cost-model.md)."""
TRAIN_BYTES_PER_PARAM = 16
"""Mixed-precision Adam model state: 2 + 2 + 12 bytes per parameter (ZeRO paper)."""
INTRA_SITE_BW_GBPS = 400.0
"""Per-GPU datacenter network inside a site (400 Gb/s RoCE/IB, Llama-3)."""
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GpuType:
    """One GPU model as the twin sees it."""

    name: str
    tflops: float
    """Dense BF16/FP16 tensor TFLOP/s."""
    tflops_fp8: float
    """Dense FP8 (or INT8 where FP8 is absent) tensor TFLOP/s; equals `tflops` when unsupported."""
    mem_gb: float
    hbm_gbps: float
    """Memory bandwidth in GB/s."""
    price_hr: float
    """USD per GPU-hour (on-demand snapshot; see docs/cost-model.md)."""
    power_w: float
    nvlink_gbps: float
    """Intra-node GPU↔GPU bandwidth in GB/s (PCIe where there is no NVLink)."""
    source: str


def _specs() -> tuple[dict, dict]:
    base = resources.files("cncbrain") / "data" / "gpu_specs"
    specs = json.loads((base / "gpu-specs_specs.json").read_text())
    cfgs = {}
    for f in (base / "llm-analysis_gpu_configs").iterdir():
        if f.name.endswith(".json"):
            cfg = json.loads(f.read_text())
            cfgs[cfg["name"]] = cfg
    return specs, cfgs


# Prices: docs/cost-model.md, AWS on-demand snapshot (khaderz.com) where quoted; H200 from the e2enetworks
# quote; V100 and T4 have no quote in the sources and are set by the assumption written beside them.
_PRICES = {
    "H100": 8.22,
    "H200": 3.37,
    "A100-80GB": 4.60,
    "A100-40GB": 3.67,
    "L40S": 1.84,
    "L4": 0.81,
    "V100": 2.00,  # assumption: between L40S and A100-40 per hour, below A100-40 (no source quote)
    "T4": 0.53,  # assumption: ~0.65 × L4, by bandwidth and FLOP/s parity (no source quote)
}


@cache
def gpu_catalog() -> dict[str, GpuType]:
    """The GPU types of the twin, built from the copied spec files (`data/gpu_specs`)."""
    specs, cfgs = _specs()
    h100 = cfgs["h100-sxm-80gb"]
    a80 = cfgs["a100-sxm-80gb"]
    a40 = cfgs["a100-sxm-40gb"]
    v100 = cfgs["v100-sxm-32gb"]
    l40s, l4, t4 = specs["l40s"], specs["l4"], specs["t4"]
    cat = [
        GpuType("H100", h100["peak_fp16_TFLOPS"], h100["peak_i8_TFLOPS"], h100["mem_per_GPU_in_GB"],
                h100["hbm_bandwidth_in_GB_per_sec"], _PRICES["H100"], 700, 450, "llm-analysis h100-sxm-80gb"),
        # H200: same die as H100 (docs/cost-model.md), 141 GB HBM3e at 4.8 TB/s
        GpuType("H200", h100["peak_fp16_TFLOPS"], h100["peak_i8_TFLOPS"], 141, 4800, _PRICES["H200"], 700, 450,
                "docs/cost-model.md (aiwiki H200)"),
        GpuType("A100-80GB", a80["peak_fp16_TFLOPS"], a80["peak_i8_TFLOPS"] / 1, a80["mem_per_GPU_in_GB"],
                a80["hbm_bandwidth_in_GB_per_sec"], _PRICES["A100-80GB"], 400, 300, "llm-analysis a100-sxm-80gb"),
        GpuType("A100-40GB", a40["peak_fp16_TFLOPS"], a40["peak_i8_TFLOPS"], a40["mem_per_GPU_in_GB"],
                a40["hbm_bandwidth_in_GB_per_sec"], _PRICES["A100-40GB"], 400, 300, "llm-analysis a100-sxm-40gb"),
        GpuType("L40S", l40s["bf16_tensor_core"], l40s["fp8_tensor_core"], l40s["gpu_memory"],
                l40s["memory_bandwidth"], _PRICES["L40S"], 350, 32, "gpu-specs l40s (PCIe Gen4)"),
        GpuType("L4", l4["bf16_tensor_core"], l4["fp8_tensor_core"], l4["gpu_memory"], l4["memory_bandwidth"],
                _PRICES["L4"], 72, 32, "gpu-specs l4 (PCIe Gen4)"),
        GpuType("V100", v100["peak_fp16_TFLOPS"], v100["peak_fp16_TFLOPS"], v100["mem_per_GPU_in_GB"],
                v100["hbm_bandwidth_in_GB_per_sec"], _PRICES["V100"], 300, 150, "llm-analysis v100-sxm-32gb"),
        # T4: gpu-specs lists no FP16 tensor figure; 65 TFLOP/s FP16 and 320 GB/s from docs/cost-model.md
        GpuType("T4", 65.0, 130.0, t4["gpu_memory"], 320.0, _PRICES["T4"], 70, 16, "gpu-specs t4 + docs/cost-model.md"),
    ]
    return {g.name: g for g in cat}


@dataclass(frozen=True)
class GpuColumns:
    """The fields of several GPU types (or of one type per site or per request) as arrays, so the
    timing formulas below run over many sites or requests at once with the very same arithmetic."""

    tflops: np.ndarray
    tflops_fp8: np.ndarray
    hbm_gbps: np.ndarray

    @classmethod
    def of(cls, gpus: list[GpuType]) -> GpuColumns:
        return cls(np.array([g.tflops for g in gpus]), np.array([g.tflops_fp8 for g in gpus]),
                   np.array([g.hbm_gbps for g in gpus]))

    def take(self, idx: np.ndarray) -> GpuColumns:
        return GpuColumns(self.tflops[idx], self.tflops_fp8[idx], self.hbm_gbps[idx])


def gpu(name: str) -> GpuType:
    cat = gpu_catalog()
    if name not in cat:
        raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(cat)}")
    return cat[name]


@dataclass(frozen=True)
class ModelSpec:
    """A transformer model class (Llama-family shapes)."""

    name: str
    params_b: float
    layers: int
    hidden: int
    kv_bytes_per_token: float
    """KV-cache bytes per token at 16-bit precision (2·L·n_kv_heads·d_head·2)."""

    @property
    def params(self) -> float:
        return self.params_b * 1e9


# Shapes and KV bytes per token (2·L·n_kv_heads·d_head·2) with their sources: docs/cost-model.md,
# "Model shapes" — 1.3B GPT-3 XL, 7B/13B Llama-2, 34B Code Llama (GQA), 70B Llama-3.1 (GQA).
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("1.3b", 1.3, 24, 2048, 2 * 24 * 2048 * 2),
        ModelSpec("7b", 7.0, 32, 4096, 524_288),
        ModelSpec("13b", 13.0, 40, 5120, 819_200),
        ModelSpec("34b", 34.0, 48, 8192, 196_608),
        ModelSpec("70b", 70.0, 80, 8192, 327_680),
    ]
}


def model(name: str) -> ModelSpec:
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[key]


PRECISION_BYTES = {"bf16": 2.0, "fp8": 1.0}


def _peak(g: GpuType | GpuColumns, precision: str):
    return (g.tflops_fp8 if precision == "fp8" else g.tflops) * 1e12


def tp_efficiency(tp: int | np.ndarray) -> float | np.ndarray:
    return 1.0 / (1.0 + TP_COMM_PENALTY * (np.asarray(tp) - 1))


def weight_bytes(m: ModelSpec, precision: str = "bf16") -> float:
    return m.params * PRECISION_BYTES[precision]


def min_tp(m: ModelSpec, g: GpuType, precision: str = "bf16", kv_reserve_tokens: int = 16_384) -> int:
    """Smallest power-of-two tensor-parallel degree (≤ 8, one node) whose memory holds the weights
    plus a KV reserve; 0 if even 8 GPUs do not."""
    need = weight_bytes(m, precision) + kv_reserve_tokens * m.kv_bytes_per_token * PRECISION_BYTES[precision] / 2
    for tp in (1, 2, 4, 8):
        if tp * g.mem_gb * GB * USABLE_MEMORY >= need:
            return tp
    return 0


def kv_capacity_tokens(m: ModelSpec, g: GpuType, tp: int, precision: str = "bf16") -> float:
    free = tp * g.mem_gb * GB * USABLE_MEMORY - weight_bytes(m, precision)
    return max(free, 0.0) / (m.kv_bytes_per_token * PRECISION_BYTES[precision] / 2)


def prefill_s(m: ModelSpec, g: GpuType | GpuColumns, tp, prompt_tokens, precision: str = "bf16"):
    """Time to first token of a prompt at batch 1: the prefill forward (compute-bound, at least one
    read of the weights) plus a fixed per-layer overhead. Vectorised over `prompt_tokens` (and over
    `g`/`tp` given as `GpuColumns`/arrays of the same length)."""
    eff = tp_efficiency(tp)
    compute = 2.0 * m.params * np.asarray(prompt_tokens, dtype=float) / (tp * _peak(g, precision) * PREFILL_MFU * eff)
    weights = weight_bytes(m, precision) / (tp * g.hbm_gbps * GB * DECODE_BW_EFF * eff)
    return np.maximum(compute, weights) + PREFILL_OVERHEAD_S_PER_LAYER * m.layers


def decode_step_s(m: ModelSpec, g: GpuType | GpuColumns, tp, batch, ctx_tokens, precision: str = "bf16"):
    """Time of one decode step for `batch` sequences of mean context `ctx_tokens`: the larger of
    reading weights + KV cache and the step's FLOPs, plus a per-layer overhead. Vectorised (over
    `g`/`tp` too, given as `GpuColumns`/arrays)."""
    eff = tp_efficiency(tp)
    batch = np.asarray(batch, dtype=float)
    kv = batch * np.asarray(ctx_tokens, dtype=float) * m.kv_bytes_per_token * PRECISION_BYTES[precision] / 2
    mem = (weight_bytes(m, precision) + kv) / (tp * g.hbm_gbps * GB * DECODE_BW_EFF * eff)
    compute = 2.0 * m.params * batch / (tp * _peak(g, precision) * PREFILL_MFU * eff)
    return np.maximum(mem, compute) + DECODE_OVERHEAD_S_PER_LAYER * m.layers


def max_batch(m: ModelSpec, g: GpuType, tp: int, ctx_tokens: float, precision: str = "bf16") -> int:
    """Decode batch limit: the engine's MAX_BATCH or what the KV cache holds at `ctx_tokens`."""
    kv_fit = kv_capacity_tokens(m, g, tp, precision) / max(ctx_tokens, 1.0)
    return int(max(0, min(MAX_BATCH, math.floor(kv_fit))))


def replica_figures(m: ModelSpec, gpus: list[GpuType], precision: str, mean_prompt: float,
                    mean_output: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One replica of `m` serving requests of mean prompt/output length, per GPU type: its
    tensor-parallel degree (0 where it does not fit), its decode batch limit, and the replica-seconds
    of work per request at that batch (prefill + output × step ÷ batch; inf where it does not fit).
    1 / work is the request rate a replica sustains at full utilisation."""
    ctx = mean_prompt + mean_output / 2
    tp = np.array([min_tp(m, g, precision) for g in gpus], dtype=np.int64)
    bmax = np.array([max_batch(m, g, max(t, 1), ctx, precision) if t else 0
                     for g, t in zip(gpus, tp, strict=True)], dtype=np.int64)
    work = np.full(len(gpus), np.inf)
    for i, g in enumerate(gpus):
        if tp[i] and bmax[i] > 0:
            pre = float(prefill_s(m, g, tp[i], mean_prompt, precision))
            step = float(decode_step_s(m, g, tp[i], bmax[i], ctx, precision))
            work[i] = pre + mean_output * step / bmax[i]
    tp[bmax == 0] = 0
    return tp, bmax, work


def replica_startup_s(m: ModelSpec, precision: str = "bf16") -> float:
    """Cold start of a replica: container + engine start (20 s) plus loading weights at 2 GB/s."""
    return 20.0 + weight_bytes(m, precision) / (2.0 * GB)


# --- training -------------------------------------------------------------------------------------


def train_memory_fits(m: ModelSpec, g: GpuType, gpus: int) -> bool:
    """16 B/param of model state (+10 % for activations with selective recompute) over `gpus` GPUs."""
    return TRAIN_BYTES_PER_PARAM * m.params * 1.10 <= gpus * g.mem_gb * GB * USABLE_MEMORY


def min_train_gpus(m: ModelSpec, g: GpuType) -> int:
    """Fewest GPUs (power of two) of type `g` that hold the training state of `m`; 0 if > 64."""
    n = 1
    while n <= 64:
        if train_memory_fits(m, g, n):
            return n
        n *= 2
    return 0


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Fraction of a step lost to the pipeline bubble: (p − 1)/(m + p − 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def ring_allreduce_s(size_bytes: float, ranks: int, bw_gbps: float, latency_s: float = 0.0) -> float:
    """Ring all-reduce time: 2(n−1)/n · S/B, plus α per step (2(n−1) steps). B in Gbit/s."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * size_bytes / (bw_gbps * 1e9 / 8) + 2 * (ranks - 1) * latency_s


def shard_tokens_per_s(m: ModelSpec, g: GpuType, gpus: int) -> float:
    """Compute-only training throughput of one shard (tokens/s): 6·N FLOPs per token at TRAIN_MFU."""
    return gpus * g.tflops * 1e12 * TRAIN_MFU / (6.0 * m.params)


def train_step_s(
    m: ModelSpec,
    tokens_per_step: float,
    shard_gpus: int,
    shard_types: list[GpuType],
    allreduce_bw_gbps: float,
    allreduce_latency_s: float,
    micro_batches: int = 16,
) -> float:
    """One synchronous data-parallel step of a job whose shards (one model replica each, on
    `shard_gpus` GPUs of the listed types) all-reduce their gradients over the slowest link.

    step = compute of the slowest shard / (1 − pipeline bubble) + ring all-reduce of 2 B/param.
    """
    n = len(shard_types)
    per_shard_tokens = tokens_per_step / n
    slowest = min(shard_tokens_per_s(m, g, shard_gpus) for g in shard_types)
    stages = max(1, math.ceil(shard_gpus / GPUS_PER_NODE))
    compute = per_shard_tokens / slowest / (1.0 - pipeline_bubble(stages, micro_batches))
    sync = ring_allreduce_s(2.0 * m.params, n, allreduce_bw_gbps, allreduce_latency_s)
    return compute + sync
