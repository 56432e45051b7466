"""The offer path of the learned site policy (`MarlSitePolicy.wants`): the view kept between offers
and when it no longer holds, and the offered service's features added without building its view."""

import numpy as np

from agents.features import COVER_MAX
from agents.marl_site import MarlSitePolicy
from agents.site_policies import make_site_policy
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb

from support.line_pool import line_site

SITES = ("ua", "ub", "uc", "ud", "ue")  # a line, 5 ms apart


def site_of(i: int) -> common.Site:
    return line_site(SITES, i)


def spec(name: str, rate: float = 2.0) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, trace="code", expected_rate_rps=rate,
                                       slo=common.SloTargets(ttft_ms=500, tpot_ms=50), min_replicas=2,
                                       max_replicas=8, gpus_per_replica=1, ingress_site_id="uc")


def snapshot(known: str, late: str) -> ppb.Snapshot:
    """`known` runs at ua, uc, ue; `late` at ub and ud (its spec is not known at first)."""
    snap = ppb.Snapshot(sequence=1)
    for i in range(len(SITES)):
        status = ppb.SiteStatus(site=site_of(i), state=common.SITE_STATE_UP)
        status.gpu_pools.add(gpu_type="H100", count=16, used=2 + i, hbm_gb=80)
        wid = known if i % 2 == 0 else late
        status.services.add(workload_id=wid, replicas=2, request_rate_rps=1.0 + 3 * i, utilization=0.2 * i)
        snap.sites.append(status)
    snap.services.add(workload_id=known, replicas=6, request_rate_rps=9.0, requests=100, requests_ok=80)
    snap.services.add(workload_id=late, replicas=4, request_rate_rps=20.0, requests=100, requests_ok=60)
    return snap


def fresh(policy: MarlSitePolicy, mine, wid: str, s: common.InferenceServiceSpec) -> np.ndarray:
    """Whether each of `mine` adds the offered service, decided on its whole view (each site's own
    choice: what the pool's coordination grants of it is the scheduler's)."""
    view, wids = policy.view_of(mine, extra=s, extra_id=wid)
    return policy.runtime.choices(view, np.arange(len(mine)))[2].rep[:, wids.index(wid)] >= 2


def test_a_service_whose_spec_is_learned_after_the_kept_view_enters_it():
    """A service of the snapshot passed over for want of a spec: once its spec is learned the kept
    view no longer holds (it would now be in view), and the offer is decided as on a fresh view."""
    policy = make_site_policy("marl")
    known, late = "svc-u-known", "svc-u-late"
    policy.book.learn(known, spec("known"))
    policy.snapshot = snapshot(known, late)
    mine = [(site_of(i), None, True) for i in range(len(SITES))]
    offered = [(f"svc-u-new{n}", spec(f"new{n}", rate)) for n, rate in enumerate((0.5, 20.0, 200.0))]
    for wid, s in offered:
        policy.book.learn(wid, s)
    got = [policy.wants(mine, wid, s) for wid, s in offered]
    base = policy._base
    assert base.wids == [known] and late in base.unknown
    assert all((g == fresh(policy, mine, wid, s)).all() for g, (wid, s) in zip(got, offered, strict=True))
    policy.wants(mine, *offered[0])
    assert policy._base is base  # nothing changed: kept

    policy.book.learn(late, spec("late", 20.0))
    for wid, s in offered:
        assert (policy.wants(mine, wid, s) == fresh(policy, mine, wid, s)).all()
    assert policy._base is not base and policy._base.wids == [known, late]
    # the offered service's block, added to the kept observation, is the fresh view's observation
    rebuilt, n = policy._base, len(mine)
    for wid, s in offered:
        view, wids = policy.view_of(mine, extra=s, extra_id=wid)
        assert wids[-1] == wid
        obs = policy.runtime.featurizer(view).build(view, np.arange(n))
        col = policy._service_column(rebuilt.rows, wid, s, offered=True)
        kept = rebuilt.feat.with_service(rebuilt.obs, rebuilt.view, np.arange(n), col)
        for name in ("site", "svc", "offer", "m_rep", "m_off", "m_ov"):
            assert np.array_equal(getattr(kept, name), getattr(obs, name)), name


def test_an_offered_service_of_the_snapshot_learned_with_its_offer_is_decided_by_the_whole_view():
    """The offer of a service the kept view passed over (no spec then; the offer brings it) is
    in view once its spec is known: the whole view decides, as a fresh one does."""
    policy = make_site_policy("marl")
    known, late = "svc-v-known", "svc-v-late"
    policy.book.learn(known, spec("known"))
    policy.snapshot = snapshot(known, late)
    mine = [(site_of(i), None, True) for i in range(len(SITES))]
    policy.book.learn("svc-v-new", spec("new"))
    policy.wants(mine, "svc-v-new", spec("new"))
    assert late in policy._base.unknown
    policy.book.learn(late, spec("late", 20.0))  # as `learn_specs` does for a round's offers
    assert (policy.wants(mine, late, spec("late", 20.0)) == fresh(policy, mine, late, spec("late", 20.0))).all()
    assert late in policy._base.wids


def test_a_new_site_message_rebuilds_the_kept_view():
    """The kept view is of the sites' messages it was built from (compared by identity)."""
    policy = make_site_policy("marl")
    policy.book.learn("svc-w-known", spec("known"))
    policy.book.learn("svc-w-new", spec("new"))
    policy.snapshot = snapshot("svc-w-known", "svc-w-late")
    mine = [(site_of(i), None, True) for i in range(len(SITES))]
    policy.wants(mine, "svc-w-new", spec("new"))
    base = policy._base
    mine[2] = (site_of(2), None, True)  # equal content, a new message
    assert (policy.wants(mine, "svc-w-new", spec("new")) == fresh(policy, mine, "svc-w-new", spec("new"))).all()
    assert policy._base is not base


def test_a_live_site_decides_for_every_one_of_six_services():
    """No cap on the live path either: a site of a pool running six services (1.3B … 70B) has all
    six in its view, a replica decision for each, and answers an offer of each of six more."""
    models = [("1.3b", 1.3), ("7b", 7), ("13b", 13), ("34b", 34), ("70b", 70), ("7b", 7)]
    wids = [f"svc-six-{n}" for n in range(6)]
    policy = make_site_policy("marl")
    snap = ppb.Snapshot(sequence=1)
    for i in range(len(SITES)):
        status = ppb.SiteStatus(site=site_of(i), state=common.SITE_STATE_UP)
        status.gpu_pools.add(gpu_type="H100", count=16, used=i, hbm_gb=80)
        for j in (i, i + 1):
            status.services.add(workload_id=wids[j], replicas=1, request_rate_rps=2.0 + j, utilization=0.9)
        snap.sites.append(status)
    for j, (wid, (model, params)) in enumerate(zip(wids, models, strict=True)):
        s = spec(f"six{j}", 4.0)
        s.model, s.params_b = model, params
        policy.book.learn(wid, s)
        snap.services.add(workload_id=wid, replicas=2, request_rate_rps=4.0 + j, requests=100, requests_ok=70)
    policy.snapshot = snap
    for i in range(len(SITES)):
        view, in_view = policy.view(site_of(i), None, True)
        assert sorted(in_view) == wids and view.n_services == 6
        obs = policy.runtime.featurizer(view).build(view, [0])
        assert obs.svc.shape[1] == 6 and (obs.svc[0, :, 0] == 1).all()  # every service active in the observation
        delta, _ = policy.decide(view)
        assert delta.shape == (6,) and ((delta >= -1) & (delta <= COVER_MAX)).all()
    offers = []
    for n in range(6):
        offer = spb.Offer(offer_id=f"six{n}", workload_id=f"svc-six-new{n}",
                          kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, units=1, gpus_per_unit=1)
        offer.inference_service.CopyFrom(spec(f"sixnew{n}", 2.0 * n))
        policy.book.learn(offer.workload_id, offer.inference_service)
        offers.append(offer)
    answers = MarlSitePolicy.answer_sites([(policy, site_of(i), None, True) for i in range(len(SITES))], offers)
    assert [len(a) for a in answers] == [6] * len(SITES)
    assert all(r.startswith("marl ") for a in answers for *_, r in a)
