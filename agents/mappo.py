"""MAPPO for the CNC pool's site agents, in one readable file (CleanRL style).

One actor shared by every site (parameter sharing: the site's own features tell it apart), a
centralised critic that sees the site's observation plus the pooled state of the whole pool, GAE,
masked categorical heads (`agents.features`). Training runs in two phases:

1. warm start (behaviour cloning with DAgger): a baseline of `cncbrain.policies` (the teacher)
   decides for the whole pool; each site learns to predict the teacher's decision for it from its
   own observation. The first round follows the teacher, later rounds follow the student and ask
   the teacher what it would have done. The critic learns the returns of those episodes.
2. MAPPO fine-tuning on the team reward (the change of the score), from the warm start.

collect → compute returns → train → save, then repeat. `cncbrain train` is the command line;
`train(args, on_update)` is the API (used by tests and `benchmarks/train_device.py`).

Seeds: training episodes use twin seeds 10000 + 1000·seed + i, model selection uses
`val_seeds`; neither overlaps the seeds `cncbrain eval` reports (0…99 by default).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from agents.cnc_pool_v0 import CncPoolEnv
from agents.features import obs_size, state_size
from agents.runtime import export_npz
from agents.teachers import make_teacher


@dataclass
class Args:
    scenarios: str = "abilene"
    """Comma-separated scenario names or YAML paths; the env copies are spread over them."""
    total_steps: int = 100_000
    """MAPPO budget in environment ticks, summed over env copies (a tick = one decision of every site)."""
    seed: int = 1
    """Seed of torch and of the training episodes' twin seeds."""
    device: str = "cpu"
    """Torch device for the networks: cpu or cuda (the twin always runs on the CPU)."""
    torch_threads: int = 1
    """CPU threads of torch; 1 is fastest for these small networks (more threads only contend with the twin)."""
    num_envs: int = 4
    """Env copies stepped in lockstep; their sites form one batch."""
    rollout_ticks: int = 120
    """Ticks collected per env copy before each update (120 = one episode of the built-in scenarios)."""
    neighbours: int = 3
    """k: neighbours an agent sees and can send overflow to."""
    hidden: int = 64
    """Width of the two hidden layers of actor and critic."""
    learning_rate: float = 3e-4
    """Adam step size of the MAPPO phase."""
    anneal_lr: bool = True
    """Decay the MAPPO learning rate linearly to zero over `total_steps`."""
    gamma: float = 1.0
    """Discount; 1 because the rewards telescope to the episode's score."""
    gae_lambda: float = 0.95
    """GAE λ."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per pass."""
    clip_coef: float = 0.1
    """PPO ratio clip; small, to stay near the warm start."""
    ent_coef: float = 0.001
    """Entropy bonus."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 0.5
    """Gradient clipping."""
    target_kl: float = 0.03
    """Stop an update's epochs early when the approximate KL passes this (None-like: 0 disables)."""
    reward_scale: float = 10.0
    """Team reward = reward_scale × Δscore."""
    teacher: str = "pack"
    """Policy imitated in the warm start: a teacher of `agents.teachers` (default `pack`) or any
    baseline name ('' skips the warm start)."""
    bc_rounds: int = 3
    """Warm-start rounds: the first follows the teacher, later ones the student (DAgger)."""
    bc_episodes: int = 4
    """Episodes per scenario per warm-start round."""
    bc_epochs: int = 40
    """Passes over the aggregated warm-start data after each round."""
    bc_learning_rate: float = 1e-3
    """Adam step size of the warm start."""
    sharpen: float = 4.0
    """After the warm start, the actor's output layer is multiplied by this: the greedy choices stay
    the same, but MAPPO explores near them instead of sampling the rare choices (add, remove, bid)
    that the class-weighted imitation made likely."""
    val_seeds: str = "5000,5001,5002,5003,5004"
    """Twin seeds of the greedy validation episodes that pick the best policy (per scenario)."""
    eval_every: int = 5
    """Validate every this many MAPPO updates (0: only at the end)."""
    out: str = "runs/marl"
    """Output folder: checkpoint.pt, policy.npz (best by validation), metrics.csv, learning_curve.png."""
    resume: str = ""
    """Checkpoint to resume from (its warm start is not redone)."""
    duration_s: float | None = None
    """Shorter episodes (tests); None keeps the scenarios' horizon."""
    extra: dict = field(default_factory=dict)
    """Free-form notes stored in the checkpoint and the exported policy's metadata."""


# ------------------------------------------------------------------------------------------ networks
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Actor(nn.Module):
    def __init__(self, n_obs: int, nvec: np.ndarray, hidden: int = 64):
        super().__init__()
        self.nvec = [int(n) for n in nvec]
        self.net = nn.Sequential(
            layer_init(nn.Linear(n_obs, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, sum(self.nvec)), std=0.01),
        )

    def heads(self, obs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Masked log-probabilities of every head: list of [N, n_h]."""
        z = self.net(obs).masked_fill(mask == 0, -1e9)
        return [torch.log_softmax(part, dim=-1) for part in torch.split(z, self.nvec, dim=-1)]

    def evaluate(self, obs, mask, action=None, greedy: bool = False):
        """(action [N, H], log-prob [N], entropy [N]); samples (or takes the argmax) when no action."""
        logps = self.heads(obs, mask)
        if action is None:
            if greedy:
                action = torch.stack([lp.argmax(dim=-1) for lp in logps], dim=-1)
            else:
                action = torch.stack([torch.multinomial(lp.exp(), 1).squeeze(-1) for lp in logps], dim=-1)
        logp = sum(lp.gather(1, action[:, h:h + 1]).squeeze(-1) for h, lp in enumerate(logps))
        entropy = sum(-(lp.exp() * lp).sum(-1) for lp in logps)
        return action, logp, entropy

    def numpy_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        lins = [m for m in self.net if isinstance(m, nn.Linear)]
        return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()) for m in lins]


class Critic(nn.Module):
    """Centralised value: the site's observation and the pooled state of the pool."""

    def __init__(self, n_in: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# ------------------------------------------------------------------------------------------ env copies
class Team:
    """Env copies in lockstep; their sites are stacked into one batch of rows."""

    def __init__(self, args: Args):
        names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        self.envs = [CncPoolEnv(scenario=names[i % len(names)], neighbours=args.neighbours,
                                reward_scale=args.reward_scale, duration_s=args.duration_s)
                     for i in range(args.num_envs)]
        self.sizes = [e.n_agents for e in self.envs]
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        self.next_seed = 10_000 + 1000 * args.seed
        self.scores: list[float] = []  # finished episodes' scores

    @property
    def n(self) -> int:
        return int(self.bounds[-1])

    def _stack(self, parts):
        obs = np.concatenate([p[0] for p in parts])
        mask = np.concatenate([p[1] for p in parts])
        state = np.concatenate([np.repeat(p[2][None], len(p[0]), axis=0) for p in parts])
        return obs, mask, state

    def reset(self):
        self.last = []
        for e in self.envs:
            self.last.append(e.reset_arrays(self.next_seed))
            self.next_seed += 1
        return self._stack(self.last)

    def step(self, choice: np.ndarray):
        rew = np.zeros(self.n, np.float32)
        done = np.zeros(self.n, np.float32)
        for i, e in enumerate(self.envs):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            o, m, s, r, d = e.step_arrays(choice[lo:hi])
            rew[lo:hi], done[lo:hi] = r, float(d)
            if d:
                self.scores.append(e.score)
                o, m, s = e.reset_arrays(self.next_seed)
                self.next_seed += 1
            self.last[i] = (o, m, s)
        return (*self._stack(self.last), rew, done)


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
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        self.team = Team(args)
        env0 = self.team.envs[0]
        self.nvec = env0.featurizer.nvec
        self.n_obs, self.n_state = obs_size(args.neighbours), state_size(args.neighbours)
        self.actor = Actor(self.n_obs, self.nvec, args.hidden).to(self.device)
        self.critic = Critic(self.n_obs + self.n_state, args.hidden).to(self.device)
        self.optim = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()],
                                      lr=args.learning_rate, eps=1e-5)
        self.global_step = 0
        self.update = 0
        self.warm_done = not args.teacher
        self.best_score = -math.inf
        self.best_state: dict | None = None
        self.history: list[dict] = []
        self.t0 = time.time()

    # --- helpers
    def _t(self, x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype, device=self.device)

    def _value_in(self, obs, state):
        return self._t(np.concatenate([obs, state], axis=1))

    def log(self, row: dict, on_update) -> None:
        row = {"update": self.update, "global_step": self.global_step, "wall_s": round(time.time() - self.t0, 2), **row}
        self.history.append(row)
        if on_update:
            on_update(row)

    # --- phase 1: warm start by imitation (DAgger)
    def warm_start(self, on_update=None, out: Path | None = None) -> None:
        a = self.args
        names = [s.strip() for s in a.scenarios.split(",") if s.strip()]
        data = {"obs": [], "mask": [], "label": [], "vin": [], "ret": []}
        opt = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()], lr=a.bc_learning_rate)
        for rnd in range(a.bc_rounds):
            scores = []
            for name in names:
                env = CncPoolEnv(scenario=name, neighbours=a.neighbours, reward_scale=a.reward_scale,
                                 duration_s=a.duration_s)
                for _ in range(a.bc_episodes):
                    seed = self.team.next_seed
                    self.team.next_seed += 1
                    teacher = make_teacher(a.teacher)
                    teacher.reset(seed)
                    obs, mask, state = env.reset_arrays(seed)
                    rows, rews = [], []
                    done = False
                    while not done:
                        label = env.featurizer.from_actions(env._view, teacher.act(env._view))
                        if rnd == 0:
                            act = label
                        else:
                            with torch.no_grad():
                                act, _, _ = self.actor.evaluate(self._t(obs), self._t(mask), greedy=True)
                            act = act.cpu().numpy()
                        rows.append((obs, mask, label, np.concatenate([obs, np.repeat(state[None], len(obs), 0)], 1)))
                        obs, mask, state, r, done = env.step_arrays(act)
                        rews.append(r)
                    ret = np.cumsum(np.array(rews)[::-1])[::-1]  # γ = 1 return-to-go of each tick
                    for (o, m, lab, vin), g in zip(rows, ret, strict=True):
                        data["obs"].append(o)
                        data["mask"].append(m)
                        data["label"].append(lab)
                        data["vin"].append(vin)
                        data["ret"].append(np.full(len(o), g, np.float32))
                    scores.append(env.score)
            obs_t = self._t(np.concatenate(data["obs"]))
            lab_np = np.concatenate(data["label"])
            mask_np = np.concatenate(data["mask"]).copy()
            off = np.concatenate([[0], np.cumsum(self.nvec)[:-1]])
            mask_np[np.arange(len(lab_np))[:, None], off[None, :] + lab_np] = 1  # the teacher's choice is allowed
            mask_t, lab_t = self._t(mask_np), self._t(lab_np, torch.long)
            vin_t, ret_t = self._t(np.concatenate(data["vin"])), self._t(np.concatenate(data["ret"]))
            # rare choices (add/remove a replica, bid) weigh more than "keep"
            w = []
            for h, n in enumerate(self.nvec):
                counts = np.bincount(lab_np[:, h], minlength=n).astype(float) + 1.0
                w.append(self._t(np.minimum(counts.sum() / (n * counts), 20.0)))
            N = len(lab_np)
            mb = max(N // 8, 1)
            for _ in range(a.bc_epochs):
                perm = torch.randperm(N, device=self.device)
                for i in range(0, N, mb):
                    idx = perm[i:i + mb]
                    logps = self.actor.heads(obs_t[idx], mask_t[idx])
                    bc = sum(nn.functional.nll_loss(lp, lab_t[idx, h], weight=w[h]) for h, lp in enumerate(logps))
                    vloss = ((self.critic(vin_t[idx]) - ret_t[idx]) ** 2).mean()
                    opt.zero_grad()
                    (bc + a.vf_coef * vloss).backward()
                    opt.step()
            with torch.no_grad():
                acc = np.mean([(lp.argmax(-1) == lab_t[:, h]).float().mean().item()
                               for h, lp in enumerate(self.actor.heads(obs_t, mask_t))])
            self.log({"phase": "warm", "charts/score": float(np.mean(scores)), "losses/bc": float(bc.item()),
                      "losses/value": float(vloss.item()), "charts/bc_accuracy": float(acc)}, on_update)
            if out is not None:
                self.consider_best(out, on_update)
        if out is not None and self.best_state is not None:
            self.actor.load_state_dict(self.best_state)  # MAPPO starts from the best imitation round
        with torch.no_grad():
            last = [m for m in self.actor.net if isinstance(m, nn.Linear)][-1]
            last.weight.mul_(a.sharpen)
            last.bias.mul_(a.sharpen)
        self.warm_done = True

    # --- validation: greedy episodes on held-out seeds
    def validate(self) -> float:
        a = self.args
        names = [s.strip() for s in a.scenarios.split(",") if s.strip()]
        seeds = [int(s) for s in a.val_seeds.split(",") if s.strip()]
        if not seeds:
            return math.nan
        scores = []
        for name in names:
            env = CncPoolEnv(scenario=name, neighbours=a.neighbours, duration_s=a.duration_s)
            for seed in seeds:
                obs, mask, _ = env.reset_arrays(seed)
                done = False
                while not done:
                    with torch.no_grad():
                        act, _, _ = self.actor.evaluate(self._t(obs), self._t(mask), greedy=True)
                    obs, mask, _, _, done = env.step_arrays(act.cpu().numpy())
                scores.append(env.score)
        return float(np.mean(scores))

    # --- phase 2: MAPPO
    def train(self, on_update: Callable[[dict], None] | None = None) -> dict:
        a = self.args
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        if not self.warm_done:
            self.warm_start(on_update, out)
            self.save(out)
        team = self.team
        T, N = a.rollout_ticks, team.n
        batch = T * N
        obs, mask, state = team.reset()
        start_step = self.global_step
        while self.global_step < a.total_steps:
            frac = 1.0 - self.global_step / max(a.total_steps, 1)
            lr = a.learning_rate * (frac if a.anneal_lr else 1.0)
            for g in self.optim.param_groups:
                g["lr"] = lr
            # collect
            b_obs = np.zeros((T, N, self.n_obs), np.float32)
            b_mask = np.zeros((T, N, int(self.nvec.sum())), np.float32)
            b_vin = np.zeros((T, N, self.n_obs + self.n_state), np.float32)
            b_act = np.zeros((T, N, len(self.nvec)), np.int64)
            b_logp = np.zeros((T, N), np.float32)
            b_val = np.zeros((T, N), np.float32)
            b_rew = np.zeros((T, N), np.float32)
            b_done = np.zeros((T, N), np.float32)
            n_scores = len(team.scores)
            t_collect = time.time()
            for t in range(T):
                vin = np.concatenate([obs, state], axis=1)
                with torch.no_grad():
                    act, logp, _ = self.actor.evaluate(self._t(obs), self._t(mask))
                    val = self.critic(self._t(vin))
                b_obs[t], b_mask[t], b_vin[t] = obs, mask, vin
                b_act[t], b_logp[t], b_val[t] = act.cpu().numpy(), logp.cpu().numpy(), val.cpu().numpy()
                obs, mask, state, rew, done = team.step(b_act[t])
                b_rew[t], b_done[t] = rew, done
                self.global_step += len(team.envs)
            with torch.no_grad():
                next_val = self.critic(self._value_in(obs, state)).cpu().numpy()
            t_train = time.time()
            # compute returns
            adv, ret = gae(b_rew, b_val, b_done, next_val, a.gamma, a.gae_lambda)
            # train
            f_obs, f_mask, f_vin = self._t(b_obs.reshape(batch, -1)), self._t(b_mask.reshape(batch, -1)), self._t(b_vin.reshape(batch, -1))
            f_act = self._t(b_act.reshape(batch, -1), torch.long)
            f_logp, f_adv, f_ret = self._t(b_logp.reshape(-1)), self._t(adv.reshape(-1)), self._t(ret.reshape(-1))
            mb = max(batch // a.num_minibatches, 1)
            kls, clipfracs = [], []
            for _ in range(a.update_epochs):
                perm = torch.randperm(batch, device=self.device)
                for i in range(0, batch, mb):
                    idx = perm[i:i + mb]
                    _, newlogp, ent = self.actor.evaluate(f_obs[idx], f_mask[idx], f_act[idx])
                    ratio = (newlogp - f_logp[idx]).exp()
                    with torch.no_grad():
                        kls.append(((ratio - 1) - (newlogp - f_logp[idx])).mean().item())
                        clipfracs.append(((ratio - 1).abs() > a.clip_coef).float().mean().item())
                    madv = f_adv[idx]
                    madv = (madv - madv.mean()) / (madv.std() + 1e-8)
                    pg = torch.max(-madv * ratio, -madv * ratio.clamp(1 - a.clip_coef, 1 + a.clip_coef)).mean()
                    vloss = 0.5 * ((self.critic(f_vin[idx]) - f_ret[idx]) ** 2).mean()
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
                   "charts/return": float(b_rew.sum(0).mean()), "charts/learning_rate": lr, "charts/sps": sps,
                   "losses/policy": float(pg.item()), "losses/value": float(vloss.item()),
                   "losses/entropy": float(ent.mean().item()), "losses/approx_kl": float(np.mean(kls)),
                   "losses/clipfrac": float(np.mean(clipfracs)),
                   "perf/collect_s": t_train - t_collect, "perf/train_s": t_done - t_train}
            self.log(row, on_update)
            if a.eval_every and self.update % a.eval_every == 0:
                self.consider_best(out, on_update)
            self.save(out)
        if not a.eval_every or self.update % a.eval_every:
            self.consider_best(out, on_update)
        self.save(out)
        write_metrics(out, self.history)
        return {"best_val_score": self.best_score, "global_step": self.global_step, "updates": self.update}

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
                "seed": a.seed, **meta, **a.extra}
        return export_npz(path, self.actor.numpy_layers(), self.nvec, a.neighbours, info)

    def save(self, out: Path) -> Path:
        path = out / "checkpoint.pt"
        torch.save({"args": asdict(self.args), "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                    "optim": self.optim.state_dict(), "global_step": self.global_step, "update": self.update,
                    "warm_done": self.warm_done, "best_score": self.best_score, "history": self.history,
                    "next_seed": self.team.next_seed}, path)
        write_metrics(out, self.history)
        return path

    def load(self, path: str | Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.actor.load_state_dict(ck["actor"])
        self.critic.load_state_dict(ck["critic"])
        self.optim.load_state_dict(ck["optim"])
        self.global_step, self.update = ck["global_step"], ck["update"]
        self.warm_done, self.best_score = ck["warm_done"], ck["best_score"]
        self.history = ck["history"]
        self.team.next_seed = ck["next_seed"]


def train(args: Args, on_update: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) and write checkpoint, policy, metrics CSV and learning curve into args.out."""
    trainer = Trainer(args)
    if args.resume:
        trainer.load(args.resume)
    result = trainer.train(on_update)
    plot_learning_curve(Path(args.out), trainer.history)
    return result


def load_checkpoint_weights(path: str | Path) -> dict:
    """A checkpoint's actor in the runtime's weights format (for `MarlPolicy("…/checkpoint.pt")`)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    a = ck["args"]
    k = a["neighbours"]
    from agents.features import nvec

    actor = Actor(obs_size(k), nvec(k), a["hidden"])
    actor.load_state_dict(ck["actor"])
    weights = {"nvec": nvec(k), "neighbours": np.int64(k), "meta": json.dumps({"from": str(path)})}
    for i, (w, b) in enumerate(actor.numpy_layers()):
        weights[f"w{i}"], weights[f"b{i}"] = w, b
    return weights


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
