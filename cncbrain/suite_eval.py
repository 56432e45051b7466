"""Policy evaluation over a suite of generated scenarios (`cncbrain.suites`): every policy × seed ×
scenario as one episode, run in parallel worker processes, then aggregated.

Per scenario a policy's figure is its mean over seeds; over the suite, the mean ± std of those
over scenarios; the share of scenarios on which it is best (ties count for each tied policy; the
oracle is a bound, never "best"); and per family the share of the best baseline's gap to the
oracle it closes: Σ (policy − best baseline) / Σ (oracle − best baseline) over the family's
scenarios, where the best baseline is, per scenario, the best of `BASELINE_POLICIES` that ran —
never `marl`, a `teacher:*` or the oracle.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cncbrain.evaluate import METRICS, RunResult, _clean, _nanmean, _nanstd, run_policy
from cncbrain.scenario import load_scenario
from cncbrain.twin.pool import load_network

BASELINE_POLICIES = ("random", "round-robin", "least-loaded", "greedy", "kpa", "ray-serve")
"""The baselines whose best, per scenario, sets the bar ("best baseline"): not marl, not a
teacher, not the oracle."""


@dataclass
class ScenarioRuns:
    """Every run on one scenario of the suite."""

    family: str
    seed: int
    name: str
    sites: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)

    def mean(self, policy: str, metric: str = "score") -> float:
        return _nanmean([r.metrics[metric] for r in self.runs[policy]])

    def best(self) -> list[str]:
        """Policies with the best mean score here (the oracle excluded)."""
        scores = {p: self.mean(p) for p in self.runs if p != "oracle"}
        if not scores:
            return []
        top = max(scores.values())
        return [p for p, v in scores.items() if v >= top - 1e-9]

    def best_baseline(self) -> str | None:
        have = [p for p in self.runs if p in BASELINE_POLICIES]
        return max(have, key=lambda p: self.mean(p)) if have else None


_CACHE: dict[str, object] = {}


def _scenario(key: str):
    if key not in _CACHE:
        _CACHE[key] = load_scenario(key)
    return _CACHE[key]


@contextmanager
def _quiet_topology():
    """Cogent's nodes without coordinates are logged at every load: once is enough (the table says it)."""
    log = logging.getLogger("cncbrain.twin.topology")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _episode(key: str, policy: str, seed: int, duration_s: float | None) -> tuple[str, str, RunResult]:
    try:
        with _quiet_topology():
            return key, policy, run_policy(_scenario(key), policy, seed, duration_s)
    except Exception as exc:  # say which episode, across the process boundary too
        raise RuntimeError(f"{key}, policy {policy}, seed {seed}: {type(exc).__name__}: {exc}") from exc


def _cost(sites: int, scenario, policy: str) -> float:
    """A rough relative cost of one episode, to start the longest ones first."""
    return sites * (1 + len(scenario.inference)) * (4.0 if policy == "oracle" else 1.0)


def evaluate_suite(
    members: list[tuple[str, int]],
    policies: list[str],
    seeds: int = 1,
    duration_s: float | None = None,
    workers: int | None = None,
    on_done: Callable[[str, str, RunResult], None] | None = None,
) -> list[ScenarioRuns]:
    """Run `policies` × `seeds` seeds (from each scenario's own seed) on every (family, seed) of
    `members`, in `workers` processes (default: the CPU count; 1 runs here)."""
    keys = [f"family:{f}:{s}" for f, s in members]
    out = {}
    tasks = []
    for (family, seed), key in zip(members, keys, strict=True):
        with _quiet_topology():
            sc = _scenario(key)
            n = len(sc.topology.sites) or load_network(sc).size
        out[key] = ScenarioRuns(family, seed, sc.name, n, {p: [] for p in policies})
        for p in policies:
            for s in range(sc.seed, sc.seed + seeds):
                tasks.append((_cost(n, sc, p), key, p, s))
    tasks.sort(key=lambda t: -t[0])
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))

    def record(key: str, policy: str, r: RunResult) -> None:
        out[key].runs[policy].append(r)
        if on_done:
            on_done(key, policy, r)

    if workers == 1:
        for _, key, p, s in tasks:
            record(*_episode(key, p, s, duration_s))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_episode, key, p, s, duration_s) for _, key, p, s in tasks]
            for fut in as_completed(futures):
                record(*fut.result())
    for sr in out.values():
        for runs in sr.runs.values():
            runs.sort(key=lambda r: r.seed)
    return list(out.values())


def read_stored(path: str | Path, suite: str, seeds: int, hours: float | None) -> dict:
    """A previous `--json` of `suite` with the same seeds and hours, checked before anything runs."""
    from cncbrain.errors import UsageError

    try:
        d = json.loads(Path(path).read_text())
        d["by_name"] = {row["name"]: row for row in d["scenarios"]}
        d["order"] = list(d["policies"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--with {path}: not the JSON of `cncbrain eval --suite --json` ({exc})") from None
    for key, want in (("suite", suite), ("seeds", seeds), ("hours", hours)):
        if d.get(key) != want:
            raise UsageError(f"--with {path}: its {key} is {d.get(key)!r}, this run's {want!r}")
    d["path"] = str(path)
    return d


def add_stored(results: list[ScenarioRuns], stored: dict) -> list[str]:
    """Put the runs of a previous `--json` (`read_stored`) next to those just run, for every policy
    of it not run now (a policy run now replaces the stored one of the same name): a new policy is
    measured against stored baselines without running them again. The stored file must come from
    the same generator and twin (same code): what it holds is taken as is. Returns the policies
    added, in the file's order (they are placed before those run now)."""
    from cncbrain.errors import UsageError

    path = stored["path"]
    run_now = list(results[0].runs) if results else []
    added = [p for p in stored["order"] if p not in run_now]
    for sr in results:
        row = stored["by_name"].get(sr.name)
        if row is None or row.get("sites") != sr.sites:
            raise UsageError(f"--with {path}: scenario {sr.name} ({sr.sites} sites) is not in it as generated here")
        runs: dict[str, list[RunResult]] = {}
        for p in added:
            per_seed = row["policies"].get(p, {}).get("per_seed")
            if not per_seed:
                raise UsageError(f"--with {path}: no runs of {p} on {sr.name}")
            runs[p] = [RunResult(p, int(r["seed"]), {m: math.nan if r.get(m) is None else float(r[m]) for m in METRICS},
                                 np.zeros(0), np.zeros(0)) for r in per_seed]
        sr.runs = {**runs, **sr.runs}
    return added


# ---------------------------------------------------------------------------------------- aggregation


def _gap_closed(rows: list[ScenarioRuns], policy: str) -> float | None:
    """Σ (policy − best baseline) / Σ (oracle − best baseline) over `rows`; None without an oracle
    or a baseline, or where the oracle is no better than the best baseline."""
    num = den = 0.0
    for sr in rows:
        b = sr.best_baseline()
        if b is None or "oracle" not in sr.runs or policy not in sr.runs:
            return None
        base = sr.mean(b)
        num += sr.mean(policy) - base
        den += sr.mean("oracle") - base
    return num / den if den > 1e-12 else None


def summarise_suite(results: list[ScenarioRuns]) -> dict:
    """The suite's figures (the JSON written by `--json`)."""
    policies = list(results[0].runs) if results else []
    n = len(results)
    best = {p: 0 for p in policies}
    for sr in results:
        for p in sr.best():
            best[p] += 1
    agg = {}
    for p in policies:
        per = {m: [sr.mean(p, m) for sr in results] for m in METRICS}
        agg[p] = {
            **{m: _clean(_nanmean(per[m])) for m in METRICS},
            "std": {m: _clean(_nanstd(per[m])) for m in METRICS},
            "best_share": best[p] / n if n and p != "oracle" else None,
            "gap_closed": _gap_closed(results, p),
        }
    families: dict[str, dict] = {}
    for fam in dict.fromkeys(sr.family for sr in results):
        rows = [sr for sr in results if sr.family == fam]
        fam_best = {p: sum(p in sr.best() for sr in rows) / len(rows) for p in policies if p != "oracle"}
        families[fam] = {
            "scenarios": len(rows),
            "policies": {
                p: {"score": _clean(_nanmean([sr.mean(p) for sr in rows])),
                    "score_std": _clean(_nanstd([sr.mean(p) for sr in rows])),
                    "best_share": fam_best.get(p),
                    "gap_closed": _gap_closed(rows, p)}
                for p in policies
            },
        }
    scenarios = [
        {
            "name": sr.name,
            "family": sr.family,
            "seed": sr.seed,
            "sites": sr.sites,
            "best": sr.best(),
            "best_baseline": sr.best_baseline(),
            "policies": {
                p: {**{m: _clean(sr.mean(p, m)) for m in METRICS},
                    "per_seed": [{"seed": r.seed, **{m: _clean(r.metrics[m]) for m in METRICS}} for r in runs]}
                for p, runs in sr.runs.items()
            },
        }
        for sr in results
    ]
    return {"baselines": list(BASELINE_POLICIES), "policies": agg, "families": families, "scenarios": scenarios}


def write_suite_json(path: str | Path, suite: str, summary: dict, extra: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": suite, **(extra or {}), **summary}, indent=2))


def plot_suite(path: str | Path, suite: str, summary: dict) -> None:
    """Mean score ± std per policy, share of scenarios won, mean score per family and the share of
    the best baseline's gap to the oracle closed per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pol = summary["policies"]
    names = list(pol)
    fams = list(summary["families"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    col = {p: colors[i % len(colors)] for i, p in enumerate(names)}
    fig, axes = plt.subplots(2, 2, figsize=(16, 10), constrained_layout=True)
    ax = axes[0, 0]
    ax.bar(range(len(names)), [pol[p]["score"] or 0 for p in names], yerr=[pol[p]["std"]["score"] or 0 for p in names],
           capsize=3, color=[col[p] for p in names])
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_title(f"score, mean ± std over {len(summary['scenarios'])} scenarios")
    lo = min((pol[p]["score"] or 0) - (pol[p]["std"]["score"] or 0) for p in names)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax = axes[0, 1]
    acting = [p for p in names if p != "oracle"]
    ax.bar(range(len(acting)), [pol[p]["best_share"] or 0 for p in acting], color=[col[p] for p in acting])
    ax.set_xticks(range(len(acting)), acting, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("share of scenarios on which the policy is best (ties count for each)")
    width = 0.8 / max(len(names), 1)
    ax = axes[1, 0]
    for i, p in enumerate(names):
        ys = [summary["families"][f]["policies"][p]["score"] or 0 for f in fams]
        ax.bar(np.arange(len(fams)) + i * width - 0.4 + width / 2, ys, width, label=p, color=col[p])
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylim(max(0.0, min((summary["families"][f]["policies"][p]["score"] or 1) for f in fams for p in names) - 0.05), 1.0)
    ax.set_title("mean score per family")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    ax = axes[1, 1]
    gapped = [p for p in names if p != "oracle"]
    if any(summary["families"][f]["policies"][p]["gap_closed"] is not None for f in fams for p in gapped):
        width = 0.8 / max(len(gapped), 1)
        for i, p in enumerate(gapped):
            ys = [summary["families"][f]["policies"][p]["gap_closed"] for f in fams]
            ax.bar(np.arange(len(fams)) + i * width - 0.4 + width / 2, [0 if y is None else max(y, -1.0) for y in ys],
                   width, label=p, color=col[p])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(fams)), fams)
        ax.set_ylim(-1.0, 1.0)
        ax.set_title("share of the best baseline's gap to the oracle closed, per family (clipped at −1)")
    else:
        ax.text(0.5, 0.5, "gap to the oracle: run with oracle and a baseline", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"cncbrain eval --suite {suite}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_share(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
