"""The pool of a scenario: its network (from GraphML) and the GPU inventory and ingress weight of
every site."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from cncbrain.errors import ScenarioError
from cncbrain.scenario import Scenario
from cncbrain.twin import physics
from cncbrain.twin.topology import Network, load_graphml
from cncbrain.twin.traces import alibaba_gpu_models

log = logging.getLogger(__name__)

# Alibaba's node models mapped to catalog types. G1–G3 are undisclosed internal codes; we read them
# as the data-centre generations of their era (assumption, docs/cost-model.md). P100 → V100 and
# A10 → L4 (closest catalog type by memory and bandwidth).
ALIBABA_TO_CATALOG = {
    "G1": "A100-40GB", "G2": "A100-80GB", "G3": "H100", "T4": "T4", "P100": "V100",
    "V100M16": "V100", "V100M32": "V100", "A10": "L4",
}


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


def build_pool(sc: Scenario, rng: np.random.Generator) -> Pool:
    topo = sc.topology
    net = load_graphml(sc.graphml_path(), topo.default_bandwidth_gbps, topo.per_hop_ms / 1000.0)
    names = net.names
    unknown = [n for n in sc.sites.overrides if n not in names]
    if unknown:
        raise ScenarioError(f"{sc.source or sc.name}: sites.overrides: unknown site(s) {', '.join(unknown)}; "
                            f"sites of this topology: {', '.join(names)}")
    for f in sc.failures:
        if f.site not in names:
            raise ScenarioError(f"{sc.source or sc.name}: failures: unknown site {f.site!r}; "
                                f"sites of this topology: {', '.join(names)}")
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
                inv[t] = inv.get(t, 0) + physics.GPUS_PER_NODE
            invs.append(inv)
    else:
        invs = [dict(sc.sites.default) for _ in names]
    for i, n in enumerate(names):
        if n in sc.sites.overrides:
            invs[i] = dict(sc.sites.overrides[n])
    types = [t for t in physics.gpu_catalog() if any(inv.get(t, 0) > 0 for inv in invs)]
    inventory = np.array([[inv.get(t, 0) for t in types] for inv in invs], dtype=np.int64).reshape(len(names), len(types))
    pop = _population()
    missing = [n for n in names if n not in pop]
    if missing:
        log.info("no population figure for %s; using the mean of the others", ", ".join(missing))
    known = [pop[n] for n in names if n in pop]
    fill = float(np.mean(known)) if known else 1.0
    population = np.array([pop.get(n, fill) for n in names])
    region = net.country if sc.sites.region_by == "country" else list(names)
    return Pool(net, types, inventory, population / population.sum(), region)
