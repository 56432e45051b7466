"""`cncbrain plan --local`: the adaptation service's planner (`plan_on`) without a brain."""

import json
import subprocess
import sys


def cnc(*args):
    return subprocess.run([sys.executable, "-m", "cncbrain.cli", *args], capture_output=True, text=True, timeout=120)


def test_local_plan_plans_each_gpu_group():
    r = cnc("plan", "--model", "70b", "--inference", "--gpus", "s1:L40S:8", "s2:H100:8", "--top", "50",
            "--local", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(p["site_id"] for p in out["inference"]) == ["s1", "s2"]  # one replica plan per group
    assert out["cost_model"].startswith("cncbrain.twin.costmodel")


def test_local_plan_bad_gpus_names_the_flag():
    r = cnc("plan", "--model", "7b", "--gpus", "s1:H100", "--local")
    assert r.returncode != 0 and "--gpus: expected SITE:TYPE:COUNT" in r.stderr
