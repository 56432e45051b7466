"""The twin's behaviour: determinism, serving, training in the pool, failures."""

import numpy as np
import pytest

from agents.catalog import make_policy
from cncbrain.scenario import load_scenario
from cncbrain.twin.scenario import parse_scenario
from cncbrain.twin.sim import Twin
from cncbrain.twin.traces import JobSpec, load_azure, replay
from cncbrain.twin.view import Actions


def _run(policy="greedy", seed=3, hours=0.25, scenario="abilene"):
    tw = Twin(load_scenario(scenario), seed=seed, duration_s=hours * 3600)
    p = make_policy(policy)
    p.reset(seed)
    while not tw.done():
        tw.step(p.act(tw.view()))
    return tw


def test_deterministic_for_a_seed():
    a, b = _run(seed=5).metrics(), _run(seed=5).metrics()
    assert a == pytest.approx(b, nan_ok=True)
    c = _run(seed=6).metrics()
    assert c != pytest.approx(a, nan_ok=True)


def test_metrics_are_in_range_and_score_follows_its_formula():
    tw = _run(hours=0.5)
    m = tw.metrics()
    for k in ("slo_attainment", "training_goodput", "gpu_utilization"):
        assert 0.0 <= m[k] <= 1.0
    cost_all = float((tw.total * tw.price[None, :]).sum() * tw.time_s / 3600)
    expect = 0.5 * m["slo_attainment"] + 0.4 * m["training_goodput"] + 0.1 * (1 - m["cost_usd"] / cost_all)
    assert m["score"] == pytest.approx(expect)
    assert tw.n_requests > 1000  # half an hour of both traces at their rate scales


def test_trace_replay_scales_rate_and_tiles():
    base = load_azure("conv")
    rng = np.random.default_rng(0)
    doubled = replay("conv", base.length_s, 2.0, rng)
    assert len(doubled) == pytest.approx(2 * len(base), rel=0.01)
    half = replay("conv", base.length_s, 0.5, rng)
    assert len(half) == pytest.approx(0.5 * len(base), rel=0.05)
    two_hours = replay("code", 2 * base.length_s, 1.0, rng)
    assert two_hours.t.max() > 1.9 * base.length_s and np.all(np.diff(two_hours.t) >= 0)


def _quiet_scenario(failures=()):
    data = {
        "name": "quiet",
        "duration_s": 3600,
        "tick_s": 30,
        "topology": {"graphml": "Abilene.graphml", "default_bandwidth_gbps": 10},
        "sites": {"default": {"A100-80GB": 16}},
        "inference": [],
        "training": {"trace": "none"},
        "failures": list(failures),
    }
    return parse_scenario(data, "quiet")


def _job(job_id="j", runtime=1800.0, ckpt=300.0):
    from cncbrain.twin import costmodel

    m = costmodel.model("7b")
    rate = costmodel.shard_tokens_per_s(m, costmodel.gpu("A100-80GB"), 2) * 4
    return JobSpec(job_id, 0.0, "7b", 4, 2, rate * runtime, 2**20, runtime, ckpt)


def test_a_job_spread_over_a_slow_wan_runs_slower_than_inside_one_site():
    tw = Twin(_quiet_scenario())
    tw.submit_job(_job("local"))
    tw.submit_job(_job("spread"))
    tw.step()  # jobs arrive → pending
    ny, la, sea = (tw.site_index[n] for n in ("New York", "Los Angeles", "Seattle"))
    assert tw.place_job("local", [ny] * 4)
    assert tw.place_job("spread", [ny, la, sea, la])
    local, spread = (tw.jobs[tw.job_index[j]] for j in ("local", "spread"))
    assert spread.rate < 0.8 * local.rate
    assert spread.wan_bytes_per_s > 0 and local.wan_bytes_per_s == 0


def test_gang_placement_is_all_or_nothing():
    tw = Twin(_quiet_scenario())
    tw.submit_job(_job("big"))
    tw.step()
    ny = tw.site_index["New York"]
    free_before = tw.free_gpus().copy()
    # 16 GPUs at a site hold 8 shards of 2; 4 shards fit, but not on an index that does not exist
    assert not tw.place_job("big", [ny, ny, ny])  # wrong shard count
    assert np.array_equal(tw.free_gpus(), free_before)
    tw.total[:] = 0
    tw.total[ny] = 6  # room for 3 shards only
    assert not tw.place_job("big", [ny] * 4)
    assert tw.jobs[0].state == "pending"


def test_failure_drops_replicas_and_rolls_training_back_to_its_checkpoint():
    sc = _quiet_scenario([{"site": "Chicago", "at_s": 900, "duration_s": 600}])
    tw = Twin(sc)
    chi = tw.site_index["Chicago"]
    tw.submit_job(_job("j", runtime=3000, ckpt=600))
    tw.step()
    assert tw.place_job("j", [chi] * 4)
    while tw.time_s < 870:
        tw.step()
    job = tw.jobs[0]
    tw.step()  # runs 870–900 s; the failure fires at the 900 s boundary, before the next view
    progress_before = job.progress + job.lost
    assert job.state == "pending"
    assert job.progress == pytest.approx(job.checkpoint) and job.progress < progress_before
    assert job.lost == pytest.approx(progress_before - job.checkpoint) and job.lost > 0
    assert not tw.view().site_up[chi]  # the policy sees the failure in the very next view
    assert tw.free_gpus()[chi].sum() == 0  # a down site offers nothing
    assert not tw.place_job("j", [chi] * 4)
    while tw.time_s < 1500:
        tw.step()
    assert tw.free_gpus()[chi].sum() == 16  # back up


def test_site_failure_removes_its_replicas():
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=2400)
    p = make_policy("greedy")
    p.reset(0)
    chi = tw.site_index["Chicago"]
    while tw.time_s < 1470:
        tw.step(p.act(tw.view()))
    tw.set_replicas("chat", "Chicago", 2)
    assert tw.replicas_by_type()[chi].sum() > 0
    tw.step(p.act(tw.view()))
    assert tw.replicas_by_type()[chi].sum() == 0  # Chicago failed at the 1500 s boundary
    assert not tw.site_up()[chi]


def test_replica_bounds_are_respected_by_arbitration():
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    view = tw.view()
    delta = np.full((view.n_sites, view.n_services), 10)
    tw.step(Actions(delta, None, None))
    counts = tw.replicas_by_type().sum(axis=(0, 2))
    for k, svc in enumerate(tw.services):
        assert counts[k] <= svc.spec.max_replicas
    down = np.full((view.n_sites, view.n_services), -50)
    tw.step(Actions(down, None, None))
    counts = tw.replicas_by_type().sum(axis=(0, 2))
    for k, svc in enumerate(tw.services):
        assert counts[k] >= svc.spec.min_replicas


def test_a_model_that_does_not_fit_one_gpu_uses_tensor_parallelism():
    tw = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    chat = tw.services[tw.service_index["chat"]]  # 13B
    types = {g: int(t) for g, t in zip(tw.gpu_types, chat.tp, strict=True)}
    assert types["H100"] == 1 and types["T4"] >= 2
    used_before = tw.used_gpus().copy()
    kc = tw.site_index["Kansas City"]  # A100-40GB and T4 only
    assert tw.set_replicas("chat", "Kansas City", 1) == 1
    grew = tw.used_gpus()[kc] - used_before[kc]
    assert grew.sum() == chat.tp[np.nonzero(grew)[0][0]] >= 2


def test_overload_is_missed_not_served():
    sc = load_scenario("abilene")
    tw = Twin(sc, seed=0, duration_s=900)
    while not tw.done():
        tw.step()  # no decisions: only the warm-start replicas serve the whole trace
    m = tw.metrics()
    assert m["slo_attainment"] < 0.8
