"""The learned site policy at decision time: a torch-free numpy forward pass over exported weights.

The live brain and the container image have no torch, so training (`agents.mappo`) exports the
shared actor to a small `.npz` (`export_npz`) and this module decides from it.

Use:

    from agents.runtime import MarlPolicy
    policy = MarlPolicy()                      # the shipped policy, agents/policies/marl_v0.npz
    policy = MarlPolicy("runs/x/policy.npz")   # another one (also a training checkpoint .pt, with torch)
    actions = policy.act(view)                 # every site at once: a `cncbrain.twin.view.Actions`
    delta, accept, overflow = policy.decide_site(view, s)   # one site, for the live site agent

`decide_site(view, site_index) -> (replica_delta [K] int, accept [O] float, overflow [K] int)`:
`replica_delta` is −1/0/+1 per service of `view.services`; `accept` is the site's bid for each of
`view.offers` (> 0 takes shards, higher first, 0 declines); `overflow` is the site index that takes
this site's overflow of each service, or −1 for the default (nearest with room). It sees only the
site's own state, its k nearest neighbours and the per-service pool broadcasts
(`agents.features`), and is deterministic (the most likely choice of every head, masked).

Weights file (`.npz`): `w0, b0, w1, b1, w2, b2` (tanh MLP, row-vector convention `x @ w + b`),
`nvec` (choices per head), `neighbours` (k) and `meta` (JSON: format version, obs size, how it
was trained).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from agents.features import Featurizer, nvec, obs_size
from cncbrain.policies.baselines import Policy
from cncbrain.twin.view import Actions, PoolView

FORMAT_VERSION = 1
SHIPPED = "marl_v0.npz"


def shipped_policy_path() -> Path:
    return Path(str(resources.files("agents") / "policies" / SHIPPED))


class NumpyActor:
    """The shared actor: observation rows → masked per-head choices."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.layers = []
        i = 0
        while f"w{i}" in weights:
            self.layers.append((np.asarray(weights[f"w{i}"], np.float32), np.asarray(weights[f"b{i}"], np.float32)))
            i += 1
        self.nvec = np.asarray(weights["nvec"], np.int64)
        self.k = int(weights["neighbours"])
        self.meta = json.loads(str(weights["meta"])) if "meta" in weights else {}
        if self.layers[0][0].shape[0] != obs_size(self.k):
            raise ValueError(f"policy expects {self.layers[0][0].shape[0]} observation features, "
                             f"this code builds {obs_size(self.k)} (k={self.k}); re-export the policy")
        if not np.array_equal(self.nvec, nvec(self.k)):
            raise ValueError(f"policy has action heads {self.nvec.tolist()}, this code has {nvec(self.k).tolist()} "
                             f"(k={self.k}); retrain or re-export the policy")
        self.offsets = np.concatenate([[0], np.cumsum(self.nvec)])

    @classmethod
    def load(cls, path: str | Path) -> NumpyActor:
        path = Path(path)
        if path.suffix == ".pt":  # a training checkpoint: export on the fly (needs torch)
            from agents.mappo import load_checkpoint_weights

            return cls(load_checkpoint_weights(path))
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})

    def logits(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, np.float32)
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                np.tanh(x, out=x)
        return x

    def choose(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """[N, heads] the most likely allowed choice of every head."""
        z = self.logits(obs)
        z = np.where(mask > 0, z, -np.inf)
        out = np.empty((z.shape[0], len(self.nvec)), np.int64)
        for h in range(len(self.nvec)):
            out[:, h] = z[:, self.offsets[h]:self.offsets[h + 1]].argmax(axis=1)
        return out

    def choose_head(self, obs: np.ndarray, mask: np.ndarray, h: int) -> np.ndarray:
        """[N] column `h` of `choose(obs, mask)`, without the other heads."""
        z = self.logits(obs)[:, self.offsets[h]:self.offsets[h + 1]]
        return np.where(mask[:, self.offsets[h]:self.offsets[h + 1]] > 0, z, -np.inf).argmax(axis=1)


class MarlPolicy(Policy):
    """The learned per-site policy behind the `Policy` interface (`--policy marl[:PATH]`)."""

    name = "marl"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else shipped_policy_path()
        if not self.path.exists():
            raise FileNotFoundError(f"no MARL policy at {self.path}")
        self.actor = NumpyActor.load(self.path)
        self._feat: Featurizer | None = None
        self._feat_key: tuple | None = None

    def _featurizer(self, view: PoolView) -> Featurizer:
        key = (id(view.latency_s), view.latency_s.shape)
        if self._feat is None or self._feat_key != key:
            self._feat = Featurizer(view.latency_s, self.actor.k)
            self._feat_key = key
        return self._feat

    def choices(self, view: PoolView) -> tuple[Featurizer, np.ndarray]:
        feat = self._featurizer(view)
        obs, mask, _ = feat.build(view)
        return feat, self.actor.choose(obs, mask)

    def act(self, view: PoolView) -> Actions:
        feat, choice = self.choices(view)
        return feat.to_actions(view, choice)

    def decide_site(self, view: PoolView, site_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One site's decision (see the module docstring), from that site's features alone."""
        feat = self._featurizer(view)
        s = int(site_index)
        obs, mask, room = feat.build_site(view, s)
        choice = self.actor.choose(obs[None], mask[None])[0]
        return feat.site_action(view, s, choice, room)


def export_npz(path: str | Path, layers: list[tuple[np.ndarray, np.ndarray]], nvec: np.ndarray, k: int,
               meta: dict | None = None) -> Path:
    """Write actor weights (list of (w [in, out], b [out])) in the runtime's format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (w, b) in enumerate(layers):
        arrays[f"w{i}"] = np.asarray(w, np.float32)
        arrays[f"b{i}"] = np.asarray(b, np.float32)
    info = {"format": FORMAT_VERSION, "obs_size": obs_size(k), **(meta or {})}
    np.savez_compressed(path, nvec=np.asarray(nvec, np.int64), neighbours=np.int64(k),
                        meta=np.array(json.dumps(info)), **arrays)
    return path
