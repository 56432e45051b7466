"""A tiny MAPPO run end to end: warm start, a few updates, outputs, save/load, resume, the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agents.catalog import make_policy  # noqa: E402
from agents.mappo import Trainer, train  # noqa: E402
from agents.runtime import MarlPolicy  # noqa: E402
from agents.train_args import Args  # noqa: E402
from cncbrain.cli import main  # noqa: E402
from cncbrain.scenario import load_scenario  # noqa: E402
from cncbrain.twin.sim import Twin  # noqa: E402

pytestmark = pytest.mark.smoke

TINY = dict(num_envs=2, rollout_ticks=20, duration_s=600, bc_rounds=1, bc_episodes=1, bc_epochs=2,
            val_seeds="5000", eval_every=2)


def test_tiny_run_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = train(Args(total_steps=120, out=str(out), **TINY))
    assert first["global_step"] == 120 and first["updates"] == 3
    for name in ("checkpoint.pt", "policy.npz", "policy_last.npz", "metrics.csv", "learning_curve.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["phase"] for r in rows].count("warm") == 1
    assert [r["phase"] for r in rows].count("mappo") == 3
    assert all(np.isfinite(float(r["losses/value"])) for r in rows if r["phase"] == "mappo")

    # save/load: a checkpoint restores the exact actor
    t = Trainer(Args(out=str(out), **TINY))
    t.load(out / "checkpoint.pt")
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    for k, v in t.actor.state_dict().items():
        assert torch.equal(v, ck["actor"][k])
    assert t.global_step == 120 and t.warm_done

    # resume: continues from step 120 without redoing the warm start
    again = train(Args(total_steps=200, out=str(out), resume=str(out / "checkpoint.pt"), **TINY))
    assert again["global_step"] == 200 and again["updates"] == 5
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["phase"] for r in rows].count("warm") == 1
    assert [r["phase"] for r in rows].count("mappo") == 5

    # the exported policy (and the checkpoint itself) play the twin
    for path in (out / "policy.npz", out / "checkpoint.pt"):
        p = make_policy(f"marl:{path}")
        assert isinstance(p, MarlPolicy)
        twin = Twin(load_scenario("abilene"), seed=0, duration_s=300)
        p.reset(0)
        while not twin.done():
            twin.step(p.act(twin.view()))
        assert 0 < twin.metrics()["score"] <= 1


def test_train_command_on_two_scenarios(tmp_path):
    out = tmp_path / "cli"
    rc = main(["train", "--scenarios", "abilene,geant", "--total-steps", "40", "--duration-s", "360", "--num-envs", "2",
               "--bc-rounds", "1", "--bc-episodes", "1", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[-1]["global_step"] == "40" or int(rows[-1]["global_step"]) >= 40
    assert (out / "policy.npz").exists()
