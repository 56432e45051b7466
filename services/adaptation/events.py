"""Adaptation's NATS side: it follows perception (snapshots, site up/down) and the scheduler's
state of record, decides (domain) and publishes `AdaptationAction`s on `cnc.adaptation.action`.

- A site marked down (the `site_state` event, or a snapshot that shows it down) triggers recovery
  at once: every workload placed there gets a new whole placement, planned against the capacity
  the scheduler's records leave free and the tenants' placement policy (governance's gate).
- A site that is up but holds more than its GPUs now allow (it registered fewer: nodes down or
  drained at a real site) sheds just enough units to other sites on the same snapshot.
- Every snapshot: checkpoints are tracked from training progress; the scaling guardrails look at
  each inference service (SLO attainment, load, perception's forecast) and may scale it.
- Units that found no room are planned again on later snapshots; an action not yet applied by the
  scheduler is not planned twice (it waits `recovery_retry_ticks`).

The scheduler applies an action's placement (after its own capacity and governance checks) and
bumps the workload's generation; actions planned from an older generation are ignored there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError
from nats.js import api

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain import metrics
from cncbrain.auth import subscribe_durable
from cncbrain.bus import KV_WORKLOADS, Bus, Event, subjects
from cncbrain.kvfeed import KvFollower
from cncbrain.workload import spec_of, tenant_of
from services.adaptation.domain.autoscale import AutoscalingPolicy, Guardrails, ScaleKind, ServiceObservation
from services.adaptation.domain.recovery import (
    ActionKind,
    CheckpointTracker,
    RecoveryAction,
    SiteCapacity,
    SiteUnits,
    WorkloadKind,
    WorkloadPlacement,
    plan_recovery,
    plan_scale,
    plan_shrink,
)
from services.adaptation.settings import Settings

log = logging.getLogger(__name__)

ADAPTATION_BUCKET = "cnc-adaptation"
ACTIVE = (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)
KIND_PB = {
    ActionKind.REPLACE_REPLICAS: apb.ACTION_KIND_REPLACE_REPLICAS,
    ActionKind.RESUME_SHARDS: apb.ACTION_KIND_RESUME_SHARDS,
    ActionKind.WAIT_FOR_CAPACITY: apb.ACTION_KIND_WAIT_FOR_CAPACITY,
    ScaleKind.EMERGENCY_SCALE_UP: apb.ACTION_KIND_EMERGENCY_SCALE_UP,
    ScaleKind.SURGE_SCALE_UP: apb.ACTION_KIND_SURGE_SCALE_UP,
    ScaleKind.SCALE_DOWN: apb.ACTION_KIND_SCALE_DOWN,
    ScaleKind.ENFORCE_MIN: apb.ACTION_KIND_ENFORCE_MIN,
    ScaleKind.ENFORCE_MAX: apb.ACTION_KIND_ENFORCE_MAX,
}

Forecaster = Callable[[str], Awaitable[float | None]]
PolicyGate = Any  # cncbrain.governance.gate.GovernanceGate (duck-typed: `allows`)


def placement_view(w: spb.Workload) -> WorkloadPlacement:
    spec = spec_of(w)
    training = w.kind == common.WORKLOAD_KIND_TRAINING_JOB
    sites = {p.site_id: SiteUnits(p.gpu_type, p.replicas, tuple(p.shard_indices))
             for p in w.placements if p.replicas or p.shard_indices}
    return WorkloadPlacement(
        workload_id=w.workload_id,
        kind=WorkloadKind.TRAINING if training else WorkloadKind.INFERENCE,
        tenant_id=getattr(spec, "tenant", "") or "",
        gpus_per_unit=max(1, (w.training_job.gpus_per_shard if training else w.inference_service.gpus_per_replica)
                          if spec else 1),
        sites=sites,
        allowed_gpu_types=frozenset(getattr(spec, "allowed_gpu_types", ()) or ()),
        ingress_site_id="" if training else w.inference_service.ingress_site_id,
        generation=w.generation,
    )


def default_policy(w: spb.Workload) -> AutoscalingPolicy:
    spec = w.inference_service
    lo = spec.min_replicas
    hi = max(spec.max_replicas, lo, 1)
    return AutoscalingPolicy(min_replicas=lo, max_replicas=hi)


def policy_to_pb(p: AutoscalingPolicy) -> apb.AutoscalingPolicy:
    return apb.AutoscalingPolicy(
        min_replicas=p.min_replicas, max_replicas=p.max_replicas, target_slo_attainment=p.target_slo_attainment,
        target_utilization=p.target_utilization, surge_threshold=p.surge_threshold,
        scale_down_stable_ticks=p.scale_down_stable_ticks, scale_down_step=p.scale_down_step,
        cooldown_ticks=p.cooldown_ticks, prior_capacity_rps=p.prior_capacity_rps, enabled=p.enabled)


def policy_from_pb(m: apb.AutoscalingPolicy) -> AutoscalingPolicy:
    """Raises ValueError naming the field when the policy is not usable."""
    return AutoscalingPolicy(
        min_replicas=m.min_replicas, max_replicas=m.max_replicas,
        target_slo_attainment=m.target_slo_attainment or 0.9, target_utilization=m.target_utilization or 0.75,
        surge_threshold=m.surge_threshold or 1.0, scale_down_stable_ticks=m.scale_down_stable_ticks or 3,
        scale_down_step=m.scale_down_step or 1, cooldown_ticks=m.cooldown_ticks,
        prior_capacity_rps=m.prior_capacity_rps or 2.0, enabled=m.enabled)


def placements_pb(workload_id: str, kind: common.WorkloadKind.ValueType, gpus_per_unit: int, before: Iterable[str],
                  after: dict[str, SiteUnits]) -> list[common.Placement]:
    """The whole new placement, with an explicit empty entry for every site the workload leaves."""
    out = []
    for site_id in sorted(set(before) | set(after)):
        u = after.get(site_id)
        out.append(common.Placement(
            workload_id=workload_id, kind=kind, site_id=site_id, gpus_per_unit=gpus_per_unit,
            gpu_type=u.gpu_type if u else "", replicas=u.replicas if u else 0,
            shard_indices=list(u.shard_indices) if u else []))
    return out


class Adapter:
    def __init__(self, bus: Bus, settings: Settings, gate: PolicyGate | None = None,
                 forecaster: Forecaster | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.gate = gate
        self.forecaster = forecaster
        self.workloads: dict[str, spb.Workload] = {}
        self.snapshot: ppb.Snapshot | None = None
        self.down: set[str] = set()
        self.guardrails = Guardrails()
        self.explicit_policies: set[str] = set()
        self.checkpoints = CheckpointTracker(settings.checkpoint_interval_s)
        self.actions: collections.deque[apb.AdaptationAction] = collections.deque(maxlen=settings.max_actions_kept)
        self.inflight: dict[str, tuple[int, int]] = {}  # workload -> (tick planned, generation planned from)
        self.tick = 0
        self._waiting: set[tuple[str, str]] = set()  # (workload, failed site) told to wait for room
        self.counters = bus.counters
        self._lock = asyncio.Lock()
        self._follower: KvFollower | None = None

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.kv = await self.bus.kv(ADAPTATION_BUCKET)
        await self._load_policies()
        await self._load_actions()
        kv = await self.bus.kv(KV_WORKLOADS)
        self._follower = KvFollower(kv, self._apply_workload, "adaptation-workloads")
        await self._follower.start(initial_timeout=10.0)
        await self.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, self.on_snapshot, consumer="adaptation")
        await subscribe_durable(self.bus, subjects.PERCEPTION_SITE_STATE, self.on_site_state, "adaptation-sites")

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    async def _load_policies(self) -> None:
        items = await self.bus.retrying(lambda: self.bus.kv_items(ADAPTATION_BUCKET), "read the autoscaling policies")
        for key, (value, _) in items.items():
            if key.startswith("policy."):
                m = apb.AutoscalingPolicy()
                try:
                    m.ParseFromString(value)
                except DecodeError:
                    log.error("autoscaling policy %s in %s is not an AutoscalingPolicy; ignored", key, ADAPTATION_BUCKET)
                    continue
                wid = key.removeprefix("policy.")
                self.guardrails.set_policy(wid, policy_from_pb(m))
                self.explicit_policies.add(wid)

    async def _load_actions(self) -> None:
        """The recent actions, replayed from the stream (ListActions survives a restart)."""
        info = await self.bus.js.stream_info(subjects.ADAPTATION_STREAM.name)
        if info.state.messages == 0:
            return
        last = info.state.last_seq
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            a = apb.AdaptationAction()
            with contextlib.suppress(Exception):
                a.ParseFromString(msg.data)
                self.actions.append(a)
            if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
                done.set()

        start_seq = max(1, last - self.settings.max_actions_kept + 1)
        sub = await self.bus.js.subscribe(subjects.ADAPTATION_ACTION.template, stream=subjects.ADAPTATION_STREAM.name,
                                          cb=on_msg, ordered_consumer=True, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                          config=api.ConsumerConfig(opt_start_seq=start_seq))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 10.0)
        finally:
            await sub.unsubscribe()

    # ---- the scheduler's state of record ------------------------------------------------------------

    def _apply_workload(self, entry: Any) -> None:
        if not entry.value:
            self.workloads.pop(entry.key, None)
            return
        w = spb.Workload()
        try:
            w.ParseFromString(entry.value)
        except Exception:
            log.error("adaptation: unreadable workload record %s", entry.key)
            return
        old = self.workloads.get(w.workload_id)
        self.workloads[w.workload_id] = w
        if old is not None and old.generation != w.generation:
            self.inflight.pop(w.workload_id, None)  # the scheduler applied a change
        if w.state not in ACTIVE:
            self.inflight.pop(w.workload_id, None)
            if w.state != spb.WORKLOAD_STATE_PENDING:
                self.checkpoints.forget(w.workload_id)

    # ---- the pool as the scheduler's records leave it --------------------------------------------

    def capacity(self) -> dict[str, SiteCapacity]:
        """Free GPUs per site and type: inventory minus every committed placement."""
        out: dict[str, SiteCapacity] = {}
        if self.snapshot is None:
            return out
        for s in self.snapshot.sites:
            site = s.site
            pools = site.gpu_pools or s.gpu_pools
            out[site.site_id] = SiteCapacity(
                site_id=site.site_id,
                up=s.state == common.SITE_STATE_UP and site.site_id not in self.down,
                free_by_type={p.gpu_type: p.count for p in pools},
                price_by_type={p.gpu_type: p.price_usd_per_hour for p in pools},
                latency_ms={lk.peer_site_id: lk.latency_ms for lk in site.links},
            )
        for w in self.workloads.values():
            if w.state not in ACTIVE:
                continue
            for p in w.placements:
                cap = out.get(p.site_id)
                if cap is not None and p.gpu_type in cap.free_by_type:
                    cap.free_by_type[p.gpu_type] -= (p.replicas + len(p.shard_indices)) * p.gpus_per_unit
        return out

    def allowed(self, w: WorkloadPlacement, site_id: str, gpu_type: str) -> bool:
        if self.gate is None:
            return True
        return self.gate.allows(w.workload_id, w.tenant_id, site_id, gpu_type)

    def room(self, w: spb.Workload) -> dict[str, int]:
        """GPUs by type the tenant's quota lets this workload hold in all (types not named: no bound)."""
        tenant = tenant_of(w)
        if self.gate is None or not tenant:
            return {}
        per_type, _, _ = self.gate.headroom(w.workload_id, tenant)
        return per_type

    def _busy(self, w: spb.Workload) -> bool:
        pending = self.inflight.get(w.workload_id)
        return (pending is not None and pending[1] == w.generation
                and self.tick - pending[0] < self.settings.recovery_retry_ticks)

    # ---- publishing ----------------------------------------------------------------------------------

    async def publish(self, action: apb.AdaptationAction) -> apb.AdaptationAction:
        action.action_id = action.action_id or uuid.uuid4().hex
        if not action.HasField("at"):
            action.at.FromNanoseconds(time.time_ns())
        action.snapshot_sequence = self.tick
        await self.bus.publish(subjects.ADAPTATION_ACTION, action, event_id=action.action_id)
        metrics.ACTIONS.labels(apb.ActionKind.Name(action.kind).removeprefix("ACTION_KIND_").lower()).inc()
        self.actions.append(action)
        self.counters[f"adaptation.{apb.ActionKind.Name(action.kind).lower()}"] += 1
        log.info("adaptation: %s %s: %s", apb.ActionKind.Name(action.kind), action.workload_id, action.reason)
        return action

    def _recovery_pb(self, w: spb.Workload, act: RecoveryAction) -> apb.AdaptationAction:
        view = placement_view(w)
        placements = [] if act.kind is ActionKind.WAIT_FOR_CAPACITY else placements_pb(
            w.workload_id, w.kind, view.gpus_per_unit, view.sites, dict(act.new_placement))
        return apb.AdaptationAction(
            kind=KIND_PB[act.kind], workload_id=w.workload_id, site_id=act.failed_site_id, reason=act.reason,
            placements=placements, shortfall=act.shortfall, lost_progress=act.lost_progress,
            lost_tokens=act.lost_tokens, base_generation=w.generation)

    # ---- recovery ------------------------------------------------------------------------------------

    async def recover(self, site_id: str, over: dict[str, int] | None = None) -> list[apb.AdaptationAction]:
        """Plan and publish the re-placement of everything placed at `site_id` (down), or, with
        `over` (GPUs by type placed beyond what the up site has now), of just enough of it."""
        async with self._lock:
            hit = [w for w in self.workloads.values()
                   if w.state in ACTIVE and not self._busy(w)
                   and any(p.site_id == site_id and (p.replicas or p.shard_indices) for p in w.placements)]
            if not hit:
                return []
            caps = self.capacity()
            if site_id in caps and over is None:
                caps[site_id].up = False
            ckpts = {}
            for w in hit:
                if w.kind == common.WORKLOAD_KIND_TRAINING_JOB:
                    c = self.checkpoints.get(w.workload_id, w.training_job.tokens)
                    if c is not None:
                        ckpts[w.workload_id] = c
            by_id = {w.workload_id: w for w in hit}
            views = [placement_view(w) for w in hit]
            rooms = {w.workload_id: self.room(w) for w in hit}
            if over is None:
                planned = plan_recovery(site_id, views, caps, self.allowed, ckpts, rooms)
            else:
                lost = ", ".join(f"{n} {t}" for t, n in sorted(over.items()))
                planned = plan_shrink(site_id, over, views, caps, self.allowed, ckpts, rooms,
                                      why=f"site {site_id} has fewer GPUs in service ({lost} GPUs over what it holds)")
            out = []
            for act in planned:
                w = by_id[act.workload_id]
                if act.kind is ActionKind.WAIT_FOR_CAPACITY:
                    # Said once per failure, then retried quietly on every snapshot.
                    if (w.workload_id, site_id) in self._waiting:
                        continue
                    self._waiting.add((w.workload_id, site_id))
                else:
                    self._waiting.discard((w.workload_id, site_id))
                    self.inflight[w.workload_id] = (self.tick, w.generation)
                    ckpt = ckpts.get(w.workload_id)
                    if act.kind is ActionKind.RESUME_SHARDS and ckpt is not None:
                        # The job restarts from its checkpoint: that is where it stands now.
                        now_s = self.snapshot.sim_time_s if self.snapshot else 0.0
                        self.checkpoints.forget(w.workload_id)
                        self.checkpoints.checkpointed(w.workload_id, now_s, ckpt.checkpoint_progress)
                out.append(await self.publish(self._recovery_pb(w, act)))
            return out

    async def on_site_state(self, event: Event) -> None:
        change: ppb.SiteStateChanged = event.payload
        if change.state == common.SITE_STATE_DOWN:
            self.down.add(change.site_id)
            await self.recover(change.site_id)
        elif change.state == common.SITE_STATE_UP:
            self.down.discard(change.site_id)

    # ---- every tick ----------------------------------------------------------------------------------

    async def on_snapshot(self, event: Event) -> None:
        snap: ppb.Snapshot = event.payload
        self.snapshot = snap
        self.tick = int(snap.sequence)
        for s in snap.sites:
            sid = s.site.site_id
            if s.state == common.SITE_STATE_DOWN:
                self.down.add(sid)
            elif s.state == common.SITE_STATE_UP:
                self.down.discard(sid)
            for j in s.jobs:
                self.checkpoints.observe(j.workload_id, snap.sim_time_s, j.progress)
        for site_id in sorted(self.down):
            await self.recover(site_id)
        for site_id, cap in sorted(self.capacity().items()):
            over = {t: -n for t, n in cap.free_by_type.items() if n < 0}
            if cap.up and over:
                await self.recover(site_id, over)
        if self.settings.guardrails_enabled:
            await self.run_guardrails(snap)

    async def run_guardrails(self, snap: ppb.Snapshot) -> list[apb.AdaptationAction]:
        loads: dict[str, list[float]] = {}
        for s in snap.sites:
            for svc in s.services:
                acc = loads.setdefault(svc.workload_id, [0.0, 0.0, 0.0])
                acc[0] += svc.request_rate_rps
                acc[1] += svc.requests
                acc[2] += svc.requests_ok
        out = []
        services = [w for w in self.workloads.values()
                    if w.state in ACTIVE and w.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE and not self._busy(w)]
        forecasts: list[float | None] = [None] * len(services)
        if self.forecaster and services:  # one round of concurrent calls per tick, not one per service
            forecasts = list(await asyncio.gather(*(self.forecaster(w.workload_id) for w in services)))
        for w, forecast in zip(services, forecasts, strict=True):
            wid = w.workload_id
            if wid not in self.explicit_policies:
                self.guardrails.set_policy(wid, default_policy(w))
            rate, requests, ok = loads.get(wid, (0.0, 0.0, 0.0))
            replicas = sum(p.replicas for p in w.placements)
            obs = ServiceObservation(wid, self.tick, replicas, rate, ok / requests if requests > 0 else 1.0, forecast)
            decision = self.guardrails.observe(obs)
            if decision is None:
                continue
            async with self._lock:
                view = placement_view(w)
                new, short = plan_scale(view, decision.to_replicas, self.capacity(), self.allowed, self.room(w))
                if sum(u.replicas for u in new.values()) == replicas:
                    continue  # nowhere to grow (or nothing to drop)
                reason = decision.reason + (f"; {short} replica(s) found no room" if short else "")
                action = apb.AdaptationAction(
                    kind=KIND_PB[decision.kind], workload_id=wid, reason=reason, from_replicas=replicas,
                    to_replicas=sum(u.replicas for u in new.values()),
                    placements=placements_pb(wid, w.kind, view.gpus_per_unit, view.sites, new),
                    shortfall=short, base_generation=w.generation)
                self.inflight[wid] = (self.tick, w.generation)
                out.append(await self.publish(action))
        return out

    # ---- queries -------------------------------------------------------------------------------------

    def list_actions(self, workload_id: str = "", site_id: str = "", since_ns: int = 0, until_ns: int = 0,
                     limit: int = 100) -> list[apb.AdaptationAction]:
        out = []
        for a in reversed(self.actions):
            if workload_id and a.workload_id != workload_id:
                continue
            if site_id and a.site_id != site_id and all(p.site_id != site_id for p in a.placements):
                continue
            t = a.at.ToNanoseconds()
            if since_ns and t < since_ns:
                continue
            if until_ns and t > until_ns:
                continue
            out.append(a)
            if len(out) >= limit:
                break
        return out

    async def set_policy(self, workload_id: str, policy: AutoscalingPolicy) -> None:
        await self.kv.put(f"policy.{workload_id}", policy_to_pb(policy).SerializeToString())
        self.guardrails.set_policy(workload_id, policy)
        self.explicit_policies.add(workload_id)

    def get_policy(self, workload_id: str) -> tuple[AutoscalingPolicy, bool]:
        if workload_id in self.explicit_policies:
            return self.guardrails.policy(workload_id), True
        w = self.workloads.get(workload_id)
        if w is not None and w.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE:
            return default_policy(w), False
        return self.guardrails.default_policy, False

