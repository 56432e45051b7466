"""The numpy runtime of the learned policy: same decisions as the torch actor, no torch needed, one
site's decision equals that site's row of the pool's decision, any number of services (speed:
benchmarks/bench_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agents.catalog import make_policy
from agents.features import N_REP, Featurizer, ServiceColumn
from agents.runtime import (
    SHIPPED,
    LegacyMarlPolicy,
    MarlPolicy,
    NumpyActor,
    export_npz,
    load_policy,
    shipped_policy_path,
)
from cncbrain.scenario import load_scenario
from cncbrain.twin.scenario import parse_scenario
from cncbrain.twin.sim import Twin

SIX = ["chat", "code", "assistant", "reason", "edge", "batch"]


def six_services():
    """att with six services (1.3B … 70B, bf16 and fp8, both traces)."""
    sc = load_scenario("att").model_dump()
    models = [("13b", "conv", "bf16"), ("7b", "code", "bf16"), ("70b", "conv", "bf16"), ("34b", "conv", "fp8"),
              ("1.3b", "code", "bf16"), ("7b", "conv", "fp8")]
    sc["inference"] = [{"name": n, "model": m, "trace": t, "precision": p, "rate_scale": 3.0, "ingress": "uniform",
                        "slo": {"ttft_s": 2.0, "tpot_s": 0.15}, "min_replicas": 1, "max_replicas": 32}
                       for n, (m, t, p) in zip(SIX, models, strict=True)]
    return parse_scenario(sc)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from agents.mappo import Actor

    torch.manual_seed(0)
    actor = Actor(3, 64)
    with torch.no_grad():  # non-trivial output layers (the trainer's init makes them nearly zero)
        actor.svc[-1].weight.normal_(0, 0.5)
        actor.off[-1].weight.normal_(0, 0.5)
    path = export_npz(tmp_path_factory.mktemp("pol") / "p.npz", actor.numpy_layers(), 3, {"test": True})
    return actor, path


def test_numpy_forward_matches_torch(exported):
    import torch

    from agents.mappo import Batch, split_choice

    actor, path = exported
    na = NumpyActor.load(path)
    for scenario in (load_scenario("geant"), six_services()):
        twin = Twin(scenario, seed=3)
        for _ in range(3):
            obs = Featurizer(twin.latency, 3).build(twin.view())
            b = Batch.of(Batch.pad([obs], obs.K), "cpu")
            with torch.no_grad():
                rep, ov, off = actor.logits(b)
                greedy, _, _ = actor.evaluate(b, greedy=True)
            h = na.encode(obs.site)
            zs = na.service_logits(h, obs.svc)
            np.testing.assert_allclose(np.where(obs.m_rep > 0, zs[..., :N_REP], -1e9), rep.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.where(obs.m_ov > 0, zs[..., N_REP:], -1e9), ov.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.where(obs.m_off > 0, na.offer_logits(h, obs.offer), -1e9), off.numpy(),
                                       rtol=1e-4, atol=1e-4)
            c, t = na.choose(obs), split_choice(greedy.numpy(), obs.K)
            assert (c.rep == t.rep).all() and (c.off == t.off).all() and (c.ov == t.ov).all()
            twin.step(MarlPolicy(path).act(twin.view()))
    assert na.meta["test"] is True and na.meta["format"] == 2


def test_a_training_checkpoint_is_measured_as_its_export(exported, tmp_path):
    """`marl:PATH.pt` reads the checkpoint's actor with the training stack: the same weights as its
    export; the torch-free runtime refuses a checkpoint by name instead of importing torch."""
    import torch

    actor, path = exported
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"args": {"neighbours": 3, "hidden": 64}, "actor": actor.state_dict()}, ckpt)
    p = make_policy(f"marl:{ckpt}")
    assert isinstance(p, MarlPolicy)
    ref = NumpyActor.load(path)
    for part in ("site", "svc", "off"):
        for (w, b), (w2, b2) in zip(getattr(p.actor, part), getattr(ref, part), strict=True):
            assert np.array_equal(w, w2) and np.array_equal(b, b2)
    with pytest.raises(ValueError, match="is a training checkpoint; the runtime reads a policy .npz"):
        MarlPolicy(ckpt)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        make_policy(f"marl:{tmp_path / 'bad.pt'}")


def test_an_unknown_policy_is_one_line_naming_the_known():
    from cncbrain.errors import UsageError

    with pytest.raises(UsageError) as err:
        make_policy("marl2")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown policy 'marl2'; known: random")
    assert all(n in msg for n in ("greedy", "marl", "oracle", "teacher:pack"))
    with pytest.raises(UsageError, match="policy 'marl:/nowhere/p.npz': no MARL policy at /nowhere/p.npz"):
        make_policy("marl:/nowhere/p.npz")


def test_decide_site_is_the_sites_row_of_act(exported):
    _, path = exported
    p = MarlPolicy(path)
    twin = Twin(load_scenario("abilene"), seed=5)
    p.reset(5)
    for _ in range(6):
        view = twin.view()
        full = p.act(view)
        for s in range(view.n_sites):
            d, acc, ov = p.decide_site(view, s)
            assert (d == full.replica_delta[s]).all()
            assert (acc == full.accept[s]).all()
            assert (ov == full.overflow[s]).all()
            assert (d >= -1).all()
        twin.step(full)


def test_a_pool_with_six_services_gets_a_decision_for_every_service(exported):
    """No cap on services: a six-service pool gets a replica decision for each of the six, at
    every site — and the choice for a service does not depend on where it sits in the list
    (one sub-network for every (site, service) pair). The shipped policy's sites want to scale each
    of the six (the first policy format never touched a fifth or sixth service; what the pool's
    coordination grants of those wishes is test_coordination's)."""
    _, path = exported
    p = make_policy("marl")
    twin = Twin(six_services(), seed=1)
    view = twin.view()
    assert [s.name for s in view.services] == SIX
    acted = set()
    for _ in range(40):
        view = twin.view()
        a = p.act(view)
        assert a.replica_delta.shape == (view.n_sites, 6) and a.overflow.shape == (view.n_sites, 6)
        wished = p.choices(view)[2].rep
        acted |= {j for j in range(6) if (wished[:, j] != 1).any()}
        d, _, ov = p.decide_site(view, 3)
        assert d.shape == (6,) and ov.shape == (6,)
        twin.step(a)
    assert acted == set(range(6)), f"services never changed: {set(range(6)) - acted}"
    p = MarlPolicy(path)
    # reversed service order: the same choices, reversed
    feat = p.featurizer(view)
    obs = feat.build(view)
    order = np.arange(6)[::-1]
    perm = feat.build(view)
    perm.svc, perm.m_rep, perm.m_ov = obs.svc[:, order], obs.m_rep[:, order], obs.m_ov[:, order]
    a, b = p.actor.choose(obs), p.actor.choose(perm)
    assert (a.rep[:, order] == b.rep).all() and (a.ov[:, order] == b.ov).all() and (a.off == b.off).all()
    # and each service alone gives its column
    for j in range(6):
        assert (p.actor.choose_replicas(obs, j) == a.rep[:, j]).all()


def test_adding_one_service_to_built_features_equals_building_them_all():
    """`Featurizer.with_service` (a live agent adds an offered service, not placed yet, to the
    observation it keeps) gives exactly `build`'s observation and masks of the view that has that
    service last."""
    import dataclasses

    twin = Twin(six_services(), seed=2)
    rng = np.random.default_rng(1)
    for t in range(12):
        view = twin.view()
        feat = Featurizer(view.latency_s, 3)
        j = view.n_services - 1
        cut = lambda x, j=j: x[:, :j]  # noqa: E731
        # (the focus figures worked out from the view's own rows, as for the offered service)
        pool = dataclasses.replace(view.pool, service_replicas_max=view.pool.service_replicas_max[:j],
                                   service_sites=view.pool.service_sites[:j], service_uncovered_max=None,
                                   focus_latency_s=None, focus_nearest=None)
        base = dataclasses.replace(
            view, services=view.services[:j], ready=cut(view.ready), replicas=cut(view.replicas),
            capacity_rps=cut(view.capacity_rps), demand_rps=cut(view.demand_rps), load=cut(view.load),
            slo_recent=view.slo_recent[:j], overflow=cut(view.overflow), pool=pool)
        # the offered service: no replicas anywhere, its demand where it will enter
        zero = np.zeros(view.n_sites)
        col = ServiceColumn(view.services[j], zero, zero, view.demand_rps[:, j], zero, zero, 1.0, 0.0, 0.0)
        full = dataclasses.replace(
            base, services=view.services, ready=np.c_[base.ready, zero], replicas=np.c_[base.replicas, zero],
            capacity_rps=np.c_[base.capacity_rps, zero], demand_rps=view.demand_rps, load=np.c_[base.load, zero],
            slo_recent=np.r_[base.slo_recent, 1.0], overflow=view.overflow,
            pool=dataclasses.replace(pool, service_replicas_max=np.r_[pool.service_replicas_max, 0.0],
                                     service_sites=np.r_[pool.service_sites, 0.0]))
        rows = np.sort(rng.choice(view.n_sites, 7, replace=False))
        got = feat.with_service(feat.build(base, rows), base, rows, col)
        want = feat.build(full, rows)
        for name in ("site", "svc", "offer", "m_rep", "m_off", "m_ov", "room"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (t, name)
        twin.step(make_policy("greedy").act(view) if t % 2 else None)


def test_shipped_policy_loads_through_make_policy_and_plays_an_episode():
    assert shipped_policy_path().exists(), f"agents/policies/{SHIPPED} must ship with the package"
    p = make_policy("marl")
    assert isinstance(p, MarlPolicy)
    twin = Twin(load_scenario("abilene"), seed=0, duration_s=1200)
    p.reset(0)
    while not twin.done():
        twin.step(p.act(twin.view()))
    m = twin.metrics()
    assert 0.0 < m["score"] <= 1.0


def test_the_first_policy_format_still_plays_in_the_twin():
    """`marl:agents/policies/marl_v0.npz` (format 1: services padded to 4) is measured as before."""
    old = Path(shipped_policy_path()).parent / "marl_v0.npz"
    p = make_policy(f"marl:{old}")
    assert isinstance(p, LegacyMarlPolicy)
    twin = Twin(load_scenario("abilene"), seed=0, duration_s=600)
    while not twin.done():
        twin.step(p.act(twin.view()))
    assert 0.0 < twin.metrics()["score"] <= 1.0
    with pytest.raises(ValueError, match="format 1, this runtime reads format 2"):
        NumpyActor.load(old)


def test_runtime_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from agents.runtime import MarlPolicy\n"
            "from cncbrain.scenario import load_scenario\nfrom cncbrain.twin.sim import Twin\n"
            "p = MarlPolicy(); t = Twin(load_scenario('abilene'), seed=0); print(p.decide_site(t.view(), 0))\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_agents_process_loads_numpy_with_one_blas_thread():
    """`cncbrain agent` sets OPENBLAS_NUM_THREADS=1 before anything loads numpy (OpenBLAS reads it
    then, once), unless the operator set it."""
    code = ("import os, sys\n"
            "class Watch:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'numpy' and 'seen' not in os.environ:\n"
            "            os.environ['seen'] = os.environ.get('OPENBLAS_NUM_THREADS', 'unset')\n"
            "sys.meta_path.insert(0, Watch())\n"
            "from cncbrain.cli import build_parser\n"
            "build_parser('agent')\n"
            "import agents.marl_site\n"
            "print(os.environ['seen'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["1"], res.stderr
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "OPENBLAS_NUM_THREADS": "2"})
    assert res.returncode == 0 and res.stdout.split() == ["2"], res.stderr


@pytest.mark.parametrize("scenario", ["abilene", "geant"])
def test_single_site_features_equal_the_pool_row(scenario):
    from agents.cnc_pool_v0 import CncPoolEnv
    from agents.features import Choice

    env = CncPoolEnv(scenario=scenario, duration_s=1800 if scenario == "abilene" else 600)
    env.reset_arrays(7)
    rng = np.random.default_rng(0)
    done = False
    while not done:
        view, feat = env._view, env.featurizer
        obs = feat.build(view)
        for s in range(view.n_sites):
            one = feat.build(view, [s])
            for name in ("site", "svc", "offer", "m_rep", "m_off", "m_ov", "room"):
                assert np.array_equal(getattr(one, name)[0], getattr(obs, name)[s]), (s, name)
        choice = Choice.unflat(rng.integers(0, env.nvec, size=(view.n_sites, len(env.nvec))), env.K)
        full = feat.to_actions(view, choice, obs)
        for s in range(view.n_sites):
            one = feat.build(view, [s])
            a = feat.to_actions(view, Choice(choice.rep[[s]], choice.off[[s]], choice.ov[[s]]), one, [s])
            assert (a.replica_delta[s] == full.replica_delta[s]).all() and (a.accept[s] == full.accept[s]).all()
            assert (a.overflow[s] == full.overflow[s]).all()
        *_, done = env.step_arrays(choice)


def test_a_policy_of_other_sizes_is_refused_by_name(tmp_path):
    w = {"site": [(np.zeros((5, 8), np.float32), np.zeros(8, np.float32))],
         "svc": [(np.zeros((8 + 27, 8), np.float32), np.zeros(8, np.float32)), (np.zeros((8, 7), np.float32), np.zeros(7))],
         "off": [(np.zeros((8 + 8, 2), np.float32), np.zeros(2))]}
    path = export_npz(tmp_path / "other.npz", w, 3, {})
    with pytest.raises(ValueError, match="policy expects inputs"):
        NumpyActor.load(path)
    with pytest.raises(FileNotFoundError, match="no MARL policy"):
        load_policy(tmp_path / "missing.npz")


def test_a_policy_file_is_read_once_per_process_and_again_when_replaced(tmp_path):
    """Every site agent of a process runs the same file: one actor for all of them; a file written
    anew (other size or time) is read again, not served from the cache."""
    import os
    import shutil

    path = tmp_path / "policy.npz"
    shutil.copy(shipped_policy_path(), path)
    first, second = MarlPolicy(path), MarlPolicy(path)
    assert first.actor is second.actor
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert MarlPolicy(path).actor is not first.actor
