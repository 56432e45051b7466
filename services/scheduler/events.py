"""The scheduler's NATS side: it offers work to the site agents, collects their proposals,
arbitrates them (domain), commits placements to the state of record (store) and publishes them per
site; it follows perception's snapshots (capacity, liveness, training progress) and the executors'
reports. After a restart it recovers everything from the store.

Single writer: one scheduler owns the records (CAS on every write makes a second one fail loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import Bus, Event, subjects
from services.scheduler import domain
from services.scheduler.domain import Ledger
from services.scheduler.settings import Settings
from services.scheduler.store import Conflict, WorkloadStore

if TYPE_CHECKING:
    from services.scheduler.governance import SchedulerGovernance

log = logging.getLogger(__name__)
EVENT_OF_STATE = {
    domain.PENDING: pb.WORKLOAD_EVENT_KIND_ACCEPTED,
    domain.PLACED: pb.WORKLOAD_EVENT_KIND_PLACED,
    domain.RUNNING: pb.WORKLOAD_EVENT_KIND_RUNNING,
    domain.COMPLETED: pb.WORKLOAD_EVENT_KIND_COMPLETED,
    domain.FAILED: pb.WORKLOAD_EVENT_KIND_FAILED,
    domain.CANCELLED: pb.WORKLOAD_EVENT_KIND_CANCELLED,
}


def now_ns() -> int:
    return time.time_ns()


@dataclass
class OpenOffer:
    expected: set[str]
    proposals: dict[str, site_pb.Proposal] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Coordinator:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self.store = WorkloadStore(bus)
        self.ledger = Ledger()
        self.offers: dict[str, OpenOffer] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.sites_known = asyncio.Event()
        self.governance: SchedulerGovernance | None = None  # issue 5 hooks, set by the server
        self.accepted: dict[str, asyncio.Future[None]] = {}
        self.counters = bus.counters

    # --- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        records = await self.store.open()
        self.ledger.rebuild(records)
        await self.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, self.on_snapshot, consumer="scheduler-snapshot")
        await self.bus.subscribe(subjects.SITE_PROPOSAL, self.on_proposal, consumer="scheduler-proposals")
        await self.bus.subscribe(subjects.SITE_APPLIED, self.on_applied, consumer="scheduler-applied", durable=True)
        pending = [w for w in records if w.state == domain.PENDING]
        for w in pending:
            # ACCEPTED may not have reached the stream before a crash; its id makes this a no-op if it did.
            await self.publish_event(w, pb.WORKLOAD_EVENT_KIND_ACCEPTED)
            self.spawn_placement(w.workload_id)
        recent = [w for w in records if time.time() - w.updated_at.seconds <= self.settings.republish_window_s]
        log.info("recovered %d workloads (%d pending, %d to republish)", len(records), len(pending), len(recent))
        for w in recent:
            if w.state != domain.PENDING:
                await self.publish_placements(w, list(w.placements))

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        for task in list(self.tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def lock(self, workload_id: str) -> asyncio.Lock:
        return self.locks.setdefault(workload_id, asyncio.Lock())

    # --- tenant actions (called by rpc) -----------------------------------------------------
    async def accept(self, w: pb.Workload) -> pb.Workload:
        """Store a new workload (idempotent on its id) and start placing it."""
        try:
            await self.store.create(w)
        except Conflict:
            existing = self.store.get(w.workload_id) or await self.store.refresh(w.workload_id)
            if existing is None:
                raise
            if not domain.same_spec(existing, w):
                raise domain.SpecError("request_id", "already used for a different spec") from None
            return existing
        # The offer goes out while ACCEPTED is being stored; PLACED waits for it (event order).
        self.accepted[w.workload_id] = asyncio.ensure_future(self.publish_event(w, pb.WORKLOAD_EVENT_KIND_ACCEPTED))
        self.spawn_placement(w.workload_id)
        return w

    async def cancel(self, workload_id: str) -> pb.Workload:
        async with self.lock(workload_id):
            w = self._copy(workload_id)
            if w.state in domain.ENDED:
                raise domain.ScaleRefused(f"workload is already {pb.WorkloadState.Name(w.state)}")
            return await self._end(w, domain.CANCELLED, "cancelled by the tenant")

    # --- placement ----------------------------------------------------------------------------
    def spawn_placement(self, workload_id: str) -> None:
        if workload_id not in self.tasks:
            task = asyncio.create_task(self._place(workload_id), name=f"place-{workload_id}")
            self.tasks[workload_id] = task
            task.add_done_callback(lambda _t: self.tasks.pop(workload_id, None))

    def _timeout_of(self, w: pb.Workload) -> float:
        if w.kind == domain.TRAINING:
            return w.training_job.gang_timeout_s or self.settings.default_gang_timeout_s
        return self.settings.placement_timeout_s

    async def _place(self, workload_id: str) -> None:
        w = self.store.get(workload_id)
        assert w is not None
        need = domain.need_of(w)
        deadline = w.created_at.ToNanoseconds() / 1e9 + self._timeout_of(w)
        attempts = 0
        while True:
            attempts += 1
            if self.ledger.up:
                proposals = await self._offer(w, need)
                async with self.lock(workload_id):
                    current = self.store.get(workload_id)
                    if current is None or current.state != domain.PENDING:
                        return  # cancelled meanwhile
                    if self.governance:  # proposals outside the workload's placement policy never count
                        proposals = self.governance.proposals(current, proposals)
                    allocation = domain.arbitrate(need, proposals, self.ledger)
                    if allocation is not None:
                        w = self._copy(workload_id)
                        placements = domain.commit_placement(w, allocation, now_ns())
                        verdict = self.governance.check(w, placements) if self.governance else None
                        if verdict is not None and not verdict.ok:
                            self.counters["placements_refused_by_governance"] += 1
                            log.info("placement of %s refused by governance: %s", workload_id, verdict.message)
                            allocation = None
                    if allocation is not None:
                        for p in placements:
                            self.ledger.take(p)
                        try:
                            await self._write(w)
                        except Exception:
                            for p in placements:
                                self.ledger.take(p, -1)
                            raise
                        self.counters["placements_committed"] += 1
                        if self.governance:
                            self.governance.committed(w)
                        self.counters["units_placed"] += need.units
                        await self.publish_placements(w, placements)
                        await self.publish_event(w, pb.WORKLOAD_EVENT_KIND_PLACED)
                        return
            if time.time() > deadline:
                async with self.lock(workload_id):
                    w = self._copy(workload_id)
                    if w.state == domain.PENDING:
                        room = self.ledger.total(need.allowed_gpu_types)
                        await self._end(
                            w, domain.FAILED,
                            f"could not place {need.units}×{need.gpus_per_unit} GPUs in {self._timeout_of(w):.0f} s "
                            f"after {attempts} offers (pool has {room} GPUs of the allowed types, "
                            f"{len(self.ledger.up)} sites up)",
                        )
                return
            await asyncio.sleep(self.settings.retry_interval_s)

    async def _offer(self, w: pb.Workload, need: domain.Need) -> list[site_pb.Proposal]:
        offer_id = uuid.uuid4().hex[:16]
        deadline = time.time() + self.settings.offer_timeout_s
        offer = pb.Offer(
            offer_id=offer_id, workload_id=w.workload_id, kind=w.kind, units=need.units,
            gpus_per_unit=need.gpus_per_unit,
            # Issue 5: only the GPU types the tenant's policy and quota leave room for are offered.
            allowed_gpu_types=list(self.governance.offer_types(w) if self.governance else need.allowed_gpu_types),
            ingress_site_id=need.ingress_site_id, min_hbm_gb=need.min_hbm_gb,
        )
        offer.deadline.FromNanoseconds(int(deadline * 1e9))
        pending = OpenOffer(expected=set(self.ledger.up))
        self.offers[offer_id] = pending
        try:
            await self.bus.publish(subjects.SCHEDULER_OFFER, offer)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.done.wait(), self.settings.offer_timeout_s)
        finally:
            self.offers.pop(offer_id, None)
        self.counters["offers"] += 1
        return list(pending.proposals.values())

    async def _write(self, w: pb.Workload) -> None:
        try:
            await self.store.update(w)
        except Conflict:
            # A write whose reply was lost in a NATS restart may have landed: then it is ours.
            stored = await self.store.refresh(w.workload_id)
            if stored != w:
                raise
            log.info("write of %s had landed before the retry", w.workload_id)

    def _copy(self, workload_id: str) -> pb.Workload:
        w = self.store.get(workload_id)
        if w is None:
            raise KeyError(workload_id)
        copy = pb.Workload()
        copy.CopyFrom(w)
        return copy

    async def _end(self, w: pb.Workload, state: int, message: str) -> pb.Workload:
        before: list[common.Placement] = []
        if w.state in domain.ACTIVE:
            for p in w.placements:
                held = common.Placement()
                held.CopyFrom(p)
                before.append(held)
        changed = domain.end(w, state, message, now_ns())
        await self._write(w)
        for p in before:
            self.ledger.take(p, -1)
        await self.publish_placements(w, changed)
        await self.publish_event(w, EVENT_OF_STATE[state])
        task = self.tasks.get(w.workload_id)
        if task and task is not asyncio.current_task():
            task.cancel()
        return w

    # --- publishing ---------------------------------------------------------------------------
    async def publish_placements(self, w: pb.Workload, placements: list[common.Placement]) -> None:
        spec_field = w.WhichOneof("spec")
        msgs = []
        for p in placements:
            msg = pb.PlacementCommitted(placement=p)
            getattr(msg, spec_field).CopyFrom(getattr(w, spec_field))
            msg.committed_at.CopyFrom(w.updated_at)
            msgs.append(msg)
        # Nats-Msg-Id = workload/generation/site: JetStream drops a republished duplicate.
        await asyncio.gather(*[
            self.bus.publish(
                subjects.SCHEDULER_PLACEMENT, m,
                event_id=f"{w.workload_id}/{m.placement.generation}/{m.placement.site_id}",
                site=m.placement.site_id,
            )
            for m in msgs
        ])

    async def publish_event(self, w: pb.Workload, kind: int) -> None:
        if kind != pb.WORKLOAD_EVENT_KIND_ACCEPTED and w.workload_id in self.accepted:
            await self.accepted.pop(w.workload_id)
        ev = pb.WorkloadEvent(
            workload_id=w.workload_id, kind=kind, state=w.state, generation=w.generation,
            placements=[p for p in w.placements if p.replicas or p.shard_indices], message=w.message,
            progress=w.progress,
        )
        ev.at.CopyFrom(w.updated_at)
        await self.bus.publish(
            subjects.SCHEDULER_WORKLOAD, ev,
            event_id=f"{w.workload_id}/{w.generation}/{pb.WorkloadEventKind.Name(kind)}/{round(w.progress, 2)}",
            workload=w.workload_id,
        )

    # --- consumers ----------------------------------------------------------------------------
    async def on_proposal(self, event: Event) -> None:
        p: site_pb.Proposal = event.payload
        if p.site_id != event.params["site"]:
            raise ValueError(f"proposal from {p.site_id} on {event.subject}")
        if p.kind == site_pb.PROPOSAL_KIND_ACCEPT_OFFER:
            offer = self.offers.get(p.offer_id)
            if offer is None:
                self.counters["late_proposals"] += 1
                return
            offer.proposals[p.site_id] = p
            if offer.expected <= offer.proposals.keys():
                offer.done.set()
        elif p.kind == site_pb.PROPOSAL_KIND_SCALE:
            await self.on_scale(p)

    async def on_scale(self, p: site_pb.Proposal) -> None:
        if p.workload_id not in self.store.records:
            self.counters["scale_unknown"] += 1
            return
        async with self.lock(p.workload_id):
            w = self._copy(p.workload_id)
            try:
                changed = domain.scale(w, p.site_id, p.units, p.gpu_type, self.ledger, now_ns())
            except domain.ScaleRefused as exc:
                self.counters["scale_refused"] += 1
                log.debug("scale of %s at %s refused: %s", p.workload_id, p.site_id, exc)
                return
            verdict = self.governance.check(w, w.placements) if self.governance else None
            if verdict is not None and not verdict.ok:
                self.ledger.rebuild(self.store.records.values())
                self.counters["scale_refused_by_governance"] += 1
                log.debug("scale of %s at %s refused by governance: %s", p.workload_id, p.site_id, verdict.message)
                return
            try:
                await self._write(w)
            except Exception:
                self.ledger.rebuild(self.store.records.values())
                raise
            self.counters["scale_committed"] += 1
            if self.governance:
                self.governance.committed(w)
            await self.publish_placements(w, [changed])
            await self.publish_event(w, pb.WORKLOAD_EVENT_KIND_RESCALED)

    async def on_snapshot(self, event: Event) -> None:
        snap = event.payload
        for s in snap.sites:
            self.ledger.set_site(s.site.site_id, s.site.gpu_pools, s.state == common.SITE_STATE_UP)
        if snap.sites:
            self.sites_known.set()
        progress: dict[str, tuple[float, bool]] = {}
        for s in snap.sites:
            for j in s.jobs:
                old = progress.get(j.workload_id, (0.0, False))
                progress[j.workload_id] = (max(old[0], j.progress), old[1] or j.finished)
        for wid, (value, finished) in progress.items():
            w = self.store.get(wid)
            if w is None or w.state not in domain.ACTIVE:
                continue
            if finished:
                async with self.lock(wid):
                    w = self._copy(wid)
                    w.progress = 1.0
                    await self._end(w, domain.COMPLETED, "all tokens trained")
            elif value - w.progress >= 0.01:
                async with self.lock(wid):
                    w = self._copy(wid)
                    step = int(value * 10) > int(w.progress * 10)
                    w.progress = value
                    await self._write(w)
                    if step:
                        await self.publish_event(w, pb.WORKLOAD_EVENT_KIND_PROGRESS)

    async def on_applied(self, event: Event) -> None:
        a: site_pb.PlacementApplied = event.payload
        wid = a.placement.workload_id
        w = self.store.get(wid)
        if w is None:
            return
        if not a.ok:
            log.warning("site %s could not apply %s: %s", a.placement.site_id, wid, a.error)
            self.counters["apply_failed"] += 1
            return
        if w.state == domain.PLACED and a.placement.generation == w.generation:
            async with self.lock(wid):
                w = self._copy(wid)
                if w.state != domain.PLACED:
                    return
                w.state = domain.RUNNING
                w.updated_at.FromNanoseconds(now_ns())
                await self._write(w)
                await self.publish_event(w, pb.WORKLOAD_EVENT_KIND_RUNNING)
