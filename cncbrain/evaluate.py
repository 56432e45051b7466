"""Policy evaluation on the twin: run policies × seeds on a scenario, aggregate the metrics of docs/twin.md,
print a table, write JSON and draw the comparison."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.catalog import make_policy
from cncbrain.oracle import oracle_bound
from cncbrain.twin.scenario import Scenario
from cncbrain.twin.sim import Twin

METRICS = [
    "score",
    "slo_attainment",
    "ttft_p99_s",
    "tpot_p99_s",
    "training_goodput",
    "mean_jct_slowdown",
    "gpu_utilization",
    "cost_usd",
    "wan_gb",
]


@dataclass
class RunResult:
    policy: str
    seed: int
    metrics: dict[str, float]
    slo_t: np.ndarray = field(repr=False)
    slo_series: np.ndarray = field(repr=False)


def run_policy(scenario: Scenario, policy: str, seed: int, duration_s: float | None = None) -> RunResult:
    """One episode of `policy` on `scenario` with `seed` (the oracle solves its LP instead)."""
    twin = Twin(scenario, seed=seed, duration_s=duration_s)
    if policy == "oracle":
        return RunResult(policy, seed, oracle_bound(twin).metrics(), np.zeros(0), np.zeros(0))
    p = make_policy(policy)
    p.reset(seed)
    while not twin.done():
        twin.step(p.act(twin.view()))
    t, series = twin.slo_series()
    return RunResult(policy, seed, twin.metrics(), t, series)


def evaluate(
    scenario: Scenario,
    policies: list[str],
    seeds: list[int],
    duration_s: float | None = None,
    on_done: Callable[[RunResult], None] | None = None,
) -> dict[str, list[RunResult]]:
    for name in policies:  # fail on an unknown name before any work
        if name != "oracle":
            make_policy(name)
    out: dict[str, list[RunResult]] = {p: [] for p in policies}
    for name in policies:
        for seed in seeds:
            r = run_policy(scenario, name, seed, duration_s)
            out[name].append(r)
            if on_done:
                on_done(r)
    return out


def _nanmean(xs: list[float]) -> float:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _nanstd(xs: list[float]) -> float:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.std(v)) if v else float("nan")


def summarise(results: dict[str, list[RunResult]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per policy and metric: mean and standard deviation over seeds."""
    return {
        name: {m: {"mean": _nanmean([r.metrics[m] for r in runs]), "std": _nanstd([r.metrics[m] for r in runs])}
               for m in METRICS}
        for name, runs in results.items()
    }


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def to_json(scenario_name: str, results: dict[str, list[RunResult]]) -> dict:
    summary = summarise(results)
    return {
        "scenario": scenario_name,
        "policies": {
            name: {
                **{m: _clean(summary[name][m]["mean"]) for m in METRICS},
                "per_seed": [{"seed": r.seed, **{m: _clean(r.metrics[m]) for m in METRICS}} for r in runs],
            }
            for name, runs in results.items()
        },
    }


def write_json(path: str | Path, scenario_name: str, results: dict[str, list[RunResult]]) -> None:
    Path(path).write_text(json.dumps(to_json(scenario_name, results), indent=2))


def plot(path: str | Path, scenario_name: str, results: dict[str, list[RunResult]]) -> None:
    """Bars (mean ± std over seeds) for every metric and SLO attainment over time per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results)
    names = list(results)
    fig = plt.figure(figsize=(16, 10), constrained_layout=True)
    grid = fig.add_gridspec(3, 4)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, m in enumerate(METRICS):
        ax = fig.add_subplot(grid[n // 4, n % 4])
        means = [summary[p][m]["mean"] for p in names]
        stds = [summary[p][m]["std"] for p in names]
        ax.bar(range(len(names)), [0 if math.isnan(v) else v for v in means],
               yerr=[0 if math.isnan(v) else v for v in stds], capsize=3,
               color=[colors[i % len(colors)] for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(m, fontsize=10)
    ax = fig.add_subplot(grid[2, 1:])
    for i, p in enumerate(names):
        runs = [r for r in results[p] if len(r.slo_series)]
        if not runs:
            continue
        n = min(len(r.slo_series) for r in runs)
        series = np.mean([r.slo_series[:n] for r in runs], axis=0)
        ax.plot(runs[0].slo_t[:n] / 60.0, series, label=p, color=colors[i % len(colors)], lw=1.2)
    ax.set_xlabel("time (min)")
    ax.set_ylabel("SLO attainment per tick")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=4)
    ax.set_title("SLO attainment over time (mean over seeds)")
    fig.suptitle(f"cncbrain eval — {scenario_name} ({len(next(iter(results.values())))} seed(s))")
    fig.savefig(path, dpi=110)
    plt.close(fig)
