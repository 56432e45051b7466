"""MAPPO for the CNC pool's site agents, in one readable file (CleanRL style).

One actor shared by every site (parameter sharing: the site's own features tell it apart) with one
sub-network shared by every (site, service) pair and one by every (site, offer) pair
(`agents.runtime` documents the network), a centralised critic that sees the site's observation
plus the pooled state of the whole pool, GAE, masked categorical heads (`agents.features`).
Training runs in two phases:

1. warm start (behaviour cloning with DAgger): teachers (`agents.teachers`, or any baseline)
   decide for the whole pool; each site learns to predict the decision for it from its own
   observation. With several teachers (`--teacher pack,ray-serve`) every training scenario is
   labelled by the one that scores best on it (each is played once on the scenario), so the
   student learns which rule fits which pool from what a site can observe. The first round follows
   the teachers, later rounds follow the student and ask the teacher what it would have done. The
   critic learns the returns of those episodes.
2. MAPPO fine-tuning on the team reward (the change of the score), from the warm start.

collect → compute returns → train → save, then repeat. `cncbrain train` is the command line;
`train(args, on_update)` is the API (used by tests and `benchmarks/train_device.py`).

Scenarios: names, YAML paths or a suite (`suite:NAME`, `cncbrain.suites`), comma-separated; env
copies cycle through them (each reset takes the next scenario). Seeds: training episodes use twin
seeds 10000 + 1000·seed + i, model selection uses `val_seeds` on the validation scenarios;
neither overlaps the seeds `cncbrain eval` reports (0…99 by default).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from agents.catalog import make_teacher
from agents.checkpoint import actor_layers
from agents.cnc_pool_v0 import CncPoolEnv
from agents.features import F_OFFER, MAX_OFFERS, N_OFF, N_REP, Choice, Obs, f_site, f_svc, state_size
from agents.runtime import export_npz
from agents.train_args import Args
from cncbrain.scenario import load_scenario
from cncbrain.twin.scenario import Scenario


def scenario_list(spec: str) -> list[Scenario]:
    """The scenarios of a comma-separated list of names, YAML paths and `suite:NAME` entries."""
    out: list[Scenario] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.startswith("suite:"):
            from cncbrain.suites import suite

            out += [load_scenario(x) if isinstance(x, str) else x for x in suite(item.removeprefix("suite:"))]
        else:
            out.append(load_scenario(item))
    if not out:
        raise ValueError(f"no scenarios in {spec!r}")
    return out


# ------------------------------------------------------------------------------------------ networks
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Batch:
    """Structured observations of B site rows as tensors, services padded to a common K (a padded
    service is all zeros with only "keep" and "default" allowed, so it adds nothing to log-probs)."""

    def __init__(self, site, svc, offer, m_rep, m_off, m_ov):
        self.site, self.svc, self.offer = site, svc, offer
        self.m_rep, self.m_off, self.m_ov = m_rep, m_off, m_ov

    def __getitem__(self, idx) -> Batch:
        return Batch(self.site[idx], self.svc[idx], self.offer[idx], self.m_rep[idx], self.m_off[idx], self.m_ov[idx])

    @property
    def valid(self) -> torch.Tensor:
        """[B, K] whether a service slot holds a service (its `active` feature)."""
        return self.svc[:, :, 0] > 0.5

    @staticmethod
    def pad(obs_list: list[Obs], K: int) -> dict[str, np.ndarray]:
        """Numpy arrays of several `Obs` stacked, services padded to K."""
        def padk(x, fill_col=None):
            n, k = x.shape[:2]
            out = np.zeros((n, K, *x.shape[2:]), x.dtype)
            out[:, :k] = x
            if fill_col is not None:
                out[:, k:, fill_col] = 1
            return out
        return {"site": np.concatenate([o.site for o in obs_list]),
                "svc": np.concatenate([padk(o.svc) for o in obs_list]),
                "offer": np.concatenate([o.offer for o in obs_list]),
                "m_rep": np.concatenate([padk(o.m_rep, 1) for o in obs_list]),
                "m_off": np.concatenate([o.m_off for o in obs_list]),
                "m_ov": np.concatenate([padk(o.m_ov, 0) for o in obs_list])}

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], device) -> Batch:
        t = lambda x: torch.as_tensor(np.asarray(x, np.float32), device=device)  # noqa: E731
        return cls(t(arrays["site"]), t(arrays["svc"]), t(arrays["offer"]), t(arrays["m_rep"]), t(arrays["m_off"]),
                   t(arrays["m_ov"]))


def pad_choice(choices: list[Choice], K: int) -> np.ndarray:
    """[B, 2K + O] choices (rep K, off O, ov K) stacked, services padded to K with keep/default."""
    out = []
    for c in choices:
        n, k = c.rep.shape
        rep = np.ones((n, K), np.int64)
        ov = np.zeros((n, K), np.int64)
        rep[:, :k], ov[:, :k] = c.rep, c.ov
        out.append(np.concatenate([rep, c.off, ov], axis=1))
    return np.concatenate(out)


def split_choice(a: np.ndarray, K: int) -> Choice:
    return Choice(a[:, :K], a[:, K:K + MAX_OFFERS], a[:, K + MAX_OFFERS:])


class Actor(nn.Module):
    def __init__(self, k: int, hidden: int = 64):
        super().__init__()
        self.k = k
        H = hidden
        self.site = nn.ModuleList([layer_init(nn.Linear(f_site(k), H)), layer_init(nn.Linear(H, H))])
        self.svc = nn.ModuleList([layer_init(nn.Linear(H + f_svc(k), H)), layer_init(nn.Linear(H, H)),
                                  layer_init(nn.Linear(H, N_REP + k + 1), std=0.01)])
        self.off = nn.ModuleList([layer_init(nn.Linear(H + F_OFFER, H)), layer_init(nn.Linear(H, N_OFF), std=0.01)])

    @staticmethod
    def _head(layers, h, block):
        n, m = block.shape[:2]
        x = torch.cat([h[:, None, :].expand(n, m, h.shape[1]), block], dim=2)
        for i, lin in enumerate(layers):
            x = lin(x)
            if i < len(layers) - 1:
                x = torch.tanh(x)
        return x

    def logits(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked logits: replica [B, K, 3], overflow [B, K, k+1], offer [B, O, 2]."""
        h = b.site
        for lin in self.site:
            h = torch.tanh(lin(h))
        zs = self._head(self.svc, h, b.svc)
        zo = self._head(self.off, h, b.offer)
        rep = zs[..., :N_REP].masked_fill(b.m_rep == 0, -1e9)
        ov = zs[..., N_REP:].masked_fill(b.m_ov == 0, -1e9)
        off = zo.masked_fill(b.m_off == 0, -1e9)
        return rep, ov, off

    def evaluate(self, b: Batch, action: torch.Tensor | None = None, greedy: bool = False):
        """(action [B, 2K + O], log-prob [B], entropy [B]); samples (or takes the argmax) when no action."""
        rep, ov, off = self.logits(b)
        K = rep.shape[1]
        lps = [torch.log_softmax(z, dim=-1) for z in (rep, off, ov)]
        if action is None:
            if greedy:
                parts = [lp.argmax(dim=-1) for lp in lps]
            else:
                parts = [torch.distributions.Categorical(logits=lp).sample() for lp in lps]
            action = torch.cat(parts, dim=1)
        a_rep, a_off, a_ov = action[:, :K], action[:, K:K + MAX_OFFERS], action[:, K + MAX_OFFERS:]
        logp = sum(lp.gather(2, a[..., None]).squeeze(-1).sum(1) for lp, a in zip(lps, (a_rep, a_off, a_ov), strict=True))
        entropy = sum(-(lp.exp() * lp).sum(-1).sum(1) for lp in lps)
        return action, logp, entropy

    def margins(self, b: Batch, action: torch.Tensor) -> torch.Tensor:
        """[B, K] how much more likely each row's replica choice in `action` is than "keep" (logit
        difference): the order in which the pool's coordination grants the wishes."""
        rep = self.logits(b)[0]
        chosen = rep.gather(2, action[:, :rep.shape[1], None]).squeeze(-1)
        return chosen - rep[..., 1]

    def bc_loss(self, b: Batch, label: torch.Tensor, weights: list[torch.Tensor], row_w: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the labels (replica, offer, overflow heads), each term weighted by its
        class weight and its row's weight; padded service slots do not count."""
        rep, ov, off = self.logits(b)
        K = rep.shape[1]
        valid = b.valid.float()
        parts = ((rep, label[:, :K], weights[0], valid), (off, label[:, K:K + MAX_OFFERS], weights[1], None),
                 (ov, label[:, K + MAX_OFFERS:], weights[2], valid))
        loss = 0.0
        for z, lab, w, v in parts:
            nll = -torch.log_softmax(z, dim=-1).gather(2, lab[..., None]).squeeze(-1)  # [B, M]
            ww = w[lab] * row_w[:, None] * (v if v is not None else 1.0)
            loss = loss + (ww * nll).sum() / ww.sum().clamp(min=1e-9)
        return loss

    def adjust_for_class_weights(self, weights: list[torch.Tensor]) -> None:
        """Remove the bias that class-weighted imitation puts on the greedy choice: trained with
        weights w_c, the actor's softmax estimates ∝ w_c·p(c), so its argmax picks a rare choice
        (add, remove, bid) whenever w_c·p(c) beats "keep" — at a weight of 20, at a probability of
        1/21. Subtracting log w_c from the output biases restores argmax p(c) (logit adjustment);
        `weights` are `Trainer._class_weights`' (replica, offer, overflow heads)."""
        w_rep, w_off, w_ov = (torch.log(w.to(self.svc[-1].bias.device)) for w in weights)
        with torch.no_grad():
            self.svc[-1].bias[:N_REP] -= w_rep
            self.svc[-1].bias[N_REP:] -= w_ov
            self.off[-1].bias -= w_off

    def scale_outputs(self, factor: float) -> None:
        with torch.no_grad():
            for lin in (self.svc[-1], self.off[-1]):
                lin.weight.mul_(factor)
                lin.bias.mul_(factor)

    def numpy_layers(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        return actor_layers(self.state_dict())


class Critic(nn.Module):
    """Centralised value: the site's block, the mean and max of its service blocks, the pooled state."""

    def __init__(self, k: int, hidden: int = 64):
        super().__init__()
        n_in = f_site(k) + 2 * f_svc(k) + state_size(k)
        self.net = nn.Sequential(
            layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )

    def forward(self, b: Batch, state: torch.Tensor) -> torch.Tensor:
        valid = b.valid[..., None].float()
        n = valid.sum(1).clamp(min=1)
        mean = (b.svc * valid).sum(1) / n
        mx = b.svc.masked_fill(valid == 0, -OBS_FLOOR).max(1).values
        mx = torch.where(valid.sum(1) > 0, mx, torch.zeros_like(mx))
        return self.net(torch.cat([b.site, mean, mx, state], dim=1)).squeeze(-1)


OBS_FLOOR = 1e3


# ------------------------------------------------------------------------------------------ env copies
class Team:
    """Env copies in lockstep, each cycling through the scenarios; their sites are stacked into
    one batch of rows (services padded to the most any copy has)."""

    def __init__(self, args: Args, scenarios: list[Scenario]):
        self.args = args
        self.scenarios = scenarios
        self.cursor = 0
        self._envs: dict[int, CncPoolEnv] = {}
        self.envs: list[CncPoolEnv] = []
        for _ in range(args.num_envs):
            self.envs.append(self._next_env())
        self.next_seed = 10_000 + 1000 * args.seed
        self.scores: list[float] = []  # finished episodes' scores
        self.finished: list[tuple[str, float]] = []

    def env_for(self, i: int) -> CncPoolEnv:
        env = self._envs.get(i)
        if env is None:
            a = self.args
            env = self._envs[i] = CncPoolEnv(scenario=self.scenarios[i], neighbours=a.neighbours,
                                             reward_scale=a.reward_scale, duration_s=a.duration_s,
                                             reward="site" if a.credit > 0 else "team", coordinated=a.coordinated)
        return env

    def _next_env(self) -> CncPoolEnv:
        n = len(self.scenarios)
        if self.cursor % n == 0:  # a new pass over the scenarios, in a new order (families mixed)
            self.order = np.random.default_rng(self.args.seed * 7919 + self.cursor // n).permutation(n)
        i = int(self.order[self.cursor % n])
        self.cursor += 1
        # two copies on the same scenario need two envs
        env = self.env_for(i)
        if any(e is env for e in self.envs):
            a = self.args
            env = CncPoolEnv(scenario=self.scenarios[i], neighbours=a.neighbours, reward_scale=a.reward_scale,
                             duration_s=a.duration_s, reward="site" if a.credit > 0 else "team",
                             coordinated=a.coordinated)
        return env

    def _layout(self):
        self.sizes = [e.n_agents for e in self.envs]
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        self.K = max(max(e.K for e in self.envs), 1)

    @property
    def n(self) -> int:
        return int(self.bounds[-1])

    def _stack(self):
        arrays = Batch.pad([o for o, _ in self.last], self.K)
        state = np.concatenate([np.repeat(s[None], len(o.site), axis=0) for o, s in self.last])
        return arrays, state

    def reset(self):
        self.last = []
        for e in self.envs:
            self.last.append(e.reset_arrays(self.next_seed))
            self.next_seed += 1
        self._layout()
        return self._stack()

    def step(self, action: np.ndarray, margin: np.ndarray | None = None):
        """Step every copy with its rows of `action` [n, 2K + O] (and of `margin` [n, K], the
        coordination's order); a finished copy starts its next scenario (so the layout may change:
        `self.n`, `self.K`)."""
        rew = np.zeros(self.n, np.float32)
        done = np.zeros(self.n, np.float32)
        for i, e in enumerate(self.envs):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            a = action[lo:hi]
            choice = Choice(a[:, :e.K], a[:, self.K:self.K + MAX_OFFERS], a[:, self.K + MAX_OFFERS:self.K + MAX_OFFERS + e.K])
            o, s, r, d = e.step_arrays(choice, None if margin is None else margin[lo:hi, :e.K])
            if self.args.credit > 0:  # r: each site's share of the team reward
                c = self.args.credit
                r = (1 - c) * r.sum() + c * len(r) * r
            rew[lo:hi], done[lo:hi] = r, float(d)
            if d:
                self.scores.append(e.score)
                self.finished.append((e.scenario.name, e.score))
            self.last[i] = (o, s)
        return rew, done

    def restart_finished(self, done_rows: np.ndarray) -> bool:
        """Start the next scenario in every copy whose episode ended; True if any did."""
        any_done = False
        for i in range(len(self.envs)):
            if done_rows[self.bounds[i]] > 0:
                self.envs[i] = self._next_env()
                self.last[i] = self.envs[i].reset_arrays(self.next_seed)
                self.next_seed += 1
                any_done = True
        if any_done:
            self._layout()
        return any_done


def gae(rewards, values, dones, next_value, gamma, lam):
    """Advantages and returns of a [T, N] rollout; `dones[t]` marks that step t ended an episode."""
    T = len(rewards)
    adv = np.zeros_like(rewards)
    last = 0.0
    for t in reversed(range(T)):
        nv = next_value if t == T - 1 else values[t + 1]
        nonterm = 1.0 - dones[t]
        delta = rewards[t] + gamma * nv * nonterm - values[t]
        last = delta + gamma * lam * nonterm * last
        adv[t] = last
    return adv, adv + values


# ------------------------------------------------------------------------------------------ training
class Trainer:
    def __init__(self, args: Args):
        self.args = args
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        self.scenarios = scenario_list(args.scenarios)
        self.val = scenario_list(args.val_scenarios) if args.val_scenarios else self.scenarios
        self.team = Team(args, self.scenarios)
        k = args.neighbours
        self.actor = Actor(k, args.hidden).to(self.device)
        self.critic = Critic(k, args.hidden).to(self.device)
        self.optim = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()],
                                      lr=args.learning_rate, eps=1e-5)
        self.global_step = 0
        self.update = 0
        self.warm_done = not args.teacher
        self.best_score = -math.inf
        self.best_state: dict | None = None
        self.history: list[dict] = []
        self.teacher_of: dict[str, str] = {}
        self.t0 = time.time()

    # --- helpers
    def _t(self, x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype, device=self.device)

    def _batch(self, arrays: dict[str, np.ndarray]) -> Batch:
        return Batch.of(arrays, self.device)

    def log(self, row: dict, on_update) -> None:
        row = {"update": self.update, "global_step": self.global_step, "wall_s": round(time.time() - self.t0, 2), **row}
        self.history.append(row)
        if on_update:
            on_update(row)

    def greedy(self, obs: Obs) -> Choice:
        return self.greedy_with_margins(obs)[0]

    def greedy_with_margins(self, obs: Obs) -> tuple[Choice, np.ndarray]:
        """The actor's most likely choices and their margins over "keep" ([N, K], `Actor.margins`)."""
        Kp = max(obs.K, 1)
        with torch.no_grad():
            b = self._batch(Batch.pad([obs], Kp))
            a, _, _ = self.actor.evaluate(b, greedy=True)
            m = self.actor.margins(b, a).cpu().numpy()
        c = split_choice(a.cpu().numpy(), Kp)
        return Choice(c.rep[:, :obs.K], c.off, c.ov[:, :obs.K]), m[:, :obs.K]

    # --- phase 1: warm start by imitation (DAgger)
    def pick_teacher(self, scenario: Scenario, names: list[str]) -> str:
        """The teacher that scores best on `scenario` (one episode, its own seed), cached."""
        if len(names) == 1:
            return names[0]
        key = scenario.name + "|" + (scenario.source or "")
        if key not in self.teacher_of and self.args.teacher_table:
            from agents.teachers import TEACHERS

            table = {r["scenario"]: r["scores"] for r in json.loads(Path(self.args.teacher_table).read_text())["scenarios"]}
            # generated pools by their source (family:NAME:SEED), built-ins and files by the name they were given
            scores = table.get(scenario.source or "", table.get(scenario.name))
            cols = {n: (f"teacher:{n.removeprefix('teacher:')}" if n.removeprefix("teacher:") in TEACHERS else n)
                    for n in names}
            if scores is not None and all(c in scores for c in cols.values()):
                self.teacher_of[key] = max(names, key=lambda n: scores[cols[n]]["score"])
        if key not in self.teacher_of:
            from cncbrain.twin.sim import Twin

            best, best_score = names[0], -math.inf
            for name in names:
                twin = Twin(scenario, 9_000 + self.args.seed, self.args.duration_s)
                p = make_teacher(name)
                p.reset(9_000)
                while not twin.done():
                    twin.step(p.act(twin.view()))
                sc = twin.metrics()["score"]
                if sc > best_score:
                    best, best_score = name, sc
            self.teacher_of[key] = best
        return self.teacher_of[key]

    def warm_start(self, on_update=None, out: Path | None = None) -> None:
        a = self.args
        names = [t.strip() for t in a.teacher.split(",") if t.strip()]
        data: dict[str, list] = {"obs": [], "label": [], "vin_state": [], "ret": [], "row_w": [], "teacher": []}
        opt = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()], lr=a.bc_learning_rate)
        cycle = 0
        for rnd in range(a.bc_rounds):
            scores = []
            if a.bc_scenarios > 0:
                plan = [(self.scenarios[(cycle + i) % len(self.scenarios)], 1) for i in range(a.bc_scenarios)]
                cycle += a.bc_scenarios
            else:
                plan = [(sc, a.bc_episodes) for sc in self.scenarios]
            for sc, n_ep in plan:
                env = CncPoolEnv(scenario=sc, neighbours=a.neighbours, reward_scale=a.reward_scale,
                                 duration_s=a.duration_s)
                tname = self.pick_teacher(sc, names)
                for _ in range(n_ep):
                    seed = self.team.next_seed
                    self.team.next_seed += 1
                    teacher = make_teacher(tname)
                    teacher.reset(seed)
                    obs, state = env.reset_arrays(seed)
                    rows, rews = [], []
                    done = False
                    while not done:
                        label = env.featurizer.from_actions(env._view, teacher.act(env._view), obs)
                        act = label if rnd == 0 else self.greedy(obs)
                        keep, w = self._keep_rows(label, a.bc_rows_per_tick)
                        rows.append((obs.rows(keep), Choice(label.rep[keep], label.off[keep], label.ov[keep]), state, w))
                        obs, state, r, done = env.step_arrays(act)
                        rews.append(r)
                    ret = np.cumsum(np.array(rews)[::-1])[::-1]  # γ = 1 return-to-go of each tick
                    for (o, lab, st, w), g in zip(rows, ret, strict=True):
                        data["teacher"].append(np.full(o.n, names.index(tname) if tname in names else -1, np.int16))
                        data["row_w"].append(w)
                        data["obs"].append(o)
                        data["label"].append(lab)
                        data["vin_state"].append(np.repeat(st[None], o.n, axis=0))
                        data["ret"].append(np.full(o.n, g, np.float32))
                    scores.append(env.score)
                    if on_update is not None:
                        on_update({"phase": "warm-episode", "update": self.update, "global_step": self.global_step,
                                   "round": rnd, "episodes": len(scores), "of": sum(n for _, n in plan),
                                   "charts/score": env.score})
            K = max(max(o.K for o in data["obs"]), 1)
            arrays = Batch.pad(data["obs"], K)
            lab_np = pad_choice(data["label"], K)
            # the teacher's choice is allowed (a teacher may do what the masks forbid, e.g. remove below min)
            for name, (lo, hi) in (("m_rep", (0, K)), ("m_off", (K, K + MAX_OFFERS)),
                                   ("m_ov", (K + MAX_OFFERS, 2 * K + MAX_OFFERS))):
                m = arrays[name]
                idx = lab_np[:, lo:hi]
                np.put_along_axis(m, idx[..., None], 1, axis=2)
            batch = self._batch(arrays)
            lab_t = self._t(lab_np, torch.long)
            st_t = self._t(np.concatenate(data["vin_state"]))
            ret_t = self._t(np.concatenate(data["ret"]))
            row_w = np.concatenate(data["row_w"])
            weights = self._class_weights(lab_np, K, row_w, arrays["svc"][:, :, 0] > 0.5)
            row_w_t = self._t(row_w)
            N = len(lab_np)
            mb = max(min(a.bc_minibatch, N), 1)
            for _ in range(a.bc_epochs):
                perm = torch.randperm(N, device=self.device)
                for i in range(0, N, mb):
                    idx = perm[i:i + mb]
                    b = batch[idx]
                    bc = self.actor.bc_loss(b, lab_t[idx], weights, row_w_t[idx])
                    vloss = ((self.critic(b, st_t[idx]) - ret_t[idx]) ** 2).mean()
                    opt.zero_grad()
                    (bc + a.vf_coef * vloss).backward()
                    opt.step()
            acc, by_teacher = self._bc_accuracy(batch, lab_t, np.concatenate(data["teacher"]), names)
            self.log({"phase": "warm", "charts/score": float(np.mean(scores)), "losses/bc": float(bc.item()),
                      "losses/value": float(vloss.item()), "charts/bc_accuracy": acc,
                      "charts/bc_rows": N, "charts/bc_accuracy_by_teacher": by_teacher,
                      "charts/teacher_pools": self._teacher_counts(names)}, on_update)
            if out is not None and rnd == a.bc_rounds - 1:
                self.consider_best(out, on_update)
                if a.logit_adjust:
                    self.actor.adjust_for_class_weights(weights)
                    self.log({"phase": "logit-adjust"}, on_update)
                    self.consider_best(out, on_update)
        if out is not None and self.best_state is not None:
            self.actor.load_state_dict(self.best_state)  # MAPPO starts from the best imitation round
        self.actor.scale_outputs(a.sharpen)
        self.warm_done = True

    def _bc_accuracy(self, batch: Batch, lab_t: torch.Tensor, teacher: np.ndarray, names: list[str],
                     n: int = 20000) -> tuple[float, str]:
        """The greedy student's share of choices equal to the label on (at most `n` evenly spaced)
        rows of the aggregated data, over all and per teacher ("kpa 0.93 (41,000 rows), …")."""
        idx = np.linspace(0, len(lab_t) - 1, min(n, len(lab_t))).astype(np.int64)
        with torch.no_grad():
            pred, _, _ = self.actor.evaluate(batch[self._t(idx, torch.long)], greedy=True)
        hit = (pred == lab_t[idx]).float().mean(dim=1).cpu().numpy()
        per = []
        for i, name in enumerate(names):
            m = teacher[idx] == i
            if m.any():
                per.append(f"{name.removeprefix('marl:')} {hit[m].mean():.3f} ({int((teacher == i).sum()):,} rows)")
        return float(hit.mean()), "; ".join(per)

    def _teacher_counts(self, names: list[str]) -> str:
        """How many training pools each teacher labels ("kpa 40, teacher:kpack 21, …")."""
        counts = {n: sum(t == n for t in self.teacher_of.values()) for n in names}
        return ", ".join(f"{n.removeprefix('marl:')} {c}" for n, c in counts.items() if c) or names[0]

    def _keep_rows(self, label: Choice, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a tick kept for imitation and their weights: every site the teacher has change
        its replicas or send overflow elsewhere, weight 1, and of the other sites a random `n`, each
        weighing for the sites it stands for (so the imitated distribution stays the teacher's)."""
        busy = (label.rep != 1).any(axis=1) | (label.ov != 0).any(axis=1)  # (a teacher bids wherever a shard fits)
        idle = np.flatnonzero(~busy)
        w_idle = 1.0
        if len(idle) > n:
            w_idle = len(idle) / n
            idle = self.rng.choice(idle, n, replace=False)
        keep = np.concatenate([np.flatnonzero(busy), idle])
        w = np.concatenate([np.ones(busy.sum(), np.float32), np.full(len(idle), w_idle, np.float32)])
        order = np.argsort(keep)
        return keep[order], w[order]

    def _class_weights(self, lab: np.ndarray, K: int, row_w: np.ndarray, valid: np.ndarray) -> list[torch.Tensor]:
        """Per head, each class's weight: rare choices (add/remove a replica, bid) weigh more than
        "keep", up to `bc_class_weight_cap` times (counts weighted by the rows' weights)."""
        cap = self.args.bc_class_weight_cap
        out = []
        for cols, n, v in ((slice(0, K), N_REP, valid), (slice(K, K + MAX_OFFERS), N_OFF, None),
                           (slice(K + MAX_OFFERS, 2 * K + MAX_OFFERS), self.args.neighbours + 1, valid)):
            lab_h = lab[:, cols]
            w = np.broadcast_to(row_w[:, None], lab_h.shape)
            if v is not None:
                w = w * v
            counts = np.bincount(lab_h.ravel(), weights=w.ravel(), minlength=n).astype(float) + 1.0
            out.append(self._t(np.minimum(counts.sum() / (n * counts), cap)))
        return out

    # --- validation: greedy episodes on held-out seeds
    def validate(self) -> float:
        a = self.args
        own = a.val_seeds.strip() == "scenario"
        seeds = [] if own else [int(s) for s in a.val_seeds.split(",") if s.strip()]
        if not seeds and not own:
            return math.nan
        scores = []
        for sc in self.val:
            env = CncPoolEnv(scenario=sc, neighbours=a.neighbours, duration_s=a.duration_s, coordinated=a.coordinated)
            for seed in ([sc.seed] if own else seeds):
                obs, _ = env.reset_arrays(seed)
                done = False
                while not done:
                    obs, _, _, done = env.step_arrays(*self.greedy_with_margins(obs))
                scores.append(env.score)
        return float(np.mean(scores))

    # --- phase 2: MAPPO
    def train(self, on_update: Callable[[dict], None] | None = None) -> dict:
        a = self.args
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        if not self.warm_done:
            self.warm_start(on_update, out)
            import shutil

            shutil.copy(self.save(out), out / "checkpoint_warm.pt")  # MAPPO variants can resume from here
        team = self.team
        T = a.rollout_ticks
        arrays, state = team.reset()
        start_step = self.global_step
        while self.global_step < a.total_steps:
            frac = 1.0 - self.global_step / max(a.total_steps, 1)
            lr = a.learning_rate * (frac if a.anneal_lr else 1.0)
            for g in self.optim.param_groups:
                g["lr"] = lr
            # collect (the layout may change when a copy starts its next scenario: one segment per layout)
            segs: list[dict] = []
            seg = None
            n_scores = len(team.scores)
            t_collect = time.time()
            for t in range(T):
                if seg is None:
                    seg = {"K": team.K, "obs": [], "state": [], "act": [], "logp": [], "val": [], "rew": [], "done": []}
                b = self._batch(arrays)
                st = self._t(state)
                with torch.no_grad():
                    act, logp, _ = self.actor.evaluate(b)
                    val = self.critic(b, st)
                    margin = self.actor.margins(b, act).cpu().numpy() if a.coordinated else None
                act_np = act.cpu().numpy()
                rew, done = team.step(act_np, margin)
                seg["obs"].append(arrays)
                seg["state"].append(state)
                seg["act"].append(act_np)
                seg["logp"].append(logp.cpu().numpy())
                seg["val"].append(val.cpu().numpy())
                seg["rew"].append(rew)
                seg["done"].append(done)
                self.global_step += len(team.envs)
                if done.any() or t == T - 1:
                    # the segment ends here (a copy that finished starts its next scenario, which may
                    # change the layout): bootstrap every row from its post-step observation
                    nxt, nxt_state = team._stack()
                    with torch.no_grad():
                        seg["next_val"] = self.critic(self._batch(nxt), self._t(nxt_state)).cpu().numpy()
                    segs.append(seg)
                    seg = None
                    team.restart_finished(done)
                arrays, state = team._stack()
            t_train = time.time()
            flat = self._flatten(segs, a)
            batch = flat["batch"]
            f_state, f_act = flat["state"], flat["act"]
            f_logp, f_adv, f_ret = flat["logp"], flat["adv"], flat["ret"]
            B = len(f_logp)
            mb = max(B // a.num_minibatches, 1)
            kls, clipfracs = [], []
            pg = vloss = ent = torch.zeros(())
            for _ in range(a.update_epochs):
                perm = torch.randperm(B, device=self.device)
                for i in range(0, B, mb):
                    idx = perm[i:i + mb]
                    b = batch[idx]
                    _, newlogp, ent = self.actor.evaluate(b, f_act[idx])
                    ratio = (newlogp - f_logp[idx]).exp()
                    with torch.no_grad():
                        kls.append(((ratio - 1) - (newlogp - f_logp[idx])).mean().item())
                        clipfracs.append(((ratio - 1).abs() > a.clip_coef).float().mean().item())
                    madv = f_adv[idx]
                    madv = (madv - madv.mean()) / (madv.std() + 1e-8)
                    pg = torch.max(-madv * ratio, -madv * ratio.clamp(1 - a.clip_coef, 1 + a.clip_coef)).mean()
                    vloss = 0.5 * ((self.critic(b, f_state[idx]) - f_ret[idx]) ** 2).mean()
                    loss = pg - a.ent_coef * ent.mean() + a.vf_coef * vloss
                    self.optim.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_([*self.actor.parameters(), *self.critic.parameters()], a.max_grad_norm)
                    self.optim.step()
                if a.target_kl and np.mean(kls[-a.num_minibatches:]) > a.target_kl:
                    break
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t_done = time.time()
            self.update += 1
            new_scores = team.scores[n_scores:]
            sps = (self.global_step - start_step) / max(time.time() - self.t0, 1e-9)
            row = {"phase": "mappo", "charts/score": float(np.mean(new_scores)) if new_scores else float("nan"),
                   "charts/return": flat["return"], "charts/learning_rate": lr, "charts/sps": sps,
                   "losses/policy": float(pg.item()), "losses/value": float(vloss.item()),
                   "losses/entropy": float(ent.mean().item()), "losses/approx_kl": float(np.mean(kls)) if kls else 0.0,
                   "losses/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
                   "perf/collect_s": t_train - t_collect, "perf/train_s": t_done - t_train, "perf/batch": B}
            self.log(row, on_update)
            if a.eval_every and self.update % a.eval_every == 0:
                self.consider_best(out, on_update)
            self.save(out)
        if not a.eval_every or self.update % a.eval_every:
            self.consider_best(out, on_update)
        self.save(out)
        write_metrics(out, self.history)
        return {"best_val_score": self.best_score, "global_step": self.global_step, "updates": self.update}

    def _flatten(self, segs: list[dict], a: Args) -> dict:
        """GAE per segment, then one batch of every (tick, site) row, services padded to the largest K."""
        K = max(s["K"] for s in segs)
        obs_parts, st, act, logp, adv, ret = [], [], [], [], [], []
        returns = []
        for s in segs:
            rew, val, done = np.stack(s["rew"]), np.stack(s["val"]), np.stack(s["done"])
            ad, rt = gae(rew, val, done, s["next_val"], a.gamma, a.gae_lambda)
            returns.append(float(rew.sum(0).mean()))
            for t in range(len(rew)):
                o = s["obs"][t]
                pad = K - o["svc"].shape[1]
                if pad:
                    o = {**o, "svc": np.pad(o["svc"], ((0, 0), (0, pad), (0, 0))),
                         "m_rep": np.pad(o["m_rep"], ((0, 0), (0, pad), (0, 0))),
                         "m_ov": np.pad(o["m_ov"], ((0, 0), (0, pad), (0, 0)))}
                    o["m_rep"][:, -pad:, 1] = 1
                    o["m_ov"][:, -pad:, 0] = 1
                obs_parts.append(o)
                act_t = s["act"][t]
                if pad:
                    Ks = s["K"]
                    act_t = np.concatenate([act_t[:, :Ks], np.ones((len(act_t), pad), np.int64),
                                            act_t[:, Ks:Ks + MAX_OFFERS], act_t[:, Ks + MAX_OFFERS:],
                                            np.zeros((len(act_t), pad), np.int64)], axis=1)
                act.append(act_t)
                st.append(s["state"][t])
                logp.append(s["logp"][t])
                adv.append(ad[t])
                ret.append(rt[t])
        arrays = {key: np.concatenate([o[key] for o in obs_parts]) for key in obs_parts[0]}
        return {"batch": self._batch(arrays), "state": self._t(np.concatenate(st)),
                "act": self._t(np.concatenate(act), torch.long), "logp": self._t(np.concatenate(logp)),
                "adv": self._t(np.concatenate(adv)), "ret": self._t(np.concatenate(ret)),
                "return": float(np.mean(returns))}

    # --- save / load
    def consider_best(self, out: Path, on_update=None) -> None:
        score = self.validate()
        self.log({"phase": "val", "charts/val_score": score}, on_update)
        if score > self.best_score or (math.isnan(score) and self.best_state is None):
            self.best_score = score
            self.best_state = {k: v.detach().clone() for k, v in self.actor.state_dict().items()}
            self.export(out / "policy.npz", val_score=score)
        self.export(out / "policy_last.npz", val_score=score)

    def export(self, path: Path, **meta) -> Path:
        a = self.args
        info = {"scenarios": a.scenarios, "global_step": self.global_step, "teacher": a.teacher,
                "seed": a.seed, **({"coordination": "pool"} if a.coordinated else {}),
                **({"init_actor": a.init_actor} if a.init_actor else {}), **meta, **a.extra}
        return export_npz(path, self.actor.numpy_layers(), a.neighbours, info)

    def save(self, out: Path) -> Path:
        path = out / "checkpoint.pt"
        torch.save({"args": asdict(self.args), "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                    "optim": self.optim.state_dict(), "global_step": self.global_step, "update": self.update,
                    "warm_done": self.warm_done, "best_score": self.best_score, "history": self.history,
                    "next_seed": self.team.next_seed, "teacher_of": self.teacher_of}, path)
        write_metrics(out, self.history)
        return path

    def init_actor(self, path: str | Path) -> None:
        """Start the actor from a policy file's weights (format 2, the same sizes); the best
        validation so far is forgotten (it was another actor's)."""
        from agents.runtime import load_weights

        w = load_weights(path)
        state = {}
        for part in ("site", "svc", "off"):
            i = 0
            while f"{part}{i}_w" in w:
                state[f"{part}.{i}.weight"] = torch.as_tensor(np.asarray(w[f"{part}{i}_w"]).T.copy())
                state[f"{part}.{i}.bias"] = torch.as_tensor(np.asarray(w[f"{part}{i}_b"]).copy())
                i += 1
        try:
            self.actor.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a policy of this actor's sizes ({exc})") from None
        self.warm_done = True
        self.best_score, self.best_state = -math.inf, None

    def load(self, path: str | Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.actor.load_state_dict(ck["actor"])
        self.critic.load_state_dict(ck["critic"])
        self.optim.load_state_dict(ck["optim"])
        self.global_step, self.update = ck["global_step"], ck["update"]
        self.warm_done, self.best_score = ck["warm_done"], ck["best_score"]
        self.history = ck["history"]
        self.team.next_seed = ck["next_seed"]
        self.teacher_of = ck.get("teacher_of", {})


def train(args: Args, on_update: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) and write checkpoint, policy, metrics CSV and learning curve into args.out."""
    trainer = Trainer(args)
    if args.resume:
        trainer.load(args.resume)
    if args.init_actor:
        trainer.init_actor(args.init_actor)
    result = trainer.train(on_update)
    plot_learning_curve(Path(args.out), trainer.history)
    return result


# ------------------------------------------------------------------------------------------ plumbing
def write_metrics(out: Path, history: list[dict]) -> Path:
    path = out / "metrics.csv"
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    return path


def plot_learning_curve(out: Path, history: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "learning_curve.png"
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for phase, style in (("warm", "s-"), ("mappo", "-"), ("val", "o--")):
        rows = [r for r in history if r.get("phase") == phase]
        key = "charts/val_score" if phase == "val" else "charts/score"
        pts = [(r["global_step"], r[key]) for r in rows if not math.isnan(r.get(key, math.nan))]
        if pts:
            x, y = zip(*pts, strict=True)
            label = {"warm": "warm start (imitation rounds)", "mappo": "MAPPO training episodes",
                     "val": "greedy validation"}[phase]
            ax[0].plot(x, y, style, label=label, ms=4)
    ax[0].set_xlabel("environment ticks (MAPPO)")
    ax[0].set_ylabel("episode score")
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    rows = [r for r in history if r.get("phase") == "mappo"]
    if rows:
        ax[1].plot([r["global_step"] for r in rows], [r["charts/return"] for r in rows], label="team return")
        ax[1].set_xlabel("environment ticks (MAPPO)")
        ax[1].set_ylabel("return (reward_scale × Δscore)")
        ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
