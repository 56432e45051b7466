"""Governance's state, folded from its own ledger (pure).

Every change goes the same way: a command method validates its input against the current state
and returns a `Record` (ledger kind, subject, payload) without changing anything; the server
appends the record to the ledger and only then calls `apply`. So the ledger is the state of record:
replaying it rebuilds tenants, quotas, policies, token records, admissions and usage exactly.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cncbrain.errors import AlreadyExists, InvalidArgument, NotFound
from cncbrain.governance.policy import (
    Decision,
    Holding,
    Placement,
    PlacementPolicy,
    Quota,
    SiteOffer,
    Verdict,
    WorkloadDemand,
    admit,
    check_placements,
    placement_from_dict,
    placement_to_dict,
    policy_from_dict,
    policy_to_dict,
    quota_from_dict,
    quota_to_dict,
)
from cncbrain.identity import Role, TokenRecord, mint_token, validate_tenant_id
from cncbrain.limits import quote
from services.governance.domain.usage import Allocation, UsageBook


def as_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A `GovernanceState.snapshot()` as JSON data: the usage intervals as rows, in order (an open
    one, end None, is its unit's current holding)."""
    return {**snapshot, "allocations": [[a.unit_id, a.workload_id, a.tenant_id, a.site_id, a.gpu_type, a.gpus,
                                         a.price_per_gpu_hour, a.start, a.end] for a in snapshot["allocations"]]}


@dataclass(frozen=True, slots=True)
class Record:
    """A change to append to the ledger, then apply."""

    kind: str
    subject: str
    payload: dict[str, Any]


@dataclass(slots=True)
class Tenant:
    tenant_id: str
    display_name: str
    quota: Quota = field(default_factory=Quota)
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    created_at: float = 0.0


# ---- the state ----------------------------------------------------------------------------------


@dataclass
class GovernanceState:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    workload_policies: dict[str, PlacementPolicy] = field(default_factory=dict)
    workload_tenant: dict[str, str] = field(default_factory=dict)
    holdings: dict[str, dict[str, Holding]] = field(default_factory=dict)  # tenant -> workload -> holding
    usage: UsageBook = field(default_factory=UsageBook)
    pool: dict[str, SiteOffer] = field(default_factory=dict)  # from perception snapshots; not ledgered
    pool_known: bool = False
    enrolled: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Site id -> the operator's terms: region, GPUs at most and price by type, NATS key."""

    # ---- queries ----

    def tenant(self, tenant_id: str) -> Tenant:
        t = self.tenants.get(tenant_id)
        if t is None:
            raise NotFound(f"tenant {quote(tenant_id)} does not exist")
        return t

    def effective_policy(self, tenant_id: str, workload_id: str | None = None) -> PlacementPolicy:
        policy = self.tenant(tenant_id).policy
        if workload_id:
            policy = policy.narrowed_by(self.workload_policies.get(workload_id))
        return policy

    def tokens_of(self, tenant_id: str | None) -> list[TokenRecord]:
        return sorted(
            (r for r in self.tokens.values() if tenant_id is None or r.tenant_id == tenant_id),
            key=lambda r: r.created_at,
        )

    # ---- commands: validate, return the record to ledger ----

    def create_tenant(
        self, tenant_id: str, display_name: str = "", quota: Quota | None = None,
        policy: PlacementPolicy | None = None, now: float | None = None,
    ) -> Record:
        validate_tenant_id(tenant_id)
        if tenant_id in self.tenants:
            raise AlreadyExists(f"tenant {quote(tenant_id)} already exists")
        return Record("tenant.created", tenant_id, {
            "tenant_id": tenant_id, "display_name": display_name or tenant_id,
            "quota": quota_to_dict(quota or Quota()), "policy": policy_to_dict(policy or PlacementPolicy()),
            "created_at": time.time() if now is None else now,
        })

    def set_quota(self, tenant_id: str, quota: Quota) -> Record:
        self.tenant(tenant_id)
        return Record("tenant.quota_set", tenant_id, {"tenant_id": tenant_id, "quota": quota_to_dict(quota)})

    def set_policy(self, tenant_id: str, policy: PlacementPolicy, workload_id: str = "") -> Record:
        self.tenant(tenant_id)
        if workload_id:
            owner = self.workload_tenant.get(workload_id)
            if owner is not None and owner != tenant_id:
                raise InvalidArgument(f"workload {quote(workload_id)} belongs to tenant {owner!r}")
            return Record("workload.policy_set", workload_id, {
                "tenant_id": tenant_id, "workload_id": workload_id, "policy": policy_to_dict(policy)})
        return Record("tenant.policy_set", tenant_id, {"tenant_id": tenant_id, "policy": policy_to_dict(policy)})

    def issue_token(
        self, role: Role, tenant_id: str | None, description: str = "", now: float | None = None
    ) -> tuple[str, Record]:
        """Returns the token (shown once, never stored) and the record holding only its hash."""
        if role is Role.TENANT:
            if not tenant_id:
                raise InvalidArgument("a tenant token needs a tenant id")
            self.tenant(tenant_id)
        elif tenant_id:
            raise InvalidArgument("an operator token belongs to no tenant")
        token, rec = mint_token(role, tenant_id or None, description=description, now=now)
        return token, Record("token.issued", rec.token_id, {
            "token_id": rec.token_id, "secret_sha256": rec.secret_sha256, "role": rec.role.value,
            "tenant_id": rec.tenant_id, "created_at": rec.created_at, "description": rec.description})

    def revoke_token(self, token_id: str, now: float | None = None) -> Record:
        rec = self.tokens.get(token_id)
        if rec is None:
            raise NotFound(f"token {quote(token_id)} does not exist")
        return Record("token.revoked", token_id, {
            "token_id": token_id, "tenant_id": rec.tenant_id,
            "revoked_at": time.time() if now is None else now})

    def admit(self, demand: WorkloadDemand, gpus_per_unit: int = 1) -> tuple[Decision, Record]:
        """Admission always produces a record: refusals are audited too."""
        tenant = self.tenants.get(demand.tenant_id)
        if tenant is None:
            decision = Decision(Verdict.UNKNOWN_TENANT, (f"tenant {quote(demand.tenant_id)} does not exist",))
            holding = None
        else:
            owner = self.workload_tenant.get(demand.workload_id)
            if owner is not None and owner != demand.tenant_id:
                decision = Decision(Verdict.POLICY_VIOLATION,
                                    (f"workload id {quote(demand.workload_id)} belongs to another tenant",))
                holding = None
            else:
                wl_policy = self.workload_policies.get(demand.workload_id)
                if demand.policy is not None:
                    wl_policy = demand.policy.narrowed_by(wl_policy)
                d = WorkloadDemand(demand.workload_id, demand.tenant_id, demand.kind, demand.gpus,
                                   demand.gpu_type, wl_policy)
                decision, holding = admit(
                    d, tenant.quota, tenant.policy,
                    self.holdings.get(demand.tenant_id, {}).values(),
                    self.pool.values() if self.pool_known else None, gpus_per_unit)
        payload: dict[str, Any] = {
            "workload_id": demand.workload_id, "tenant_id": demand.tenant_id, "kind": demand.kind,
            "gpus": demand.gpus, "gpu_type": demand.gpu_type, "verdict": decision.verdict.value,
            "reasons": list(decision.reasons),
            "policy": policy_to_dict(demand.policy) if demand.policy is not None else None,
        }
        if holding is not None:
            payload["reserved_gpus"] = holding.reserved_gpus
            payload["reserved_cost_per_hour"] = holding.reserved_cost_per_hour
        return decision, Record("admission", demand.workload_id, payload)

    def check_placements(self, placements: list[Placement], replace_workload: bool = False) -> Decision:
        """Check one workload's placements before commit (no record: the commit is recorded)."""
        if not placements:
            return Decision(Verdict.ADMITTED)
        tenant_ids = {p.tenant_id for p in placements}
        workload_ids = {p.workload_id for p in placements}
        if len(tenant_ids) != 1 or len(workload_ids) != 1:
            raise InvalidArgument("check placements of one workload at a time")
        tenant_id, workload_id = tenant_ids.pop(), workload_ids.pop()
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            return Decision(Verdict.UNKNOWN_TENANT, (f"tenant {quote(tenant_id)} does not exist",))
        return check_placements(
            placements, tenant.quota, self.effective_policy(tenant_id, workload_id),
            self.holdings.get(tenant_id, {}), replace_workload)

    def placement_committed(self, p: Placement, at: float) -> Record:
        return Record("placement.committed", p.unit_id, {**placement_to_dict(p), "at": at})

    def placement_released(self, unit_id: str, workload_id: str, tenant_id: str, at: float, reason: str) -> Record:
        return Record("placement.released", unit_id, {
            "unit_id": unit_id, "workload_id": workload_id, "tenant_id": tenant_id, "at": at, "reason": reason})

    def workload_ended(self, workload_id: str, tenant_id: str, at: float, reason: str) -> Record:
        return Record("workload.ended", workload_id, {
            "workload_id": workload_id, "tenant_id": tenant_id, "at": at, "reason": reason})

    def enroll_site(self, site_id: str, region: str, gpus: Mapping[str, tuple[int, float]], nats_public_key: str = "",
                    now: float | None = None) -> Record:
        """Admit a site: the GPUs it may offer at most and their price by type (replaces earlier terms)."""
        from cncbrain.bus.subjects import SubjectError, check_token

        try:
            check_token(site_id, "site_id")
        except SubjectError as exc:
            raise InvalidArgument(str(exc)) from None
        if not gpus:
            raise InvalidArgument("gpus: a site offers at least one GPU type")
        terms: dict[str, dict[str, float | int]] = {}
        for gpu_type, (count, price) in gpus.items():
            if not gpu_type or len(gpu_type) > 64:
                raise InvalidArgument("gpus.gpu_type: 1..64 characters")
            if not 0 < count <= 1_000_000:
                raise InvalidArgument(f"gpus[{quote(gpu_type)}].max_count: 1..1000000")
            if not (price >= 0 and price < 1e6):
                raise InvalidArgument(f"gpus[{quote(gpu_type)}].price_usd_per_hour: 0..1000000")
            terms[gpu_type] = {"max_count": int(count), "price_usd_per_hour": float(price)}
        if nats_public_key and not (nats_public_key.startswith("U") and len(nats_public_key) == 56):
            raise InvalidArgument("nats_public_key: a NATS user public key (U…, 56 characters)")
        return Record("site.enrolled", site_id, {
            "site_id": site_id, "region": region, "gpus": terms, "nats_public_key": nats_public_key,
            "enrolled_at": time.time() if now is None else now})

    # ---- folding a ledger record into the state ----

    def apply(self, kind: str, payload: Mapping[str, Any]) -> None:  # noqa: C901 - one branch per kind
        if kind == "tenant.created":
            tid = payload["tenant_id"]
            self.tenants[tid] = Tenant(tid, payload.get("display_name", tid), quota_from_dict(payload.get("quota")),
                                       policy_from_dict(payload.get("policy")), float(payload.get("created_at", 0)))
        elif kind == "tenant.quota_set":
            self.tenants[payload["tenant_id"]].quota = quota_from_dict(payload["quota"])
        elif kind == "tenant.policy_set":
            self.tenants[payload["tenant_id"]].policy = policy_from_dict(payload["policy"])
        elif kind == "workload.policy_set":
            self.workload_policies[payload["workload_id"]] = policy_from_dict(payload["policy"])
            self.workload_tenant[payload["workload_id"]] = payload["tenant_id"]
        elif kind == "token.issued":
            rec = TokenRecord(
                token_id=payload["token_id"], secret_sha256=payload["secret_sha256"], role=Role(payload["role"]),
                tenant_id=payload.get("tenant_id"), created_at=float(payload["created_at"]),
                description=payload.get("description", ""))
            self.tokens[rec.token_id] = rec
        elif kind == "token.revoked":
            old = self.tokens.get(payload["token_id"])
            if old is not None:
                self.tokens[old.token_id] = TokenRecord(
                    old.token_id, old.secret_sha256, old.role, old.tenant_id, old.created_at,
                    old.description, float(payload["revoked_at"]))
        elif kind == "admission":
            if payload.get("verdict") == Verdict.ADMITTED.value:
                tid, wid = payload["tenant_id"], payload["workload_id"]
                self.workload_tenant[wid] = tid
                held = self.holdings.setdefault(tid, {}).setdefault(wid, Holding(wid))
                held.reserved_gpus = {str(k): int(v) for k, v in (payload.get("reserved_gpus") or {}).items()}
                held.reserved_cost_per_hour = float(payload.get("reserved_cost_per_hour") or 0.0)
                if payload.get("policy"):
                    self.workload_policies[wid] = policy_from_dict(payload["policy"]).narrowed_by(
                        self.workload_policies.get(wid))
        elif kind == "placement.committed":
            p = placement_from_dict(payload)
            self.workload_tenant.setdefault(p.workload_id, p.tenant_id)
            held = self.holdings.setdefault(p.tenant_id, {}).setdefault(p.workload_id, Holding(p.workload_id))
            held.placed[p.unit_id] = p
            self.usage.start(Allocation(p.unit_id, p.workload_id, p.tenant_id, p.site_id, p.gpu_type, p.gpus,
                                        p.price_per_gpu_hour, float(payload["at"])))
        elif kind == "placement.released":
            holding = self.holdings.get(payload["tenant_id"], {}).get(payload["workload_id"])
            if holding is not None:
                holding.placed.pop(payload["unit_id"], None)
            self.usage.stop(payload["unit_id"], float(payload["at"]))
        elif kind == "site.enrolled":
            self.enrolled[payload["site_id"]] = dict(payload)
        elif kind == "workload.ended":
            self.holdings.get(payload["tenant_id"], {}).pop(payload["workload_id"], None)
            self.usage.stop_workload(payload["workload_id"], float(payload["at"]))
        # Other kinds (adaptation actions, refused checks) are audit-only.

    def apply_record(self, record: Record) -> None:
        self.apply(record.kind, record.payload)

    # ---- a checkpoint of the folded state (what `apply` built; not the pool, which is not ledgered) ----

    def to_dict(self) -> dict[str, Any]:
        """Everything folded from the ledger as plain JSON data; `from_dict` gives the same state."""
        return as_json(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """`to_dict` in two steps, so that a caller that must not wait (the ledger writer) pays only
        for this one: a copy sharing nothing that can change — closed usage intervals are never
        changed again, so they are shared as they are, open ones copied — which `as_json` (in a
        thread, while the state moves on) turns into the JSON data."""
        return {
            "tenants": [[t.tenant_id, t.display_name, quota_to_dict(t.quota), policy_to_dict(t.policy), t.created_at]
                        for t in self.tenants.values()],
            "tokens": [[r.token_id, r.secret_sha256, r.role.value, r.tenant_id, r.created_at, r.description,
                        r.revoked_at] for r in self.tokens.values()],
            "workload_policies": {w: policy_to_dict(p) for w, p in self.workload_policies.items()},
            "workload_tenant": dict(self.workload_tenant),
            "holdings": {tid: [[h.workload_id, dict(h.reserved_gpus), h.reserved_cost_per_hour,
                                [placement_to_dict(p) for p in h.placed.values()]] for h in held.values()]
                         for tid, held in self.holdings.items()},
            "allocations": [a if a.end is not None else copy.copy(a) for a in self.usage.allocations],
            "enrolled": json.loads(json.dumps(self.enrolled)),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GovernanceState:
        state = cls()
        for tid, name, quota, policy, created in d["tenants"]:
            state.tenants[tid] = Tenant(tid, name, quota_from_dict(quota), policy_from_dict(policy), float(created))
        for token_id, digest, role, tenant_id, created, description, revoked in d["tokens"]:
            state.tokens[token_id] = TokenRecord(token_id, digest, Role(role), tenant_id, float(created), description,
                                                 None if revoked is None else float(revoked))
        state.workload_policies = {w: policy_from_dict(p) for w, p in d["workload_policies"].items()}
        state.workload_tenant = dict(d["workload_tenant"])
        for tid, held in d["holdings"].items():
            state.holdings[tid] = {
                wid: Holding(wid, {str(k): int(v) for k, v in gpus.items()}, float(cost),
                             {p["unit_id"]: placement_from_dict(p) for p in placed})
                for wid, gpus, cost, placed in held}
        book = state.usage
        for row in d["allocations"]:
            a = Allocation(*row)
            book.allocations.append(a)
            if a.end is None:
                book._open[a.unit_id] = a
        state.enrolled = {k: dict(v) for k, v in d["enrolled"].items()}
        return state

    def update_pool(self, offers: Iterable[SiteOffer]) -> None:
        self.pool = {o.site_id: o for o in offers}
        self.pool_known = True
