"""Quotas and placement policy (pure): admission of a workload and the check of every placement.

A tenant has a `Quota` (GPUs by type, GPUs in all, cost per hour) and a `PlacementPolicy` (allowed
regions and sites for data residency, allowed GPU types, a cost cap). A workload may carry its own
policy; the one that applies is the intersection of both, so a workload can only narrow what its
tenant allows.

Quota use is counted as, per live workload, the larger of what it reserved at admission (the GPUs
it needs to start) and what is placed for it now; a scale-up beyond the reservation is checked
placement by placement.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cncbrain.errors import InvalidArgument

EPS = 1e-9


class Verdict(enum.StrEnum):
    ADMITTED = "admitted"
    QUOTA_EXCEEDED = "quota_exceeded"  # gRPC RESOURCE_EXHAUSTED
    POLICY_VIOLATION = "policy_violation"  # gRPC FAILED_PRECONDITION
    UNKNOWN_TENANT = "unknown_tenant"  # gRPC FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class Quota:
    """Upper bounds on what one tenant holds at once; None means no bound."""

    gpus_by_type: Mapping[str, int] = field(default_factory=dict)
    max_gpus: int | None = None
    max_cost_per_hour: float | None = None

    def __post_init__(self) -> None:
        for gpu_type, n in self.gpus_by_type.items():
            if n < 0:
                raise InvalidArgument(f"quota for {gpu_type} must be >= 0, got {n}")
        if self.max_gpus is not None and self.max_gpus < 0:
            raise InvalidArgument("max_gpus must be >= 0")
        if self.max_cost_per_hour is not None and self.max_cost_per_hour < 0:
            raise InvalidArgument("max_cost_per_hour must be >= 0")


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """Where a workload may run; None in a field means "anything"."""

    allowed_regions: frozenset[str] | None = None
    allowed_sites: frozenset[str] | None = None
    allowed_gpu_types: frozenset[str] | None = None
    max_cost_per_hour: float | None = None  # for one workload, all its placements together

    def narrowed_by(self, other: PlacementPolicy | None) -> PlacementPolicy:
        """The policy that satisfies both `self` and `other`."""
        if other is None:
            return self

        def meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
            if a is None:
                return b
            if b is None:
                return a
            return a & b

        caps = [c for c in (self.max_cost_per_hour, other.max_cost_per_hour) if c is not None]
        return PlacementPolicy(
            allowed_regions=meet(self.allowed_regions, other.allowed_regions),
            allowed_sites=meet(self.allowed_sites, other.allowed_sites),
            allowed_gpu_types=meet(self.allowed_gpu_types, other.allowed_gpu_types),
            max_cost_per_hour=min(caps) if caps else None,
        )

    def site_reasons(self, site_id: str, region: str, gpu_type: str) -> list[str]:
        """Why a site/GPU type is outside this policy (empty when it is allowed)."""
        reasons = []
        if self.allowed_sites is not None and site_id not in self.allowed_sites:
            reasons.append(f"site {site_id} is not in the allowed sites {sorted(self.allowed_sites)}")
        if self.allowed_regions is not None and region not in self.allowed_regions:
            reasons.append(f"site {site_id} is in region {region!r}, not in {sorted(self.allowed_regions)}")
        if self.allowed_gpu_types is not None and gpu_type not in self.allowed_gpu_types:
            reasons.append(f"GPU type {gpu_type} is not in the allowed types {sorted(self.allowed_gpu_types)}")
        return reasons


@dataclass(frozen=True, slots=True)
class SiteOffer:
    """What governance needs to know about a site: where it is and what it sells at what price."""

    site_id: str
    region: str
    gpus_by_type: Mapping[str, int]
    price_per_gpu_hour: Mapping[str, float]
    up: bool = True


@dataclass(frozen=True, slots=True)
class WorkloadDemand:
    """A workload as admission sees it."""

    workload_id: str
    tenant_id: str
    kind: str  # "training" | "inference"
    gpus: int  # GPUs needed to start (all shards, or min replicas x GPUs per replica)
    gpu_type: str | None = None  # None: any type the policy allows
    policy: PlacementPolicy | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """One shard or replica the scheduler is about to commit."""

    workload_id: str
    tenant_id: str
    unit_id: str  # the shard or replica id
    site_id: str
    region: str
    gpu_type: str
    gpus: int
    price_per_gpu_hour: float

    @property
    def cost_per_hour(self) -> float:
        return self.gpus * self.price_per_gpu_hour


@dataclass(slots=True)
class Holding:
    """What one live workload counts against its tenant's quota."""

    workload_id: str
    reserved_gpus: dict[str, int] = field(default_factory=dict)  # by GPU type ("*" = type not yet known)
    reserved_cost_per_hour: float = 0.0
    placed: dict[str, Placement] = field(default_factory=dict)  # by unit id

    def placed_gpus(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.placed.values():
            out[p.gpu_type] = out.get(p.gpu_type, 0) + p.gpus
        return out

    def placed_cost(self) -> float:
        return sum(p.cost_per_hour for p in self.placed.values())

    def counted(self) -> tuple[dict[str, int], int, float]:
        """GPUs by type, GPUs in all and cost per hour this workload counts for."""
        placed = self.placed_gpus()
        placed_total = sum(placed.values())
        reserved_total = sum(self.reserved_gpus.values())
        if placed_total >= reserved_total:
            return placed, placed_total, max(self.placed_cost(), 0.0)
        by_type = dict(placed)
        for t, n in self.reserved_gpus.items():
            by_type[t] = max(by_type.get(t, 0), n)
        return by_type, reserved_total, max(self.reserved_cost_per_hour, self.placed_cost())


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    eligible_sites: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.ADMITTED

    @property
    def message(self) -> str:
        return "; ".join(self.reasons) if self.reasons else self.verdict.value


def tenant_usage(holdings: Iterable[Holding]) -> tuple[dict[str, int], int, float]:
    by_type: dict[str, int] = {}
    total = 0
    cost = 0.0
    for h in holdings:
        t, n, c = h.counted()
        for k, v in t.items():
            by_type[k] = by_type.get(k, 0) + v
        total += n
        cost += c
    return by_type, total, cost


def quota_reasons(quota: Quota, by_type: Mapping[str, int], total: int, cost: float) -> list[str]:
    reasons = []
    for gpu_type, limit in sorted(quota.gpus_by_type.items()):
        used = by_type.get(gpu_type, 0)
        if used > limit:
            reasons.append(f"{gpu_type} GPUs would be {used}, quota is {limit}")
    if quota.max_gpus is not None and total > quota.max_gpus:
        reasons.append(f"GPUs in all would be {total}, quota is {quota.max_gpus}")
    if quota.max_cost_per_hour is not None and cost > quota.max_cost_per_hour + EPS:
        reasons.append(f"cost would be ${cost:.2f}/h, quota is ${quota.max_cost_per_hour:.2f}/h")
    return reasons


def eligible_offers(
    policy: PlacementPolicy, pool: Iterable[SiteOffer], gpu_type: str | None, gpus_per_unit: int = 1
) -> list[tuple[SiteOffer, str]]:
    """(site, GPU type) pairs the policy allows and the site has at least `gpus_per_unit` of."""
    out = []
    for site in pool:
        if not site.up:
            continue
        types = [gpu_type] if gpu_type else sorted(site.gpus_by_type)
        for t in types:
            if site.gpus_by_type.get(t, 0) >= gpus_per_unit and not policy.site_reasons(site.site_id, site.region, t):
                out.append((site, t))
    return out


def admit(
    demand: WorkloadDemand,
    quota: Quota,
    tenant_policy: PlacementPolicy,
    holdings: Iterable[Holding],
    pool: Iterable[SiteOffer] | None,
    gpus_per_unit: int = 1,
) -> tuple[Decision, Holding | None]:
    """Admission at submit: the policy must leave somewhere to run, the quota room for the demand.

    Returns the decision and, when admitted, the `Holding` to record for the workload. `pool` None
    means the pool is not known yet; then only the quota and the GPU type are checked.
    """
    if demand.gpus <= 0:
        return Decision(Verdict.POLICY_VIOLATION, ("a workload needs at least one GPU",)), None
    policy = tenant_policy.narrowed_by(demand.policy)
    if demand.gpu_type and policy.allowed_gpu_types is not None and demand.gpu_type not in policy.allowed_gpu_types:
        return (
            Decision(
                Verdict.POLICY_VIOLATION,
                (f"GPU type {demand.gpu_type} is not allowed by the placement policy "
                 f"(allowed: {sorted(policy.allowed_gpu_types)})",),
            ),
            None,
        )
    eligible: list[tuple[SiteOffer, str]] = []
    if pool is not None:
        pool = list(pool)
        eligible = eligible_offers(policy, pool, demand.gpu_type, gpus_per_unit)
        if not eligible:
            return (
                Decision(
                    Verdict.POLICY_VIOLATION,
                    (f"no site that is up satisfies the placement policy for {demand.workload_id} "
                     f"({describe_policy(policy)}, gpu_type={demand.gpu_type or 'any'})",),
                ),
                None,
            )
        capacity = sum(s.gpus_by_type.get(t, 0) for s, t in eligible)
        if capacity < demand.gpus:
            return (
                Decision(
                    Verdict.POLICY_VIOLATION,
                    (f"the sites the policy allows hold {capacity} GPUs, the workload needs {demand.gpus}",),
                ),
                None,
            )
    # Reserve at the cheapest eligible price: the real price is checked placement by placement.
    prices = [s.price_per_gpu_hour.get(t, 0.0) for s, t in eligible]
    unit_price = min(prices) if prices else 0.0
    holding = Holding(
        workload_id=demand.workload_id,
        reserved_gpus={demand.gpu_type or "*": demand.gpus},
        reserved_cost_per_hour=unit_price * demand.gpus,
    )
    if policy.max_cost_per_hour is not None and holding.reserved_cost_per_hour > policy.max_cost_per_hour + EPS:
        return (
            Decision(
                Verdict.POLICY_VIOLATION,
                (f"the cheapest allowed placement costs ${holding.reserved_cost_per_hour:.2f}/h, "
                 f"the policy caps the workload at ${policy.max_cost_per_hour:.2f}/h",),
            ),
            None,
        )
    others = [h for h in holdings if h.workload_id != demand.workload_id]
    by_type, total, cost = tenant_usage([*others, holding])
    if "*" in by_type:
        # An untyped reservation counts against the total only; per-type limits bind at placement.
        by_type = {k: v for k, v in by_type.items() if k != "*"}
    reasons = quota_reasons(quota, by_type, total, cost)
    if not reasons and demand.gpu_type is None and eligible and quota.gpus_by_type:
        # Untyped demand: per-type limits still bound it, summed over the types it may use.
        used, _, _ = tenant_usage(others)
        room_by_type: dict[str, int] = {}
        for s, t in eligible:
            room_by_type[t] = room_by_type.get(t, 0) + s.gpus_by_type.get(t, 0)
        room = -used.get("*", 0)  # other workloads' untyped reservations take from the same room
        for t, capacity in room_by_type.items():
            limit = quota.gpus_by_type.get(t)
            room += capacity if limit is None else max(0, min(capacity, limit - used.get(t, 0)))
        if room < demand.gpus:
            parts = ", ".join(f"{t} {max(0, quota.gpus_by_type[t] - used.get(t, 0))}" for t in sorted(room_by_type)
                              if t in quota.gpus_by_type)
            reasons = [f"the quota leaves room for {room} GPUs of the types the workload may use ({parts}); "
                       f"it needs {demand.gpus}"]
    if reasons:
        return Decision(Verdict.QUOTA_EXCEEDED, tuple(reasons)), None
    return Decision(Verdict.ADMITTED, eligible_sites=tuple(sorted({s.site_id for s, _ in eligible}))), holding


def check_placements(
    placements: Iterable[Placement],
    quota: Quota,
    policy: PlacementPolicy,
    holdings: Mapping[str, Holding],
    replace_workload: bool = False,
) -> Decision:
    """The check before the scheduler commits: every placement inside its workload's policy and the
    tenant inside its quota once they are all added. All or nothing, like a gang commit.

    replace_workload: `placements` are the workload's whole placement after the commit (absolute,
    as the scheduler records it), not additions to what it holds.
    """
    placements = list(placements)
    reasons: list[str] = []
    trial: dict[str, Holding] = {
        wid: Holding(h.workload_id, dict(h.reserved_gpus), h.reserved_cost_per_hour, dict(h.placed))
        for wid, h in holdings.items()
    }
    if replace_workload:
        for wid in {p.workload_id for p in placements}:
            if wid in trial:
                trial[wid].placed = {}
    for p in placements:
        for r in policy.site_reasons(p.site_id, p.region, p.gpu_type):
            reasons.append(f"{p.unit_id}: {r}")
        h = trial.setdefault(p.workload_id, Holding(p.workload_id))
        h.placed[p.unit_id] = p
    if policy.max_cost_per_hour is not None:
        for wid in sorted({p.workload_id for p in placements}):
            cost = trial[wid].placed_cost()
            if cost > policy.max_cost_per_hour + EPS:
                reasons.append(
                    f"{wid} would cost ${cost:.2f}/h, the policy caps it at ${policy.max_cost_per_hour:.2f}/h"
                )
    if reasons:
        return Decision(Verdict.POLICY_VIOLATION, tuple(reasons))
    by_type, total, cost = tenant_usage(trial.values())
    by_type.pop("*", None)
    reasons = quota_reasons(quota, by_type, total, cost)
    if reasons:
        return Decision(Verdict.QUOTA_EXCEEDED, tuple(reasons))
    return Decision(Verdict.ADMITTED)


def check_workload(
    placements: Sequence[Placement],
    quota: Quota,
    policy: PlacementPolicy,
    others: tuple[Mapping[str, int], int, float],
    held: Holding | None,
) -> Decision:
    """`check_placements` for one workload whose whole new placement is `placements`, given the
    tenant's usage without that workload (`others`, from `tenant_usage`). Linear in the workload's
    own placements, so callers that cache `others` check in microseconds."""
    reasons: list[str] = []
    trial = Holding(held.workload_id if held else "", dict(held.reserved_gpus) if held else {},
                    held.reserved_cost_per_hour if held else 0.0)
    for p in placements:
        if policy.allowed_sites is not None or policy.allowed_regions is not None or policy.allowed_gpu_types is not None:
            for r in policy.site_reasons(p.site_id, p.region, p.gpu_type):
                reasons.append(f"{p.unit_id}: {r}")
        trial.placed[p.unit_id] = p
    if policy.max_cost_per_hour is not None:
        cost = trial.placed_cost()
        if cost > policy.max_cost_per_hour + EPS:
            wid = placements[0].workload_id if placements else ""
            reasons.append(f"{wid} would cost ${cost:.2f}/h, the policy caps it at ${policy.max_cost_per_hour:.2f}/h")
    if reasons:
        return Decision(Verdict.POLICY_VIOLATION, tuple(reasons))
    by_type, total, cost = trial.counted()
    merged = dict(others[0])
    for k, v in by_type.items():
        merged[k] = merged.get(k, 0) + v
    merged.pop("*", None)
    reasons = quota_reasons(quota, merged, others[1] + total, others[2] + cost)
    if reasons:
        return Decision(Verdict.QUOTA_EXCEEDED, tuple(reasons))
    return Decision(Verdict.ADMITTED)


def describe_policy(policy: PlacementPolicy) -> str:
    parts = []
    if policy.allowed_regions is not None:
        parts.append(f"regions={sorted(policy.allowed_regions)}")
    if policy.allowed_sites is not None:
        parts.append(f"sites={sorted(policy.allowed_sites)}")
    if policy.allowed_gpu_types is not None:
        parts.append(f"gpu_types={sorted(policy.allowed_gpu_types)}")
    if policy.max_cost_per_hour is not None:
        parts.append(f"max_cost=${policy.max_cost_per_hour:.2f}/h")
    return ", ".join(parts) or "no restrictions"


# ---- (de)serialising the value types: ledger payloads and governance's KV projection -------------------------------------


def quota_to_dict(q: Quota) -> dict[str, Any]:
    return {"gpus_by_type": dict(sorted(q.gpus_by_type.items())), "max_gpus": q.max_gpus,
            "max_cost_per_hour": q.max_cost_per_hour}


def quota_from_dict(d: Mapping[str, Any] | None) -> Quota:
    d = d or {}
    return Quota(
        gpus_by_type={str(k): int(v) for k, v in (d.get("gpus_by_type") or {}).items()},
        max_gpus=None if d.get("max_gpus") is None else int(d["max_gpus"]),
        max_cost_per_hour=None if d.get("max_cost_per_hour") is None else float(d["max_cost_per_hour"]),
    )


def _opt_list(s: frozenset[str] | None) -> list[str] | None:
    return None if s is None else sorted(s)


def _opt_set(v: Iterable[str] | None) -> frozenset[str] | None:
    return None if v is None else frozenset(str(x) for x in v)


def policy_to_dict(p: PlacementPolicy) -> dict[str, Any]:
    return {
        "allowed_regions": _opt_list(p.allowed_regions),
        "allowed_sites": _opt_list(p.allowed_sites),
        "allowed_gpu_types": _opt_list(p.allowed_gpu_types),
        "max_cost_per_hour": p.max_cost_per_hour,
    }


def policy_from_dict(d: Mapping[str, Any] | None) -> PlacementPolicy:
    d = d or {}
    cap = d.get("max_cost_per_hour")
    return PlacementPolicy(
        allowed_regions=_opt_set(d.get("allowed_regions")),
        allowed_sites=_opt_set(d.get("allowed_sites")),
        allowed_gpu_types=_opt_set(d.get("allowed_gpu_types")),
        max_cost_per_hour=None if cap is None else float(cap),
    )


def placement_to_dict(p: Placement) -> dict[str, Any]:
    return {"workload_id": p.workload_id, "tenant_id": p.tenant_id, "unit_id": p.unit_id,
            "site_id": p.site_id, "region": p.region, "gpu_type": p.gpu_type, "gpus": p.gpus,
            "price_per_gpu_hour": p.price_per_gpu_hour}


def placement_from_dict(d: Mapping[str, Any]) -> Placement:
    return Placement(
        workload_id=str(d["workload_id"]), tenant_id=str(d["tenant_id"]), unit_id=str(d["unit_id"]),
        site_id=str(d["site_id"]), region=str(d.get("region", "")), gpu_type=str(d["gpu_type"]),
        gpus=int(d["gpus"]), price_per_gpu_hour=float(d.get("price_per_gpu_hour", 0.0)),
    )
