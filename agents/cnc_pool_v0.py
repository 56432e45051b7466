"""cnc_pool_v0: the CNC pool as a PettingZoo `ParallelEnv`, one agent per compute site, over the
digital twin (`cncbrain.twin`).

| item           | value                                                                              |
|----------------|------------------------------------------------------------------------------------|
| agents         | `site_<i>` for every site i of the scenario's topology (index order of the twin,   |
|                | stable); a down site stays an agent, with every choice but the no-op masked        |
| observation    | `Box(−10, 10, (obs_size(k),), float32)`: the site's own state (free/total GPUs,    |
|                | replicas, demand, capacity and load per service, offered jobs that fit), pool-wide |
|                | per-service broadcasts and a summary of its k nearest neighbours by latency —      |
|                | table in `agents.features`; independent of the number of sites and services        |
| action         | `MultiDiscrete([3]*4 + [2]*2 + [k+1]*4)`: per service −1/0/+1 replica, per offered |
|                | job decline/bid, per service overflow to the default or one of k neighbours        |
| action mask    | `infos[agent]["action_mask"]`: int8, one 0/1 per value of each head (same order);  |
|                | infeasible choices that are sent anyway are ignored by the twin                    |
| state          | `state()`: pooled centralised state for the critic (`agents.features`)            |
| reward         | team reward, the same for every agent: `reward_scale` × the change of the          |
|                | `score` of the episode so far (its sum over an episode is `reward_scale` × final   |
|                | score), minus `shaping` × the share of sites whose chosen add/remove was masked    |
|                | (default 0: no shaping)                                                             |
| episode end    | truncation of all agents when the scenario's horizon ends (3600 s = 120 ticks for  |
|                | the built-in scenarios); no termination                                            |

Arguments (all have defaults): `scenario` (name, path or `Scenario`), `seed` (first episode's
twin seed; later `reset()` without a seed count up from it), `neighbours` (k), `reward_scale`,
`shaping`, `duration_s` (shorter horizon, for tests).

Besides the dict API, `reset_arrays` / `step_arrays` work on stacked [S, …] arrays — what the
trainer uses, without per-agent dicts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from agents.features import K_MAX, OBS_CLIP, Featurizer, nvec, obs_size, state_size
from cncbrain.scenario import Scenario, load_scenario
from cncbrain.twin import physics
from cncbrain.twin.sim import Twin


class ScoreTracker:
    """The `score` (docs/twin.md, Metrics) of a twin's episode so far, as `Twin.metrics()["score"]` computes it, without
    its percentile work (called every tick)."""

    def __init__(self, twin: Twin):
        self.twin = twin
        ref = physics.gpu("A100-80GB")
        jobs = twin.jobs
        self.arrival = np.array([j.spec.arrival_s for j in jobs])
        self.tokens = np.array([j.spec.tokens for j in jobs])
        self.rate = np.array([physics.shard_tokens_per_s(physics.model(j.spec.model), ref, j.spec.shard_gpus)
                              * j.spec.n_shards for j in jobs])
        self.pool_cost_per_s = float((twin.total * twin.price[None, :]).sum() / 3600.0)

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
        return 0.5 * slo + 0.4 * goodput + 0.1 * (1.0 - share)


class CncPoolEnv(ParallelEnv):
    metadata = {"name": "cnc_pool_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, scenario: str | Path | Scenario = "abilene", seed: int | None = None,
                 neighbours: int = 3, reward_scale: float = 10.0, shaping: float = 0.0,
                 duration_s: float | None = None, render_mode: str | None = None):
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        self.k = int(neighbours)
        self.reward_scale = float(reward_scale)
        self.shaping = float(shaping)
        self.duration_s = duration_s
        self.render_mode = render_mode
        self._next_seed = self.scenario.seed if seed is None else int(seed)
        self.twin = Twin(self.scenario, self._next_seed, duration_s)
        self.featurizer = Featurizer(self.twin.latency, self.k)
        self.possible_agents = [f"site_{i}" for i in range(self.twin.S)]
        self.agents: list[str] = []
        self._obs_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (obs_size(self.k),), np.float32)
        self._act_space = spaces.MultiDiscrete(nvec(self.k))
        self.state_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (state_size(self.k),), np.float32)
        self._obs = self._mask = self._state = None

    # ------------------------------------------------------------------ spaces (one object shared by all agents)
    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.MultiDiscrete:
        return self._act_space

    # ------------------------------------------------------------------ array API (the trainer's)
    @property
    def n_agents(self) -> int:
        return self.twin.S

    def reset_arrays(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if seed is not None:
            self._next_seed = int(seed)
        self.twin = Twin(self.scenario, self._next_seed, self.duration_s)
        self._next_seed += 1
        self.tracker = ScoreTracker(self.twin)
        self._score = 0.0
        self._view = self.twin.view()
        self._obs, self._mask, self._state = self.featurizer.build(self._view, 0.0)
        return self._obs, self._mask, self._state

    def step_arrays(self, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, bool]:
        """Apply every site's choice [S, n_heads]; returns (obs, mask, state, team reward, done)."""
        choice = np.asarray(choice, dtype=np.int64)
        penalty = 0.0
        if self.shaping:
            n = self.featurizer.nvec
            off = np.concatenate([[0], np.cumsum(n)[:-1]])
            chosen = self._mask[np.arange(len(choice))[:, None], off[None, :] + choice]
            penalty = self.shaping * float((chosen == 0).any(axis=1).mean())
        self.twin.step(self.featurizer.to_actions(self._view, choice))
        score = self.tracker.score()
        reward = self.reward_scale * (score - self._score) - penalty
        self._score = score
        self._view = self.twin.view()
        elapsed = self.twin.time_s / self.twin.duration_s
        self._obs, self._mask, self._state = self.featurizer.build(self._view, elapsed)
        return self._obs, self._mask, self._state, reward, self.twin.done()

    @property
    def score(self) -> float:
        """The episode's score so far."""
        return self._score

    # ------------------------------------------------------------------ PettingZoo API
    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, mask, _ = self.reset_arrays(seed)
        self.agents = self.possible_agents[:]
        return ({a: obs[i] for i, a in enumerate(self.agents)},
                {a: {"action_mask": mask[i]} for i, a in enumerate(self.agents)})

    def step(self, actions: dict[str, np.ndarray]):
        if not self.agents:
            raise RuntimeError("step() after the episode ended; call reset()")
        choice = np.zeros((self.n_agents, len(self.featurizer.nvec)), np.int64)
        choice[:, :K_MAX] = 1  # agents without an action keep their replicas
        for i, a in enumerate(self.possible_agents):
            if a in actions:
                choice[i] = actions[a]
        obs, mask, _, reward, done = self.step_arrays(choice)
        agents = self.agents
        rewards = dict.fromkeys(agents, float(reward))
        terms = dict.fromkeys(agents, False)
        truncs = dict.fromkeys(agents, bool(done))
        infos = {a: {"action_mask": mask[i]} for i, a in enumerate(agents)}
        observations = {a: obs[i] for i, a in enumerate(agents)}
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
