"""Every baseline (and the MARL warm start's teachers) runs through the policy interface; each
baseline behaves like its namesake."""

import numpy as np
import pytest

from agents.catalog import make_policy
from agents.teachers import TEACHERS
from cncbrain.errors import CncError
from cncbrain.policies import BASELINES
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


@pytest.mark.parametrize("name", [*BASELINES, *(f"teacher:{t}" for t in TEACHERS)])
def test_baseline_runs_and_produces_valid_actions(name):
    tw = Twin(load_scenario("abilene"), seed=2, duration_s=1200)
    p = make_policy(name)
    p.reset(2)
    while not tw.done():
        view = tw.view()
        a = p.act(view)
        assert a.replica_delta.shape == (view.n_sites, view.n_services)
        assert a.accept.shape == (view.n_sites, len(view.offers))
        assert not (a.accept[~view.site_up] > 0).any()  # a down site never bids
        tw.step(a)
    m = tw.metrics()
    assert 0 < m["slo_attainment"] <= 1 and 0 <= m["training_goodput"] <= 1
    assert tw.replicas_by_type().sum() > 0


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(CncError, match="known: random, round-robin, least-loaded, greedy, kpa, ray-serve"):
        make_policy("magic")


def _first_additions(name):
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    p = make_policy(name)
    p.reset(0)
    tw.step(p.act(tw.view()))
    view = tw.view()
    view.demand_rps[:] = 0
    view.demand_rps[view.site_ids.index("Seattle"), 0] = 40.0  # a surge far from the warm replicas
    return view, p.act(view)


def test_greedy_places_near_the_demand():
    view, a = _first_additions("greedy")
    added = np.nonzero(a.replica_delta[:, 0] > 0)[0]
    assert len(added) > 0
    sea = view.site_ids.index("Seattle")
    mean_lat = view.latency_s[sea, added].mean()
    assert mean_lat < np.median(view.latency_s[sea])


def test_least_loaded_spreads_over_sites():
    view, a = _first_additions("least-loaded")
    assert (a.replica_delta[:, 0] > 0).sum() >= 3


def test_kpa_panics_on_a_surge_and_then_does_not_scale_down():
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    p = make_policy("kpa")
    p.reset(0)
    view = tw.view()
    view.demand_rps[:, 0] = 0
    p.act(view)
    view.demand_rps[0, 0] = 200.0
    a = p.act(view)
    assert p.panicking and a.replica_delta[:, 0].sum() > 0
    view.demand_rps[:, 0] = 0.0
    view.time_s += 30
    a = p.act(view)
    assert (a.replica_delta[:, 0] >= 0).all()  # no scale-down within the panic window


def test_ray_serve_waits_its_upscale_delay():
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    p = make_policy("ray-serve")
    p.reset(0)
    view = tw.view()
    view.load[:, 0] = np.where(view.ready[:, 0] > 0, 3.0, 0.0)  # its replicas hold 3× their batch
    first = p.act(view)
    assert first.replica_delta[:, 0].sum() == 0  # the wish must persist for upscale_delay_s
    view.time_s += 30
    second = p.act(view)
    assert second.replica_delta[:, 0].sum() > 0
