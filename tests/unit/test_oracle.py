"""The offline bound is an upper bound: no baseline scores above it on any built-in scenario."""

import pytest

from cncbrain.evaluate import run_policy
from cncbrain.oracle import oracle_bound
from cncbrain.policies import BASELINES
from cncbrain.scenario import builtin_scenarios, load_scenario
from cncbrain.twin.sim import Twin


@pytest.mark.parametrize("scenario", list(builtin_scenarios()))
@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_bounds_every_baseline(scenario, seed):
    sc = load_scenario(scenario)
    bound = oracle_bound(Twin(sc, seed=seed))
    assert "Optimal" in bound.status
    for name in BASELINES:
        m = run_policy(sc, name, seed).metrics
        assert m["score"] <= bound.score + 1e-9, f"{name} {m['score']:.4f} > oracle {bound.score:.4f}"
        assert m["slo_attainment"] <= bound.slo_attainment + 1e-9
        assert m["training_goodput"] <= bound.training_goodput + 1e-9


def test_oracle_is_not_trivially_one():
    sc = load_scenario("abilene")
    b = oracle_bound(Twin(sc, seed=0))
    assert 0.5 < b.score < 1.0  # cost always leaves something on the table
