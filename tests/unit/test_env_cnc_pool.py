"""The MARL environment: PettingZoo conformance, determinism, masks, failures, reward, sizes."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from agents import cnc_pool_v0
from agents.catalog import make_policy
from agents.features import MAX_OFFERS, Choice, mask_size, nvec, obs_size, state_size
from cncbrain.scenario import load_scenario
from cncbrain.twin.scenario import parse_scenario


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
        assert infos[a]["action_mask"].shape == (mask_size(2, 3),)
    assert env.state().shape == env.state_space.shape == (state_size(3),)


def test_spaces_follow_the_services_and_not_the_sites():
    """The observation and action have one block / head per service of the scenario (no padding,
    no cap); the sites only change the number of agents; the critic's state has one size."""
    small = load_scenario("abilene").model_dump()
    small["inference"] = small["inference"][:1]
    many = load_scenario("att").model_dump()
    many["inference"] = [dict(many["inference"][i % 3], name=f"s{i}") for i in range(6)]
    for scenario, K, S in ((parse_scenario(small), 1, 11), ("abilene", 2, 11), ("geant", 2, 34), ("att", 3, 25),
                           (parse_scenario(many), 6, 25)):
        env = cnc_pool_v0.parallel_env(scenario=scenario, duration_s=600)
        obs, infos = env.reset(seed=0)
        a = env.agents[0]
        assert len(env.agents) == S
        assert obs[a].shape == (obs_size(K, 3),) and infos[a]["action_mask"].shape == (mask_size(K, 3),)
        assert tuple(env.action_space(a).nvec) == tuple(nvec(K, 3)) == (4,) * K + (2,) * MAX_OFFERS + (4,) * K
        assert env.state().shape == (state_size(3),)


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
            K = env.K
            keep = np.zeros_like(m)
            keep[[4 * k + 1 for k in range(K)]] = 1
            keep[[4 * K + 2 * o for o in range(MAX_OFFERS)]] = 1
            keep[[4 * K + 2 * MAX_OFFERS + 4 * k for k in range(K)]] = 1
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
        actions = {a: env.action_space(a).sample(mask=None) if rng.random() < 0.5 else np.array([1] * 2 + [0] * 2 + [0] * 2)
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
    done = False
    n = np.arange(env.n_agents)[:, None]
    while not done:
        act = p.act(env._view)
        choice = env.featurizer.from_actions(env._view, act)
        o = env._obs
        ks = np.arange(env.K)[None, :]
        assert (o.m_rep[n, ks, choice.rep] == 1).all() and (o.m_off[n, np.arange(MAX_OFFERS)[None], choice.off] == 1).all()
        assert (o.m_ov[n, ks, choice.ov] == 1).all()
        back = env.featurizer.to_actions(env._view, choice, o)
        assert (back.replica_delta == np.clip(act.replica_delta, -1, 1)).all()
        assert ((back.accept > 0) == (act.accept > 0)).all()
        flat = choice.flat()
        assert (Choice.unflat(flat, env.K).flat() == flat).all()
        *_, done = env.step_arrays(choice)


def test_site_credit_splits_the_team_reward_exactly():
    """`reward="site"`: each site's share of the score change; the shares sum to the team reward at
    every tick, a site that serves nothing and hosts nothing gets no SLO or training credit, and
    the PettingZoo rewards are the shares."""
    site = cnc_pool_v0.parallel_env(scenario="att", reward="site", duration_s=1200)
    team = cnc_pool_v0.parallel_env(scenario="att", duration_s=1200)
    site.reset_arrays(5)
    team.reset_arrays(5)
    p = make_policy("teacher:pack")
    p.reset(5)
    done, spread = False, []
    while not done:
        c = site.featurizer.from_actions(site._view, p.act(site._view), site._obs)
        _, _, shares, done = site.step_arrays(c)
        _, _, r, _ = team.step_arrays(c)
        assert shares.shape == (site.n_agents,) and shares.sum() == pytest.approx(r, abs=1e-9)
        spread.append(shares.std())
    assert max(spread) > 0  # sites are told apart
    assert site.score == pytest.approx(team.score)
    with pytest.raises(ValueError, match="reward 'mine'"):
        cnc_pool_v0.parallel_env(scenario="att", reward="mine")
