"""The warm-start teachers: measurable like any policy (they also run the episode check of
test_baselines.py), and `pack` packs while Ray Serve spreads."""

import numpy as np
import pytest

from agents.catalog import known_policies, make_policy, make_teacher
from cncbrain.errors import CncError
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


def test_teachers_are_policies_by_name():
    assert "teacher:pack" in known_policies()
    assert make_policy("teacher:pack").name == "pack"
    assert make_teacher("pack").name == "pack" and make_teacher("teacher:pack").name == "pack"
    assert make_teacher("ray-serve").name == "ray-serve"  # a baseline can teach too
    with pytest.raises(CncError, match="unknown teacher 'teacher:magic'; known: teacher:pack"):
        make_policy("teacher:magic")


def _surge(name):
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    p = make_policy(name)
    p.reset(0)
    view = tw.view()
    view.demand_rps[:, 0] = 0
    view.demand_rps[view.site_ids.index("Seattle"), 0] = 200.0  # wants many replicas at once
    view.load[:, 0] = 3.0  # Ray Serve counts the ongoing requests on the replicas
    p.act(view)
    view.time_s += 30  # Ray Serve's autoscaler (both use it) waits out its upscale delay
    return view, p.act(view)


def test_pack_fills_few_sites_where_ray_serve_spreads():
    view, packed = _surge("teacher:pack")
    _, spread = _surge("ray-serve")
    assert packed.replica_delta[:, 0].sum() > 3
    assert (packed.replica_delta[:, 0] > 0).sum() < (spread.replica_delta[:, 0] > 0).sum()
    # it starts with the site that already runs the most replicas
    first = int(np.argmax(np.where(view.free_gpus.sum(axis=1) > 0, view.replicas.sum(axis=1), -1)))
    assert packed.replica_delta[first, 0] > 0
