"""A training checkpoint (`checkpoint.pt`, written by `agents.mappo`) read as the runtime's
weights, so it can be measured in the twin like an exported policy (`--policy marl:PATH.pt`).

The training stack (torch) is needed here and only here when a checkpoint is measured; the live
runtime (`agents.runtime`) reads only the exported `.npz`. Below the trainer, which exports its
actor with the same `actor_layers`, so a checkpoint and its export give the same weights.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from agents.runtime import weights_of

ACTOR_PARTS = ("site", "svc", "off")
"""The actor's sub-networks: each an `nn.ModuleList` of `nn.Linear` under this name."""


def actor_layers(state: Mapping[str, torch.Tensor]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The actor's linear layers of its `state_dict` (`site.0.weight` [out, in], `site.0.bias`, …) in
    the runtime's row-vector convention: {"site"|"svc"|"off": [(w [in, out], b [out]), …]}."""
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for part in ACTOR_PARTS:
        layers, i = [], 0
        while f"{part}.{i}.weight" in state:
            w, b = state[f"{part}.{i}.weight"], state[f"{part}.{i}.bias"]
            layers.append((w.detach().cpu().numpy().T.copy(), b.detach().cpu().numpy().copy()))
            i += 1
        out[part] = layers
    return out


def load_checkpoint_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint's actor as the runtime's weights (what `export_npz` would write for it)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        k, state = int(ck["args"]["neighbours"]), ck["actor"]
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a training checkpoint of agents.mappo ({exc})") from None
    return weights_of(actor_layers(state), k, {"from": str(path)})
