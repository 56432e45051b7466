"""What the other blocks use from governance, in one place.

- `GovernanceGate.admit(...)`: admission at submit, a gRPC call to GovernanceService.AdmitWorkload;
  a refusal raises `AdmissionRefused` carrying the gRPC code (RESOURCE_EXHAUSTED over quota,
  FAILED_PRECONDITION outside policy) and governance's reason, for the caller to return as is.
- `GovernanceGate.check(...)`: the check of a workload's placement before the scheduler commits
  it, evaluated in-process (no network hop on the commit path) against the tenants' quotas,
  policies and holdings that governance projects into KV (`cnc-governance`), which the gate
  watches. Placements the gate approved are remembered until governance's own view includes
  them, so two quick commits cannot both take the tenant's last GPUs.

    gate = await GovernanceGate.start(bus, "127.0.0.1:50064", token)
    await gate.admit(workload_id, tenant, kind, gpus, gpus_per_unit, gpu_types)   # at submit
    decision = gate.check(workload_id, tenant, placements)                          # before commit
    if not decision.ok: ... decision.message ...

- `OpenGate`: the gate of a brain that runs without governance: it admits everything, every
  placement passes. A service holds a `Gate` either way, so its code has no "governance off" branch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from cnc.common.v1 import common_pb2 as common
from cnc.governance.v1 import governance_pb2 as gpb
from cnc.governance.v1 import governance_pb2_grpc
from cncbrain.auth import token_interceptors
from cncbrain.bus import Bus, Event, subjects
from cncbrain.bus.streams import KV_GOVERNANCE
from cncbrain.certs import client_channel
from cncbrain.errors import CncError
from cncbrain.governance.policy import (
    Decision,
    Holding,
    Placement,
    PlacementPolicy,
    Quota,
    Verdict,
    check_workload,
    placement_from_dict,
    policy_from_dict,
    quota_from_dict,
)
from cncbrain.kvfeed import KvFollower
from cncbrain.limits import quote
from cncbrain.signing import SignatureError, Verifier, verifier_from_env

log = logging.getLogger(__name__)
OVERLAY_TTL_S = 10.0


class AdmissionRefused(CncError):
    """Governance did not admit a workload; `status` is the one governance answered with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = code


@dataclass
class _TenantView:
    quota: Quota = field(default_factory=Quota)
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    holdings: dict[str, Holding] = field(default_factory=dict)
    known: bool = False


class Gate(Protocol):
    """What a service asks governance's gate (`GovernanceGate`, or `OpenGate` without governance)."""

    async def admit(self, workload_id: str, tenant_id: str, kind: common.WorkloadKind.ValueType, gpus: int,
                    gpus_per_unit: int, gpu_types: Iterable[str] = (), token: str | None = None) -> Any: ...

    def check(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> Decision: ...

    def headroom(self, workload_id: str, tenant_id: str) -> tuple[dict[str, int], int | None, float | None]: ...

    def policy_for(self, workload_id: str, tenant_id: str) -> PlacementPolicy: ...

    def price(self, site_id: str, gpu_type: str) -> float: ...

    def allows(self, workload_id: str, tenant_id: str, site_id: str, gpu_type: str) -> bool: ...

    def committed(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> None: ...

    async def close(self) -> None: ...


class OpenGate:
    """The gate without governance: every workload admitted, every placement allowed, no quota."""

    async def admit(self, workload_id: str, tenant_id: str, kind: common.WorkloadKind.ValueType, gpus: int,
                    gpus_per_unit: int, gpu_types: Iterable[str] = (), token: str | None = None) -> None:
        return None

    def check(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> Decision:
        return Decision(Verdict.ADMITTED)

    def headroom(self, workload_id: str, tenant_id: str) -> tuple[dict[str, int], int | None, float | None]:
        return {}, None, None

    def policy_for(self, workload_id: str, tenant_id: str) -> PlacementPolicy:
        return PlacementPolicy()

    def price(self, site_id: str, gpu_type: str) -> float:
        return 0.0

    def allows(self, workload_id: str, tenant_id: str, site_id: str, gpu_type: str) -> bool:
        return True

    def committed(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> None:
        return None

    async def close(self) -> None:
        return None


def unit_id(workload_id: str, site_id: str) -> str:
    return f"{workload_id}@{site_id}"


class GovernanceGate:
    def __init__(self, bus: Bus, target: str | None, token: str | None = None,
                 verifier: Verifier | None = None) -> None:
        self.bus = bus
        self.verifier = verifier
        """Governance's public key(s): a tenant or workload policy it did not sign is refused (None:
        no check, a brain without NATS credentials)."""
        self.refused = 0
        self.target = target
        self.token = token
        self.tenants: dict[str, _TenantView] = {}
        self.workload_policies: dict[str, PlacementPolicy] = {}
        self.sites: dict[str, tuple[str, dict[str, float]]] = {}  # site -> (region, price by GPU type)
        self.overlay: dict[str, tuple[float, str, list[Placement]]] = {}  # workload -> (time, tenant, placements)
        self._totals: dict[str, tuple[dict[str, Holding], dict[str, tuple], tuple]] = {}
        self._follower: KvFollower | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: governance_pb2_grpc.GovernanceServiceAsyncStub | None = None

    @classmethod
    async def start(cls, bus: Bus, target: str | None, token: str | None = None) -> GovernanceGate:
        gate = cls(bus, target, token, verifier_from_env())
        kv = await bus.kv(KV_GOVERNANCE)
        gate._follower = KvFollower(kv, gate._apply, "governance-gate")
        await gate._follower.start()
        await bus.subscribe(subjects.PERCEPTION_SNAPSHOT, gate._on_snapshot, consumer="governance-gate")
        if target:
            gate._channel = client_channel(target, interceptors=token_interceptors(token))
            gate._stub = governance_pb2_grpc.GovernanceServiceStub(gate._channel)
        return gate

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.stop()
        if self._channel is not None:
            await self._channel.close()

    # ---- following governance's projection -------------------------------------------------------

    def _apply(self, entry: Any) -> None:
        key: str = entry.key
        self._totals.clear()
        if not entry.value:  # deleted: only holdings are ever deleted (the workload ended)
            if key.startswith("holding."):
                tenant, _, wid = key.removeprefix("holding.").partition(".")
                self.tenants.get(tenant, _TenantView()).holdings.pop(wid, None)
            return
        try:
            if key.startswith(("tenant.", "workload.")) and self.verifier is not None:
                try:
                    data = self.verifier.unseal(entry.value)
                    named = data.get("tenant_id") if key.startswith("tenant.") else data.get("workload_id")
                    if key.partition(".")[2] != named:
                        raise SignatureError(f"record of {named!r} stored under {key}")
                except SignatureError as exc:
                    self.refused += 1
                    log.error("governance gate: refusing %s, not vouched for by governance: %s", key, exc)
                    return
            else:
                data = json.loads(entry.value)
            if key.startswith("tenant."):
                view = self.tenants.setdefault(key.removeprefix("tenant."), _TenantView())
                view.quota = quota_from_dict(data.get("quota"))
                view.policy = policy_from_dict(data.get("policy"))
                view.known = True
            elif key.startswith("workload."):
                if data.get("policy") is not None:
                    self.workload_policies[key.removeprefix("workload.")] = policy_from_dict(data["policy"])
            elif key.startswith("holding."):
                tenant, _, wid = key.removeprefix("holding.").partition(".")
                view = self.tenants.setdefault(tenant, _TenantView())
                held = Holding(wid, {k: int(v) for k, v in data.get("reserved_gpus", {}).items()},
                               float(data.get("reserved_cost_per_hour", 0.0)),
                               {u: placement_from_dict(p) for u, p in data.get("placed", {}).items()})
                view.holdings[wid] = held
                pending = self.overlay.get(wid)
                if pending is not None:
                    seen = {p.unit_id: (p.site_id, p.gpus) for p in held.placed.values()}
                    if seen == {p.unit_id: (p.site_id, p.gpus) for p in pending[2]}:
                        del self.overlay[wid]  # governance has caught up with the commit
        except (ValueError, KeyError, TypeError) as exc:
            log.error("governance gate: ignoring malformed %s: %s", key, exc)

    async def _on_snapshot(self, event: Event) -> None:
        for s in event.payload.sites:
            pools = s.gpu_pools or s.site.gpu_pools
            self.sites[s.site.site_id] = (s.site.region, {p.gpu_type: p.price_usd_per_hour for p in pools})

    # ---- admission (gRPC) --------------------------------------------------------------------------

    async def admit(self, workload_id: str, tenant_id: str, kind: common.WorkloadKind.ValueType, gpus: int, gpus_per_unit: int,
                    gpu_types: Iterable[str] = (), token: str | None = None, timeout_s: float = 5.0) -> gpb.Decision:
        """Admit at submit; raises `AdmissionRefused` with governance's code and reason.

        token: the caller's own token to forward (so governance checks the tenant); default the
        gate's token.
        """
        if self._stub is None:
            raise AdmissionRefused(grpc.StatusCode.UNAVAILABLE, "no governance service configured")
        request = gpb.AdmitWorkloadRequest(workload_id=workload_id, tenant_id=tenant_id, kind=kind, gpus=gpus,
                                          gpus_per_unit=gpus_per_unit, gpu_types=list(gpu_types))
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            resp = await self._stub.AdmitWorkload(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # the scheduler answers; what it needs is away: say which, so nobody looks for a dead brain
                raise AdmissionRefused(grpc.StatusCode.UNAVAILABLE, f"governance at {self.target} unavailable for "
                                       f"admission ({exc.code().name}: {(exc.details() or '')[:200]})") from None
            raise AdmissionRefused(exc.code(), exc.details() or str(exc.code())) from None
        return resp.decision

    # ---- placement check (in-process) -------------------------------------------------------------

    def placement(self, workload_id: str, tenant_id: str, p: common.Placement) -> Placement:
        region, prices = self.sites.get(p.site_id, ("", {}))
        units = p.replicas + len(p.shard_indices)
        return Placement(workload_id, tenant_id, unit_id(workload_id, p.site_id), p.site_id, region, p.gpu_type,
                         units * p.gpus_per_unit, prices.get(p.gpu_type, 0.0))

    def _usage(self, tenant_id: str, view: _TenantView) -> tuple[dict[str, Holding], dict[str, tuple], tuple]:
        """The tenant's holdings (with commits governance has not shown yet) and what each counts."""
        cached = self._totals.get(tenant_id)
        if cached is not None:
            return cached
        holdings = dict(view.holdings)
        now = time.monotonic()
        for wid, (at, tenant, ps) in self.overlay.items():
            if tenant == tenant_id and now - at <= OVERLAY_TTL_S:
                base = holdings.get(wid) or Holding(wid)
                holdings[wid] = Holding(wid, base.reserved_gpus, base.reserved_cost_per_hour, {p.unit_id: p for p in ps})
        counted = {wid: h.counted() for wid, h in holdings.items()}
        by_type: dict[str, int] = {}
        for t, _, _ in counted.values():
            for k, v in t.items():
                by_type[k] = by_type.get(k, 0) + v
        totals = (by_type, sum(c[1] for c in counted.values()), sum(c[2] for c in counted.values()))
        self._totals[tenant_id] = (holdings, counted, totals)
        return self._totals[tenant_id]

    def check(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> Decision:
        """May this workload hold exactly `placements` (its whole placement after the commit)?"""
        if not tenant_id:
            return Decision(Verdict.ADMITTED)  # no tenant: a brain running without governance's tenants
        view = self.tenants.get(tenant_id)
        if view is None or not view.known:
            return Decision(Verdict.UNKNOWN_TENANT, (f"tenant {quote(tenant_id)} does not exist",))
        mine = [self.placement(workload_id, tenant_id, p) for p in placements if p.replicas or p.shard_indices]
        if not mine:
            return Decision(Verdict.ADMITTED)
        holdings, counted, (all_types, all_gpus, all_cost) = self._usage(tenant_id, view)
        own = counted.get(workload_id)
        by_type, total, cost = all_types, all_gpus, all_cost
        if own is not None:  # the tenant's usage without this workload's current holding
            by_type = dict(all_types)
            for k, v in own[0].items():
                by_type[k] -= v
            total, cost = all_gpus - own[1], all_cost - own[2]
        policy = view.policy.narrowed_by(self.workload_policies.get(workload_id))
        return check_workload(mine, view.quota, policy, (by_type, total, cost), holdings.get(workload_id))

    def headroom(self, workload_id: str, tenant_id: str) -> tuple[dict[str, int], int | None, float | None]:
        """What the tenant's quota (and the workload's cost cap) leaves for this workload's whole
        placement: GPUs per limited type, GPUs in all (None: no bound), USD per hour (None)."""
        view = self.tenants.get(tenant_id)
        if not tenant_id or view is None or not view.known:
            return {}, None, None
        _, counted, (all_types, all_gpus, all_cost) = self._usage(tenant_id, view)
        own = counted.get(workload_id, ({}, 0, 0.0))
        q = view.quota
        per_type = {t: limit - (all_types.get(t, 0) - own[0].get(t, 0)) for t, limit in q.gpus_by_type.items()}
        total = None if q.max_gpus is None else q.max_gpus - (all_gpus - own[1])
        cost = None if q.max_cost_per_hour is None else q.max_cost_per_hour - (all_cost - own[2])
        cap = view.policy.narrowed_by(self.workload_policies.get(workload_id)).max_cost_per_hour
        if cap is not None:
            cost = cap if cost is None else min(cost, cap)
        return per_type, total, cost

    def policy_for(self, workload_id: str, tenant_id: str) -> PlacementPolicy:
        view = self.tenants.get(tenant_id)
        base = view.policy if view is not None and view.known else PlacementPolicy()
        return base.narrowed_by(self.workload_policies.get(workload_id))

    def price(self, site_id: str, gpu_type: str) -> float:
        return self.sites.get(site_id, ("", {}))[1].get(gpu_type, 0.0)

    def allows(self, workload_id: str, tenant_id: str, site_id: str, gpu_type: str) -> bool:
        """Placement policy alone (no quota): may this workload run at this site on this GPU type?
        A tenant governance does not know has no policy to enforce (it was never admitted)."""
        view = self.tenants.get(tenant_id)
        if not tenant_id or view is None or not view.known:
            return True
        region = self.sites.get(site_id, ("", {}))[0]
        policy = view.policy.narrowed_by(self.workload_policies.get(workload_id))
        return not policy.site_reasons(site_id, region, gpu_type)

    def committed(self, workload_id: str, tenant_id: str, placements: Sequence[common.Placement]) -> None:
        """Tell the gate a checked placement was committed (counted until governance has seen it)."""
        if tenant_id:
            mine = [self.placement(workload_id, tenant_id, p) for p in placements if p.replicas or p.shard_indices]
            self.overlay[workload_id] = (time.monotonic(), tenant_id, mine)
            self._totals.pop(tenant_id, None)
