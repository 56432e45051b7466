"""GovernanceService: proto <-> domain and who may call what. Refusals are raised (`cncbrain.errors`);
the server's error interceptor answers their status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cncbrain import limits, metrics
from cncbrain.auth import current_principal
from cncbrain.errors import CncError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from cncbrain.governance.policy import (
    Decision,
    PlacementPolicy,
    Quota,
    Verdict,
    WorkloadDemand,
    policy_from_dict,
    policy_to_dict,
    tenant_usage,
)
from cncbrain.identity import PermissionDenied, Principal, Role, TokenRecord, require_tenant_access
from services.governance.domain.ledger import LedgerHead
from services.governance.domain.state import GovernanceState, Record, Tenant
from services.governance.events import Governor
from services.governance.ledger_store import to_proto

SERVICE = "/cnc.governance.v1.GovernanceService/"
OPERATOR_ONLY = frozenset(SERVICE + m for m in (
    "CreateTenant", "ListTenants", "SetQuota", "IssueToken", "ListLedgerEntries", "VerifyLedger", "EnrollSite"))
"""Methods the interceptor refuses to tenants outright; the rest check the tenant per request."""

VERDICT_PB = {Verdict.ADMITTED: gpb.VERDICT_ADMITTED, Verdict.QUOTA_EXCEEDED: gpb.VERDICT_QUOTA_EXCEEDED,
              Verdict.POLICY_VIOLATION: gpb.VERDICT_POLICY_VIOLATION, Verdict.UNKNOWN_TENANT: gpb.VERDICT_UNKNOWN_TENANT}
REFUSAL: dict[Verdict, type[CncError]] = {Verdict.QUOTA_EXCEEDED: ResourceExhausted,
                                         Verdict.POLICY_VIOLATION: FailedPrecondition,
                                         Verdict.UNKNOWN_TENANT: FailedPrecondition}
"""The error an admission refusal is answered with, by verdict."""


# ---- proto <-> domain -----------------------------------------------------------------------------


def quota_from_pb(q: gpb.Quota) -> Quota:
    by_type: dict[str, int] = {}
    limits.entries("quota.gpus.gpu_type", [g.gpu_type for g in q.gpus])
    for g in q.gpus:
        if not g.gpu_type:
            raise InvalidArgument("quota.gpus.gpu_type: required")
        by_type[g.gpu_type] = limits.integer(f"quota.gpus[{g.gpu_type}].max_gpus", g.max_gpus, 0, limits.MAX_GPUS)
    cost = q.max_cost_usd_per_hour if q.HasField("max_cost_usd_per_hour") else None
    if cost is not None:
        limits.number("quota.max_cost_usd_per_hour", cost, 0, limits.MAX_COST_PER_HOUR, unit=" USD/h")
    max_gpus = limits.integer("quota.max_gpus", q.max_gpus, 0, limits.MAX_GPUS) if q.HasField("max_gpus") else None
    return Quota(by_type, max_gpus, cost)


def quota_to_pb(q: Quota) -> gpb.Quota:
    out = gpb.Quota(gpus=[gpb.GpuQuota(gpu_type=t, max_gpus=n) for t, n in sorted(q.gpus_by_type.items())])
    if q.max_gpus is not None:
        out.max_gpus = q.max_gpus
    if q.max_cost_per_hour is not None:
        out.max_cost_usd_per_hour = q.max_cost_per_hour
    return out


def policy_from_pb(p: gpb.PlacementPolicy) -> PlacementPolicy:
    def pick(values: Any, restrict: bool) -> frozenset[str] | None:
        return frozenset(values) if (values or restrict) else None

    cost = p.max_cost_usd_per_hour if p.HasField("max_cost_usd_per_hour") else None
    if cost is not None:
        limits.number("policy.max_cost_usd_per_hour", cost, 0, limits.MAX_COST_PER_HOUR, unit=" USD/h")
    for name in ("allowed_regions", "allowed_sites", "allowed_gpu_types"):
        limits.entries(f"policy.{name}", getattr(p, name), max_len=limits.MAX_REPEATED)
    return PlacementPolicy(pick(p.allowed_regions, p.restrict_regions), pick(p.allowed_sites, p.restrict_sites),
                           pick(p.allowed_gpu_types, p.restrict_gpu_types), cost)


def policy_to_pb(p: PlacementPolicy) -> gpb.PlacementPolicy:
    out = gpb.PlacementPolicy(
        allowed_regions=sorted(p.allowed_regions or ()), allowed_sites=sorted(p.allowed_sites or ()),
        allowed_gpu_types=sorted(p.allowed_gpu_types or ()), restrict_regions=p.allowed_regions is not None,
        restrict_sites=p.allowed_sites is not None, restrict_gpu_types=p.allowed_gpu_types is not None)
    if p.max_cost_per_hour is not None:
        out.max_cost_usd_per_hour = p.max_cost_per_hour
    return out


def ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def token_to_pb(r: TokenRecord) -> gpb.TokenInfo:
    out = gpb.TokenInfo(token_id=r.token_id, role=gpb.ROLE_OPERATOR if r.role is Role.OPERATOR else gpb.ROLE_TENANT,
                       tenant_id=r.tenant_id or "", description=r.description, created_at=ts(r.created_at),
                       revoked=r.revoked)
    if r.revoked_at is not None:
        out.revoked_at.FromNanoseconds(int(r.revoked_at * 1e9))
    return out


def decision_to_pb(d: Decision) -> gpb.Decision:
    return gpb.Decision(verdict=VERDICT_PB[d.verdict], reasons=list(d.reasons), eligible_sites=list(d.eligible_sites))


def tenant_to_pb(t: Tenant, state: GovernanceState) -> gpb.Tenant:
    _, gpus, cost = tenant_usage(state.holdings.get(t.tenant_id, {}).values())
    return gpb.Tenant(tenant_id=t.tenant_id, display_name=t.display_name, quota=quota_to_pb(t.quota),
                     policy=policy_to_pb(t.policy), created_at=ts(t.created_at), gpus_in_use=gpus,
                     cost_usd_per_hour_in_use=cost)


# ---- the servicer -----------------------------------------------------------------------------------


class GovernanceServicer(governance_pb2_grpc.GovernanceServiceServicer):
    def __init__(self, governor: Governor) -> None:
        self.gov = governor

    @property
    def state(self) -> GovernanceState:
        return self.gov.state

    async def _change(self, command: Callable[[GovernanceState], tuple[Any, list[Record]]]) -> Any:
        result, _ = await self.gov.submit(command, current_principal().token_id)
        return result

    @staticmethod
    def _tenant_scope(principal: Principal, asked: str) -> str | None:
        """The tenant a listing covers: the asked one (checked), or all for an operator."""
        if asked:
            require_tenant_access(principal, asked)
            return asked
        return None if principal.is_operator else principal.tenant_id

    # tenants ----------------------------------------------------------------------------------------

    async def CreateTenant(self, request: gpb.CreateTenantRequest, context) -> gpb.CreateTenantResponse:
        limits.text("display_name", request.display_name, required=False)
        quota = quota_from_pb(request.quota)
        policy = policy_from_pb(request.policy)
        await self._change(lambda s: (None, [s.create_tenant(request.tenant_id, request.display_name, quota,
                                                             policy)]))
        return gpb.CreateTenantResponse(tenant=tenant_to_pb(self.state.tenant(request.tenant_id), self.state))

    async def GetTenant(self, request: gpb.GetTenantRequest, context) -> gpb.GetTenantResponse:
        require_tenant_access(current_principal(), request.tenant_id)
        return gpb.GetTenantResponse(tenant=tenant_to_pb(self.state.tenant(request.tenant_id), self.state))

    async def ListTenants(self, request: gpb.ListTenantsRequest, context) -> gpb.ListTenantsResponse:
        return gpb.ListTenantsResponse(tenants=[tenant_to_pb(t, self.state) for _, t in sorted(self.state.tenants.items())])

    async def SetQuota(self, request: gpb.SetQuotaRequest, context) -> gpb.SetQuotaResponse:
        quota = quota_from_pb(request.quota)
        await self._change(lambda s: (None, [s.set_quota(request.tenant_id, quota)]))
        return gpb.SetQuotaResponse(tenant=tenant_to_pb(self.state.tenant(request.tenant_id), self.state))

    async def SetPlacementPolicy(self, request: gpb.SetPlacementPolicyRequest, context) -> gpb.SetPlacementPolicyResponse:
        principal = current_principal()
        if request.workload_id:
            require_tenant_access(principal, request.tenant_id)
        elif not principal.is_operator:
            raise PermissionDenied("only an operator sets a tenant's placement policy")
        policy = policy_from_pb(request.policy)
        await self._change(lambda s: (None, [s.set_policy(request.tenant_id, policy, request.workload_id)]))
        effective = self.state.effective_policy(request.tenant_id, request.workload_id or None)
        return gpb.SetPlacementPolicyResponse(effective_policy=policy_to_pb(effective))

    # tokens -----------------------------------------------------------------------------------------

    async def IssueToken(self, request: gpb.IssueTokenRequest, context) -> gpb.IssueTokenResponse:
        if request.role not in (gpb.ROLE_TENANT, gpb.ROLE_OPERATOR):
            raise InvalidArgument("role: ROLE_TENANT or ROLE_OPERATOR")
        role = Role.OPERATOR if request.role == gpb.ROLE_OPERATOR else Role.TENANT
        limits.text("description", request.description, required=False)

        def issue(s: GovernanceState) -> tuple[str, list[Record]]:
            token, rec = s.issue_token(role, request.tenant_id or None, request.description)
            return token, [rec]

        token = await self._change(issue)
        token_id = token.split(".", 1)[0]
        await self.gov.publish_token(token_id)
        return gpb.IssueTokenResponse(token=token, info=token_to_pb(self.state.tokens[token_id]))

    async def RevokeToken(self, request: gpb.RevokeTokenRequest, context) -> gpb.RevokeTokenResponse:
        principal = current_principal()
        rec = self.state.tokens.get(request.token_id)
        if rec is None:
            raise NotFound(f"token {limits.quote(request.token_id)} does not exist")
        if not principal.is_operator and rec.tenant_id != principal.tenant_id:
            raise PermissionDenied("a tenant may revoke only its own tokens")
        await self._change(lambda s: (None, [s.revoke_token(request.token_id)]))
        # Written before answering: every service's feed gets the revocation right away.
        await self.gov.publish_token(request.token_id)
        return gpb.RevokeTokenResponse(info=token_to_pb(self.state.tokens[request.token_id]))

    async def ListTokens(self, request: gpb.ListTokensRequest, context) -> gpb.ListTokensResponse:
        scope = self._tenant_scope(current_principal(), request.tenant_id)
        records = [r for r in self.state.tokens_of(None) if scope is None or r.tenant_id == scope]
        return gpb.ListTokensResponse(tokens=[token_to_pb(r) for r in records])

    async def WhoAmI(self, request: gpb.WhoAmIRequest, context) -> gpb.WhoAmIResponse:
        p = current_principal()
        return gpb.WhoAmIResponse(token_id=p.token_id, role=gpb.ROLE_OPERATOR if p.is_operator else gpb.ROLE_TENANT,
                                 tenant_id=p.tenant_id or "")

    # admission and placement -----------------------------------------------------------------------

    async def AdmitWorkload(self, request: gpb.AdmitWorkloadRequest, context) -> gpb.AdmitWorkloadResponse:
        if not request.workload_id or not request.tenant_id:
            raise InvalidArgument("workload_id and tenant_id: required")
        require_tenant_access(current_principal(), request.tenant_id)
        if request.gpus < 1:
            raise InvalidArgument("gpus: a workload needs at least one GPU")
        policy = policy_from_pb(request.policy) if request.HasField("policy") else None
        gpu_type = request.gpu_types[0] if len(request.gpu_types) == 1 else None
        if len(request.gpu_types) > 1:
            policy = (policy or PlacementPolicy()).narrowed_by(
                PlacementPolicy(allowed_gpu_types=frozenset(request.gpu_types)))
        kind = "training" if request.kind == common.WORKLOAD_KIND_TRAINING_JOB else "inference"
        demand = WorkloadDemand(request.workload_id, request.tenant_id, kind, request.gpus, gpu_type, policy)

        def admit(s: GovernanceState) -> tuple[Decision, list[Record]]:
            decision, rec = s.admit(demand, max(request.gpus_per_unit, 1))
            return decision, [rec]

        decision = await self._change(admit)
        metrics.ADMISSIONS.labels("admitted" if decision.ok else "refused", decision.verdict.name.lower()).inc()
        if not decision.ok:
            raise REFUSAL[decision.verdict](f"{request.workload_id}: {decision.message}")
        return gpb.AdmitWorkloadResponse(decision=decision_to_pb(decision))

    async def CheckPlacement(self, request: gpb.CheckPlacementRequest, context) -> gpb.CheckPlacementResponse:
        require_tenant_access(current_principal(), request.tenant_id)
        placements = [self.gov.placement_of(request.workload_id, request.tenant_id, p)
                      for p in request.placements if p.replicas or p.shard_indices]
        decision = self.state.check_placements(placements, replace_workload=True) if placements else Decision(
            Verdict.ADMITTED)
        return gpb.CheckPlacementResponse(decision=decision_to_pb(decision))

    # usage and ledger ------------------------------------------------------------------------------

    async def GetUsage(self, request: gpb.GetUsageRequest, context) -> gpb.GetUsageResponse:
        scope = self._tenant_scope(current_principal(), request.tenant_id)
        now = time.time()
        t0 = request.start.ToNanoseconds() / 1e9 if request.HasField("start") else 0.0
        t1 = request.end.ToNanoseconds() / 1e9 if request.HasField("end") else now
        if not principal_may_see_workload(current_principal(), request.workload_id, self.state):
            raise PermissionDenied(f"workload {limits.quote(request.workload_id)} belongs to another tenant")
        tenants, workloads = self.state.usage.query(t0, t1, now, scope, request.workload_id or None,
                                                    request.by_gpu_type)

        def line(u: Any) -> gpb.UsageLine:
            return gpb.UsageLine(tenant_id=u.tenant_id, workload_id=u.workload_id, gpu_type=u.gpu_type,
                                gpu_hours=u.gpu_hours, cost_usd=u.cost_usd)

        return gpb.GetUsageResponse(tenants=[line(u) for u in tenants], workloads=[line(u) for u in workloads],
                                   start=ts(t0), end=ts(t1))

    async def ListLedgerEntries(self, request: gpb.ListLedgerEntriesRequest, context) -> gpb.ListLedgerEntriesResponse:
        limit = min(request.limit or 100, 1000)
        entries = await self.gov.store.read_all()
        picked = []
        for e in sorted((e for e in entries if e.index >= request.from_index), key=lambda e: e.index):
            if request.kind and e.kind != request.kind:
                continue
            if request.subject and e.subject != request.subject:
                continue
            picked.append(e)
            if len(picked) >= limit:
                break
        return gpb.ListLedgerEntriesResponse(entries=[to_proto(e) for e in picked], length=self.gov.head.length)

    async def EnrollSite(self, request: gpb.EnrollSiteRequest, context) -> gpb.EnrollSiteResponse:
        site = request.site
        gpus: dict[str, tuple[int, float]] = {}
        for g in site.gpus:
            if g.gpu_type in gpus:
                raise InvalidArgument(f"gpus: {g.gpu_type} given twice")
            gpus[g.gpu_type] = (g.max_count, g.price_usd_per_hour)
        def enroll(s: GovernanceState) -> tuple[None, list[Record]]:
            rec = s.enroll_site(site.site_id, site.region, gpus, site.nats_public_key)
            known = s.enrolled.get(site.site_id)
            same = known is not None and all(known.get(k) == rec.payload[k]
                                             for k in ("region", "gpus", "nats_public_key"))
            return None, [] if same else [rec]  # the same terms again: nothing to record

        await self._change(enroll)
        return gpb.EnrollSiteResponse(site=enrollment_to_pb(self.state.enrolled[site.site_id]))

    async def VerifyLedger(self, request: gpb.VerifyLedgerRequest, context) -> gpb.VerifyLedgerResponse:
        expected = None
        if request.expected_length:
            if len(request.expected_head_hash) != 64:
                raise InvalidArgument("expected_head_hash: 64 hex characters")
            expected = LedgerHead(request.expected_length, request.expected_head_hash)
        result, seconds = await self.gov.verify(expected)
        return gpb.VerifyLedgerResponse(
            ok=result.ok, entries_checked=result.entries_checked, length=result.head.length,
            head_hash=result.head.hash, seconds=seconds,
            issues=[gpb.LedgerIssue(index=max(i.index, 0), kind=i.kind, detail=i.detail) for i in result.issues])


def enrollment_to_pb(terms: dict) -> gpb.SiteEnrollment:
    return gpb.SiteEnrollment(
        site_id=terms["site_id"], region=terms.get("region", ""), nats_public_key=terms.get("nats_public_key", ""),
        enrolled_at=ts(terms.get("enrolled_at")),
        gpus=[gpb.EnrolledGpus(gpu_type=t, max_count=int(g["max_count"]), price_usd_per_hour=float(g["price_usd_per_hour"]))
              for t, g in sorted(terms["gpus"].items())])


def principal_may_see_workload(principal: Principal, workload_id: str, state: GovernanceState) -> bool:
    if not workload_id or principal.is_operator:
        return True
    owner = state.workload_tenant.get(workload_id)
    return owner is None or owner == principal.tenant_id


__all__ = ["GovernanceServicer", "OPERATOR_ONLY", "policy_from_dict", "policy_to_dict"]
