"""The MARL environment: PettingZoo conformance, determinism, masks, failures, reward, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from agents import cnc_pool_v0
from agents.features import K_MAX, MAX_OFFERS, mask_size, nvec, obs_size
from cncbrain.policies import make_policy
from cncbrain.scenario import load_scenario, parse_scenario


@pytest.mark.parametrize("scenario,hours", [("abilene", 1.0), ("geant", 0.7)])
def test_parallel_api(scenario, hours):
    env = cnc_pool_v0.parallel_env(scenario=scenario, duration_s=hours * 3600)
    parallel_api_test(env, num_cycles=1000)
    assert env.metadata["name"] == "cnc_pool_v0"


@pytest.mark.parametrize("scenario", ["abilene", "geant"])
def test_parallel_seed(scenario):
    parallel_seed_test(lambda: cnc_pool_v0.parallel_env(scenario=scenario, duration_s=900))


def test_every_argument_has_a_default_and_agents_are_sites():
    env = cnc_pool_v0.parallel_env()
    obs, infos = env.reset(seed=3)
    assert env.possible_agents == [f"site_{i}" for i in range(11)]
    assert set(obs) == set(env.possible_agents)
    for a in env.possible_agents:
        assert env.observation_space(a).contains(obs[a])
        assert infos[a]["action_mask"].shape == (mask_size(3),)
    assert env.state().shape == env.state_space.shape


def test_sizes_do_not_depend_on_sites_or_services():
    small = load_scenario("abilene").model_dump()
    small["inference"] = small["inference"][:1]
    one_service = cnc_pool_v0.parallel_env(scenario=parse_scenario(small), duration_s=600)
    shapes = set()
    for env in (one_service, cnc_pool_v0.parallel_env(scenario="abilene"), cnc_pool_v0.parallel_env(scenario="geant")):
        obs, infos = env.reset(seed=0)
        a = env.agents[0]
        shapes.add((obs[a].shape, infos[a]["action_mask"].shape, env.state().shape, tuple(env.action_space(a).nvec)))
    assert shapes == {((obs_size(3),), (mask_size(3),), (2 * obs_size(3) + 2,), tuple(nvec(3)))}
    # the padded services of the one-service scenario allow only "keep" and "default overflow"
    obs, infos = one_service.reset(seed=0)
    m = infos["site_0"]["action_mask"]
    for k in range(1, K_MAX):
        assert list(m[3 * k:3 * k + 3]) == [0, 1, 0]
    ov0 = 3 * K_MAX + 2 * MAX_OFFERS
    assert m[ov0 + 4 * 1: ov0 + 4 * 2].tolist() == [1, 0, 0, 0]


def test_down_site_stays_an_agent_with_only_noop_allowed():
    env = cnc_pool_v0.parallel_env(scenario="abilene")
    obs, infos = env.reset(seed=1)
    chicago = env.twin.site_index["Chicago"]
    agent = f"site_{chicago}"
    checked = 0
    while env.agents:
        actions = {a: env.action_space(a).sample() for a in env.agents}
        obs, rew, term, trunc, infos = env.step(actions)
        if env.agents and not env.twin.site_up()[chicago]:
            assert agent in env.agents
            m = infos[agent]["action_mask"]
            keep = np.zeros_like(m)
            keep[[3 * k + 1 for k in range(K_MAX)]] = 1
            keep[[3 * K_MAX + 2 * o for o in range(MAX_OFFERS)]] = 1
            keep[[3 * K_MAX + 2 * MAX_OFFERS + 4 * k for k in range(K_MAX)]] = 1
            assert (m == keep).all()
            assert obs[agent][0] == 0.0  # the "up" feature
            checked += 1
    # down 1500–2100 s; the twin applies it at the 1500 s tick boundary, so the agents see it in the
    # views of 1500, 1530, …, 2070 s: 20 ticks
    assert checked == 20


def test_team_reward_sums_to_the_twin_score():
    env = cnc_pool_v0.parallel_env(scenario="abilene", reward_scale=10.0)
    obs, infos = env.reset(seed=2)
    total = 0.0
    rng = np.random.default_rng(0)
    while env.agents:
        actions = {a: env.action_space(a).sample(mask=None) if rng.random() < 0.5 else np.array([1] * 4 + [1] * 2 + [0] * 4)
                   for a in env.agents}
        obs, rew, term, trunc, infos = env.step(actions)
        assert len(set(rew.values())) == 1  # one team reward
        total += next(iter(rew.values()))
    assert total == pytest.approx(10.0 * env.twin.metrics()["score"], abs=1e-9)
    assert infos["site_0"]["score"] == pytest.approx(env.twin.metrics()["score"], abs=1e-12)


def test_masked_choices_round_trip_a_baseline():
    """A baseline's decisions, mapped to per-site choices, are allowed by the masks and give the
    same replica changes (clipped to ±1) and the same bidders when mapped back."""
    env = cnc_pool_v0.parallel_env(scenario="abilene")
    env.reset_arrays(4)
    p = make_policy("kpa")
    p.reset(4)
    off = np.concatenate([[0], np.cumsum(env.featurizer.nvec)[:-1]])
    done = False
    while not done:
        act = p.act(env._view)
        choice = env.featurizer.from_actions(env._view, act)
        assert (env._mask[np.arange(env.n_agents)[:, None], off[None, :] + choice] == 1).all()
        back = env.featurizer.to_actions(env._view, choice)
        assert (back.replica_delta == np.clip(act.replica_delta, -1, 1)).all()
        assert ((back.accept > 0) == (act.accept > 0)).all()
        *_, done = env.step_arrays(choice)
