"""The numpy runtime of the learned policy: same decisions as the torch actor, no torch needed,
one site's decision equals that site's row of the pool's decision (speed: benchmarks/bench_policy.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from agents.features import Featurizer, nvec, obs_size
from agents.runtime import MarlPolicy, NumpyActor, export_npz, shipped_policy_path
from cncbrain.policies import make_policy
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from agents.mappo import Actor

    torch.manual_seed(0)
    actor = Actor(obs_size(3), nvec(3), 64)
    with torch.no_grad():  # a non-trivial output layer (the trainer's init makes it nearly zero)
        actor.net[-1].weight.normal_(0, 0.5)
    path = export_npz(tmp_path_factory.mktemp("pol") / "p.npz", actor.numpy_layers(), nvec(3), 3, {"test": True})
    return actor, path


def test_numpy_forward_matches_torch(exported):
    import torch

    actor, path = exported
    na = NumpyActor.load(path)
    twin = Twin(load_scenario("geant"), seed=3)
    obs, mask, _ = Featurizer(twin.latency, 3).build(twin.view())
    with torch.no_grad():
        want = actor.net(torch.as_tensor(obs)).numpy()
        greedy, _, _ = actor.evaluate(torch.as_tensor(obs), torch.as_tensor(mask, dtype=torch.float32), greedy=True)
    np.testing.assert_allclose(na.logits(obs), want, rtol=1e-4, atol=1e-5)
    assert (na.choose(obs, mask) == greedy.numpy()).all()
    assert na.meta["test"] is True and na.meta["obs_size"] == obs_size(3)


def test_decide_site_is_the_sites_row_of_act(exported):
    _, path = exported
    p = MarlPolicy(path)
    twin = Twin(load_scenario("abilene"), seed=5)
    p.reset(5)
    for _ in range(6):
        view = twin.view()
        full = p.act(view)
        for s in range(view.n_sites):
            d, acc, ov = p.decide_site(view, s)
            assert (d == full.replica_delta[s]).all()
            assert (acc == full.accept[s]).all()
            assert (ov == full.overflow[s]).all()
            assert set(np.unique(d)) <= {-1, 0, 1}
        twin.step(full)


def test_shipped_policy_loads_through_make_policy_and_plays_an_episode():
    assert shipped_policy_path().exists(), "agents/policies/marl_v0.npz must ship with the package"
    p = make_policy("marl")
    assert isinstance(p, MarlPolicy)
    twin = Twin(load_scenario("abilene"), seed=0, duration_s=1200)
    p.reset(0)
    while not twin.done():
        twin.step(p.act(twin.view()))
    m = twin.metrics()
    assert 0.0 < m["score"] <= 1.0


def test_runtime_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from agents.runtime import MarlPolicy\n"
            "from cncbrain.scenario import load_scenario\nfrom cncbrain.twin.sim import Twin\n"
            "p = MarlPolicy(); t = Twin(load_scenario('abilene'), seed=0); print(p.decide_site(t.view(), 0))\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("scenario", ["abilene", "geant"])
def test_single_site_features_equal_the_pool_row(scenario):
    from agents.cnc_pool_v0 import CncPoolEnv

    env = CncPoolEnv(scenario=scenario, duration_s=1800 if scenario == "abilene" else 600)
    env.reset_arrays(7)
    rng = np.random.default_rng(0)
    done, ticks = False, 0
    while not done:
        view, feat = env._view, env.featurizer
        obs, mask, _ = feat.build(view)
        for s in range(view.n_sites):
            o, m, _ = feat.build_site(view, s)
            np.testing.assert_allclose(o, obs[s], rtol=1e-6, atol=1e-7)
            assert (m == mask[s]).all(), (ticks, s)
        choice = rng.integers(0, feat.nvec, size=(view.n_sites, len(feat.nvec)))
        full = feat.to_actions(view, choice)
        for s in range(view.n_sites):
            d, acc, ov = feat.site_action(view, s, choice[s], feat.build_site(view, s)[2])
            assert (d == full.replica_delta[s]).all() and (acc == full.accept[s]).all() and (ov == full.overflow[s]).all()
        *_, done = env.step_arrays(choice)
        ticks += 1


def test_a_policy_with_other_action_heads_is_refused_by_name(tmp_path):
    heads = nvec(3).copy()
    heads[:4] = 5  # e.g. a policy trained with a wider replica head
    w = [(np.zeros((obs_size(3), 8), np.float32), np.zeros(8, np.float32)),
         (np.zeros((8, int(heads.sum())), np.float32), np.zeros(int(heads.sum()), np.float32))]
    path = export_npz(tmp_path / "other.npz", w, heads, 3, {})
    with pytest.raises(ValueError, match=r"policy has action heads \[5, 5, 5, 5, 2, 2, 4, 4, 4, 4\], this code has "
                                         r"\[3, 3, 3, 3, 2, 2, 4, 4, 4, 4\]"):
        NumpyActor.load(path)


def test_adding_one_service_to_built_features_equals_building_them_all():
    """`Featurizer.extend` (a live agent adds an offered service to the observation it keeps) gives
    exactly `build`'s observation and mask, whether the service's slot was padded (inactive) or
    past the last service."""
    import dataclasses

    from agents.cnc_pool_v0 import CncPoolEnv
    from agents.features import K_MAX

    env = CncPoolEnv(scenario="att", duration_s=900)
    env.reset_arrays(3)
    rng = np.random.default_rng(1)
    checked, done = 0, False
    while not done:
        view, feat = env._view, env.featurizer
        obs, mask, _ = feat.build(view)
        K = min(view.n_services, K_MAX)
        for j in range(K):
            padded = [dataclasses.replace(svc, active=False) if i == j else svc for i, svc in enumerate(view.services)]
            bases = [dataclasses.replace(view, services=padded)]
            if j == view.n_services - 1:  # the live case: the offered service is the view's last
                bases.append(dataclasses.replace(
                    view, services=view.services[:j], ready=view.ready[:, :j], replicas=view.replicas[:, :j],
                    capacity_rps=view.capacity_rps[:, :j], demand_rps=view.demand_rps[:, :j],
                    load=view.load[:, :j], slo_recent=view.slo_recent[:j], overflow=view.overflow[:, :j]))
            for base in bases:
                b_obs, b_mask, _ = feat.build(base)
                e_obs, e_mask = feat.extend(b_obs, b_mask, view, j)
                assert e_obs.dtype == obs.dtype and np.array_equal(e_obs, obs), (j, checked)
                assert np.array_equal(e_mask, mask), (j, checked)
                checked += 1
        choice = rng.integers(0, feat.nvec, size=(view.n_sites, len(feat.nvec)))
        *_, done = env.step_arrays(choice)
    assert checked > 100
    with pytest.raises(ValueError, match="not an active service"):
        feat.extend(obs, mask, view, K_MAX)
