"""Warm-start plumbing that a training run relies on: the teacher table (built-ins by name,
columns added to an existing table) and the logit adjustment of a class-weighted imitation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agents.cnc_pool_v0 import CncPoolEnv  # noqa: E402
from agents.mappo import Batch, Trainer, split_choice  # noqa: E402
from agents.train_args import Args  # noqa: E402
from benchmarks.marl_teachers_by_pool import merge  # noqa: E402
from cncbrain.scenario import load_scenario  # noqa: E402


def _row(name, seeds=None, **scores):
    r = {"scenario": name, "scores": {p: {"score": v} for p, v in scores.items()}}
    if seeds:
        r["seeds"] = seeds
    return r


def test_merge_adds_columns_and_rows_and_refuses_other_seeds():
    old = [_row("family:zoo:1000", kpa=0.6, greedy=0.7)]
    rows = {r["scenario"]: r for r in merge(old, [_row("family:zoo:1000", **{"ray-serve": 0.8}),
                                                  _row("att", [9000], kpa=0.5)])}
    assert set(rows["family:zoo:1000"]["scores"]) == {"kpa", "greedy", "ray-serve"}
    assert rows["family:zoo:1000"]["best"] == "ray-serve" and rows["att"]["best"] == "kpa"
    assert set(old[0]["scores"]) == {"kpa", "greedy"}  # the old table is not changed in place
    with pytest.raises(SystemExit, match="seeds"):
        merge([_row("att", [9000], kpa=0.5)], [_row("att", [0], greedy=0.9)])


def test_teacher_table_labels_a_built_in_by_its_name(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"scenarios": [_row("abilene", [9000], kpa=0.6, **{"teacher:pack": 0.7})]}))
    t = Trainer(Args(scenarios="abilene", teacher="kpa,pack", teacher_table=str(table), duration_s=300))
    sc = load_scenario("abilene")
    assert t.pick_teacher(sc, ["kpa", "pack"]) == "pack"  # read from the table: nothing played
    table.write_text(json.dumps({"scenarios": [_row("abilene", [9000], kpa=0.8, **{"teacher:pack": 0.7})]}))
    assert t.pick_teacher(sc, ["kpa", "pack"]) == "pack"  # cached per scenario
    assert Trainer(Args(scenarios="abilene", teacher="kpa,pack", teacher_table=str(table),
                        duration_s=300)).pick_teacher(sc, ["kpa", "pack"]) == "kpa"


def test_logit_adjustment_takes_the_class_weights_out_of_the_greedy_choice():
    t = Trainer(Args(scenarios="abilene", duration_s=300))
    env = CncPoolEnv(scenario=load_scenario("abilene"), duration_s=300)
    obs, _ = env.reset_arrays(0)
    batch = t._batch(Batch.pad([obs], obs.K))
    last = t.actor.svc[-1]
    with torch.no_grad():  # every row's replica logits = the bias: "add" ahead of "keep" by log 10
        last.weight.zero_()
        last.bias.zero_()
        last.bias[2] = math.log(10.0)

    def choices():
        a, _, _ = t.actor.evaluate(batch, greedy=True)
        return split_choice(a.numpy(), obs.K).rep

    add_ok = batch.m_rep[..., 2].numpy() > 0
    assert add_ok.any() and (choices()[add_ok] == 2).all()
    # trained with "add" weighted 20× over "keep": p(add) is 10/20 of p(keep) — keep is the likelier
    w = [torch.tensor([1.0, 1.0, 20.0, 1.0]), torch.ones(2), torch.ones(4)]
    t.actor.adjust_for_class_weights(w)
    assert (choices() == 1).all()
    assert np.isclose(last.bias[2].item(), math.log(10.0) - math.log(20.0))
