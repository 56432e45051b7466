"""Workload traces: Azure LLM inference requests (Splitwise 2023, `code` and `conv`) and Alibaba GPU
cluster tasks (cluster-trace-gpu-v2023, "openb"), turned into the twin's request arrays and
training jobs. Everything here is numpy and deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources

import numpy as np

from cncbrain.twin import costmodel

AZURE_TRACES = {"code": "AzureLLMInferenceTrace_code.csv", "conv": "AzureLLMInferenceTrace_conv.csv"}


@dataclass
class RequestTrace:
    """Requests sorted by arrival: time (s from start), prompt and output tokens."""

    t: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    length_s: float

    def __len__(self) -> int:
        return len(self.t)


@cache
def load_azure(kind: str) -> RequestTrace:
    """One Azure LLM inference trace (about one hour), times relative to its first request."""
    if kind not in AZURE_TRACES:
        raise KeyError(f"unknown inference trace {kind!r}; known: {', '.join(AZURE_TRACES)}")
    path = resources.files("cncbrain") / "data" / "azure" / AZURE_TRACES[kind]
    ts, prompt, out = [], [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            # timestamps carry 7 fractional digits; datetime takes 6
            stamp = row["TIMESTAMP"]
            head, _, frac = stamp.partition(".")
            ts.append(datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").timestamp())
            prompt.append(int(row["ContextTokens"]))
            out.append(int(row["GeneratedTokens"]))
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return RequestTrace(t, np.asarray(prompt)[order], np.maximum(np.asarray(out)[order], 1), float(t[-1]) + 1.0)


def replay(kind: str, duration_s: float, rate_scale: float, rng: np.random.Generator,
           start_s: float = 0.0) -> RequestTrace:
    """The trace scaled in rate and tiled to `duration_s`; only its part from `start_s` on (a
    window of a long horizon; 0: all of it, as the evaluations replay it).

    Rate scaling superposes ⌈r⌉ copies of the trace, copy k shifted by a random circular offset
    (copy 0 unshifted), and thins the last copy to the fractional part, so bursts keep their shape.
    Beyond its length the trace repeats.
    """
    base = load_azure(kind)
    copies = max(1, int(np.ceil(rate_scale)))
    frac = rate_scale - (copies - 1)
    ts, ps, os_ = [], [], []
    for k in range(copies):
        offset = 0.0 if k == 0 else rng.uniform(0, base.length_s)
        t = (base.t + offset) % base.length_s
        keep = np.ones(len(t), bool) if k < copies - 1 else rng.random(len(t)) < frac
        ts.append(t[keep])
        ps.append(base.prompt[keep])
        os_.append(base.output[keep])
    t1, p1, o1 = np.concatenate(ts), np.concatenate(ps), np.concatenate(os_)
    first = int(start_s // base.length_s)
    reps = max(int(np.ceil(duration_s / base.length_s)) - first, 0)
    t = np.concatenate([t1 + r * base.length_s for r in range(first, first + reps)] or [np.zeros(0)])
    p = np.tile(p1, reps)
    o = np.tile(o1, reps)
    keep = (t < duration_s) & (t >= start_s)
    order = np.argsort(t[keep], kind="stable")
    return RequestTrace(t[keep][order], p[keep][order], o[keep][order], duration_s)


# --- training jobs from the Alibaba GPU trace -------------------------------------------------------


@dataclass
class TracedTask:
    """One GPU task of the Alibaba trace: arrival (s), GPUs asked for, run time (s)."""

    arrival_s: np.ndarray
    num_gpu: np.ndarray
    duration_s: np.ndarray


@cache
def load_alibaba() -> TracedTask:
    path = resources.files("cncbrain") / "data" / "alibaba" / "openb_pod_list_default.csv"
    arr, gpus, dur = [], [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            if int(row["num_gpu"]) <= 0 or not row["deletion_time"] or not row["scheduled_time"]:
                continue
            d = float(row["deletion_time"]) - float(row["scheduled_time"])
            if d <= 0:
                continue
            arr.append(float(row["creation_time"]))
            gpus.append(int(row["num_gpu"]))
            dur.append(d)
    order = np.argsort(arr, kind="stable")
    return TracedTask(np.asarray(arr)[order], np.asarray(gpus)[order], np.asarray(dur)[order])


# Alibaba's node models mapped to catalog types. G1–G3 are undisclosed internal codes; we read them
# as the data-centre generations of their era (an assumption, stated in docs/twin.md, Sites). P100 → V100 and
# A10 → L4 (closest catalog type by memory and bandwidth).
ALIBABA_TO_CATALOG = {
    "G1": "A100-40GB", "G2": "A100-80GB", "G3": "H100", "T4": "T4", "P100": "V100",
    "V100M16": "V100", "V100M32": "V100", "A10": "L4",
}


@cache
def alibaba_gpu_models() -> dict[str, int]:
    """GPU models and node counts of the Alibaba node list (used to sample site inventories)."""
    path = resources.files("cncbrain") / "data" / "alibaba" / "openb_node_list_gpu_node.csv"
    counts: dict[str, int] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            counts[row["model"]] = counts.get(row["model"], 0) + int(row["gpu"])
    return counts


@dataclass
class JobSpec:
    """A training job as the twin runs it: a gang of `n_shards` data-parallel shards, each one model
    replica on `shard_gpus` GPUs of one type at one site."""

    job_id: str
    arrival_s: float
    model: str
    n_shards: int
    shard_gpus: int
    tokens: float
    tokens_per_step: float
    ideal_runtime_s: float
    """Runtime on the requested GPUs of the reference type with no communication cost."""
    checkpoint_interval_s: float
    tenant: str = "default"


# Model class by the task's size (GPU-seconds) quantile: most trace tasks are small.
_SIZE_CLASSES = [(0.50, "1.3b"), (0.80, "7b"), (0.95, "13b"), (1.01, "34b")]
REFERENCE_GPU = "A100-80GB"


def jobs_from_trace(
    n_jobs: int,
    duration_s: float,
    rng: np.random.Generator,
    gpu_scale: int = 8,
    min_runtime_s: float = 300.0,
    max_runtime_s: float = 5400.0,
    checkpoint_interval_s: float = 600.0,
    prefix: str = "job",
) -> list[JobSpec]:
    """Sample `n_jobs` consecutive tasks of the Alibaba trace (a random window, so its bursts and
    lulls are kept), compress their arrivals into the first 80 % of the horizon and map each to a
    training job: GPUs = trace GPUs × `gpu_scale` (a trace GPU stands for one 8-GPU node of the
    pool); model class by the task's GPU-time quantile; runtime = trace runtime clipped to
    [min, max]; token budget = what the requested GPUs of the reference type do in that runtime."""
    tasks = load_alibaba()
    if n_jobs <= 0:
        return []
    start = int(rng.integers(0, max(1, len(tasks.arrival_s) - n_jobs)))
    sl = slice(start, start + n_jobs)
    arr = tasks.arrival_s[sl]
    span = max(arr[-1] - arr[0], 1.0)
    arrivals = (arr - arr[0]) / span * duration_s * 0.8
    gpu_time = tasks.num_gpu * tasks.duration_s
    qs = np.searchsorted(np.sort(gpu_time), gpu_time[sl]) / len(gpu_time)
    ref = costmodel.gpu(REFERENCE_GPU)
    jobs = []
    for k in range(len(arrivals)):
        model_name = next(name for q, name in _SIZE_CLASSES if qs[k] < q)
        m = costmodel.model(model_name)
        shard_gpus = max(costmodel.min_train_gpus(m, ref), 1)
        gpus = max(int(tasks.num_gpu[sl][k]) * gpu_scale, shard_gpus)
        n_shards = max(1, gpus // shard_gpus)
        runtime = float(np.clip(tasks.duration_s[sl][k], min_runtime_s, max_runtime_s))
        rate = costmodel.shard_tokens_per_s(m, ref, shard_gpus) * n_shards
        jobs.append(
            JobSpec(
                job_id=f"{prefix}-{k:04d}",
                arrival_s=float(arrivals[k]),
                model=model_name,
                n_shards=n_shards,
                shard_gpus=shard_gpus,
                tokens=rate * runtime,
                tokens_per_step=float(2**20 if m.params_b < 10 else 2**22),
                ideal_runtime_s=runtime,
                checkpoint_interval_s=checkpoint_interval_s,
            )
        )
    return jobs
