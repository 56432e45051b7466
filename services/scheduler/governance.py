"""The scheduler's side of governance, in one module the scheduler's own files only call into:

- who may touch a workload: a tenant's workloads carry its id (`spec.tenant`, filled from the
  caller's token), a tenant sees and changes only its own, an operator any (PERMISSION_DENIED);
- admission at submit through governance (RESOURCE_EXHAUSTED / FAILED_PRECONDITION and the reason);
- the placement-policy and quota check of every placement before it is committed (the gate is
  in-process, fed by governance's KV), and site agents' proposals outside policy ignored;
- what the placement check asks of the commit paths (`services/scheduler/coordinator.py`): the
  proposals and GPU types a workload's policy and quota leave, the verdict on a whole placement,
  and the news that a placement was committed.

The gate is always there: governance's (`GovernanceGate`) when `governance_target` is set, else one
that admits everything (`OpenGate`). Who may touch a workload is checked when `auth_enabled` is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.auth import load_token, optional_principal
from cncbrain.bus import Bus
from cncbrain.governance.gate import AdmissionRefused, Gate, GovernanceGate, OpenGate
from cncbrain.governance.policy import Decision
from cncbrain.identity import PermissionDenied, require_tenant_access
from cncbrain.workload import tenant_of
from services.scheduler import domain
from services.scheduler.domain import Inventory

__all__ = ["AdmissionRefused", "Gate", "SchedulerGovernance", "open_gate", "tenant_of"]


async def open_gate(bus: Bus, governance_target: str, token: str = "") -> tuple[Gate, str | None]:
    """The gate the scheduler checks with — governance's when `governance_target` is set, else the
    always-admitting `OpenGate` — and the scheduler's own token (forwarded when a caller has none)."""
    token = token or load_token(required=False) or ""
    if not governance_target:
        return OpenGate(), token or None
    return await GovernanceGate.start(bus, governance_target, token or None), token or None


class SchedulerGovernance:
    def __init__(self, inventory: Inventory, gate: Gate | None = None, token: str | None = None) -> None:
        self.inventory = inventory
        """The GPU inventory (what the proposals' caps follow)."""
        self.gate: Gate = gate or OpenGate()
        """Governance's gate, or the always-admitting one (a brain without governance)."""
        self.token = token

    async def close(self) -> None:
        await self.gate.close()

    # ---- the tenant API ------------------------------------------------------------------------------

    @staticmethod
    def claim(spec: Any) -> None:
        """Stamp a new workload with its tenant: a tenant's token decides it; an operator names it."""
        p = optional_principal()
        if p is None or p.is_operator:
            return
        if spec.tenant and spec.tenant != p.tenant_id:
            raise PermissionDenied(f"tenant {p.tenant_id!r} may not submit work for tenant {spec.tenant!r}")
        spec.tenant = p.tenant_id or ""

    @staticmethod
    def check_owner(w: spb.Workload) -> None:
        p = optional_principal()
        if p is None or p.is_operator:
            return
        tenant = tenant_of(w)
        if not tenant:
            raise PermissionDenied(f"workload {w.workload_id} belongs to no tenant; only an operator may touch it")
        require_tenant_access(p, tenant)

    @staticmethod
    def visible(w: spb.Workload) -> bool:
        p = optional_principal()
        return p is None or p.is_operator or tenant_of(w) == p.tenant_id

    async def admit(self, w: spb.Workload, caller_token: str | None) -> None:
        """Raises `AdmissionRefused` (code + governance's reason) unless governance admits `w`."""
        tenant = tenant_of(w)
        if not tenant:
            return
        need = domain.need_of(w)
        await self.gate.admit(w.workload_id, tenant, w.kind, need.units * need.gpus_per_unit, need.gpus_per_unit,
                              need.allowed_gpu_types, token=caller_token or self.token)

    # ---- the commit path -----------------------------------------------------------------------------

    def proposals(self, w: spb.Workload, proposals: Iterable[site_pb.Proposal]) -> list[site_pb.Proposal]:
        """The proposals arbitration may use: only sites the workload's placement policy allows, and
        each capped by what the tenant's quota leaves, so the arbitrated placement passes the check.

        Caps follow arbitration's own order (cheapest first, one proposal per site, within the
        inventory's free GPUs), so a proposal is capped only by what earlier ones will really take.
        """
        proposals = list(proposals)
        tenant = tenant_of(w)
        if not tenant:
            return proposals
        allowed = [p for p in proposals if self.gate.allows(w.workload_id, tenant, p.site_id, p.gpu_type)]
        per_type, total, cost = self.gate.headroom(w.workload_id, tenant)
        if not per_type and total is None and cost is None:
            return allowed
        need = domain.need_of(w)
        g = need.gpus_per_unit
        remaining = need.units
        seen: set[str] = set()
        out = []
        for p in sorted(allowed, key=lambda p: (p.cost, p.site_id)):
            if (p.units == 0 or p.site_id in seen or p.site_id not in self.inventory.up
                    or (need.allowed_gpu_types and p.gpu_type not in need.allowed_gpu_types)):
                out.append(p)
                continue
            cap = p.units
            if p.gpu_type in per_type:
                cap = min(cap, max(0, per_type[p.gpu_type]) // g)
            if total is not None:
                cap = min(cap, max(0, total) // g)
            price = self.gate.price(p.site_id, p.gpu_type)
            if cost is not None and price > 0:
                cap = min(cap, int(max(0.0, cost) // (price * g)))
            if cap <= 0:
                continue
            take = min(cap, remaining, self.inventory.free(p.site_id, p.gpu_type) // g)
            if take > 0:
                seen.add(p.site_id)
                remaining -= take
                if p.gpu_type in per_type:
                    per_type[p.gpu_type] -= take * g
                if total is not None:
                    total -= take * g
                if cost is not None:
                    cost -= take * g * price
            capped = site_pb.Proposal()
            capped.CopyFrom(p)
            capped.units = cap
            out.append(capped)
        return out

    def offer_types(self, w: spb.Workload) -> tuple[str, ...]:
        """GPU types to offer the workload on: its own list (empty: every type in the pool), less the
        types its placement policy excludes or its tenant's quota has no room for. Site agents then
        answer with a type the tenant may actually use."""
        need = domain.need_of(w)
        tenant = tenant_of(w)
        if not tenant:
            return need.allowed_gpu_types
        allowed = self.gate.policy_for(w.workload_id, tenant).allowed_gpu_types
        per_type, _, _ = self.gate.headroom(w.workload_id, tenant)
        if allowed is None and not per_type:
            return need.allowed_gpu_types  # neither its policy nor its quota narrows the types
        types = set(need.allowed_gpu_types) or {t for pools in self.inventory.capacity.values() for t in pools}
        if allowed is not None:
            types &= allowed
        types = {t for t in types if per_type.get(t, need.gpus_per_unit) >= need.gpus_per_unit}
        # An empty list would mean "any type": offer a type no site has instead, so nothing is proposed.
        return tuple(sorted(types)) or (domain.NO_TYPE_WITHIN_QUOTA,)

    def site_filter(self, w: spb.Workload) -> Callable[[str, str], bool] | None:
        """The workload's placement policy as `allowed(site, gpu_type)`; None when it has none."""
        tenant = tenant_of(w)
        if not tenant:
            return None
        gate, wid = self.gate, w.workload_id
        return lambda site, gpu_type: gate.allows(wid, tenant, site, gpu_type)

    def check(self, w: spb.Workload, placements: Iterable[common.Placement]) -> Decision:
        """May `w` hold exactly `placements` (its whole placement after the commit)?"""
        return self.gate.check(w.workload_id, tenant_of(w), list(placements))

    def committed(self, w: spb.Workload) -> None:
        self.gate.committed(w.workload_id, tenant_of(w), list(w.placements))
