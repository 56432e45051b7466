"""cnc_pool_v0: the CNC pool as a PettingZoo `ParallelEnv`, one agent per compute site, over the
digital twin (`cncbrain.twin`).

| item           | value                                                                              |
|----------------|------------------------------------------------------------------------------------|
| agents         | `site_<i>` for every site i of the scenario's topology (index order of the twin,   |
|                | stable); a down site stays an agent, with every choice but the no-op masked        |
| observation    | `Box(−10, 10, (obs_size(K, k),), float32)` for a scenario of K services: the       |
|                | site block, one block per service, one per offered job (`agents.features`; the   |
|                | policy reads it structured, `Obs.unflat`): the site's own state, pool-wide       |
|                | broadcasts and its k nearest neighbours by latency. Every service has its block:  |
|                | no cap on the number of services                                                  |
| action         | `MultiDiscrete([4]*K + [2]*2 + [k+1]*K)`: per service remove one / keep / add one |
|                | / cover the pool's deficit, per offered job decline/bid, per service overflow to   |
|                | the default or one of k neighbours                                                 |
| action mask    | `infos[agent]["action_mask"]`: int8, one 0/1 per value of each head (same order);  |
|                | infeasible choices that are sent anyway are ignored by the twin                    |
| state          | `state()`: pooled centralised state for the critic (`agents.features`)            |
| reward         | team reward, the same for every agent: `reward_scale` × the change of the          |
|                | `score` of the episode so far (its sum over an episode is `reward_scale` × final   |
|                | score), minus `shaping` × the share of sites whose chosen add/remove was masked    |
|                | (default 0: no shaping). With `reward="site"`, each site gets its own share of the |
|                | team reward (`ScoreTracker.site_credit`: the requests it served that met their     |
|                | SLOs, the training its shards did, the cost of its GPUs; the shares sum to the     |
|                | team reward) — for credit assignment in training                                   |
| episode end    | truncation of all agents when the scenario's horizon ends (3600 s = 120 ticks for  |
|                | the built-in scenarios); no termination                                            |

Arguments (all have defaults): `scenario` (name, path or `Scenario`), `seed` (first episode's
twin seed; later `reset()` without a seed count up from it), `neighbours` (k), `reward_scale`,
`reward` ("team" or "site"),
`shaping`, `duration_s` (shorter horizon, for tests).

Besides the dict API, `reset_arrays` / `step_arrays` work on the structured observation of every
site (`agents.features.Obs`) and their `Choice` — what the trainer uses, without per-agent dicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from agents.features import OBS_CLIP, Choice, Featurizer, Obs, nvec, obs_size, state_size
from agents.runtime import Coordination
from cncbrain.scenario import load_scenario
from cncbrain.twin import costmodel
from cncbrain.twin.scenario import Scenario
from cncbrain.twin.sim import Twin


class ScoreTracker:
    """The `score` (docs/twin.md, Metrics) of a twin's episode so far, as `Twin.metrics()["score"]` computes it, without
    its percentile work (called every tick)."""

    def __init__(self, twin: Twin):
        self.twin = twin
        ref = costmodel.gpu("A100-80GB")
        jobs = twin.jobs
        self.arrival = np.array([j.spec.arrival_s for j in jobs])
        self.tokens = np.array([j.spec.tokens for j in jobs])
        self.rate = np.array([costmodel.shard_tokens_per_s(costmodel.model(j.spec.model), ref, j.spec.shard_gpus)
                              * j.spec.n_shards for j in jobs])
        self.pool_cost_per_s = float((twin.total * twin.price[None, :]).sum() / 3600.0)

        self.site_cost_per_s = (twin.total * twin.price[None, :]).sum(axis=1) / 3600.0
        self.parts = (1.0, 0.0, 0.0, 0.0)  # (SLO so far, useful, demanded, cost share) at the last call

    def score(self) -> float:
        tw = self.twin
        h = tw.time_s
        slo = tw.n_met / tw.n_requests if tw.n_requests else 1.0
        seen = self.arrival < h
        demanded = float(np.minimum(self.tokens, self.rate * (h - self.arrival))[seen].sum())
        useful = float(sum(j.progress for j, s in zip(tw.jobs, seen, strict=True) if s))
        goodput = min(useful / demanded, 1.0) if demanded > 0 else 1.0
        cost_all = self.pool_cost_per_s * h
        share = tw.cost_usd / cost_all if cost_all > 0 else 0.0
        self.parts = (slo, useful, demanded, share)
        return 0.5 * slo + 0.4 * goodput + 0.1 * (1.0 - share)

    def site_credit(self, report, before: tuple[float, float, float, float], delta: float) -> np.ndarray:
        """[S] the score change `delta` of the tick of `report`, split over the sites (the shares sum
        to `delta`): each site is credited with the requests it served (those with nowhere to go: at
        their ingress) that met their SLOs, weighed against the SLO share so far; the training tokens
        its shards did; and the cost of its allocated GPUs against the pool's cost share so far. What
        no site did (the training demand that arrived, the cap of goodput at 1) is split evenly."""
        tw = self.twin
        S = tw.S
        slo0, _, _, share0 = before
        _, _, demanded, _ = self.parts
        credit = np.zeros(S)
        if tw.n_requests and report.site_requests is not None:
            credit += 0.5 * (report.site_met - slo0 * report.site_requests) / tw.n_requests
        if demanded > 0 and report.site_tokens is not None:
            credit += 0.4 * report.site_tokens / demanded
        cost_all = self.pool_cost_per_s * tw.time_s
        if cost_all > 0 and report.site_cost is not None:
            dt = tw.time_s - report.time_s
            credit -= 0.1 * (report.site_cost - share0 * self.site_cost_per_s * dt) / cost_all
        return credit + (delta - credit.sum()) / S


class CncPoolEnv(ParallelEnv):
    metadata = {"name": "cnc_pool_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, scenario: str | Path | Scenario = "abilene", seed: int | None = None,
                 neighbours: int = 3, reward_scale: float = 10.0, shaping: float = 0.0,
                 duration_s: float | None = None, render_mode: str | None = None, reward: str = "team",
                 coordinated: bool = False):
        """`coordinated`: the sites' replica choices go through the pool's coordination
        (`agents.runtime.Coordination`, as the shipped policy's in the twin and live) before the twin applies them."""
        if reward not in ("team", "site"):
            raise ValueError(f"reward {reward!r}: expected 'team' or 'site'")
        self.reward = reward
        self.coordination = Coordination() if coordinated else None
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.k = int(neighbours)
        self.reward_scale = float(reward_scale)
        self.shaping = float(shaping)
        self.duration_s = duration_s
        self.render_mode = render_mode
        self._next_seed = self.scenario.seed if seed is None else int(seed)
        self.twin = Twin(self.scenario, self._next_seed, duration_s)
        self.featurizer = Featurizer(self.twin.latency, self.k)
        self.K = self.twin.K
        self.nvec = nvec(self.K, self.k)
        self.possible_agents = [f"site_{i}" for i in range(self.twin.S)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (obs_size(self.K, self.k),), np.float32)
        self._act_space = spaces.MultiDiscrete(self.nvec)
        self.state_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (state_size(self.k),), np.float32)
        self._obs: Obs | None = None
        self._state = None

    # ------------------------------------------------------------------ spaces (one object shared by all agents)
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.MultiDiscrete:
        return self._act_space

    # ------------------------------------------------------------------ array API (the trainer's)
    @property
    def n_agents(self) -> int:
        return self.twin.S

    def reset_arrays(self, seed: int | None = None) -> tuple[Obs, np.ndarray]:
        """Start an episode; returns (structured observation of every site, critic state)."""
        if seed is not None:
            self._next_seed = int(seed)
        self.twin = Twin(self.scenario, self._next_seed, self.duration_s)
        self._next_seed += 1
        self.tracker = ScoreTracker(self.twin)
        self._score = 0.0
        self._view = self.twin.view()
        self._obs = self.featurizer.build(self._view)
        self._state = self.featurizer.pooled_state(self._obs, 0.0)
        return self._obs, self._state

    def step_arrays(self, choice: Choice, margin: np.ndarray | None = None) -> tuple[Obs, np.ndarray, float | np.ndarray, bool]:
        """Apply every site's choice; returns (obs, state, reward, done): the team reward, or with
        `reward="site"` each site's share of it ([S], summing to the team reward). `margin` [S, K]:
        how much more likely each replica choice was than "keep" (the coordination's order; 0s when None)."""
        penalty = 0.0
        if self.shaping:
            o = self._obs
            n = np.arange(o.n)[:, None]
            bad = (o.m_rep[n, np.arange(self.K)[None, :], choice.rep] == 0).any(axis=1) if self.K else np.zeros(o.n, bool)
            penalty = self.shaping * float(bad.mean())
        before = self.tracker.parts
        actions = self.featurizer.to_actions(self._view, choice, self._obs)
        if self.coordination is not None and self.K:
            m = np.zeros(actions.replica_delta.shape) if margin is None else np.asarray(margin, float)
            actions.replica_delta = self.coordination.apply(self._view, actions.replica_delta, m)
        report = self.twin.step(actions)
        score = self.tracker.score()
        if self.reward == "site":  # each site's share of the score change (they sum to the team's)
            reward = self.reward_scale * self.tracker.site_credit(report, before, score - self._score) - penalty / self.n_agents
        else:
            reward = self.reward_scale * (score - self._score) - penalty
        self._score = score
        self._view = self.twin.view()
        elapsed = self.twin.time_s / self.twin.duration_s
        self._obs = self.featurizer.build(self._view)
        self._state = self.featurizer.pooled_state(self._obs, elapsed)
        return self._obs, self._state, reward, self.twin.done()

    @property
    def score(self) -> float:
        """The episode's score so far."""
        return self._score

    # ------------------------------------------------------------------ PettingZoo API
    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, _ = self.reset_arrays(seed)
        self.agents = self.possible_agents[:]
        flat, mask = obs.flat()
        return ({a: flat[i] for i, a in enumerate(self.agents)},
                {a: {"action_mask": mask[i]} for i, a in enumerate(self.agents)})

    def step(self, actions: dict[str, np.ndarray]):
        if not self.agents:
            raise RuntimeError("step() after the episode ended; call reset()")
        choice = Choice.keep(self.n_agents, self.K).flat()  # agents without an action keep everything
        for i, a in enumerate(self.possible_agents):
            if a in actions:
                choice[i] = actions[a]
        obs, _, reward, done = self.step_arrays(Choice.unflat(choice, self.K))
        flat, mask = obs.flat()
        agents = self.agents
        rewards = {a: float(np.broadcast_to(reward, (self.n_agents,))[i]) for i, a in enumerate(agents)}
        terms = dict.fromkeys(agents, False)
        truncs = dict.fromkeys(agents, bool(done))
        infos = {a: {"action_mask": mask[i]} for i, a in enumerate(agents)}
        observations = {a: flat[i] for i, a in enumerate(agents)}
        if done:
            for a in agents:
                infos[a]["score"] = self._score
            self.agents = []
        return observations, rewards, terms, truncs, infos

    def state(self) -> np.ndarray:
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs) -> CncPoolEnv:
    """The environment (PettingZoo's naming)."""
    return CncPoolEnv(**kwargs)


def env(**kwargs):
    """The AEC version of the environment, through PettingZoo's conversion."""
    from pettingzoo.utils.conversions import parallel_to_aec

    return parallel_to_aec(parallel_env(**kwargs))


raw_env = CncPoolEnv
