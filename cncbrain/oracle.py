"""The offline bound: an upper bound on `score` for one scenario and seed, computed with perfect
knowledge of the whole trace as a linear program (fluid relaxation) solved by SciPy's HiGHS.

Why it is an upper bound (docs/oracle.md has the long form): every run of the twin under any policy
maps to a feasible point of this LP with an objective at least its score —
- time is cut into windows; a policy's replicas and GPUs, averaged over a window, are a feasible
  fractional allocation (integrality, start-up delays and gang constraints are dropped);
- a request can count as met only if it is routed to a site where, with zero queueing, at batch 1,
  on the fastest GPU type of that site, its network RTT + prefill meets the TTFT SLO and the decode
  step meets the TPOT SLO (the twin's timings are never faster than that);
- a site serves at most `CAPACITY_SLACK` × its replicas' sustained throughput (queues absorb bursts);
- training runs at the compute-only rate (no all-reduce, no bubble, no failure losses), only on GPU
  types that hold its state, at most on the GPUs it asked for, only after it arrived;
- GPUs of a type are shared by inference and training pool-wide (site limits only for replicas);
- cost counts only the GPUs the LP allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from cncbrain.twin import costmodel
from cncbrain.twin.pool import distances_km
from cncbrain.twin.sim import Twin

WINDOW_S = 300.0
CAPACITY_SLACK = 1.25
EXACT_SITES = 50
"""Up to this many sites every ingress site has its own flows in the LP (all built-in scenarios)."""
INGRESS_GROUPS = 24
"""Above EXACT_SITES, ingress sites are taken together in this many groups of neighbours (see
`ingress_groups`): the LP grows with groups × sites instead of sites², still an upper bound."""


@dataclass
class OracleResult:
    score: float
    slo_attainment: float
    training_goodput: float
    cost_usd: float
    status: str

    def metrics(self) -> dict[str, float]:
        nan = float("nan")
        return {
            "score": self.score,
            "slo_attainment": self.slo_attainment,
            "ttft_p99_s": nan,
            "tpot_p99_s": nan,
            "training_goodput": self.training_goodput,
            "mean_jct_slowdown": nan,
            "gpu_utilization": nan,
            "cost_usd": self.cost_usd,
            "wan_gb": nan,
        }


class _Vars:
    """Index bookkeeping for the LP's variable blocks."""

    def __init__(self):
        self.n = 0

    def block(self, size: int) -> np.ndarray:
        idx = np.arange(self.n, self.n + size)
        self.n += size
        return idx


def ingress_groups(twin: Twin, exact_sites: int = EXACT_SITES, n_groups: int = INGRESS_GROUPS) -> list[list[int]]:
    """Ingress sites taken together in the LP: each site alone up to `exact_sites` sites; above,
    `n_groups` groups of nearby sites (farthest-point centres by great-circle distance, each site
    with its nearest centre). A group's flow to a site may be at most the sum of its members' SLO-
    feasible requests there and at most their demand: a relaxation of the per-site constraints (a
    run's per-site flows, summed per group, satisfy it), so the optimum stays an upper bound."""
    if len(twin.site_ids) <= exact_sites:
        return [[i] for i in range(twin.S)]
    net = twin.pool.net
    centres = [int(np.argmax(twin.pool.population))]
    nearest = distances_km(net, centres[0])
    while len(centres) < n_groups:
        c = int(np.argmax(nearest))
        if nearest[c] <= 0:
            break
        centres.append(c)
        nearest = np.minimum(nearest, distances_km(net, c))
    dist = np.stack([distances_km(net, c) for c in centres])  # [C, S]
    owner = np.argmin(dist, axis=0)
    return [np.nonzero(owner == c)[0].tolist() for c in range(len(centres)) if (owner == c).any()]


def oracle_bound(twin: Twin, window_s: float = WINDOW_S) -> OracleResult:
    """Solve the LP for a freshly built twin (same scenario, seed and horizon as the runs)."""
    H = twin.duration_s
    T = max(1, math.ceil(H / window_s))
    edges = np.minimum(np.arange(T + 1) * window_s, H)
    wlen = np.diff(edges)
    S, G, K = twin.S, twin.G, twin.K
    up_share = np.ones((S, T))
    for s, at, dur in twin.failures:
        for t in range(T):
            lo, hi = max(edges[t], at), min(edges[t + 1], at + dur)
            if hi > lo:
                up_share[s, t] -= (hi - lo) / wlen[t]
    avail = twin.total[:, :, None] * up_share[:, None, :]  # [S, G, T]
    groups = ingress_groups(twin)
    group_of = np.empty(S, dtype=np.int64)
    for gi, members in enumerate(groups):
        group_of[members] = gi
    V = _Vars()
    rows, cols, vals, rhs = [], [], [], []
    nrow = 0

    def add_row(c_idx, c_val, b):
        nonlocal nrow
        rows.extend([nrow] * len(c_idx))
        cols.extend(list(c_idx))
        vals.extend(list(c_val))
        rhs.append(b)
        nrow += 1

    served: list[int] = []  # request-flow variables (met SLO)
    upper: dict[int, float] = {}
    site_flows: dict[tuple[int, int, int], list[int]] = {}
    cost_coef: dict[int, float] = {}
    n_req = 0
    # ---------------------------------------------------------------- inference
    r_idx = {}  # (k, j, g) -> [T] replica variables
    for k, svc in enumerate(twin.services):
        if not svc.active:
            continue
        rw = svc.spec.request_weight
        n_req += len(svc.t) * rw
        types = [g for g in range(G) if svc.tp[g] > 0]
        for j in range(S):
            for g in types:
                if twin.total[j, g] >= svc.tp[g]:
                    r_idx[(k, j, g)] = V.block(T)
        # per-request prefill on each type, batch-1 decode step per type
        pre = {g: costmodel.prefill_s(svc.model, twin.gpus[g], int(svc.tp[g]), svc.prompt, svc.spec.precision)
               for g in types}
        ctx = svc.mean_prompt + svc.mean_output / 2
        tpot_ok = {g: float(costmodel.decode_step_s(svc.model, twin.gpus[g], int(svc.tp[g]), 1, ctx,
                                                   svc.spec.precision)) <= svc.spec.slo.tpot_s for g in types}
        win = np.minimum((svc.t // window_s).astype(int), T - 1)
        rtt = 2 * twin.latency
        grp = group_of[svc.ingress]
        for t in range(T):
            in_w = win == t
            for gi, members in enumerate(groups):
                in_g = in_w & (grp == gi)
                if not in_g.any():
                    continue
                reach = np.zeros(S)  # requests of the group that could meet the SLOs at each site
                demand = 0
                for i in members:
                    sel = in_g & (svc.ingress == i) if len(members) > 1 else in_g
                    d = int(sel.sum())
                    if d == 0:
                        continue
                    d_w = d * rw  # the requests the simulated ones stand for
                    demand += d_w
                    phi = np.zeros(S)
                    thresh = svc.spec.slo.ttft_s - rtt[i]  # [S]
                    for g in types:
                        if not tpot_ok[g]:
                            continue
                        sorted_pre = np.sort(pre[g][sel])
                        frac = np.searchsorted(sorted_pre, np.where(np.isfinite(thresh), thresh, -1.0), side="right") / d
                        has = twin.total[:, g] >= svc.tp[g]
                        phi = np.maximum(phi, np.where(has, frac, 0.0))
                    reach += phi * d_w
                js = np.nonzero(reach > 0)[0]
                if len(js) == 0:
                    continue
                x = V.block(len(js))
                for v, j in zip(x, js.tolist(), strict=True):
                    served.append(v)
                    upper[v] = reach[j]  # requests of this group that can meet the SLOs at j
                    site_flows.setdefault((k, j, t), []).append(v)
                add_row(x, np.ones(len(x)), demand)  # routed ≤ demand
    # capacity of each site's replicas per window
    for (k, j, t), xs in site_flows.items():
        svc = twin.services[k]
        c_idx, c_val = list(xs), [1.0] * len(xs)
        for g in range(G):
            if (k, j, g) in r_idx:
                c_idx.append(r_idx[(k, j, g)][t])
                c_val.append(-CAPACITY_SLACK * svc.mu[g] * wlen[t])
        add_row(c_idx, c_val, 0.0)
    for (k, _j, g), rv in r_idx.items():
        for t in range(T):
            cost_coef[rv[t]] = twin.services[k].tp[g] * twin.price[g] * wlen[t] / 3600.0
    # max replicas per service
    for k, svc in enumerate(twin.services):
        for t in range(T):
            idx = [rv[t] for (kk, _j, _g), rv in r_idx.items() if kk == k]
            if idx:
                add_row(idx, [1.0] * len(idx), svc.spec.max_replicas)
    # ---------------------------------------------------------------- training
    ref = costmodel.gpu("A100-80GB")
    demanded = 0.0
    y_idx: dict[tuple[int, int], list[int]] = {}
    z_all: list[int] = []
    for job in twin.jobs:
        spec = job.spec
        if spec.arrival_s >= H:
            continue
        m = costmodel.model(spec.model)
        ideal = costmodel.shard_tokens_per_s(m, ref, spec.shard_gpus) * spec.n_shards
        demanded += min(spec.tokens, ideal * (H - spec.arrival_s))
        z = V.block(T)
        z_all.extend(z)
        add_row(z, np.ones(T), spec.tokens)
        fits = [g for g in range(G) if costmodel.train_memory_fits(m, twin.gpus[g], spec.shard_gpus)]
        for t in range(T):
            run_s = max(0.0, edges[t + 1] - max(edges[t], spec.arrival_s))
            if run_s <= 0 or not fits:
                add_row([z[t]], [1.0], 0.0)
                continue
            ys = V.block(len(fits))
            for v, g in zip(ys, fits, strict=True):
                y_idx.setdefault((g, t), []).append(v)
                cost_coef[v] = twin.price[g] * wlen[t] / 3600.0
            rate = [costmodel.shard_tokens_per_s(m, twin.gpus[g], 1) * run_s for g in fits]
            add_row([z[t], *ys], [1.0, *[-r for r in rate]], 0.0)  # tokens ≤ GPUs × rate × time
            add_row(ys, [1.0] * len(ys), spec.n_shards * spec.shard_gpus)  # GPUs it asked for
    # goodput is capped at 1 (as in the twin's metric): an auxiliary variable gp ≤ 1, gp ≤ Σz / D
    gp = V.block(1)[0] if demanded > 0 else None
    if gp is not None:
        add_row([gp, *z_all], [demanded, *([-1.0] * len(z_all))], 0.0)
    # ---------------------------------------------------------------- GPUs
    for j in range(S):
        for g in range(G):
            for t in range(T):
                idx = [r_idx[(k, j, g)][t] for k in range(K) if (k, j, g) in r_idx]
                if idx:
                    add_row(idx, [float(twin.services[k].tp[g]) for k in range(K) if (k, j, g) in r_idx],
                            avail[j, g, t])
    for g in range(G):
        for t in range(T):
            idx, val = [], []
            for (k, _j, gg), rv in r_idx.items():
                if gg == g:
                    idx.append(rv[t])
                    val.append(float(twin.services[k].tp[g]))
            for v in y_idx.get((g, t), []):
                idx.append(v)
                val.append(1.0)
            if idx:
                add_row(idx, val, float(avail[:, g, t].sum()))
    # ---------------------------------------------------------------- solve
    n = V.n
    cost_all = float((twin.total * twin.price[None, :]).sum() * H / 3600.0)
    c = np.zeros(n)
    if n_req:
        c[served] -= 0.5 / n_req
    if gp is not None:
        c[gp] -= 0.4
    for v, w in cost_coef.items():
        c[v] += 0.1 * w / cost_all
    A = sp.csr_matrix((vals, (rows, cols)), shape=(nrow, n))
    bounds = np.zeros((n, 2))
    bounds[:, 1] = np.inf
    for v, ub in upper.items():
        bounds[v, 1] = ub
    if gp is not None:
        bounds[gp, 1] = 1.0
    res = linprog(c, A_ub=A, b_ub=np.asarray(rhs), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"oracle LP did not solve: {res.message}")
    xv = res.x
    cost = sum(w * xv[v] for v, w in cost_coef.items())
    slo = float(xv[served].sum() / n_req) if n_req else 1.0
    goodput = float(xv[gp]) if gp is not None else 1.0
    score = 0.5 * slo + 0.4 * goodput + 0.1 * (1 - cost / cost_all)
    return OracleResult(float(score), float(slo), goodput, float(cost), res.message)

