"""Scenario families and suites: every generated scenario validates and runs, (family, seed) is
reproducible, suites are disjoint, and the inline-topology / region-ingress schema reports bad input."""

import logging

import numpy as np
import pytest
import yaml

from cncbrain import families, suites
from cncbrain.errors import CncError, ScenarioError
from cncbrain.scenario import generate, load_scenario
from cncbrain.twin.pool import load_network
from cncbrain.twin.scenario import parse_scenario
from cncbrain.twin.sim import Twin

SEEDS_PER_FAMILY = 10


@pytest.fixture(autouse=True)
def _quiet():
    log = logging.getLogger("cncbrain.twin.topology")
    level = log.level
    log.setLevel(logging.ERROR)  # Cogent's nodes without coordinates, at every load
    yield
    log.setLevel(level)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_seed_validates_and_every_service_can_be_served(family):
    for seed in range(SEEDS_PER_FAMILY):
        sc = generate(family, seed)
        assert sc.source == f"family:{family}:{seed}" and sc.name == f"{family}-{seed}"
        assert 1 <= len(sc.inference) <= 6
        assert len(sc.failures) <= 3
        net = load_network(sc)
        assert 5 <= net.size <= 300
        assert np.isfinite(net.latency_s).all(), "synthetic WANs are connected"
        for svc in sc.inference:
            assert svc.rate_scale > 0 and svc.max_replicas >= max(svc.min_replicas, 1)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_generated_scenarios_run_in_the_twin(family):
    for seed in (0, 1):
        sc = generate(family, seed)
        twin = Twin(sc, seed=sc.seed, duration_s=90)
        served = [s for s in twin.services if (s.tp > 0).any()]
        assert len(served) == len(sc.inference), "every service fits some GPU type of the pool"
        while not twin.done():
            twin.step()
        m = twin.metrics()
        assert 0.0 <= m["score"] <= 1.0 and twin.n_requests > 0


def test_same_family_and_seed_same_yaml_and_round_trip(tmp_path):
    for family in families.FAMILIES:
        text = families.to_yaml(family, 5)
        assert text == families.to_yaml(family, 5)
        assert text != families.to_yaml(family, 6)
        path = tmp_path / f"{family}.yaml"
        path.write_text(text)
        back = load_scenario(path)
        assert back.model_dump() == generate(family, 5).model_dump()
        assert load_scenario(f"family:{family}:5").model_dump() == back.model_dump()


def test_unknown_family_or_bad_seed_is_a_clear_error():
    with pytest.raises(CncError, match="unknown scenario family 'nope'; families: zoo, edge"):
        generate("nope", 1)
    for bad in (-1, 2**31, 1.5, "3", True):
        with pytest.raises(CncError, match="seed must be an integer"):
            generate("edge", bad)
    with pytest.raises(CncError, match="unknown scenario family 'x'"):
        load_scenario("family:x:1")
    with pytest.raises(CncError, match="is not an integer"):
        load_scenario("family:edge:one")
    with pytest.raises(CncError, match="family:NAME:SEED"):
        load_scenario("family:edge")


def test_suites_are_disjoint_and_hold_every_family():
    seen = {}
    for name in ("train", "validation", "test"):
        members = suites.members(name)
        assert {f for f, _ in members} == set(families.FAMILIES)
        assert len(set(members)) == len(members)
        for f, s in members:
            assert (f, s) not in seen, f"{f}:{s} is in {seen.get((f, s))} and {name}"
            seen[f, s] = name
    assert not {s for _, s in suites.members("test")} & {s for n in ("train", "validation") for _, s in suites.members(n)}
    for sc in suites.suite("smoke"):
        assert load_network(sc).size <= 12, "smoke stays small"
    with pytest.raises(CncError, match="unknown suite 'nope'; suites: train, validation, test, smoke"):
        suites.members("nope")


def _inline(**over):
    data = {
        "name": "inline",
        "topology": {"sites": [{"name": "Paris", "lat": 48.85, "lon": 2.35, "population_m": 11.0},
                               {"name": "Berlin", "lat": 52.52, "lon": 13.40, "population_m": 3.6},
                               {"name": "Madrid", "lat": 40.42, "lon": -3.70}],
                     "links": [{"a": "Paris", "b": "Berlin", "bandwidth_gbps": 100},
                               {"a": "Paris", "b": "Madrid"}]},
        "sites": {"default": {"L4": 8}},
        "inference": [{"name": "chat", "model": "7b", "trace": "conv", "slo": {"ttft_s": 1, "tpot_s": 0.1},
                       "ingress": {"region": {"around": "Paris", "radius_km": 900, "share": 0.9}}}],
        "training": {"trace": "none"},
    }
    data.update(over)
    return data


def test_inline_topology_and_region_ingress():
    sc = parse_scenario(_inline())
    twin = Twin(sc, seed=0, duration_s=60)
    net = twin.pool.net
    assert net.names == ["Paris", "Berlin", "Madrid"]
    assert net.bandwidth_gbps[0, 1] == 100 and net.bandwidth_gbps[0, 2] == 10  # default for the unset link
    assert net.latency_s[1, 2] == pytest.approx(net.latency_s[1, 0] + net.latency_s[0, 2])
    w = twin._ingress_weights(sc.inference[0])
    # Paris and Berlin (878 km) are inside the 900 km region; Madrid (1050 km) only gets its population share
    assert w[2] == pytest.approx(0.1 * twin.pool.population[2])
    assert w.sum() == pytest.approx(1.0) and w[0] > w[1] > w[2]


@pytest.mark.parametrize("change,message", [
    ({"topology": {"graphml": "Abilene.graphml", "sites": [{"name": "A", "lat": 0, "lon": 0}]}}, "not both or neither"),
    ({"topology": {"sites": [{"name": "A", "lat": 0, "lon": 0}, {"name": "A", "lat": 1, "lon": 1}]}}, "repeated: A"),
    ({"topology": {"sites": [{"name": "A", "lat": 95, "lon": 0}]}}, "topology.sites.0.lat"),
    ({"topology": {"sites": [{"name": "A", "lat": 0, "lon": 0}], "links": [{"a": "A", "b": "Z"}]}},
     "links.0: unknown site"),
    ({"topology": {"sites": [{"name": "A", "lat": 0, "lon": 0}], "links": [{"a": "A", "b": "A"}]}}, "to itself"),
    ({"failures": [{"site": "Rome", "at_s": 1, "duration_s": 1}]}, "failures.0.site: unknown site 'Rome'"),
    ({"inference": [{"name": "c", "model": "7b", "trace": "conv", "slo": {"ttft_s": 1, "tpot_s": 0.1},
                     "ingress": {"region": {"around": "Rome"}}}]}, "inference.0.ingress.region.around"),
    ({"inference": [{"name": "c", "model": "7b", "trace": "conv", "slo": {"ttft_s": 1, "tpot_s": 0.1},
                     "ingress": {"region": {"around": "Paris", "share": 1.5}}}]}, "share"),
])
def test_inline_schema_errors_name_the_field(change, message):
    with pytest.raises(ScenarioError, match=message.replace(".", r"\.")):
        parse_scenario(_inline(**change), "x.yaml")


def test_region_ingress_on_a_graphml_topology_checks_the_site():
    data = _inline(topology={"graphml": "Abilene.graphml"}, sites={"default": {"L4": 8}})
    data["inference"][0]["ingress"] = {"region": {"around": "Atlantis"}}
    sc = parse_scenario(data, "x.yaml")
    with pytest.raises(ScenarioError, match="inference.0.ingress.region.around: unknown site"):
        Twin(sc)
    assert yaml.safe_load(families.to_yaml("hotspot", 0))["inference"][0]["ingress"]["region"]["share"] > 0.5


def test_request_weight_counts_each_simulated_request_as_many():
    base = load_scenario("abilene")
    chat = base.inference[0].model_copy(update={"rate_scale": 8.0})
    runs = {}
    for w in (1, 4):
        sc = base.model_copy(update={"inference": [chat.model_copy(update={"request_weight": w})], "failures": []})
        twin = Twin(sc, seed=3, duration_s=1800)
        simulated = len(twin.services[0].t)
        p = __import__("agents.catalog", fromlist=["make_policy"]).make_policy("least-loaded")
        p.reset(3)
        while not twin.done():
            twin.step(p.act(twin.view()))
        runs[w] = (simulated, twin.n_requests, twin.metrics()["slo_attainment"],
                   float(np.mean([r.demand_rps.sum() for r in twin.history])))
    (sim1, n1, slo1, dem1), (sim4, n4, slo4, dem4) = runs[1], runs[4]
    assert sim4 == pytest.approx(sim1 / 4, rel=0.1)
    assert n4 == pytest.approx(n1, rel=0.1) and dem4 == pytest.approx(dem1, rel=0.1)
    assert slo4 == pytest.approx(slo1, abs=0.05)
    with pytest.raises(ScenarioError, match="request_weight"):
        parse_scenario(_inline(inference=[{"name": "c", "model": "7b", "trace": "conv", "request_weight": 0,
                                           "slo": {"ttft_s": 1, "tpot_s": 0.1}}]))


def test_p99_weighs_requests_by_their_weight():
    twin = Twin(parse_scenario(_inline()), seed=0, duration_s=60)
    light, heavy = np.arange(1.0, 100.0), np.full(10, 500.0)  # 99 requests of weight 1, 10 of weight 9
    twin._lat_weight = [1, 9]
    assert twin._p99(np.concatenate([light, heavy]), [light, heavy]) == 500.0
    twin._lat_weight = [1, 1]
    assert twin._p99(np.concatenate([light, heavy]), [light, heavy]) == pytest.approx(
        np.percentile(np.concatenate([light, heavy]), 99))


def test_oracle_groups_ingress_above_fifty_sites_and_stays_an_upper_bound():
    from cncbrain.evaluate import run_policy
    from cncbrain.oracle import INGRESS_GROUPS, ingress_groups

    sc = generate("halls", 3002)  # 79 sites
    twin = Twin(sc, seed=sc.seed, duration_s=900)
    groups = ingress_groups(twin)
    assert 1 < len(groups) <= INGRESS_GROUPS
    assert sorted(i for g in groups for i in g) == list(range(twin.S))
    assert ingress_groups(Twin(load_scenario("geant"), seed=0, duration_s=60)) == [[i] for i in range(34)]
    bound = run_policy(sc, "oracle", sc.seed, 900).metrics
    for policy in ("greedy", "least-loaded"):
        m = run_policy(sc, policy, sc.seed, 900).metrics
        assert bound["score"] >= m["score"] and bound["slo_attainment"] >= m["slo_attainment"] - 1e-9
