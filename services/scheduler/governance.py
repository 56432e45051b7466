"""The scheduler's side of governance, in one module the scheduler's own files only call into:

- who may touch a workload: a tenant's workloads carry its id (`spec.tenant`, filled from the
  caller's token), a tenant sees and changes only its own, an operator any (PERMISSION_DENIED);
- admission at submit through governance (RESOURCE_EXHAUSTED / FAILED_PRECONDITION and the reason);
- the placement-policy and quota check of every placement before it is committed (the gate is
  in-process, fed by governance's KV), and site agents' proposals outside policy ignored;
- applying adaptation's actions (`cnc.adaptation.action`): a workload's whole new placement, planned
  from the generation it names, checked against capacity and governance, committed as a new
  generation and published per site (sites it leaves get an empty placement).

Governance is enforced when `governance_target` is set; auth when `auth_enabled` is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.auth import load_token, optional_principal, subscribe_durable
from cncbrain.bus import Event, subjects
from cncbrain.identity import PermissionDenied, require_tenant_access
from cncbrain.workload import tenant_of
from services.governance.client import AdmissionRefused, GovernanceGate
from services.governance.domain.policy import Decision, Verdict
from services.scheduler import domain

if TYPE_CHECKING:
    from services.scheduler.events import Coordinator

log = logging.getLogger(__name__)

__all__ = ["AdmissionRefused", "SchedulerGovernance", "tenant_of"]


class SchedulerGovernance:
    def __init__(self, co: Coordinator, gate: GovernanceGate | None, token: str | None) -> None:
        self.co = co
        self.gate = gate
        self.token = token

    @classmethod
    async def start(cls, co: Coordinator, governance_target: str, token: str = "") -> SchedulerGovernance:
        gate = None
        token = token or load_token(required=False) or ""
        if governance_target:
            gate = await GovernanceGate.start(co.bus, governance_target, token or None)
        hooks = cls(co, gate, token or None)
        await subscribe_durable(co.bus, subjects.ADAPTATION_ACTION, hooks.on_action, "scheduler-adaptation")
        return hooks

    async def close(self) -> None:
        if self.gate is not None:
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
    def check_owner(w: pb.Workload) -> None:
        p = optional_principal()
        if p is None or p.is_operator:
            return
        tenant = tenant_of(w)
        if not tenant:
            raise PermissionDenied(f"workload {w.workload_id} belongs to no tenant; only an operator may touch it")
        require_tenant_access(p, tenant)

    @staticmethod
    def visible(w: pb.Workload) -> bool:
        p = optional_principal()
        return p is None or p.is_operator or tenant_of(w) == p.tenant_id

    async def admit(self, w: pb.Workload, caller_token: str | None) -> None:
        """Raises `AdmissionRefused` (code + governance's reason) unless governance admits `w`."""
        tenant = tenant_of(w)
        if self.gate is None or not tenant:
            return
        need = domain.need_of(w)
        await self.gate.admit(w.workload_id, tenant, w.kind, need.units * need.gpus_per_unit, need.gpus_per_unit,
                              need.allowed_gpu_types, token=caller_token or self.token)

    # ---- the commit path -----------------------------------------------------------------------------

    def proposals(self, w: pb.Workload, proposals: Iterable[site_pb.Proposal]) -> list[site_pb.Proposal]:
        """The proposals arbitration may use: only sites the workload's placement policy allows, and
        each capped by what the tenant's quota leaves, so the arbitrated placement passes the check.

        Caps follow arbitration's own order (cheapest first, one proposal per site, within the
        ledger's free GPUs), so a proposal is capped only by what earlier ones will really take.
        """
        proposals = list(proposals)
        tenant = tenant_of(w)
        if self.gate is None or not tenant:
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
            if (p.units == 0 or p.site_id in seen or p.site_id not in self.co.ledger.up
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
            take = min(cap, remaining, self.co.ledger.free(p.site_id, p.gpu_type) // g)
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

    def offer_types(self, w: pb.Workload) -> tuple[str, ...]:
        """GPU types to offer the workload on: its own list (empty: every type in the pool), less the
        types its placement policy excludes or its tenant's quota has no room for. Site agents then
        answer with a type the tenant may actually use."""
        need = domain.need_of(w)
        tenant = tenant_of(w)
        if self.gate is None or not tenant:
            return need.allowed_gpu_types
        types = set(need.allowed_gpu_types) or {t for pools in self.co.ledger.capacity.values() for t in pools}
        allowed = self.gate.policy_for(w.workload_id, tenant).allowed_gpu_types
        if allowed is not None:
            types &= allowed
        per_type, _, _ = self.gate.headroom(w.workload_id, tenant)
        types = {t for t in types if per_type.get(t, need.gpus_per_unit) >= need.gpus_per_unit}
        # An empty list would mean "any type": offer a type no site has instead, so nothing is proposed.
        return tuple(sorted(types)) or (domain.NO_TYPE_WITHIN_QUOTA,)

    def site_filter(self, w: pb.Workload) -> Callable[[str, str], bool] | None:
        """The workload's placement policy as `allowed(site, gpu_type)`; None when it has none."""
        tenant = tenant_of(w)
        if self.gate is None or not tenant:
            return None
        gate, wid = self.gate, w.workload_id
        return lambda site, gpu_type: gate.allows(wid, tenant, site, gpu_type)

    def check(self, w: pb.Workload, placements: Iterable[common.Placement]) -> Decision:
        """May `w` hold exactly `placements` (its whole placement after the commit)?"""
        if self.gate is None:
            return Decision(Verdict.ADMITTED)
        return self.gate.check(w.workload_id, tenant_of(w), list(placements))

    def committed(self, w: pb.Workload) -> None:
        if self.gate is not None:
            self.gate.committed(w.workload_id, tenant_of(w), list(w.placements))

    # ---- adaptation's actions --------------------------------------------------------------------------

    async def on_action(self, event: Event) -> None:
        action: apb.AdaptationAction = event.payload
        if not action.placements:
            return  # WAIT_FOR_CAPACITY and friends carry nothing to apply
        co = self.co
        wid = action.workload_id
        if wid not in co.store.records:
            co.counters["adaptation_unknown"] += 1
            return
        async with co.lock(wid):
            w = co._copy(wid)
            if w.state not in domain.ACTIVE:
                return
            if w.generation != action.base_generation:
                co.counters["adaptation_stale"] += 1
                log.info("adaptation action for %s planned from generation %d, record is at %d: ignored",
                         wid, action.base_generation, w.generation)
                return
            refused = self._refusal(w, action)
            if refused:
                co.counters["adaptation_refused"] += 1
                log.warning("adaptation action for %s refused: %s", wid, refused)
                return
            before = {p.site_id for p in w.placements}
            for p in w.placements:
                co.ledger.take(p, -1)
            w.generation += 1
            del w.placements[:]
            changed = []
            for p in action.placements:
                entry = common.Placement()
                entry.CopyFrom(p)
                entry.workload_id, entry.kind, entry.generation = wid, w.kind, w.generation
                if entry.replicas or entry.shard_indices:
                    w.placements.append(entry)
                    co.ledger.take(entry)
                if entry.site_id in before or entry.replicas or entry.shard_indices:
                    changed.append(entry)
            if w.kind == domain.TRAINING and action.lost_progress > 0:
                w.progress = max(0.0, w.progress - action.lost_progress)
            w.message = action.reason + (f"; {action.lost_tokens:,.0f} tokens to redo" if action.lost_tokens > 0 else "")
            w.updated_at.FromNanoseconds(time.time_ns())
            try:
                await co._write(w)
            except Exception:
                co.ledger.rebuild(co.store.records.values())
                raise
            self.committed(w)
            co.counters["adaptation_applied"] += 1
        await co.publish_placements(w, changed)
        await co.publish_event(w, pb.WORKLOAD_EVENT_KIND_RESCALED)

    def _refusal(self, w: pb.Workload, action: apb.AdaptationAction) -> str:
        held: dict[tuple[str, str], int] = {}
        for p in w.placements:
            key = (p.site_id, p.gpu_type)
            held[key] = held.get(key, 0) + (p.replicas + len(p.shard_indices)) * p.gpus_per_unit
        wanted = [p for p in action.placements if p.replicas or p.shard_indices]
        if w.kind == domain.INFERENCE:
            total = sum(p.replicas for p in wanted)
            spec = w.inference_service
            if spec.max_replicas and total > spec.max_replicas:
                return f"{total} replicas is above the service's maximum of {spec.max_replicas}"
        else:
            shards = sorted(i for p in wanted for i in p.shard_indices)
            if shards != list(range(w.training_job.shards)):
                return "a training placement must hold every shard exactly once"
        for p in wanted:
            if p.site_id not in self.co.ledger.up:
                return f"site {p.site_id} is not up"
            need = (p.replicas + len(p.shard_indices)) * p.gpus_per_unit
            room = self.co.ledger.free(p.site_id, p.gpu_type) + held.get((p.site_id, p.gpu_type), 0)
            if need > room:
                return f"site {p.site_id} has {room} {p.gpu_type} for {need}"
        decision = self.check(w, wanted)
        return "" if decision.ok else decision.message
