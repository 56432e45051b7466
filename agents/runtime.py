"""The learned site policy at decision time: a torch-free numpy forward pass over exported weights.

The live brain and the container image have no torch, so training (`agents.mappo`) exports the
shared actor to a small `.npz` (`export_npz`) and this module decides from it.

Use:

    from agents.runtime import MarlPolicy
    policy = MarlPolicy()                      # the shipped policy, agents/policies/marl_v3.npz (marl_v2.npz's weights, coordinated)
    policy = MarlPolicy("runs/x/policy.npz")   # another one (a training checkpoint .pt: agents.catalog)
    actions = policy.act(view)                 # every site at once: a `cncbrain.twin.view.Actions`
    delta, accept, overflow = policy.decide_site(view, s)   # one site, for the live site agent

`decide_site(view, site_index) -> (replica_delta [K] int, accept [O] float, overflow [K] int)`:
`replica_delta` is the change of replicas (−1, 0, +1, or the "cover" count) for every service of
`view.services` (any number); `accept` is the
site's bid for each of `view.offers` (> 0 takes shards, higher first, 0 declines); `overflow` is the
site index that takes this site's overflow of each service, or −1 for the default (nearest with
room). It sees only the site's own state, its k nearest neighbours and the pool broadcasts
(`agents.features`), and is deterministic (the most likely choice of every head, masked).

The network (format 2): a site encoder (site block → 2 tanh layers), one sub-network shared by
every (site, service) pair (site encoding + that service's block → 2 tanh layers → 4 replica
logits and k+1 overflow logits) and one shared by every (site, offer) pair (site encoding + offer
block → 1 tanh layer → 2 logits). So the policy is permutation-equivariant over services and
offers and decides for any number of them.

Weights file (`.npz`, format 2): `site{i}_w`, `site{i}_b`, `svc{i}_w`, `svc{i}_b`, `off{i}_w`,
`off{i}_b` (row-vector convention `x @ w + b`; the first layer of `svc` and `off` takes the site
encoding first, then the block), `neighbours` (k), `meta` (JSON: format, feature sizes, how it was
trained). A format-1 file (the first shipped policy, `marl_v0.npz`: one MLP over a padded vector of
at most 4 services) still loads for measurement in the twin (`act`; `agents.features_v0`); it has
no live site agent.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from agents.features import F_OFFER, MAX_OFFERS, N_OFF, N_REP, Choice, Featurizer, Obs, f_site, f_svc
from cncbrain.coordination import TARGET_UTIL, Pool, admit
from cncbrain.policies.baselines import Policy
from cncbrain.twin.view import Actions, PoolView

FORMAT_VERSION = 2
SHIPPED = "marl_v3.npz"


def shipped_policy_path() -> Path:
    return Path(str(resources.files("agents") / "policies" / SHIPPED))


def _layers(weights: dict[str, np.ndarray], prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out, i = [], 0
    while f"{prefix}{i}_w" in weights:
        out.append((np.asarray(weights[f"{prefix}{i}_w"], np.float32), np.asarray(weights[f"{prefix}{i}_b"], np.float32)))
        i += 1
    return out


class NumpyActor:
    """The shared actor: structured observations (`agents.features.Obs`) → masked choices."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.meta = json.loads(str(weights["meta"])) if "meta" in weights else {}
        fmt = self.meta.get("format", 1)
        if fmt != FORMAT_VERSION:
            raise ValueError(f"policy file format {fmt}, this runtime reads format {FORMAT_VERSION}")
        self.k = int(weights["neighbours"])
        self.site = _layers(weights, "site")
        self.svc = _layers(weights, "svc")
        self.off = _layers(weights, "off")
        if not (self.site and len(self.svc) >= 2 and self.off):
            raise ValueError("policy file lacks the site, service or offer layers of format 2")
        H = self.site[-1][0].shape[1]
        want = {"site": f_site(self.k), "svc": H + f_svc(self.k), "off": H + F_OFFER}
        got = {"site": self.site[0][0].shape[0], "svc": self.svc[0][0].shape[0], "off": self.off[0][0].shape[0]}
        if want != got:
            raise ValueError(f"policy expects inputs {got}, this code builds {want} (k={self.k}); retrain the policy")
        if self.svc[-1][0].shape[1] != N_REP + self.k + 1 or self.off[-1][0].shape[1] != N_OFF:
            raise ValueError(f"policy has heads of {self.svc[-1][0].shape[1]} / {self.off[-1][0].shape[1]} values, "
                             f"this code has {N_REP + self.k + 1} / {N_OFF} (k={self.k}); retrain the policy")
        self.H = H
        # each head's first layer split into its site-encoding and block parts (`_head`)
        self._first = {"svc": (self.svc[0][0][:H], self.svc[0][0][H:], self.svc[0][1]),
                       "off": (self.off[0][0][:H], self.off[0][0][H:], self.off[0][1])}

    @classmethod
    def load(cls, path: str | Path) -> NumpyActor:
        return cls(load_weights(path))

    # --- forward passes
    def encode(self, site: np.ndarray) -> np.ndarray:
        """[N, H] site encodings."""
        x = np.asarray(site, np.float32)
        for w, b in self.site:
            x = np.tanh(x @ w + b)
        return x

    def _head(self, name: str, h: np.ndarray, block: np.ndarray) -> np.ndarray:
        """Logits of the shared sub-network `name` ("svc" or "off") over blocks [N, M, F] with the
        site encodings h [N, H]."""
        layers = self.svc if name == "svc" else self.off
        w_site, w_block, b0 = self._first[name]
        N, M, F = block.shape
        # every (site, block) pair in one matrix product per layer: [N·M, F] @ [F, H]
        x = (np.asarray(block, np.float32).reshape(N * M, F) @ w_block).reshape(N, M, w_block.shape[1])
        x += (h @ w_site)[:, None, :]
        x += b0
        np.tanh(x, out=x)
        x = x.reshape(N * M, w_block.shape[1])
        for i, (w, b) in enumerate(layers[1:], start=1):
            x = x @ w + b
            if i < len(layers) - 1:
                np.tanh(x, out=x)
        return x.reshape(N, M, layers[-1][0].shape[1])

    def service_logits(self, h: np.ndarray, svc: np.ndarray) -> np.ndarray:
        """[N, K, 3 + k+1]: replica then overflow logits of every (site, service)."""
        if svc.shape[1] == 0:
            return np.zeros((svc.shape[0], 0, N_REP + self.k + 1), np.float32)
        return self._head("svc", h, svc)

    def offer_logits(self, h: np.ndarray, offer: np.ndarray) -> np.ndarray:
        return self._head("off", h, offer)

    def choose(self, obs: Obs, margins: bool = False):
        """The most likely allowed choice of every head; with `margins`, also how much more likely
        each (site, service)'s replica choice is than "keep" ([N, K] logit differences, 0 for keep)."""
        h = self.encode(obs.site)
        zs = self.service_logits(h, obs.svc)
        zr = np.where(obs.m_rep > 0, zs[..., :N_REP], -np.inf)
        rep = zr.argmax(axis=2)
        ov = np.where(obs.m_ov > 0, zs[..., N_REP:], -np.inf).argmax(axis=2)
        if obs.m_off[:, :, 1:].any():
            off = np.where(obs.m_off > 0, self.offer_logits(h, obs.offer), -np.inf).argmax(axis=2)
        else:  # no site may bid (no offer, or none fits): every site declines, no need for the offer head
            off = np.zeros(obs.m_off.shape[:2], np.int64)
        if margins:
            return Choice(rep, off, ov), np.take_along_axis(zr, rep[..., None], 2)[..., 0] - zr[..., 1]
        return Choice(rep, off, ov)

    def choose_replicas(self, obs: Obs, j: int) -> np.ndarray:
        """[N] replica choice (0 remove, 1 keep, 2 add) of service j alone."""
        h = self.encode(obs.site)
        z = self._head("svc", h, obs.svc[:, j:j + 1])[:, 0, :N_REP]
        return np.where(obs.m_rep[:, j] > 0, z, -np.inf).argmax(axis=1)


class MarlPolicy(Policy):
    """The learned per-site policy behind the `Policy` interface (`--policy marl[:PATH]`)."""

    name = "marl"

    def __init__(self, path: str | Path | None = None, weights: dict[str, np.ndarray] | None = None,
                 coordination: Coordination | None = None):
        """`coordination`: how the sites' replica choices are coordinated in `act` (default: as the
        policy file says, `meta["coordination"]`: `Coordination()` or none)."""
        self.path = Path(path) if path else shipped_policy_path()
        if not self.path.exists():
            raise FileNotFoundError(f"no MARL policy at {self.path}")
        self.actor = NumpyActor(weights) if weights is not None else shared_actor(self.path)
        self.k = self.actor.k
        if coordination is None and self.actor.meta.get("coordination"):
            coordination = Coordination()
        self.coordination = coordination
        """How the sites' replica choices go through the pool's coordination (`act`; live: the
        scheduler, with the defaults), or None."""
        self._feat: Featurizer | None = None
        self._feat_key: tuple | None = None

    def featurizer(self, view: PoolView) -> Featurizer:
        key = (id(view.latency_s), view.latency_s.shape)
        if self._feat is None or self._feat_key != key:
            self._feat = Featurizer(view.latency_s, self.k)
            self._feat_key = key
        return self._feat

    def choices(self, view: PoolView, rows=None) -> tuple[Featurizer, Obs, Choice]:
        feat = self.featurizer(view)
        obs = feat.build(view, rows)
        return feat, obs, self.actor.choose(obs)

    def act(self, view: PoolView) -> Actions:
        feat = self.featurizer(view)
        obs = feat.build(view)
        choice, margin = self.actor.choose(obs, margins=True)
        actions = feat.to_actions(view, choice, obs)
        if self.coordination is not None and view.n_services:
            actions.replica_delta = self.coordination.apply(view, actions.replica_delta, margin)
        return actions

    @property
    def coordinated(self) -> bool:
        return self.coordination is not None

    def decide_site(self, view: PoolView, site_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One site's decision (see the module docstring), from that site's features alone."""
        rows = np.array([int(site_index)])
        feat, obs, choice = self.choices(view, rows)
        delta, accept, overflow = feat.row_actions(view, choice, obs, rows)
        return delta[0], accept[0], overflow[0]

    def site_wishes(self, view: PoolView, site_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(replica delta [K], priority [K]) of one site: its replica choices and how they rank in the
        pool's coordination (`wish_priority`), for a live agent's SCALE proposals."""
        rows = np.array([int(site_index)])
        feat = self.featurizer(view)
        obs = feat.build(view, rows)
        choice, margin = self.actor.choose(obs, margins=True)
        delta = feat.row_actions(view, choice, obs, rows)[0]
        return delta[0], wish_priority(view, margin, rows)[0]


class LegacyMarlPolicy(Policy):
    """A format-1 policy file (`marl_v0.npz`: one MLP over services padded to 4), for measuring it
    in the twin next to the current one. Services past the fourth get no decision (that format's cap)."""

    name = "marl"

    def __init__(self, path: str | Path, weights: dict[str, np.ndarray]):
        from agents import features_v0

        self.path = Path(path)
        self.layers = []
        i = 0
        while f"w{i}" in weights:
            self.layers.append((np.asarray(weights[f"w{i}"], np.float32), np.asarray(weights[f"b{i}"], np.float32)))
            i += 1
        self.k = int(weights["neighbours"])
        self.nvec = np.asarray(weights["nvec"], np.int64)
        if self.layers[0][0].shape[0] != features_v0.obs_size(self.k) or \
                not np.array_equal(self.nvec, features_v0.nvec(self.k)):
            raise ValueError(f"{path}: a format-1 policy of other sizes than format 1's")
        self.offsets = np.concatenate([[0], np.cumsum(self.nvec)])
        self._v0 = features_v0
        self._feat = None
        self._key = None

    def act(self, view: PoolView) -> Actions:
        key = (id(view.latency_s), view.latency_s.shape)
        if self._feat is None or self._key != key:
            self._feat, self._key = self._v0.Featurizer(view.latency_s, self.k), key
        obs, mask, _ = self._feat.build(view)
        z = obs
        for i, (w, b) in enumerate(self.layers):
            z = z @ w + b
            if i < len(self.layers) - 1:
                z = np.tanh(z)
        z = np.where(mask > 0, z, -np.inf)
        choice = np.stack([z[:, self.offsets[h]:self.offsets[h + 1]].argmax(axis=1) for h in range(len(self.nvec))], 1)
        return self._feat.to_actions(view, choice)

    def decide_site(self, view: PoolView, site_index: int):
        a = self.act(view)
        return a.replica_delta[site_index], a.accept[site_index], a.overflow[site_index]


def shared_actor(path: Path) -> NumpyActor:
    """The actor of a policy file, read once per process: every site agent of an agent process runs
    the same file. Keyed by the file's path, size and modification time (a file replaced is read
    again); the actor holds only its weights, so sharing it is safe."""
    st = path.stat()
    return _actor(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _actor(path: str, size: int, mtime_ns: int) -> NumpyActor:
    return NumpyActor.load(path)


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a policy file (`.npz`). A training checkpoint (`.pt`) is not one: the runtime
    has no torch; `agents.catalog.make_policy("marl:PATH.pt")` measures one with the training stack."""
    path = Path(path)
    if path.suffix == ".pt":
        raise ValueError(f"{path} is a training checkpoint; the runtime reads a policy .npz (training writes "
                         "policy.npz next to it)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_policy(path: str | Path | None = None, weights: dict[str, np.ndarray] | None = None) -> Policy:
    """`MarlPolicy` of a policy file (default: the shipped one), or `LegacyMarlPolicy` of a format-1
    file; `weights`: the file's arrays when already read (a training checkpoint's, `agents.checkpoint`)."""
    if path is None:
        return MarlPolicy()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no MARL policy at {path}")
    if weights is None:
        weights = load_weights(path)
    meta = json.loads(str(weights["meta"])) if "meta" in weights else {}
    if meta.get("format", 1) == 1:
        return LegacyMarlPolicy(path, weights)
    return MarlPolicy(path, weights)


def weights_of(layers: dict[str, list[tuple[np.ndarray, np.ndarray]]], k: int,
               meta: dict | None = None) -> dict[str, np.ndarray]:
    """The arrays of a policy file (format 2) of actor layers ({"site"|"svc"|"off": [(w [in, out], b [out]), …]})."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, ls in layers.items():
        for i, (w, b) in enumerate(ls):
            arrays[f"{prefix}{i}_w"] = np.asarray(w, np.float32)
            arrays[f"{prefix}{i}_b"] = np.asarray(b, np.float32)
    info = {"format": FORMAT_VERSION, "f_site": f_site(k), "f_svc": f_svc(k), "f_offer": F_OFFER,
            "max_offers": MAX_OFFERS, **(meta or {})}
    return {"neighbours": np.int64(k), "meta": np.array(json.dumps(info)), **arrays}


def export_npz(path: str | Path, layers: dict[str, list[tuple[np.ndarray, np.ndarray]]], k: int,
               meta: dict | None = None) -> Path:
    """Write actor weights ({"site"|"svc"|"off": [(w [in, out], b [out]), …]}) in the runtime's format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **weights_of(layers, k, meta))
    return path



def pool_of(view: PoolView) -> Pool:
    """The pool-wide figures of `view`'s services that coordination needs (a view's rows add up to
    the pool: a live view has a "rest of the pool" row)."""
    reps = view.replicas.astype(float)
    return Pool(view.demand_rps.sum(axis=0), view.capacity_rps.sum(axis=0), reps.sum(axis=0),
                (view.replicas - view.ready).sum(axis=0), np.array([s.min_replicas for s in view.services], float))


def per_replica(view: PoolView) -> np.ndarray:
    """[S, K] capacity (requests/s) of one of each site's replicas of each service (0 where none)."""
    reps = view.replicas.astype(float)
    return np.where(reps > 0, view.capacity_rps / np.maximum(reps, 1), 0.0)


def wish_priority(view: PoolView, margin: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """[n, K] the order in which the coordination grants the wishes of the sites `rows` (default:
    all): the policy's confidence (the chosen replica logit less "keep"'s) less the site's latency
    to where the service's demand is least covered, in 20 ms units (the greedy rule's "nearest to
    the demand" as the tie-break of equally sure sites)."""
    lat = view.pool_stats().focus_latency_s
    if lat is None:
        return np.asarray(margin, float)
    lat = np.asarray(lat, float) if rows is None else np.asarray(lat, float)[np.asarray(rows)]
    return np.asarray(margin, float) - np.minimum(lat, 1.0) / 0.02


@dataclass(frozen=True)
class Coordination:
    """`cncbrain.coordination.admit` over every site of a view, with its options (the defaults are
    what the shipped policy and the live scheduler use; the others are for measuring variants:
    benchmarks/marl_coordination_variants.py)."""

    priority: str = "both"
    """Order of the wishes: "both" (`wish_priority`), "margin" (the policy's confidence alone),
    "latency" (nearest to the service's demand first)."""
    target_util: float = TARGET_UTIL
    max_removals: int | None = None
    remove_margin: float | None = None
    hold: bool = True
    free_uncovered: bool = False

    def apply(self, view: PoolView, delta: np.ndarray, margin: np.ndarray) -> np.ndarray:
        """The granted part of the sites' replica deltas `delta` [S, K]; `margin` [S, K]: how much
        more likely each site's replica choice was than "keep"."""
        priority = wish_priority(view, 0.0 * margin if self.priority == "latency" else margin) \
            if self.priority != "margin" else margin
        return admit(delta, priority, view.capacity_per_replica(), per_replica(view), pool_of(view),
                     target_util=self.target_util, max_removals=self.max_removals, remove_margin=self.remove_margin,
                     hold=self.hold, free_uncovered=self.free_uncovered)


def coordinated_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy of the policy file `src` (format 2) whose sites' replica choices go through the pool's
    coordination (`meta["coordination"]`; the weights unchanged): how `marl_v3.npz` was made of
    `marl_v2.npz`."""
    weights = load_weights(src)
    meta = json.loads(str(weights["meta"])) if "meta" in weights else {}
    if meta.get("format", 1) != FORMAT_VERSION:
        raise ValueError(f"{src}: a format-{meta.get('format', 1)} policy; coordination needs format {FORMAT_VERSION}")
    meta.update(coordination="pool", weights_of=Path(src).name)
    dst = Path(dst)
    np.savez_compressed(dst, **{**weights, "meta": np.array(json.dumps(meta))})
    return dst
