"""The scheduler-side placement check (GovernanceGate.check), fed as governance's KV would feed it."""

import json
from types import SimpleNamespace

from cnc.common.v1 import common_pb2 as common
from cncbrain.governance.gate import GovernanceGate
from cncbrain.governance.policy import Verdict


def kv(key, value):
    return SimpleNamespace(key=key, value=json.dumps(value).encode() if value is not None else b"")


def gate():
    g = GovernanceGate(bus=None, target=None)
    g._apply(kv("tenant.acme", {"quota": {"gpus_by_type": {"H100": 4}, "max_gpus": None, "max_cost_per_hour": None},
                                "policy": {"allowed_regions": ["eu"]}}))
    g.sites.update({"ams": ("eu", {"H100": 4.0}), "nyc": ("us", {"H100": 3.0})})
    return g


def at(site, replicas, wid="w1"):
    return common.Placement(workload_id=wid, site_id=site, replicas=replicas, gpu_type="H100", gpus_per_unit=1)


def test_policy_and_quota_are_enforced():
    g = gate()
    assert g.check("w1", "acme", [at("ams", 4)]).ok
    d = g.check("w1", "acme", [at("ams", 2), at("nyc", 1)])
    assert d.verdict is Verdict.POLICY_VIOLATION and "nyc" in d.message
    d = g.check("w1", "acme", [at("ams", 5)])
    assert d.verdict is Verdict.QUOTA_EXCEEDED
    assert g.check("w1", "nobody", [at("ams", 1)]).verdict is Verdict.UNKNOWN_TENANT
    assert g.check("w1", "", [at("nyc", 1)]).ok  # no tenant: nothing to enforce


def test_holdings_of_other_workloads_count_and_own_is_replaced():
    g = gate()
    g._apply(kv("holding.acme.w0", {"reserved_gpus": {}, "reserved_cost_per_hour": 0, "placed": {
        "w0@ams": {"workload_id": "w0", "tenant_id": "acme", "unit_id": "w0@ams", "site_id": "ams",
                   "region": "eu", "gpu_type": "H100", "gpus": 3, "price_per_gpu_hour": 4.0}}}))
    assert g.check("w1", "acme", [at("ams", 1)]).ok
    assert g.check("w1", "acme", [at("ams", 2)]).verdict is Verdict.QUOTA_EXCEEDED
    # w0 moving its own 3 GPUs is not growth
    assert g.check("w0", "acme", [at("ams", 3, "w0")]).ok
    g._apply(kv("holding.acme.w0", None))  # the workload ended
    assert g.check("w1", "acme", [at("ams", 4)]).ok


def test_a_commit_counts_until_governance_shows_it():
    g = gate()
    assert g.check("w1", "acme", [at("ams", 3)]).ok
    g.committed("w1", "acme", [at("ams", 3)])
    assert g.check("w2", "acme", [at("ams", 2, "w2")]).verdict is Verdict.QUOTA_EXCEEDED
    g._apply(kv("holding.acme.w1", {"reserved_gpus": {}, "reserved_cost_per_hour": 0, "placed": {
        "w1@ams": {"workload_id": "w1", "tenant_id": "acme", "unit_id": "w1@ams", "site_id": "ams",
                   "region": "eu", "gpu_type": "H100", "gpus": 3, "price_per_gpu_hour": 4.0}}}))
    assert "w1" not in g.overlay
    assert g.check("w2", "acme", [at("ams", 1, "w2")]).ok


def test_headroom_and_quota_aware_proposals_let_arbitration_fit_the_quota():
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.site.v1 import events_pb2 as site_pb
    from services.scheduler import domain
    from services.scheduler.governance import SchedulerGovernance

    g = GovernanceGate(bus=None, target=None)
    g._apply(kv("tenant.lab", {"quota": {"gpus_by_type": {"H100": 4, "L40S": 0}}, "policy": {}}))
    g.sites.update({"a": ("us", {"H100": 4.0, "L40S": 1.8}), "b": ("us", {"A100-80GB": 4.6})})
    assert g.headroom("w", "lab") == ({"H100": 4, "L40S": 0}, None, None)
    inventory = domain.Inventory()
    inventory.set_site("a", [common.GpuPool(gpu_type="H100", count=16), common.GpuPool(gpu_type="L40S", count=16)], True)
    inventory.set_site("b", [common.GpuPool(gpu_type="A100-80GB", count=16)], True)
    hooks = SchedulerGovernance(inventory, g, None)
    spec = common.InferenceServiceSpec(name="chat", min_replicas=6, max_replicas=6, gpus_per_replica=1, tenant="lab")
    w = spb.Workload(workload_id="w", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, inference_service=spec)
    proposals = [
        site_pb.Proposal(site_id="a", units=6, gpu_type="L40S", cost=1.0),  # cheapest, but L40S quota is 0
        site_pb.Proposal(site_id="a2", units=6, gpu_type="H100", cost=2.0),  # site not up: left as is
        site_pb.Proposal(site_id="b", units=6, gpu_type="A100-80GB", cost=3.0),
    ]
    capped = hooks.proposals(w, proposals)
    assert all(p.gpu_type != "L40S" for p in capped)
    allocation = domain.arbitrate(domain.need_of(w), capped, inventory)
    assert allocation == {"b": ("A100-80GB", 6)}
    placements = domain.commit_placement(w, allocation, 0)
    assert hooks.check(w, placements).ok
    # H100 is capped at the quota's 4: arbitration fills the rest elsewhere.
    inventory.set_site("a2", [common.GpuPool(gpu_type="H100", count=16)], True)
    g.sites["a2"] = ("us", {"H100": 4.0})
    w2 = spb.Workload(workload_id="w2", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, inference_service=spec)
    capped = hooks.proposals(w2, proposals)
    assert {p.site_id: p.units for p in capped} == {"a2": 4, "b": 6}
    allocation = domain.arbitrate(domain.need_of(w2), capped, inventory)
    assert allocation == {"a2": ("H100", 4), "b": ("A100-80GB", 2)}
    assert hooks.check(w2, domain.commit_placement(w2, allocation, 0)).ok
