"""Failure recovery: replicas re-placed nearest-first within policy, shards gang-resumed with the
lost work stated, capacity never handed out twice."""

from services.adaptation.domain.recovery import (
    ActionKind,
    CheckpointTracker,
    SiteCapacity,
    SiteUnits,
    WorkloadKind,
    WorkloadPlacement,
    plan_recovery,
    plan_shrink,
)


def pool():
    lat = {"a": {"b": 5.0, "c": 40.0, "d": 80.0}, "b": {"c": 35.0, "d": 75.0}, "c": {"d": 30.0}}
    return {
        "a": SiteCapacity("a", False, {"H100": 0}, {"H100": 4.0}, lat["a"]),
        "b": SiteCapacity("b", True, {"H100": 4}, {"H100": 4.0}, lat["b"]),
        "c": SiteCapacity("c", True, {"H100": 16, "L4": 8}, {"H100": 3.0, "L4": 0.8}, lat["c"]),
        "d": SiteCapacity("d", True, {"H100": 32}, {"H100": 2.0}, {}),
    }


def svc(wid="svc", replicas=3, gpus=1, ingress="", types=frozenset({"H100"}), extra=None):
    sites = {"a": SiteUnits("H100", replicas=replicas)}
    sites.update(extra or {})
    return WorkloadPlacement(wid, WorkloadKind.INFERENCE, "acme", gpus, sites, types, ingress)


def job(wid="job", shards=(0, 1, 2, 3), gpus=2, extra=None):
    sites = {"a": SiteUnits("H100", shard_indices=tuple(shards))}
    sites.update(extra or {})
    return WorkloadPlacement(wid, WorkloadKind.TRAINING, "acme", gpus, sites, frozenset({"H100"}))


def test_replicas_go_to_the_nearest_sites_first():
    sites = pool()
    (act,) = plan_recovery("a", [svc(replicas=6)], sites)
    assert act.kind is ActionKind.REPLACE_REPLICAS
    assert dict(act.moved) == {"b": 4, "c": 2}
    assert "a" not in act.new_placement
    assert sites["b"].free_by_type["H100"] == 0 and sites["c"].free_by_type["H100"] == 14
    assert "site a is down" in act.reason and "6 of 6" in act.reason


def test_policy_excluding_sites_is_respected():
    sites = pool()
    (act,) = plan_recovery("a", [svc(replicas=2)], sites, allowed=lambda w, s, g: s == "d")
    assert dict(act.moved) == {"d": 2}


def test_no_room_means_wait_with_shortfall():
    sites = pool()
    (act,) = plan_recovery("a", [svc(replicas=2, types=frozenset({"T4"}))], sites)
    assert act.kind is ActionKind.WAIT_FOR_CAPACITY and act.shortfall == 2
    assert dict(act.new_placement) == {"a": SiteUnits("H100", replicas=2)}


def test_shards_are_gang_resumed_near_the_job_with_lost_work():
    sites = pool()
    w = job(extra={"c": SiteUnits("H100", shard_indices=(4, 5))})
    tracker = CheckpointTracker(interval_s=100)
    tracker.observe("job", 0, 0.10)
    tracker.observe("job", 100, 0.30)  # checkpoint
    tracker.observe("job", 150, 0.42)
    (act,) = plan_recovery("a", [w], sites, checkpoints={"job": tracker.get("job", tokens=1e9)})
    assert act.kind is ActionKind.RESUME_SHARDS
    assert dict(act.moved) == {"c": 4}  # the job's own site c first, not the nearer b
    assert act.new_placement["c"].shard_indices == (0, 1, 2, 3, 4, 5)
    assert abs(act.lost_progress - 0.12) < 1e-9 and abs(act.lost_tokens - 0.12e9) < 1
    assert "30.0%" in act.reason


def test_gang_all_or_nothing_leaves_capacity_untouched():
    sites = pool()
    for s in sites.values():
        s.free_by_type = {k: min(v, 2) for k, v in s.free_by_type.items()}
    (act,) = plan_recovery("a", [job(gpus=4)], sites)
    assert act.kind is ActionKind.WAIT_FOR_CAPACITY and act.shortfall == 4
    assert sites["b"].free_by_type["H100"] == 2  # nothing taken


def test_capacity_is_not_given_twice_and_inference_goes_first():
    sites = {"a": SiteCapacity("a", False, {}), "b": SiteCapacity("b", True, {"H100": 4}, latency_ms={"a": 1})}
    acts = plan_recovery("a", [job("j", shards=(0, 1), gpus=2), svc("s", replicas=3)], sites)
    by = {a.workload_id: a for a in acts}
    assert by["s"].kind is ActionKind.REPLACE_REPLICAS and dict(by["s"].moved) == {"b": 3}
    assert by["j"].kind is ActionKind.WAIT_FOR_CAPACITY
    assert sites["b"].free_by_type["H100"] == 1


def test_unaffected_workloads_are_left_alone():
    sites = pool()
    w = WorkloadPlacement("other", WorkloadKind.INFERENCE, "acme", 1, {"b": SiteUnits("H100", 2)})
    assert plan_recovery("a", [w], sites) == []


def test_a_site_that_lost_gpus_sheds_just_enough_replicas_before_any_gang():
    """Site a is up with 8 of its H100s gone (free -8): two 4-GPU replicas of one service move,
    one stays; the job's share stays (replicas were enough); the units go to the nearest room."""
    sites = pool()
    sites["a"].up = True
    sites["a"].free_by_type = {"H100": -8}
    s = svc(replicas=3, gpus=4)
    j = job(shards=(0, 1), gpus=4)
    acts = plan_shrink("a", {"H100": 8}, [j, s], sites)
    assert [a.workload_id for a in acts] == ["svc"]
    (act,) = acts
    assert act.kind is ActionKind.REPLACE_REPLICAS and dict(act.moved) == {"b": 1, "c": 1}
    assert act.new_placement["a"] == SiteUnits("H100", replicas=1)
    assert act.reason.startswith("site a lost GPUs; re-placed 2 of 2 replica(s)")
    assert sites["b"].free_by_type["H100"] == 0 and sites["c"].free_by_type["H100"] == 12


def test_a_gang_share_moves_whole_when_replicas_are_not_enough():
    sites = pool()
    sites["a"].up = True
    s = svc(replicas=1, gpus=2)
    j = job(shards=(0, 1), gpus=4)
    acts = plan_shrink("a", {"H100": 6}, [s, j], sites, why="site a: node down")
    by = {a.workload_id: a for a in acts}
    assert dict(by["svc"].moved) == {"b": 1} and "a" not in by["svc"].new_placement
    assert by["job"].kind is ActionKind.RESUME_SHARDS and by["job"].new_placement["c"].shard_indices == (0, 1)
    assert by["job"].reason.startswith("site a: node down; resumed 2 shard(s)")


def test_no_room_anywhere_means_wait_and_nothing_taken():
    sites = {"a": SiteCapacity("a", True, {"H100": -4}), "b": SiteCapacity("b", True, {"H100": 2})}
    (act,) = plan_shrink("a", {"H100": 4}, [svc(replicas=2, gpus=4)], sites)
    assert act.kind is ActionKind.WAIT_FOR_CAPACITY and act.shortfall == 1
    assert sites["b"].free_by_type["H100"] == 2


def test_scale_up_fills_own_sites_first_then_nearest():
    from services.adaptation.domain.recovery import plan_scale

    sites = pool()
    w = WorkloadPlacement("s", WorkloadKind.INFERENCE, "acme", 1, {"c": SiteUnits("H100", 2)}, frozenset({"H100"}), "b")
    new, short = plan_scale(w, 24, sites)
    assert short == 0
    assert new["c"].replicas == 18  # its own site first, to the brim (2 held + 16 free)
    assert new["b"].replicas == 4  # then the ingress site
    assert new["d"].replicas == 2  # then the next nearest to the ingress
    assert sites["c"].free_by_type["H100"] == 0 and sites["d"].free_by_type["H100"] == 30


def test_scale_down_drops_farthest_first_and_reports_shortfall():
    from services.adaptation.domain.recovery import plan_scale

    sites = pool()
    w = WorkloadPlacement("s", WorkloadKind.INFERENCE, "acme", 1,
                          {"b": SiteUnits("H100", 2), "d": SiteUnits("H100", 2)}, frozenset({"H100"}), "b")
    new, _ = plan_scale(w, 3, sites)
    assert new == {"b": SiteUnits("H100", 2), "d": SiteUnits("H100", 1)}
    assert sites["d"].free_by_type["H100"] == 33  # the dropped replica's GPU is free again
    new, short = plan_scale(w, 200, pool(), allowed=lambda w, s, g: s == "b")
    assert new["b"].replicas == 6 and short == 200 - 6 - 2


def test_quota_room_steers_recovery_away_from_types_without_room():
    sites = {"a": SiteCapacity("a", False, {}),
             "b": SiteCapacity("b", True, {"L40S": 8, "H100": 8}, {"L40S": 1.0, "H100": 4.0}, {"a": 1})}
    w = svc(replicas=3, types=frozenset(), extra={"b": SiteUnits("H100", 2)})
    (act,) = plan_recovery("a", [w], sites, rooms={"svc": {"L40S": 0, "H100": 4}})
    # L40S is cheaper but the tenant has no L40S quota; H100 room is 4, 2 already held at b.
    assert dict(act.moved) == {"b": 2} and act.shortfall == 1
    assert act.new_placement["b"] == SiteUnits("H100", 4)
