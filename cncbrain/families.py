"""Scenario families: a generator of valid scenarios, reproducible from (family, seed).

A family is a kind of pool — real backbones, small-GPU edge rooms, big halls plus edge rooms,
inventories sampled from the Alibaba node list, demand concentrated in one region, overload, large
continental WANs — and, for each seed, draws one scenario of that kind: topology, inventories,
inference services, ingress, load, training and failures, each within the family's ranges
(docs/scenarios.md lists them and says why).

    scenario_data("edge", 7)   -> the data of a scenario file (cncbrain.scenario.generate("edge", 7)
                                  validates it: a Scenario whose .source is "family:edge:7")
    to_yaml("edge", 7)         -> scenario YAML that load_scenario reads back into the same scenario
    load_scenario("family:edge:7")   # what every --scenario option accepts

The generator sits beside the scenario schema (`cncbrain.twin.scenario`, which validates what it
writes) and below the loader (`cncbrain.scenario`): it writes scenario data and imports neither.

Synthetic topologies place sites on real cities (`cncbrain/data/cities.csv`: GeoNames cities,
coordinates and populations) and join them by a Waxman or a geometric random graph over
great-circle distance, always connected (a minimum spanning tree underneath).

**Load is calibrated.** For every service the generator computes what the pool could serve if it
served nothing else — Σ over sites and GPU types of ⌊GPUs / tensor-parallel degree⌋ × the requests/s
one replica sustains when always busy (the twin's own `costmodel.replica_figures`) — and sets each
service's `rate_scale` so that its demand is a drawn share of that.
Training adds its expected GPU-seconds (Alibaba trace, `gpu_scale`, runtimes) over the horizon as a
share of the pool's GPUs. `load` = inference shares + training share: 1.0 is a pool whose every GPU
would be busy all the time under a perfect fluid packing (the twin's routing already queues work
beyond 80 % utilisation); "overloaded" families draw 1.1–1.6: more than the pool can serve. The twin simulates about
`SIM_RPS` requests/s per scenario: a service with more demand than its part of that gets a
`request_weight` (each simulated request stands for that many).
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np
import yaml

from cncbrain.errors import UsageError
from cncbrain.twin import costmodel
from cncbrain.twin.topology import EARTH_RADIUS_KM, load_graphml
from cncbrain.twin.traces import ALIBABA_TO_CATALOG, load_alibaba, load_azure

SIM_RPS = 200.0
"""Requests/s the twin simulates per scenario (about 720,000 an hour, a few seconds per episode):
a service whose demand is larger than its part of this gets a `request_weight` (one simulated
request stands for that many)."""
HORIZON_S = 3600.0
ZOO = {"abilene": "Abilene.graphml", "att": "AttMpls.graphml", "geant": "Geant2009.graphml",
       "surfnet": "Surfnet.graphml", "cogent": "Cogentco.graphml"}
SMALL_GPUS = ["T4", "L4", "V100"]
HUB_GPUS = ["H100", "H200", "A100-80GB"]
ROOM_GPUS = ["L4", "T4", "L40S", "A100-40GB", "V100"]
MIXED_GPUS = {"A100-80GB": 4, "H100": 3, "L40S": 3, "A100-40GB": 2, "L4": 2, "H200": 1, "T4": 1, "V100": 1}
LOAD_LEVELS = {"light": (0.2, 0.45), "moderate": (0.45, 0.75), "heavy": (0.75, 1.0), "overloaded": (1.1, 1.6)}
TRAINING_LEVELS = {"none": (0.0, 0.0), "light": (0.05, 0.15), "moderate": (0.15, 0.35), "heavy": (0.35, 0.6)}
SERVICE_NAMES = {"conv": "chat", "code": "code"}
# SLOs per (trace, model): TTFT s, TPOT s. The built-in scenarios' figures (DistServe's chatbot and
# code-completion SLOs) for 7B/13B/70B; 1.3B and 34B between their neighbours.
SLOS = {
    ("conv", "1.3b"): (0.5, 0.05), ("conv", "7b"): (1.0, 0.10), ("conv", "13b"): (1.0, 0.10),
    ("conv", "34b"): (1.5, 0.12), ("conv", "70b"): (2.5, 0.15),
    ("code", "1.3b"): (0.3, 0.04), ("code", "7b"): (0.5, 0.05), ("code", "13b"): (0.8, 0.08),
    ("code", "34b"): (1.2, 0.10), ("code", "70b"): (2.0, 0.15),
}


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class City:
    name: str
    country: str
    region: str
    lat: float
    lon: float
    population_m: float


@cache
def cities() -> dict[str, list[City]]:
    """The cities synthetic sites stand on, by region (north-america, europe, asia)."""
    out: dict[str, list[City]] = {}
    with (resources.files("cncbrain") / "data" / "cities.csv").open() as f:
        for r in csv.DictReader(f):
            out.setdefault(r["region"], []).append(City(r["name"], r["country"], r["region"], float(r["lat"]),
                                                        float(r["lon"]), float(r["population_m"])))
    return out


@cache
def _alibaba_nodes() -> list[tuple[str, int]]:
    """(catalog GPU type, GPUs) of every node of the Alibaba GPU node list."""
    path = resources.files("cncbrain") / "data" / "alibaba" / "openb_node_list_gpu_node.csv"
    with path.open() as f:
        return [(ALIBABA_TO_CATALOG.get(r["model"], "A100-80GB"), int(r["gpu"])) for r in csv.DictReader(f)]


@cache
def _zoo_sites(key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    net = load_graphml(str(resources.files("cncbrain") / "data" / "topologyzoo" / ZOO[key]))
    return net.names, net.lat, net.lon


@cache
def _trace_rps(kind: str) -> tuple[float, float, float]:
    """Requests/s, mean prompt and mean output tokens of an Azure trace."""
    t = load_azure(kind)
    return len(t) / t.length_s, float(t.prompt.mean()), float(t.output.mean())


@cache
def _training_gpu_s(gpu_scale: int, max_runtime_s: float = 5400.0, horizon_s: float = HORIZON_S) -> float:
    """Expected GPU-seconds a training job drawn from the Alibaba trace asks for within the horizon
    (arrivals spread over its first 80 %, as `traces.jobs_from_trace` does)."""
    from cncbrain.twin.traces import _SIZE_CLASSES, REFERENCE_GPU

    tasks = load_alibaba()
    gpu_time = tasks.num_gpu * tasks.duration_s
    qs = np.searchsorted(np.sort(gpu_time), gpu_time) / len(gpu_time)
    ref = costmodel.gpu(REFERENCE_GPU)
    shard = {name: max(costmodel.min_train_gpus(costmodel.model(name), ref), 1) for _, name in _SIZE_CLASSES}
    names = [next(n for q, n in _SIZE_CLASSES if x < q) for x in qs]
    gpus = np.maximum(tasks.num_gpu * gpu_scale, np.array([shard[n] for n in names]))
    runtime = np.clip(tasks.duration_s, 300.0, max_runtime_s)
    left = horizon_s * (1.0 - 0.8 * np.linspace(0, 1, 41))  # time left after a uniform arrival in [0, 0.8H]
    within = np.minimum(runtime[:, None], left[None, :]).mean(axis=1)
    return float(np.mean(gpus * within))


# ---------------------------------------------------------------------------------------- pieces


def _km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distances (km)."""
    p, lam = np.radians(lat), np.radians(lon)
    dp = p[:, None] - p[None, :]
    dl = lam[:, None] - lam[None, :]
    a = np.sin(dp / 2) ** 2 + np.cos(p)[:, None] * np.cos(p)[None, :] * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def _pick_cities(rng: np.random.Generator, regions: list[str], n: int) -> list[City]:
    """`n` distinct cities of the regions, likelier the more populous (weight √population)."""
    pool = [c for r in regions for c in cities()[r]]
    w = np.sqrt(np.array([c.population_m for c in pool]))
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False, p=w / w.sum())
    return [pool[i] for i in sorted(idx)]


def _wan_links(rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray, kind: str,
               mean_degree: float) -> list[tuple[int, int]]:
    """Links of a synthetic WAN over sites at (lat, lon): a minimum spanning tree (so it is
    connected) plus Waxman links (probability ∝ exp(−d / (α·L))) or geometric ones (every pair
    closer than a radius), the extra links sized to reach about `mean_degree`."""
    n = len(lat)
    if n == 1:
        return []
    d = _km(lat, lon)
    from scipy.sparse.csgraph import minimum_spanning_tree  # scipy only where a WAN is drawn

    mst = minimum_spanning_tree(np.triu(d + 1e-6, 1)).tocoo()
    links = {(min(i, j), max(i, j)) for i, j in zip(mst.row.tolist(), mst.col.tolist(), strict=True)}
    extra = max(0, int(round(mean_degree * n / 2)) - len(links))
    iu, ju = np.triu_indices(n, 1)
    dist = d[iu, ju]
    if kind == "waxman":
        alpha = 0.15
        w = np.exp(-dist / (alpha * max(dist.max(), 1.0)))
        order = np.argsort(-(w * rng.random(len(w))), kind="stable")  # weighted draw without replacement
    else:  # geometric: the shortest pairs, with a little jitter so ties fall either way
        order = np.argsort(dist * rng.uniform(0.9, 1.1, len(dist)), kind="stable")
    for e in order:
        if extra <= 0:
            break
        pair = (int(iu[e]), int(ju[e]))
        if pair not in links:
            links.add(pair)
            extra -= 1
    return sorted(links)


def _mixed_inventory(rng: np.random.Generator, types: Mapping[str, float], kinds: tuple[int, int],
                     counts: list[int]) -> dict[str, int]:
    names = list(types)
    w = np.array([types[t] for t in names], dtype=float)
    k = int(rng.integers(kinds[0], kinds[1] + 1))
    chosen = rng.choice(len(names), size=min(k, len(names)), replace=False, p=w / w.sum())
    return {names[i]: int(rng.choice(counts)) for i in sorted(chosen)}


def _alibaba_inventory(rng: np.random.Generator, nodes: tuple[int, int]) -> dict[str, int]:
    """Whole nodes drawn from the Alibaba node list (each with its own GPU type and count)."""
    table = _alibaba_nodes()
    inv: dict[str, int] = {}
    for i in rng.integers(0, len(table), size=int(rng.integers(nodes[0], nodes[1] + 1))):
        t, g = table[int(i)]
        inv[t] = inv.get(t, 0) + g
    return inv


@dataclass
class _Draft:
    """A scenario being drawn: the pieces as plain data, turned into scenario keys at the end."""

    family: str
    seed: int
    names: list[str]
    lat: np.ndarray
    lon: np.ndarray
    topology: dict
    inventory: list[dict[str, int]]
    notes: list[str] = field(default_factory=list)
    inference: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=lambda: {"trace": "none", "jobs_per_hour": 0.0})
    failures: list[dict] = field(default_factory=list)

    @property
    def total_gpus(self) -> int:
        return int(sum(sum(inv.values()) for inv in self.inventory))

    def capacity(self, model: str, precision: str, trace: str, slo: tuple[float, float]) -> tuple[float, int]:
        """Requests/s the whole pool sustains for one service if it served nothing else, every
        replica busy all the time, and how many replicas that takes, counting only GPU types on which a replica meets
        the SLOs at a small batch."""
        _, mp, mo = _trace_rps(trace)
        m = costmodel.model(model)
        types = sorted({t for inv in self.inventory for t in inv})
        gpus = [costmodel.gpu(t) for t in types]
        tp, _, work = costmodel.replica_figures(m, gpus, precision, mp, mo)
        total, replicas = 0.0, 0
        for g, (t, gt) in enumerate(zip(types, gpus, strict=True)):
            if not tp[g] or not self._meets_slo(m, gt, int(tp[g]), precision, mp, mo, slo):
                continue
            reps = int(sum(inv.get(t, 0) // tp[g] for inv in self.inventory))
            total += reps / work[g]
            replicas += reps
        return total, replicas

    @staticmethod
    def _meets_slo(m, g, tp: int, precision: str, mp: float, mo: float, slo: tuple[float, float]) -> bool:
        step = float(costmodel.decode_step_s(m, g, tp, 8, mp + mo / 2, precision))
        pre = float(costmodel.prefill_s(m, g, tp, mp, precision))
        return step <= slo[1] and pre <= 0.6 * slo[0]


# ---------------------------------------------------------------------------------------- drawing


def _synthetic(rng: np.random.Generator, family: str, seed: int, n: int, regions: list[str],
               bandwidth: list[float]) -> _Draft:
    picked = _pick_cities(rng, regions, n)
    lat = np.array([c.lat for c in picked])
    lon = np.array([c.lon for c in picked])
    kind = str(rng.choice(["waxman", "geometric"]))
    degree = float(rng.uniform(2.4, 3.6))
    links = _wan_links(rng, lat, lon, kind, degree)
    topo = {
        "sites": [{"name": c.name, "lat": c.lat, "lon": c.lon, "country": c.country,
                   "population_m": c.population_m} for c in picked],
        "links": [{"a": picked[i].name, "b": picked[j].name, "bandwidth_gbps": float(rng.choice(bandwidth))}
                  for i, j in links],
        "default_bandwidth_gbps": 10.0,
        "per_hop_ms": 0.5,
    }
    d = _Draft(family, seed, [c.name for c in picked], lat, lon, topo, [])
    d.notes.append(f"topology: {kind} WAN over {len(picked)} cities of {' + '.join(regions)}, "
                   f"{len(links)} links (mean degree {2 * len(links) / max(len(picked), 1):.1f})")
    return d


def _zoo(rng: np.random.Generator, family: str, seed: int, keys: list[str], cycle: bool = False) -> _Draft:
    """A Topology Zoo network: drawn from `keys`, or (cycle) the seed's turn through them, so any
    len(keys) consecutive seeds hold every network."""
    key = keys[seed % len(keys)] if cycle else str(rng.choice(keys))
    names, lat, lon = _zoo_sites(key)
    topo = {"graphml": ZOO[key], "default_bandwidth_gbps": float(rng.choice([10.0, 40.0, 100.0])), "per_hop_ms": 0.5}
    d = _Draft(family, seed, list(names), np.asarray(lat), np.asarray(lon), topo, [])
    d.notes.append(f"topology: Topology Zoo {ZOO[key]} ({len(names)} sites)")
    return d


def _regions(rng: np.random.Generator, size: int) -> list[str]:
    """One region, or North America + Europe for some of the larger pools."""
    if size >= 40 and rng.random() < 0.3:
        return ["north-america", "europe"]
    return [str(rng.choice(["north-america", "europe", "asia"]))]


def _services(rng: np.random.Generator, d: _Draft, count: tuple[int, int], models: Mapping[str, float],
              fp8: float, ingress: Callable[[np.random.Generator], object], force: Sequence[tuple[str, str]] = ()) -> None:
    """Draw services (model, precision, trace, SLOs, ingress), each one the pool can serve within
    its SLOs on at least one GPU type; a model it cannot serve is replaced by the next smaller."""
    n = int(rng.integers(count[0], count[1] + 1))
    names = list(models)
    w = np.array([models[m] for m in names], dtype=float)
    order = list(costmodel.MODELS)
    used: dict[str, int] = {}
    for k in range(n):
        if k < len(force):
            model, precision = force[k]
        else:
            model = str(rng.choice(names, p=w / w.sum()))
            precision = "fp8" if rng.random() < fp8 else "bf16"
        trace = str(rng.choice(["conv", "code"], p=[0.65, 0.35]))
        scale = float(rng.uniform(0.9, 1.4))
        while True:
            base = SLOS[(trace, model)]
            slo = (round(base[0] * scale, 3), round(base[1] * scale, 3))
            if d.capacity(model, precision, trace, slo)[0] > 0:
                break
            if precision == "bf16":
                precision = "fp8"
            elif order.index(model) > 0:
                model, precision = order[order.index(model) - 1], "bf16"
            else:
                raise RuntimeError(f"{d.family}:{d.seed}: no GPU of the pool serves even a 1.3B model")
        stem = f"{SERVICE_NAMES[trace]}-{model.replace('.', '')}"
        used[stem] = used.get(stem, 0) + 1
        name = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
        d.inference.append({"name": name, "model": model, "precision": precision, "trace": trace,
                            "slo": {"ttft_s": slo[0], "tpot_s": slo[1]}, "ingress": ingress(rng)})


def _calibrate(rng: np.random.Generator, d: _Draft, load: tuple[float, float], training: tuple[float, float],
               gpu_scale: int) -> None:
    """Set each service's rate and the training job rate so that the pool's load lands in `load`
    (training taking a share drawn from `training`); see the module docstring."""
    target = float(rng.uniform(*load))
    tr_share = float(rng.uniform(*training)) if training[1] > 0 else 0.0
    tr_share = min(tr_share, 0.8 * target) if d.inference else tr_share
    inf_share = max(target - tr_share, 0.05 * len(d.inference))
    shares = rng.dirichlet(np.full(len(d.inference), 2.0)) * inf_share if d.inference else np.zeros(0)
    demand = []
    for svc, share in zip(d.inference, shares, strict=True):
        cap, reps = d.capacity(svc["model"], svc["precision"], svc["trace"], (svc["slo"]["ttft_s"], svc["slo"]["tpot_s"]))
        demand.append((share * cap, cap, reps))
    realised = 0.0
    for svc, (rps, cap, reps) in zip(d.inference, demand, strict=True):
        base, _, _ = _trace_rps(svc["trace"])
        svc["rate_scale"] = round(float(max(rps / base, 0.05)), 4)
        svc["request_weight"] = int(min(1000, max(1, round(rps / (SIM_RPS / len(d.inference))))))
        realised += svc["rate_scale"] * base / cap
        # room to scale: 3 × the replicas the demand needs on the pool's average replica (bursts,
        # failures, slower GPU types), at least 8
        svc["min_replicas"] = int(rng.integers(1, 3))
        svc["max_replicas"] = int(max(8, math.ceil(3 * rps / (cap / reps))))
    if tr_share > 0:
        per_job = _training_gpu_s(gpu_scale)
        jobs = tr_share * d.total_gpus * HORIZON_S / per_job
        d.training = {"trace": "alibaba", "jobs_per_hour": round(float(jobs), 2), "gpu_scale": gpu_scale,
                      "load_scale": 1.0, "checkpoint_interval_s": 600.0}
    d.notes.append(f"load: {realised + tr_share:.2f} of the pool (inference {realised:.2f}, training {tr_share:.2f})")
    rps = sum(s["rate_scale"] * _trace_rps(s["trace"])[0] for s in d.inference)
    sim = sum(s["rate_scale"] * _trace_rps(s["trace"])[0] / s["request_weight"] for s in d.inference)
    d.notes.append(f"GPUs: {d.total_gpus}; inference demand {rps:.1f} req/s, {sim:.1f} simulated")


def _failures(rng: np.random.Generator, d: _Draft, count: tuple[int, int]) -> None:
    """0–3 site failures, likelier at sites with more GPUs, in the middle of the hour."""
    n = min(int(rng.integers(count[0], count[1] + 1)), len(d.names) - 1)
    if n <= 0:
        return
    g = np.array([sum(inv.values()) for inv in d.inventory], dtype=float) + 1.0
    sites = rng.choice(len(d.names), size=n, replace=False, p=g / g.sum())
    for s in sites:
        d.failures.append({"site": d.names[int(s)], "at_s": float(round(rng.uniform(0.15, 0.7) * HORIZON_S / 30) * 30),
                           "duration_s": float(rng.choice([300.0, 600.0, 900.0, 1200.0]))})
    d.failures.sort(key=lambda f: (f["at_s"], f["site"]))


def _population_ingress(rng: np.random.Generator) -> str:
    return "population"


def _mostly_population(rng: np.random.Generator) -> str:
    return "population" if rng.random() < 0.75 else "uniform"


def _level(rng: np.random.Generator, levels: list[str], table: dict) -> tuple[float, float]:
    return table[str(rng.choice(levels))]


# ---------------------------------------------------------------------------------------- families


def zoo(rng: np.random.Generator, seed: int) -> _Draft:
    """Real backbones: the bundled Topology Zoo networks (Abilene 11, AT&T 25, GEANT 34, SURFnet 50,
    Cogent 197 sites; seed mod 5 picks one, so five consecutive seeds hold all five) with mixed
    datacentre inventories (1–2 GPU types of 4–16 per site), 1–4
    services of 1.3B–70B, population or uniform ingress, load light to heavy, training none to
    heavy, 0–2 failures. Why: the networks operators actually run, beyond the three built-ins."""
    d = _zoo(rng, "zoo", seed, list(ZOO), cycle=True)
    d.inventory = [_mixed_inventory(rng, MIXED_GPUS, (1, 2), [4, 8, 16]) for _ in d.names]
    _services(rng, d, (1, 4), {"1.3b": 1, "7b": 3, "13b": 3, "34b": 2, "70b": 1.5}, 0.3, _mostly_population)
    _calibrate(rng, d, _level(rng, ["light", "moderate", "heavy"], LOAD_LEVELS),
               _level(rng, ["none", "light", "moderate", "heavy"], TRAINING_LEVELS), int(rng.choice([8, 16])))
    _failures(rng, d, (0, 2))
    return d


def edge(rng: np.random.Generator, seed: int) -> _Draft:
    """Small-GPU edge pools: 5–60 rooms of 4–16 T4/L4/V100 GPUs (one or two types) on a synthetic
    WAN of one region, with 0–2 hubs of 16–32 H100/H200/A100-80GB; 1–3 services of 1.3B–13B (a 34B
    fp8 where there is a hub), population ingress, load light to heavy, training none or light,
    0–1 failures. Why: telecom and enterprise edges hold cheap inference GPUs far from any hall;
    which model fits which room, and when to send work to a hub, is the whole problem."""
    n = int(rng.integers(5, 61))
    d = _synthetic(rng, "edge", seed, n, [str(rng.choice(["north-america", "europe", "asia"]))], [10.0, 10.0, 40.0])
    hubs = set(rng.choice(n, size=min(int(rng.integers(0, 3)), n - 1), replace=False).tolist()) if n > 2 else set()
    for i in range(n):
        if i in hubs:
            d.inventory.append({str(rng.choice(HUB_GPUS)): int(rng.choice([16, 32]))})
        else:
            d.inventory.append(_mixed_inventory(rng, {t: 1.0 for t in SMALL_GPUS}, (1, 2), [4, 8, 8, 16]))
    models = {"1.3b": 2, "7b": 3, "13b": 2} | ({"34b": 1} if hubs else {})
    _services(rng, d, (1, 3), models, 0.35, _population_ingress)
    _calibrate(rng, d, _level(rng, ["light", "moderate", "heavy"], LOAD_LEVELS),
               _level(rng, ["none", "none", "light"], TRAINING_LEVELS), 2)
    _failures(rng, d, (0, 1))
    d.notes.append(f"hubs: {', '.join(d.names[i] for i in sorted(hubs)) or 'none'}")
    return d


def halls(rng: np.random.Generator, seed: int) -> _Draft:
    """Big halls plus edge rooms: 10–120 sites, of which 2–5 halls hold 64–256 H100/H200/A100-80GB
    and the rest are rooms of 4–16 L4/T4/L40S/A100-40GB/V100; 2–6 services up to 70B (tensor
    parallel where needed), population or uniform ingress, load moderate to heavy, training
    moderate to heavy with big gangs, 0–2 failures (a hall may fail). Why: the common shape of a
    real GPU estate — a few concentrated halls and a long tail of small rooms near users."""
    n = int(rng.integers(10, 121))
    d = _synthetic(rng, "halls", seed, n, _regions(rng, n), [10.0, 40.0, 100.0])
    big = set(rng.choice(n, size=int(rng.integers(2, 6)), replace=False).tolist())
    for i in range(n):
        if i in big:
            inv = _mixed_inventory(rng, {t: 1.0 for t in HUB_GPUS}, (1, 2), [64, 128, 256])
        else:
            inv = _mixed_inventory(rng, {t: 1.0 for t in ROOM_GPUS}, (1, 2), [4, 8, 16])
        d.inventory.append(inv)
    for link in d.topology["links"]:
        if d.names.index(link["a"]) in big or d.names.index(link["b"]) in big:
            link["bandwidth_gbps"] = float(rng.choice([100.0, 400.0]))
    _services(rng, d, (2, 6), {"1.3b": 1, "7b": 2, "13b": 3, "34b": 2, "70b": 2}, 0.35, _mostly_population)
    _calibrate(rng, d, _level(rng, ["moderate", "heavy"], LOAD_LEVELS),
               _level(rng, ["moderate", "heavy"], TRAINING_LEVELS), int(rng.choice([8, 16, 32])))
    _failures(rng, d, (0, 2))
    d.notes.append(f"halls: {', '.join(d.names[i] for i in sorted(big))}")
    return d


def alibaba(rng: np.random.Generator, seed: int) -> _Draft:
    """Inventories sampled from the Alibaba GPU node list: 2–8 whole nodes per site (T4×2, P100→V100,
    G2→A100-80GB×8, G3→H100×8, … as the node list has them) on GEANT, SURFnet or a synthetic WAN of
    20–80 sites; 2–4 services (one a 34B in fp8 half the time), population ingress, load moderate
    to heavy, heavy training, 1–3 failures. Why: a production fleet's real mix of old and new
    nodes, under the training pressure of the cluster the trace came from."""
    if rng.random() < 0.35:
        d = _zoo(rng, "alibaba", seed, ["geant", "surfnet"])
    else:
        n = int(rng.integers(20, 81))
        d = _synthetic(rng, "alibaba", seed, n, _regions(rng, n), [10.0, 40.0, 100.0])
    d.inventory = [_alibaba_inventory(rng, (2, 8)) for _ in d.names]
    force = [("34b", "fp8")] if rng.random() < 0.5 else []
    _services(rng, d, (2, 4), {"1.3b": 1, "7b": 3, "13b": 3, "34b": 1, "70b": 1}, 0.3, _population_ingress, force)
    _calibrate(rng, d, _level(rng, ["moderate", "heavy"], LOAD_LEVELS), TRAINING_LEVELS["heavy"],
               int(rng.choice([4, 8, 16])))
    _failures(rng, d, (1, 3))
    return d


def hotspot(rng: np.random.Generator, seed: int) -> _Draft:
    """Demand concentrated in one region: 60–95 % of every service's requests enter within
    300–1500 km of one city (drawn by population; by population among the sites there), the rest by population everywhere; 15–100 sites
    (a Topology Zoo network or a synthetic WAN) with mixed inventories, 1–4 services, load moderate
    to heavy, training none to moderate, 0–2 failures. Why: a launch, a time zone's peak or a
    regional event puts the demand far from where the idle GPUs are."""
    if rng.random() < 0.3:
        d = _zoo(rng, "hotspot", seed, ["att", "geant", "surfnet"])
    else:
        n = int(rng.integers(15, 101))
        d = _synthetic(rng, "hotspot", seed, n, _regions(rng, n), [10.0, 40.0, 100.0])
    d.inventory = [_mixed_inventory(rng, MIXED_GPUS, (1, 2), [4, 8, 16]) for _ in d.names]
    pop = np.array([site.get("population_m", 1.0) for site in d.topology.get("sites", [])] or np.ones(len(d.names)))
    center = int(rng.choice(len(d.names), p=pop / pop.sum()))  # hotspots are likelier where more people live
    radius = float(rng.choice([300.0, 500.0, 800.0, 1000.0, 1500.0]))
    share = round(float(rng.uniform(0.6, 0.95)), 3)
    region = {"around": d.names[center], "radius_km": radius, "share": share}
    _services(rng, d, (1, 4), {"1.3b": 1, "7b": 3, "13b": 3, "34b": 2, "70b": 1}, 0.3,
              lambda _r: {"region": dict(region)})
    _calibrate(rng, d, _level(rng, ["moderate", "heavy"], LOAD_LEVELS),
               _level(rng, ["none", "light", "moderate"], TRAINING_LEVELS), 8)
    _failures(rng, d, (0, 2))
    d.notes.append(f"hotspot: {share:.0%} of demand within {radius:g} km of {d.names[center]}")
    return d


def overload(rng: np.random.Generator, seed: int) -> _Draft:
    """Overloaded pools: demand 1.1–1.6 × what a perfect fluid packing of the pool could serve, on
    10–80 sites (Topology Zoo or synthetic) with mixed inventories; 2–5 services, training
    moderate, 1–3 failures. Why: no policy meets every SLO here; the score rewards what it chooses
    to serve, keep training and not pay for."""
    if rng.random() < 0.3:
        d = _zoo(rng, "overload", seed, ["abilene", "att", "geant", "surfnet"])
    else:
        n = int(rng.integers(10, 81))
        d = _synthetic(rng, "overload", seed, n, _regions(rng, n), [10.0, 40.0, 100.0])
    d.inventory = [_mixed_inventory(rng, MIXED_GPUS, (1, 2), [4, 8, 16]) for _ in d.names]
    _services(rng, d, (2, 5), {"1.3b": 1, "7b": 3, "13b": 3, "34b": 2, "70b": 1}, 0.3, _mostly_population)
    _calibrate(rng, d, LOAD_LEVELS["overloaded"], TRAINING_LEVELS["moderate"], 8)
    _failures(rng, d, (1, 3))
    return d


def continental(rng: np.random.Generator, seed: int) -> _Draft:
    """Large continental WANs: 150–300 sites over one region or North America + Europe, mostly
    rooms of 4–16 GPUs (mixed types) with 3–8 halls of 64–128; 2–6 services, population ingress,
    load light to heavy, training light to heavy, 0–3 failures. Why: scale — the decisions of
    hundreds of sites must stay fast and still use the network."""
    n = int(rng.integers(150, 301))
    regions = ["north-america", "europe"] if rng.random() < 0.4 else [str(rng.choice(["north-america", "europe", "asia"]))]
    d = _synthetic(rng, "continental", seed, n, regions, [10.0, 40.0, 100.0])
    nh = int(rng.integers(3, 9))
    big = set(rng.choice(n, size=nh, replace=False).tolist())
    for i in range(n):
        if i in big:
            d.inventory.append(_mixed_inventory(rng, {t: 1.0 for t in HUB_GPUS}, (1, 2), [64, 128]))
        else:
            d.inventory.append(_mixed_inventory(rng, MIXED_GPUS, (1, 2), [4, 8, 16]))
    _services(rng, d, (2, 6), {"1.3b": 1, "7b": 2, "13b": 3, "34b": 2, "70b": 2}, 0.35, _population_ingress)
    _calibrate(rng, d, _level(rng, ["light", "moderate", "heavy"], LOAD_LEVELS),
               _level(rng, ["light", "moderate", "heavy"], TRAINING_LEVELS), int(rng.choice([8, 16])))
    _failures(rng, d, (0, 3))
    return d


@dataclass(frozen=True)
class Family:
    """A kind of pool: `draw(rng, seed)` returns one; `summary` is its one-line description."""

    name: str
    summary: str
    draw: Callable[[np.random.Generator, int], _Draft]

    @property
    def description(self) -> str:
        return " ".join((self.draw.__doc__ or "").split())


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("zoo", "Topology Zoo backbones (11–197 sites), mixed datacentre GPUs, 1–4 services", zoo),
        Family("edge", "5–60 small-GPU rooms (T4/L4/V100) with 0–2 hubs, small models, little training", edge),
        Family("halls", "10–120 sites: 2–5 big halls plus edge rooms, 2–6 services up to 70B, heavy training", halls),
        Family("alibaba", "inventories sampled from the Alibaba node list, heavy training, 1–3 failures", alibaba),
        Family("hotspot", "60–95 % of demand concentrated around one city, 15–100 sites", hotspot),
        Family("overload", "demand 1.1–1.6× the pool's fluid capacity, 1–3 failures", overload),
        Family("continental", "150–300-site WANs over a continent or two, rooms plus a few halls", continental),
    ]
}


# ---------------------------------------------------------------------------------------- API


def _check(family: str, seed: object) -> int:
    if family not in FAMILIES:
        raise UsageError(f"unknown scenario family {family!r}; families: {', '.join(FAMILIES)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= int(seed) < 2**31:
        raise UsageError(f"seed must be an integer from 0 to {2**31 - 1}, got {seed!r}")
    return int(seed)


def _rng(family: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(family.encode()), seed])


def _draft(family: str, seed: int) -> _Draft:
    seed = _check(family, seed)
    return FAMILIES[family].draw(_rng(family, seed), seed)


def _to_data(d: _Draft) -> dict:
    names = d.names
    default: dict[str, int] = {}
    return {
        "name": f"{d.family}-{d.seed}",
        "seed": d.seed,
        "duration_s": HORIZON_S,
        "tick_s": 30.0,
        "topology": d.topology,
        "sites": {"default": default, "overrides": {n: inv for n, inv in zip(names, d.inventory, strict=True) if inv}},
        "inference": d.inference,
        "training": d.training,
        "failures": d.failures,
    }


FAMILY_PREFIX = "family:"
"""A generated scenario's name: `family:NAME:SEED`, what every --scenario option accepts."""


def key(family: str, seed: int) -> str:
    return f"{FAMILY_PREFIX}{family}:{seed}"


def scenario_data(family: str, seed: int) -> dict:
    """The scenario `seed` of `family` as the data of a scenario file (`cncbrain.scenario.generate`
    validates it into a `Scenario`)."""
    return _to_data(_draft(family, seed))


def to_yaml(family: str, seed: int) -> str:
    """Scenario YAML of (family, seed), with a header saying what was drawn."""
    d = _draft(family, seed)
    data = _to_data(d)
    head = [f"# generated: cncbrain scenarios generate --family {family} --seed {d.seed}",
            f"# family {family}: {FAMILIES[family].summary}", *[f"# {n}" for n in d.notes]]
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(head) + "\n" + body


class _Dumper(yaml.SafeDumper):
    """Safe YAML without anchors/aliases (every value written where it is used)."""

    def ignore_aliases(self, data) -> bool:
        return True


def parse_key(key: str) -> tuple[str, int]:
    """`family:NAME:SEED` → (family, seed), checked."""
    parts = key.split(":")
    if len(parts) != 3 or parts[0] + ":" != FAMILY_PREFIX:
        raise UsageError(f"scenario {key!r}: a generated scenario is {FAMILY_PREFIX}NAME:SEED; families: {', '.join(FAMILIES)}")
    _, family, seed = parts
    if family not in FAMILIES:
        raise UsageError(f"scenario {key!r}: unknown scenario family {family!r}; families: {', '.join(FAMILIES)}")
    try:
        n = int(seed)
    except ValueError:
        raise UsageError(f"scenario {key!r}: seed {seed!r} is not an integer") from None
    return family, _check(family, n)
