"""Quotas, placement policy, admission, the pre-commit placement check, and usage accounting."""

import pytest

from cncbrain.errors import AlreadyExists, InvalidArgument, NotFound
from cncbrain.governance.policy import (
    Placement,
    PlacementPolicy,
    Quota,
    SiteOffer,
    Verdict,
    WorkloadDemand,
)
from cncbrain.identity import Role
from services.governance.domain.state import GovernanceState
from services.governance.domain.usage import Allocation, UsageBook

POOL = [
    SiteOffer("ams", "eu", {"H100": 16, "L40S": 8}, {"H100": 4.0, "L40S": 1.8}),
    SiteOffer("fra", "eu", {"A100-80": 8}, {"A100-80": 2.2}),
    SiteOffer("nyc", "us", {"H100": 64}, {"H100": 3.0}),
    SiteOffer("sea", "us", {"L4": 32}, {"L4": 0.8}),
]


def gov(quota=Quota(), policy=PlacementPolicy()) -> GovernanceState:
    s = GovernanceState()
    s.apply_record(s.create_tenant("acme", quota=quota, policy=policy))
    s.update_pool(POOL)
    return s


def place(wid, unit, site="ams", gpu="H100", gpus=1, price=4.0, region="eu", tenant="acme"):
    return Placement(wid, tenant, unit, site, region, gpu, gpus, price)


def test_tenant_commands_validate_before_recording():
    s = gov()
    with pytest.raises(AlreadyExists):
        s.create_tenant("acme")
    with pytest.raises(InvalidArgument):
        s.create_tenant("Bad Name")
    with pytest.raises(NotFound):
        s.set_quota("nobody", Quota())
    with pytest.raises(InvalidArgument):
        s.issue_token(Role.TENANT, None)
    with pytest.raises(NotFound):
        s.issue_token(Role.TENANT, "nobody")


def test_admission_within_quota_reserves_and_beyond_is_exhausted():
    s = gov(quota=Quota(gpus_by_type={"H100": 8}, max_gpus=10))
    d, rec = s.admit(WorkloadDemand("w1", "acme", "training", 6, "H100"))
    assert d.ok, d.reasons
    s.apply_record(rec)
    d, rec = s.admit(WorkloadDemand("w2", "acme", "inference", 4, "H100"))
    assert d.verdict is Verdict.QUOTA_EXCEEDED
    assert "H100 GPUs would be 10, quota is 8" in d.message
    s.apply_record(rec)  # a refusal is recorded but reserves nothing
    d, _ = s.admit(WorkloadDemand("w3", "acme", "inference", 2, "H100"))
    assert d.ok


def test_cost_quota_uses_the_cheapest_allowed_price():
    s = gov(quota=Quota(max_cost_per_hour=10.0))
    d, _ = s.admit(WorkloadDemand("w1", "acme", "inference", 4, "H100"))  # 4 x $3 (nyc) = $12
    assert d.verdict is Verdict.QUOTA_EXCEEDED and "$12.00/h" in d.message
    d, _ = s.admit(WorkloadDemand("w1", "acme", "inference", 3, "H100"))
    assert d.ok


def test_residency_policy_refuses_impossible_workloads_with_the_reason():
    s = gov(policy=PlacementPolicy(allowed_regions=frozenset({"eu"})))
    d, _ = s.admit(WorkloadDemand("w1", "acme", "inference", 1, "L4"))  # L4 only in the US
    assert d.verdict is Verdict.POLICY_VIOLATION and "no site" in d.message
    d, _ = s.admit(WorkloadDemand("w2", "acme", "training", 32, "H100"))  # only 16 H100 in the EU
    assert d.verdict is Verdict.POLICY_VIOLATION and "hold 16 GPUs" in d.message
    d, _ = s.admit(WorkloadDemand("w3", "acme", "training", 8, None))
    assert d.ok and set(d.eligible_sites) == {"ams", "fra"}


def test_workload_policy_can_only_narrow_the_tenant_policy():
    s = gov(policy=PlacementPolicy(allowed_regions=frozenset({"eu"})))
    wide = PlacementPolicy(allowed_regions=frozenset({"eu", "us"}), allowed_gpu_types=frozenset({"L4", "H100"}))
    d, rec = s.admit(WorkloadDemand("w1", "acme", "inference", 1, None, wide))
    assert d.ok and d.eligible_sites == ("ams",)  # the US stays excluded; ams has H100
    s.apply_record(rec)
    bad = s.check_placements([place("w1", "r1", site="nyc", region="us", price=3.0)])
    assert bad.verdict is Verdict.POLICY_VIOLATION and "region 'us'" in bad.message
    gpu_type = s.check_placements([place("w1", "r1", gpu="L40S", price=1.8)])
    assert gpu_type.verdict is Verdict.POLICY_VIOLATION and "GPU type L40S" in gpu_type.message
    assert s.check_placements([place("w1", "r1")]).ok


def test_placement_check_counts_scale_up_beyond_the_reservation():
    s = gov(quota=Quota(gpus_by_type={"H100": 4}))
    d, rec = s.admit(WorkloadDemand("w1", "acme", "inference", 2, "H100"))
    s.apply_record(rec)
    for i in range(4):
        s.apply_record(s.placement_committed(place("w1", f"r{i}"), at=0.0))
    d = s.check_placements([place("w1", "r4")])
    assert d.verdict is Verdict.QUOTA_EXCEEDED and "H100 GPUs would be 5" in d.message
    # Moving an existing replica is not growth.
    assert s.check_placements([place("w1", "r0", site="nyc", region="us", price=3.0)]).ok
    s.apply_record(s.placement_released("r3", "w1", "acme", at=10.0, reason="scale-down"))
    assert s.check_placements([place("w1", "r4")]).ok


def test_policy_cost_cap_per_workload():
    s = gov()
    s.apply_record(s.set_policy("acme", PlacementPolicy(max_cost_per_hour=10.0), workload_id="w1"))
    d = s.check_placements([place("w1", "r0", gpus=2), place("w1", "r1", gpus=1)])  # 3 x $4
    assert d.verdict is Verdict.POLICY_VIOLATION and "$12.00/h" in d.message
    assert s.check_placements([place("w1", "r0", gpus=2)]).ok


def test_unknown_tenant_and_mixed_checks():
    s = gov()
    d, _ = s.admit(WorkloadDemand("w1", "nobody", "training", 1))
    assert d.verdict is Verdict.UNKNOWN_TENANT
    with pytest.raises(InvalidArgument):
        s.check_placements([place("w1", "a"), place("w2", "b")])


def test_revoked_token_is_folded_from_records():
    s = gov()
    token, rec = s.issue_token(Role.TENANT, "acme")
    s.apply_record(rec)
    tid = token.split(".")[0]
    assert not s.tokens[tid].revoked
    s.apply_record(s.revoke_token(tid, now=5.0))
    assert s.tokens[tid].revoked_at == 5.0
    assert s.tokens_of("acme")[0].token_id == tid


def test_state_rebuilds_identically_from_its_records():
    s = gov(quota=Quota(max_gpus=100))
    records = []

    def do(rec):
        records.append(rec)
        s.apply_record(rec)

    for wid in ("w1", "w2"):
        _, rec = s.admit(WorkloadDemand(wid, "acme", "inference", 2, "H100"))
        do(rec)
        do(s.placement_committed(place(wid, wid + "-r0", gpus=2), at=0.0))
    do(s.placement_released("w1-r0", "w1", "acme", at=3600.0, reason="done"))
    replayed = GovernanceState()
    replayed.apply_record(replayed.create_tenant("acme", quota=Quota(max_gpus=100)))
    for rec in records:
        replayed.apply_record(rec)
    assert replayed.usage.query(0, 7200, now=7200)[0] == s.usage.query(0, 7200, now=7200)[0]
    assert replayed.holdings["acme"].keys() == s.holdings["acme"].keys()


def test_usage_sums_overlap_per_tenant_and_workload():
    book = UsageBook()
    book.start(Allocation("r1", "w1", "acme", "ams", "H100", 2, 4.0, start=0.0))
    book.start(Allocation("r2", "w2", "acme", "sea", "L4", 1, 0.8, start=1800.0))
    book.start(Allocation("r3", "w3", "globex", "nyc", "H100", 8, 3.0, start=0.0))
    book.stop("r1", at=3600.0)
    tenants, workloads = book.query(0.0, 7200.0, now=7200.0, tenant_id="acme")
    assert [t.tenant_id for t in tenants] == ["acme"]
    (acme,) = tenants
    assert acme.gpu_hours == pytest.approx(2.0 + 1.5)
    assert acme.cost_usd == pytest.approx(8.0 + 1.2)
    per_w = {w.workload_id: w for w in workloads}
    assert per_w["w2"].gpu_hours == pytest.approx(1.5)
    # A window that cuts intervals counts only the overlap.
    (acme,), _ = book.query(1800.0, 3600.0, now=7200.0, tenant_id="acme")
    assert acme.gpu_hours == pytest.approx(1.0 + 0.5)
    by_type, _ = book.query(0.0, 7200.0, now=7200.0, by_gpu_type=True)
    assert {(t.tenant_id, t.gpu_type) for t in by_type} == {("acme", "H100"), ("acme", "L4"), ("globex", "H100")}
    with pytest.raises(ValueError):
        book.query(10.0, 0.0, now=0.0)


def test_usage_moving_a_unit_closes_its_old_interval_and_replay_is_idempotent():
    book = UsageBook()
    a = Allocation("r1", "w1", "acme", "ams", "H100", 1, 4.0, start=0.0)
    book.start(a)
    book.start(Allocation("r1", "w1", "acme", "ams", "H100", 1, 4.0, start=0.0))  # replayed event
    assert len(book.allocations) == 1
    book.start(Allocation("r1", "w1", "acme", "nyc", "H100", 1, 3.0, start=3600.0))  # re-placed
    (acme,), _ = book.query(0.0, 7200.0, now=7200.0)
    assert acme.gpu_hours == pytest.approx(2.0)
    assert acme.cost_usd == pytest.approx(4.0 + 3.0)
    assert book.stop_site("nyc", at=7200.0) == ["r1"]


def test_untyped_demand_is_bounded_by_the_per_type_limits_it_could_use():
    s = gov(quota=Quota(gpus_by_type={"H100": 4, "A100-80": 2, "L40S": 0, "L4": 0}),
            policy=PlacementPolicy(allowed_sites=frozenset({"ams", "fra"})))
    d, _ = s.admit(WorkloadDemand("w1", "acme", "inference", 7))
    assert d.verdict is Verdict.QUOTA_EXCEEDED and "room for 6 GPUs" in d.message
    d, rec = s.admit(WorkloadDemand("w1", "acme", "inference", 5))
    assert d.ok  # within 4 H100 + 2 A100-80 at ams and fra
    s.apply_record(rec)
    d, _ = s.admit(WorkloadDemand("w2", "acme", "inference", 2))  # w1's untyped 5 leave room for 1
    assert d.verdict is Verdict.QUOTA_EXCEEDED and "room for 1 GPUs" in d.message
