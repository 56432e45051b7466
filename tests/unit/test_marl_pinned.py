"""The learned policy's decisions, pinned: `marl_v1.npz` on a fixed pool and seed must choose what
it chose when `tests/unit/data/marl_v1_pinned.npz` was recorded (replica, bid and overflow choices
exactly; logits to 1e-5), in the twin (`act`, `decide_site`) and on the live path (a site's own
view, an offer round of every site). The featurizer and the numpy forward pass may be rewritten
for speed; these decisions may not change.

The fixture is recorded from the code at a known-good commit with
`python -m tests.unit.test_marl_pinned` (only when the observation or the policy file is meant to
change: say so in the commit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

POLICY = Path(__file__).resolve().parents[2] / "agents" / "policies" / "marl_v1.npz"
FIXTURE = Path(__file__).resolve().parent / "data" / "marl_v1_pinned.npz"
SCENARIO = "family:alibaba:2"  # 61 sites, 4 services, 5 GPU types, training offers, 3 failures
TICKS = (0, 1, 2, 5, 12, 33, 36, 45, 64, 66, 80, 97, 119)  # failures at ticks 33–52, 64–83, 79–118
LIVE_SITES = 12


def twin_record() -> dict[str, np.ndarray]:
    """Per recorded tick: the pool's logits and choices (`act`) and each site's `decide_site`."""
    from agents.runtime import MarlPolicy
    from cncbrain.scenario import load_scenario
    from cncbrain.twin.sim import Twin

    p = MarlPolicy(POLICY)
    twin = Twin(load_scenario(SCENARIO), seed=0)
    out: dict[str, np.ndarray] = {}
    tick = 0
    while not twin.done():
        view = twin.view()
        actions = p.act(view)
        if tick in TICKS:
            obs = p.featurizer(view).build(view)
            h = p.actor.encode(obs.site)
            out[f"t{tick}_svc_logits"] = p.actor.service_logits(h, obs.svc)
            out[f"t{tick}_off_logits"] = p.actor.offer_logits(h, obs.offer)
            out[f"t{tick}_delta"] = actions.replica_delta
            out[f"t{tick}_accept"] = actions.accept
            out[f"t{tick}_overflow"] = actions.overflow
            site = [p.decide_site(view, s) for s in range(view.n_sites)]
            out[f"t{tick}_site_delta"] = np.stack([d for d, _, _ in site])
            out[f"t{tick}_site_accept"] = np.stack([a for _, a, _ in site])
            out[f"t{tick}_site_overflow"] = np.stack([o for _, _, o in site])
            out[f"t{tick}_down"] = ~view.site_up
        twin.step(actions)
        tick += 1
    return out


def live_record() -> dict[str, np.ndarray]:
    """Sites of the same pool emulated by the twin (three services and a training job placed, 20
    ticks served, one site failed), perception's snapshot: each of the first `LIVE_SITES` sites'
    own view (its logits and decision) and an offer round of every site (one inference and one
    training offer)."""
    from agents.executor_emulated import EmulatorHost
    from agents.marl_site import MarlSitePolicy
    from agents.site_policies import make_site_policy
    from benchmarks.bench_policy import perceived
    from cnc.common.v1 import common_pb2 as common
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cncbrain.scenario import load_scenario

    host = EmulatorHost(None, load_scenario(SCENARIO))

    def spec(name: str, model: str, params: float, trace: str, rate: float, ingress: str = ""):
        return common.InferenceServiceSpec(name=name, model=model, params_b=params, trace=trace, expected_rate_rps=rate,
                                           slo=common.SloTargets(ttft_ms=800, tpot_ms=80), min_replicas=1,
                                           max_replicas=12, gpus_per_replica=1, ingress_site_id=ingress)

    running = {"svc-chat": spec("chat", "7b", 7, "conv", 6.0), "svc-code": spec("code", "7b", 7, "code", 3.0),
               "svc-big": spec("big", "13b", 13, "conv", 2.0, host.ids[4])}
    for k, (wid, svc) in enumerate(running.items()):
        for s in (k, k + 3, k + 7):
            host.apply(s, spb.PlacementCommitted(placement=common.Placement(
                workload_id=wid, site_id=host.ids[s], kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, replicas=1 + k,
                gpus_per_unit=1, generation=1), inference_service=svc))
    job = common.TrainingJobSpec(name="ft", model="7b", params_b=7, shards=2, gpus_per_shard=2, tokens=1e9)
    for s in (1, 2):
        host.apply(s, spb.PlacementCommitted(placement=common.Placement(
            workload_id="job-ft", site_id=host.ids[s], kind=common.WORKLOAD_KIND_TRAINING_JOB, replicas=1,
            gpus_per_unit=2, generation=1), training_job=job))
    for tick in range(20):
        if tick == 15:
            host.twin.fail_site(5, 600.0)
        host.report = host.twin.step()
    snapshot, telemetry = perceived(host)
    out: dict[str, np.ndarray] = {}
    members = []
    for s, sid in enumerate(host.ids):
        policy = make_site_policy(f"marl:{POLICY}")
        assert isinstance(policy, MarlSitePolicy)
        policy.snapshot = snapshot
        for wid, svc in running.items():
            policy.book.learn(wid, svc)
        policy.book.learn("job-ft", job)
        members.append((policy, host.site(s), telemetry[sid], True))
        if s < LIVE_SITES:
            view, wids = policy.view(host.site(s), telemetry[sid], True)
            obs = policy.runtime.featurizer(view).build(view, [0])
            h = policy.runtime.actor.encode(obs.site)
            out[f"live{s}_svc_logits"] = policy.runtime.actor.service_logits(h, obs.svc)
            out[f"live{s}_wids"] = np.array(wids)
            out[f"live{s}_delta"] = policy.decide(view)[0]
    inference = spb.Offer(offer_id="o1", workload_id="svc-new", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE,
                          units=1, gpus_per_unit=1)
    inference.inference_service.CopyFrom(spec("new", "7b", 7, "code", 30.0, host.ids[8]))
    training = spb.Offer(offer_id="o2", workload_id="job-new", kind=common.WORKLOAD_KIND_TRAINING_JOB,
                         units=2, gpus_per_unit=2)
    members[0][0].book.learn("svc-new", inference.inference_service)
    answers = MarlSitePolicy.answer_sites(members, [inference, training])
    out["round_units"] = np.array([[a[0] for a in site] for site in answers])
    out["round_cost"] = np.array([[a[2] for a in site] for site in answers])
    out["round_reason"] = np.array([[a[3].split(":")[0] for a in site] for site in answers])
    return out


def record() -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, **twin_record(), **live_record())
    print(f"wrote {FIXTURE}")


@pytest.fixture(scope="module")
def pinned():
    if not POLICY.exists():
        pytest.fail(f"{POLICY} is gone: the pinned decisions are those of that file")
    with np.load(FIXTURE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _compare(got: dict[str, np.ndarray], pinned: dict[str, np.ndarray], prefix: str) -> None:
    want = {k: v for k, v in pinned.items() if k.startswith(prefix)}
    got = {k: v for k, v in got.items() if k.startswith(prefix)}
    assert want and sorted(got) == sorted(want)
    for key, value in want.items():
        if "logits" in key or "cost" in key:
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_the_twin_decisions_are_the_pinned_ones(pinned):
    got = twin_record()
    _compare(got, pinned, "t")
    assert any(got[f"t{t}_down"].any() for t in TICKS)  # failures are among the recorded ticks
    assert any(got[f"t{t}_accept"].any() for t in TICKS)  # and bids for training offers
    assert all((got[f"t{t}_delta"] != 0).any() for t in TICKS[:3])


def test_the_live_decisions_are_the_pinned_ones(pinned):
    got = live_record()
    _compare(got, pinned, "live")
    _compare(got, pinned, "round")


if __name__ == "__main__":
    record()
