"""The pool of a scenario: its network (from GraphML or inline sites) and the GPU inventory and ingress weight of
every site."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from cncbrain.errors import ScenarioError
from cncbrain.twin import costmodel
from cncbrain.twin.scenario import RegionIngress, Scenario
from cncbrain.twin.topology import EARTH_RADIUS_KM, Network, build_network, load_graphml
from cncbrain.twin.traces import ALIBABA_TO_CATALOG, alibaba_gpu_models

log = logging.getLogger(__name__)


@dataclass
class Pool:
    net: Network
    gpu_types: list[str]
    inventory: np.ndarray  # [S, G]
    population: np.ndarray  # [S] normalised ingress weight
    region: list[str]


@cache
def _population() -> dict[str, float]:
    path = resources.files("cncbrain") / "data" / "population.csv"
    with path.open() as f:
        return {r["label"]: float(r["population_m"]) for r in csv.DictReader(f)}


def load_network(sc: Scenario) -> Network:
    """The scenario's network: its GraphML file, or its inline sites and links."""
    topo = sc.topology
    if topo.graphml is not None:
        return load_graphml(sc.graphml_path(), topo.default_bandwidth_gbps, topo.per_hop_ms / 1000.0)
    index = {site.name: i for i, site in enumerate(topo.sites)}
    edges = [(index[link.a], index[link.b], link.bandwidth_gbps or topo.default_bandwidth_gbps) for link in topo.links]
    return build_network([site.name for site in topo.sites], np.array([site.lat for site in topo.sites]),
                         np.array([site.lon for site in topo.sites]), [site.country for site in topo.sites],
                         edges, topo.per_hop_ms / 1000.0)


def build_pool(sc: Scenario, rng: np.random.Generator) -> Pool:
    net = load_network(sc)
    names = net.names
    problems = sc.site_reference_errors(names)
    if problems:
        raise ScenarioError("\n".join(f"{sc.source or sc.name}: {p}" for p in problems))
    invs: list[dict[str, int]] = []
    if sc.sites.sample_from_alibaba:
        models = alibaba_gpu_models()
        keys = sorted(models)
        p = np.array([models[k] for k in keys], dtype=float)
        p /= p.sum()
        lo, hi = sc.sites.sample_from_alibaba.nodes_per_site
        for _ in names:
            inv: dict[str, int] = {}
            for m in rng.choice(keys, size=int(rng.integers(lo, hi + 1)), p=p):
                t = ALIBABA_TO_CATALOG.get(str(m), "A100-80GB")
                inv[t] = inv.get(t, 0) + costmodel.GPUS_PER_NODE
            invs.append(inv)
    else:
        invs = [dict(sc.sites.default) for _ in names]
    for i, n in enumerate(names):
        if n in sc.sites.overrides:
            invs[i] = dict(sc.sites.overrides[n])
    types = [t for t in costmodel.gpu_catalog() if any(inv.get(t, 0) > 0 for inv in invs)]
    inventory = np.array([[inv.get(t, 0) for t in types] for inv in invs], dtype=np.int64).reshape(len(names), len(types))
    pop = _population()
    given = {site.name: site.population_m for site in sc.topology.sites if site.population_m is not None}
    pop = {**pop, **given}
    missing = [n for n in names if n not in pop]
    if missing:
        log.info("no population figure for %s; using the mean of the others", ", ".join(missing))
    known = [pop[n] for n in names if n in pop]
    fill = float(np.mean(known)) if known else 1.0
    population = np.array([pop.get(n, fill) for n in names])
    region = net.country if sc.sites.region_by == "country" else list(names)
    return Pool(net, types, inventory, population / population.sum(), region)


def distances_km(net: Network, i: int) -> np.ndarray:
    """Great-circle distance from site `i` to every site, km."""
    p1, p2 = np.radians(net.lat[i]), np.radians(net.lat)
    dp, dl = p2 - p1, np.radians(net.lon - net.lon[i])
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def ingress_weights(pool: Pool, ingress: str | dict | RegionIngress, what: str = "ingress") -> np.ndarray:
    """Normalised ingress weight per site of an inference service's `ingress` setting."""
    names = pool.net.names
    S = len(names)
    if ingress == "uniform":
        w = np.ones(S)
    elif ingress == "population":
        w = pool.population.copy()
    elif isinstance(ingress, RegionIngress):
        r = ingress.region
        if r.around not in names:
            raise KeyError(f"{what}: ingress region around {r.around!r}: no such site in the topology")
        near = distances_km(pool.net, names.index(r.around)) <= r.radius_km
        inside = np.where(near, pool.population, 0.0)
        w = r.share * inside / inside.sum() + (1.0 - r.share) * pool.population / pool.population.sum()
    elif isinstance(ingress, str):
        raise KeyError(f"{what}: unknown ingress {ingress!r}; expected uniform, population, a region or site weights")
    else:
        index = {n: i for i, n in enumerate(names)}
        w = np.zeros(S)
        for name, weight in ingress.items():
            if name not in index:
                raise KeyError(f"{what}: ingress site {name!r} is not in the topology")
            w[index[name]] = weight
    if w.sum() <= 0:
        w = np.ones(S)
    return w / w.sum()
