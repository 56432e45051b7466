"""Decision latency of the shipped MARL policy on CPU (numpy, no torch): one site's decision
(`MarlPolicy.decide_site`, what the live site agent calls for its scale proposals), the whole
pool's (`act`), and a live offer round: every site of the scenario answering one newly offered
inference service together (`MarlSitePolicy.answer_sites`, what `up`'s agent process does on the
deploy path), on sites emulated by the twin with two services running, through perception's
snapshot.

    python benchmarks/bench_policy.py [--scenario geant] [--n 2000] [--pool 400] [--rounds 200] [--json]

Target: p99 ≤ 1 ms per site decision. The views are real twin states along an episode.
Reported twice: wall-clock and the process's CPU time per decision (`*_cpu_*`); on a shared machine
the wall-clock tail mostly measures waiting for a core, the CPU time what the decision costs (all
the process's threads). numpy's OpenBLAS runs on one thread, as in the agents' process, unless
OPENBLAS_NUM_THREADS says otherwise (`OPENBLAS_NUM_THREADS=2 python benchmarks/bench_policy.py`:
OpenBLAS's default on this 2-core machine); recorded as `openblas_threads`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the agents' process runs (cncbrain/commands/agent.py)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from agents.runtime import MarlPolicy  # noqa: E402
from cncbrain.scenario import load_scenario  # noqa: E402
from cncbrain.twin.sim import Twin  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="family:continental:49")
    ap.add_argument("--policy", default=None, help="policy .npz (default: the shipped one)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=400, help="whole-pool decisions (act) timed")
    ap.add_argument("--rounds", type=int, default=200, help="offer rounds (0: skip them)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", metavar="PNG", help="draw the before/after runs of the results file (no measuring)")
    a = ap.parse_args(argv)
    if a.plot:
        plot(a.plot)
        return
    t0 = time.perf_counter()
    p = MarlPolicy(a.policy)
    load_ms = (time.perf_counter() - t0) * 1e3
    twin = Twin(load_scenario(a.scenario), seed=0)
    views = []
    while not twin.done() and len(views) < 40:
        v = twin.view()
        views.append(v)
        twin.step(p.act(v))
    p.decide_site(views[0], 0)  # warm the featurizer cache
    site, pool, site_cpu, pool_cpu = [], [], [], []
    for i in range(a.n):
        v = views[i % len(views)]
        c0, t0 = time.process_time(), time.perf_counter()
        p.decide_site(v, (i * 7) % v.n_sites)
        site.append(time.perf_counter() - t0)
        site_cpu.append(time.process_time() - c0)
    for i in range(a.pool):
        v = views[i % len(views)]
        c0, t0 = time.process_time(), time.perf_counter()
        p.act(v)
        pool.append(time.perf_counter() - t0)
        pool_cpu.append(time.process_time() - c0)
    rounds, rounds_cpu = offer_rounds(a.scenario, a.policy, a.rounds) if a.rounds else ([], [])
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 4) if len(xs) else None  # noqa: E731
    res = {"scenario": a.scenario, "sites": views[0].n_sites, "services": views[0].n_services,
           "policy_load_ms": round(load_ms, 2),
           "site_decision_p50_ms": ms(site, 50), "site_decision_p99_ms": ms(site, 99),
           "site_decision_cpu_p50_ms": ms(site_cpu, 50), "site_decision_cpu_p99_ms": ms(site_cpu, 99),
           "pool_decision_p50_ms": ms(pool, 50), "pool_decision_p99_ms": ms(pool, 99),
           "pool_decision_cpu_p50_ms": ms(pool_cpu, 50), "pool_decision_cpu_p99_ms": ms(pool_cpu, 99),
           "offer_round_p50_ms": ms(rounds, 50), "offer_round_p99_ms": ms(rounds, 99),
           "offer_round_cpu_p50_ms": ms(rounds_cpu, 50),
           "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
           "openblas_threads": os.environ["OPENBLAS_NUM_THREADS"]}
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v}")


def offer_rounds(scenario: str, policy: str | None, n: int) -> tuple[list[float], list[float]]:
    """Seconds (wall, CPU) of `n` offer rounds, each offering one new 7B inference service to every
    site of `scenario` at once, as `up`'s agent process answers them. The sites are emulated by the
    twin (two services placed, 30 ticks served); the snapshot is perception's."""
    from agents.executor_emulated import EmulatorHost
    from agents.marl_site import MarlSitePolicy
    from agents.site_policies import make_site_policy
    from cnc.common.v1 import common_pb2 as common
    from cnc.scheduler.v1 import scheduler_pb2 as spb

    host = EmulatorHost(None, load_scenario(scenario))

    def spec(name: str, trace: str, rate: float, ingress: str = "") -> common.InferenceServiceSpec:
        return common.InferenceServiceSpec(name=name, model="7b", params_b=7, trace=trace, expected_rate_rps=rate,
                                           slo=common.SloTargets(ttft_ms=500, tpot_ms=50), min_replicas=1,
                                           max_replicas=8, gpus_per_replica=1, ingress_site_id=ingress)

    running = {"svc-chat": spec("chat", "conv", 4.0), "svc-code": spec("code", "code", 2.0)}
    for k, (wid, svc) in enumerate(running.items()):
        for s in (k, k + 2):
            host.apply(s, spb.PlacementCommitted(placement=common.Placement(
                workload_id=wid, site_id=host.ids[s], kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, replicas=2,
                gpus_per_unit=1, generation=1), inference_service=svc))
    for _ in range(30):
        host.report = host.twin.step()
    snapshot, telemetry = perceived(host)
    members = []
    for s, sid in enumerate(host.ids):
        site_policy = make_site_policy(f"marl:{policy}" if policy else "marl")
        site_policy.snapshot = snapshot
        members.append((site_policy, host.site(s), telemetry[sid], True))
    book = members[0][0].book
    for wid, svc in running.items():
        book.learn(wid, svc)
    wall, cpu = [], []
    for i in range(n + 20):  # 20 warm-up rounds (the first loads the service's trace)
        offer = spb.Offer(offer_id=f"o{i}", workload_id=f"svc-new-{i}", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE,
                            units=1, gpus_per_unit=1)
        offer.inference_service.CopyFrom(spec(f"new{i}", "code", 0.05))
        book.learn(offer.workload_id, offer.inference_service)
        c0, t0 = time.process_time(), time.perf_counter()
        MarlSitePolicy.answer_sites(members, [offer])
        if i >= 20:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return wall, cpu


RESULTS = "docs/marl_bench_policy_devicecpu.jsonl"


def plot(png: str, results: str = RESULTS) -> None:
    """Bars of the runs in `results` marked with a `code` (before/after a change), one group per
    figure, each run labelled with its code, OpenBLAS threads and load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results) as f:
        runs = [r for r in map(json.loads, filter(str.strip, f)) if "code" in r]
    if not runs:
        raise SystemExit(f"{results}: no runs marked with a code")
    figures = [("site_decision_cpu_p99_ms", "site CPU p99"), ("site_decision_p99_ms", "site wall p99"),
               ("site_decision_p50_ms", "site wall p50"), ("pool_decision_p50_ms", "pool act p50"),
               ("offer_round_p50_ms", "offer round p50")]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(figures))]
        ax.bar(xs, [r.get(key) or 0.0 for key, _ in figures], width,
               label=f"{r['code']}, {r.get('openblas_threads', '?')} BLAS thr., load {r['load_avg_1m']:.1f}",
               color=("tab:gray" if "before" in r["code"] else "tab:blue"), alpha=0.35 + 0.65 * (i + 1) / len(runs))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(figures))], [name for _, name in figures])
    ax.set_yscale("log")
    ax.axhline(1.0, color="red", lw=0.8, ls="--")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"marl decision time, {runs[0]['scenario']} ({runs[0]['sites']} sites); red: 1 ms")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def perceived(host):
    """(perception's snapshot, each site's telemetry by id) of the sites an `EmulatorHost` emulates, now."""
    from services.perception.domain import PoolPicture

    picture = PoolPicture()
    now = time.time()
    telemetry = {sid: host.site_state(sid) for sid in host.ids}
    for s, sid in enumerate(host.ids):
        picture.register(host.site(s), now)
        picture.telemetry(telemetry[sid])
    return picture.tick(now), telemetry


if __name__ == "__main__":
    main()
