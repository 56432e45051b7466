"""The Coordinator: the scheduler's NATS side and every path that commits a placement. It offers
work to the site agents, collects their proposals, arbitrates them (domain), commits placements to
the state of record (store) and publishes them per site; it follows perception's snapshots
(capacity, liveness, training progress) and the executors' reports. After a restart it recovers
everything from the store.

The commit paths, all here, each checked by the governance gate (`governance.SchedulerGovernance`,
always present: an always-admitting gate without governance) before the record is written:
- an offer round's arbitrated placement (`_decide`, `_commit`);
- a site agent's scale proposal (`on_scale`);
- an adaptation action (`on_action`): a workload's whole new placement, planned from the generation
  it names, checked against capacity and governance, committed as a new generation and published
  per site (sites it leaves get an empty placement);
- the reconciler's verdicts (`reconcile.Reconciler`): shrinking a service off the sites that failed
  it, withdrawing a workload to offer it again, failing it.

Offers go out in rounds: one placer task sends every workload waiting for placement as one
`OfferRound`; each up site answers the whole round with one `OfferAnswer` (an agent process
hosting several sites sends theirs together, as one `OfferAnswers`); the round is arbitrated
in the handler of the answer that completes it (or by the placer when the offer times out), its
workloads in offer order (the inventory is updated synchronously, so one round never double-books a
GPU), and each workload's commit runs as its own task, so a slow write never holds the next round.
A new workload's first round goes out while its record is still being stored; its commit waits
for that write (nothing is placed that is not stored). The commit then writes the placed record
(KV compare-and-set) and publishes its placement events together, one round trip instead of two:
from then on the commit is decided — what fails is retried, never re-offered — and a restart that
finds placements of a pending record in the stream rolls that commit forward (every placement
there) or takes it back (`_recover_commits`). Its ACCEPTED event goes out once that first round
is arbitrated (right after the placement when the round places it), so the deploy's critical
window carries no other event than the placement.

Single writer: one scheduler owns the records (CAS on every write makes a second one fail loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import aio, metrics, telemetry
from cncbrain.auth import subscribe_durable
from cncbrain.bus import Bus, Event, subjects
from cncbrain.coordination import Pool, admit
from cncbrain.errors import CncError, FailedPrecondition
from cncbrain.workload import copy_spec
from services.scheduler import domain
from services.scheduler.domain import Inventory
from services.scheduler.governance import Gate, SchedulerGovernance
from services.scheduler.reconcile import FAIL, SHRINK, Reconciler, TakeOff
from services.scheduler.settings import Settings
from services.scheduler.store import Conflict, WorkloadStore

log = logging.getLogger(__name__)
EVENT_OF_STATE = {
    domain.PENDING: spb.WORKLOAD_EVENT_KIND_ACCEPTED,
    domain.PLACED: spb.WORKLOAD_EVENT_KIND_PLACED,
    domain.RUNNING: spb.WORKLOAD_EVENT_KIND_RUNNING,
    domain.COMPLETED: spb.WORKLOAD_EVENT_KIND_COMPLETED,
    domain.FAILED: spb.WORKLOAD_EVENT_KIND_FAILED,
    domain.CANCELLED: spb.WORKLOAD_EVENT_KIND_CANCELLED,
}


KIND_LABEL = {domain.TRAINING: "training", domain.INFERENCE: "inference"}

EXPIRE_EVERY_S = 60.0
"""How often ended workloads past their retention (`Settings.ended_retention_s`) are removed."""

RECOVERY_CLOCK_SKEW_S = 60.0
"""How far before a pending record's creation (by the scheduler's clock) `_recover_commits` reads
the placement stream (stamped by the NATS server's clock)."""
SNAPSHOTS_KEPT = 64
"""Perception snapshots whose arrival the scheduler remembers (coordinated scaling: what was granted since)."""
GRANTS_KEPT_S = 600.0
"""How long a coordinated add counts as possibly not yet in the snapshot a proposal was made from."""


def now_ns() -> int:
    return time.time_ns()


@dataclass
class Waiting:
    """A workload waiting for placement (in the placer's queue)."""

    workload: spb.Workload
    need: domain.Need
    deadline: float
    created: asyncio.Future[bool] | None = None
    """Resolves True once the record is stored (False: it was not; never commit it). None: stored."""
    context: otel_context.Context | None = None
    """Trace of the call that submitted it; its first round is a child of it."""
    not_before: float = 0.0
    attempts: int = 0
    why: domain.Unplaced | None = None
    """Why the last round did not place it (kept on the pending record as its message)."""
    exclude: frozenset[str] = frozenset()
    """Sites that rejected or ignored an earlier placement of it (their proposals do not count)."""


@dataclass
class OpenRound:
    round_id: str
    batch: list[Waiting]
    expected: set[str]
    answers: dict[str, site_pb.OfferAnswer] = field(default_factory=dict)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    """Resolved when the round is over: every expected site answered, or the offer timed out."""
    closed: bool = False
    """Arbitrated (by the answer that completed it, or by the placer after the timeout)."""


class Coordinator:
    def __init__(self, bus: Bus, settings: Settings, gate: Gate | None = None, token: str | None = None) -> None:
        """`gate`: governance's (`governance.open_gate`), default the always-admitting one; `token`:
        the scheduler's own, forwarded at admission for a caller without one."""
        self.bus = bus
        self.settings = settings
        self.store = WorkloadStore(bus)
        self.inventory = Inventory()
        self.rounds: dict[str, OpenRound] = {}
        self.waiting: dict[str, Waiting] = {}  # insertion order = offer order
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self._placer: asyncio.Task[None] | None = None
        self._stopping = False
        self.locks: dict[str, asyncio.Lock] = {}
        self.sites_known = asyncio.Event()
        self.governance = SchedulerGovernance(self.inventory, gate, token)
        """Admission, who may touch a workload, and the check of every placement before its commit."""
        self.accepted: dict[str, asyncio.Future[None]] = {}
        """ACCEPTED publishes in flight; later events of the workload wait for theirs (order)."""
        self.unannounced: dict[str, spb.Workload] = {}
        """Stored workloads whose ACCEPTED is not sent yet (the record as accepted)."""
        self.committing: set[str] = set()
        """Workloads whose commit task is running."""
        self.counters = bus.counters
        self.agent_of: dict[str, str] = {}
        """Site -> the agent its latest registration names (who may answer for it in a batch)."""
        self.reconciler = Reconciler(settings)
        self._reconciling: asyncio.Task[None] | None = None
        self._expiring: asyncio.Task[None] | None = None
        self.scale_wishes: dict[str, dict[str, site_pb.Proposal]] = {}
        """Coordinated SCALE proposals waiting to be granted together: workload -> site -> its newest."""
        self.scale_grants: dict[str, list[tuple[float, float, int]]] = {}
        """Coordinated adds granted per workload: (monotonic time, requests/s added, replicas added)."""
        self.snapshot_seen: dict[int, float] = {}
        """Perception snapshots by sequence: when this scheduler took each (the last SNAPSHOTS_KEPT)."""
        metrics.on_scrape(self._export)

    def _export(self) -> None:
        """`cnc_scheduler_workloads` and `cnc_scheduler_waiting` (run by the metrics endpoint at scrape)."""
        counts: dict[tuple[str, str], float] = {}
        for w in list(self.store.records.values()):
            key = (KIND_LABEL.get(w.kind, "other"), spb.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_").lower())
            counts[key] = counts.get(key, 0.0) + 1
        metrics.replace_gauge(metrics.WORKLOADS, counts)
        metrics.WAITING.set(len(self.waiting))

    # --- life ---------------------------------------------------------------------------------
    async def start(self) -> None:
        records = await self._recover_commits(await self.store.open())
        self.inventory.rebuild(records)
        self.reconciler.recover(records)  # before the reports come in
        await self.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, self.on_snapshot, consumer="scheduler-snapshot")
        await self.bus.subscribe(subjects.SITE_ANSWER, self.on_answer, consumer="scheduler-proposals")
        if self.bus.identity is not None:
            # On an authenticated bus a batch counts only for sites whose registration — which only
            # an identity speaking for the site may publish — names the batch's agent.
            await self.bus.follow(subjects.SITE_REGISTERED, self.on_registered)
        await self.bus.subscribe(subjects.SITE_ANSWERS, self.on_answers, consumer="scheduler-answers")
        await self.bus.subscribe(subjects.SITE_PROPOSAL, self.on_proposal, consumer="scheduler-scale")
        await self.bus.subscribe(subjects.SITE_APPLIED, self.on_applied, consumer="scheduler-applied", durable=True)
        await subscribe_durable(self.bus, subjects.ADAPTATION_ACTION, self.on_action, "scheduler-adaptation")
        pending = [w for w in records if w.state == domain.PENDING]
        for w in pending:
            # ACCEPTED may not have reached the stream before a crash; its id makes this a no-op if it did.
            await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_ACCEPTED)
            self.enqueue(w)
        self._placer = aio.background(self._place_loop(), "placer")
        self._reconciling = aio.background(
            self._every(self.settings.reconcile_s, self._reconcile_tick, "reconciliation tick"), "reconciler")
        self._expiring = aio.background(  # NATS away, or not (or no longer) active: one line, next time
            self._every(EXPIRE_EVERY_S, self.expire_ended, "removing expired workloads", quiet=(CncError,)),
            "retention")
        recent = [w for w in records if time.time() - w.updated_at.seconds <= self.settings.republish_window_s]
        log.info("recovered %d workloads (%d pending, %d to republish)", len(records), len(pending), len(recent))
        for w in recent:
            if w.state != domain.PENDING:  # sites that applied them ignore them (and do not report again)
                await self.publish_placements(w, list(w.placements), track=False)

    async def stop(self) -> None:
        # The placer also ends on this flag: on Python 3.11 a cancel that lands as one of nats-py's
        # requests is answered is dropped by `asyncio.wait_for` (see Governor.stop).
        self._stopping = True
        metrics.off_scrape(self._export)
        self.wake.set()
        tasks = [*self.tasks, *(t for t in (self._placer, self._reconciling, self._expiring) if t)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.governance.close()

    def lock(self, workload_id: str) -> asyncio.Lock:
        return self.locks.setdefault(workload_id, asyncio.Lock())

    # --- tenant actions (called by rpc) -----------------------------------------------------
    async def accept(self, w: spb.Workload) -> spb.Workload:
        """Store a new workload (idempotent on its id) and start placing it.

        Its first offer round goes out while the record is being written (the round first: the
        placer, woken by `enqueue`, runs before this resumes); the commit waits for the write, and
        a write that fails (or finds the id taken) drops the queued entry."""
        created: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        mine = None
        if w.workload_id not in self.waiting and self.store.get(w.workload_id) is None:
            mine = self.enqueue(w, created)
            await asyncio.sleep(0)
        try:
            await self.store.create(w)
        except BaseException as exc:
            created.set_result(False)
            if mine is not None and self.waiting.get(w.workload_id) is mine:
                del self.waiting[w.workload_id]
            if not isinstance(exc, Conflict):
                raise
            existing = self.store.get(w.workload_id) or await self.store.refresh(w.workload_id)
            if existing is None:
                raise
            if not domain.same_spec(existing, w):
                raise FailedPrecondition("request_id: already used for a different spec") from None
            return existing
        created.set_result(True)
        # ACCEPTED goes out after the first round (`_announce`); every later event waits for it.
        self.unannounced[w.workload_id] = w
        if mine is not None and mine.attempts and self.waiting.get(w.workload_id) is mine:
            self._announce(w.workload_id)  # its first round ended before the write did, unplaced
        if mine is None:
            self.enqueue(w)
        return w

    def _announce(self, workload_id: str) -> None:
        """Send the workload's ACCEPTED (in the background) unless it went out already."""
        w = self.unannounced.pop(workload_id, None)
        if w is not None:
            self.accepted[workload_id] = asyncio.ensure_future(self._send_accepted(w))

    async def _send_accepted(self, w: spb.Workload) -> None:
        try:
            await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_ACCEPTED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # informational only (the record is stored): later events still go out
            self.counters["accepted_events_lost"] += 1
            log.warning("ACCEPTED event of %s not sent: %r", w.workload_id, exc)

    async def cancel(self, workload_id: str, actor: str = "") -> spb.Workload:
        """End a workload at a caller's request; `actor` (the caller's token id) goes with its
        CANCELLED event into governance's audit ledger."""
        async with self.lock(workload_id):
            w = self._copy(workload_id)
            if w.state in domain.ENDED:
                raise FailedPrecondition(f"workload is already {spb.WorkloadState.Name(w.state)}")
            return await self._end(w, domain.CANCELLED, "cancelled by the tenant", actor)

    # --- placement ----------------------------------------------------------------------------
    def enqueue(self, w: spb.Workload, created: asyncio.Future[bool] | None = None, *, deadline: float | None = None,
                exclude: frozenset[str] = frozenset()) -> Waiting:
        """Queue `w` for placement until `deadline` (default: its creation plus its timeout)."""
        if deadline is None:
            deadline = w.created_at.ToNanoseconds() / 1e9 + self._timeout_of(w)
        entry = Waiting(w, domain.need_of(w), deadline, created, otel_context.get_current(), exclude=exclude)
        self.waiting[w.workload_id] = entry
        self.wake.set()
        return entry

    def _spawn(self, coro, name: str) -> None:
        """A task of one workload (its commit, its failure): an error it does not handle is logged
        (the reconciler then finds the workload where it was left, see `reconcile`)."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.counters["task_errors"] += 1
            log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)

    def _timeout_of(self, w: spb.Workload) -> float:
        if w.kind == domain.TRAINING:
            return w.training_job.gang_timeout_s or self.settings.default_gang_timeout_s
        return self.settings.placement_timeout_s

    async def _place_loop(self) -> None:
        """One offer round at a time, each with every workload due; rounds follow each other at
        once while work waits, so a burst is batched by how long one round takes."""
        while not self._stopping:
            now = time.time()
            due = [e for e in self.waiting.values() if e.not_before <= now]
            if not due:
                delay = min((e.not_before for e in self.waiting.values()), default=None)
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), None if delay is None else max(0.0, delay - now))
                continue
            try:
                await self._round(due[: self.settings.max_offers_per_round])
            except asyncio.CancelledError:
                raise
            except Exception:  # a round that failed (NATS down) is retried after the pause
                log.exception("offer round failed")
                for e in due:
                    e.not_before = time.time() + self.settings.retry_interval_s

    async def _round(self, batch: list[Waiting]) -> None:
        """Offer `batch` and arbitrate it: at once when the last up site's answer arrives (in that
        answer's handler: no wait for the placer to resume), else when the offer times out."""
        if not self.inventory.up:
            self._arbitrate(batch, [])
            return
        rnd = await self._offer(batch)
        self._close(rnd)  # the timeout, or nothing left to do

    def _close(self, rnd: OpenRound) -> None:
        if rnd.closed:
            return
        rnd.closed = True
        self.rounds.pop(rnd.round_id, None)
        try:
            self._arbitrate(rnd.batch, list(rnd.answers.values()))
        except Exception:  # as a failed round: offered again after the pause
            log.exception("arbitration of round %s failed", rnd.round_id)
            for e in rnd.batch:
                e.not_before = time.time() + self.settings.retry_interval_s

    def _arbitrate(self, batch: list[Waiting], answers: list[site_pb.OfferAnswer]) -> None:
        by_workload: dict[str, list[site_pb.Proposal]] = {}
        for a in answers:
            for p in a.proposals:
                if p.site_id == a.site_id:
                    by_workload.setdefault(p.workload_id, []).append(p)
        now = time.time()
        for entry in batch:
            entry.attempts += 1
            if not self._decide(entry, by_workload.get(entry.workload.workload_id, []), now):
                self._announce(entry.workload.workload_id)  # its commit announces it otherwise

    async def _offer(self, batch: list[Waiting]) -> OpenRound:
        """Send the round and wait until it is over (its answers are in the returned `OpenRound`)."""
        round_id = uuid.uuid4().hex[:16]
        deadline = time.time() + self.settings.offer_timeout_s
        msg = spb.OfferRound(round_id=round_id)
        msg.deadline.FromNanoseconds(int(deadline * 1e9))
        for e in batch:
            w, need = e.workload, e.need
            offer = msg.offers.add(
                offer_id=f"{round_id}-{w.workload_id}", workload_id=w.workload_id, kind=w.kind, units=need.units,
                gpus_per_unit=need.gpus_per_unit,
                # Only the GPU types the tenant's policy and quota leave room for are offered.
                allowed_gpu_types=list(self.governance.offer_types(w)),
                ingress_site_id=need.ingress_site_id, min_hbm_gb=need.min_hbm_gb,
            )
            offer.deadline.CopyFrom(msg.deadline)
            copy_spec(w, offer)
        pending = OpenRound(round_id, batch, expected=set(self.inventory.up))
        self.rounds[round_id] = pending
        # The round belongs to the trace of its first workload's call; the others are linked.
        links = [trace.Link(sc) for e in batch[1:] if e.context is not None
                 and (sc := trace.get_current_span(e.context).get_span_context()).is_valid] \
            if telemetry.recording() else None
        try:
            with telemetry.span("cncbrain.scheduler", "offer round", context=batch[0].context, links=links,
                                kind=trace.SpanKind.PRODUCER, attributes={"cnc.offers": len(batch)}):
                await self.bus.publish(subjects.SCHEDULER_OFFER, msg, span=False)
            timer = asyncio.get_running_loop().call_later(
                self.settings.offer_timeout_s, lambda: None if pending.done.done() else pending.done.set_result(None))
            try:
                await pending.done  # every up site answered, or the timeout
            finally:
                timer.cancel()
        finally:
            self.rounds.pop(round_id, None)
        self.counters["offer_rounds"] += 1
        self.counters["offers"] += len(batch)
        return pending

    def _decide(self, entry: Waiting, proposals: list[site_pb.Proposal], now: float) -> bool:
        """Arbitrate one workload of a round (no await: the inventory cannot change underneath); a
        winning allocation is taken from the inventory at once and committed by its own task (True)."""
        wid = entry.workload.workload_id
        if self.waiting.get(wid) is not entry:
            return False  # cancelled or ended meanwhile
        current = self.store.get(wid) or entry.workload
        if current.state != domain.PENDING:
            del self.waiting[wid]
            return False
        if entry.exclude:
            proposals = [p for p in proposals if p.site_id not in entry.exclude]
        proposals = self.governance.proposals(current, proposals)  # outside its placement policy: never count
        allocation = domain.arbitrate(entry.need, proposals, self.inventory) if proposals else None
        if allocation is not None:
            w = spb.Workload()
            w.CopyFrom(current)
            placements = domain.commit_placement(w, allocation, now_ns())
            verdict = self.governance.check(w, placements)
            if not verdict.ok:
                self.counters["placements_refused_by_governance"] += 1
                log.info("placement of %s refused by governance: %s", wid, verdict.message)
                self._note(entry, domain.Unplaced("policy", f"placement refused by governance: {verdict.message}"))
            else:
                for p in placements:
                    self.inventory.take(p)
                del self.waiting[wid]
                self.committing.add(wid)
                self._spawn(self._commit(entry, w, placements), f"commit-{wid}")
                return True
        else:
            self._note(entry, domain.why_unplaced(
                entry.need, self.inventory, proposals, training=current.kind == domain.TRAINING,
                offered_types=self.governance.offer_types(current), allowed=self.governance.site_filter(current)))
        if now > entry.deadline:
            del self.waiting[wid]
            self._spawn(self._fail(entry), f"fail-{wid}")
            return False
        entry.not_before = now + self.settings.retry_interval_s
        return False

    def _note(self, entry: Waiting, why: domain.Unplaced) -> None:
        """Keep why `entry` waits; a new reason goes on its pending record (written only on change)."""
        if entry.why != why:
            entry.why = why
            self._spawn(self._write_reason(entry, why), f"reason-{entry.workload.workload_id}")

    async def _write_reason(self, entry: Waiting, why: domain.Unplaced) -> None:
        wid = entry.workload.workload_id
        if entry.created is not None and not await entry.created:
            return
        async with self.lock(wid):
            w = self.store.get(wid)
            if w is None or w.state != domain.PENDING or entry.why != why or w.message == why.text:
                return  # placed, ended or reasoned anew meanwhile
            w = self._copy(wid)
            w.message = why.text
            try:
                await self._write(w)
            except Exception:  # the next change of reason, or the placement, writes again
                log.warning("could not record why %s waits", wid, exc_info=True)

    async def _commit(self, entry: Waiting, w: spb.Workload, placements: list[common.Placement]) -> None:
        wid = w.workload_id

        def undo() -> None:
            for p in placements:
                self.inventory.take(p, -1)

        if entry.context is not None:  # the commit and its events belong to the submitting call's trace
            otel_context.attach(entry.context)  # this task's own context copy
        try:
            if entry.created is not None and not await entry.created:
                undo()
                return
            async with self.lock(wid):
                current = self.store.get(wid)
                if current is None or current.state != domain.PENDING:
                    undo()  # cancelled between arbitration and commit
                    return
                with telemetry.span("cncbrain.scheduler", "commit", attributes={
                        "cnc.workload_id": wid, "cnc.generation": w.generation,
                        "cnc.sites": [p.site_id for p in placements]} if telemetry.recording() else None):
                    await self._write_and_publish(w, placements)
                metrics.DEPLOY_TO_COMMIT.labels(KIND_LABEL.get(w.kind, "other")).observe(
                    max(0.0, time.time() - w.created_at.ToNanoseconds() / 1e9))
                self.counters["placements_committed"] += 1
                self.counters["units_placed"] += entry.need.units
                self.governance.committed(w)
                await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_PLACED)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("commit of %s failed", wid)
        finally:
            self.committing.discard(wid)

    async def _fail(self, entry: Waiting) -> None:
        wid = entry.workload.workload_id
        if entry.created is not None and not await entry.created:
            return
        need = entry.need
        try:
            async with self.lock(wid):
                w = self._copy(wid)
                if w.state == domain.PENDING:
                    why = entry.why or domain.Unplaced("no_capacity", "no offer round placed it")
                    metrics.PLACEMENT_FAILURES.labels(why.code).inc()
                    await self._end(
                        w, domain.FAILED,
                        f"not placed within {self._timeout_of(w):.0f} s ({entry.attempts} offers of "
                        f"{need.units}×{need.gpus_per_unit} GPUs): {why.text}",
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS away: the record is still PENDING; fail it again after the pause
            log.warning("could not record the failure of %s (%r); trying again", wid, exc)
            if wid not in self.waiting and not self._stopping:
                entry.created = None
                entry.not_before = time.time() + self.settings.retry_interval_s
                self.waiting[wid] = entry
                self.wake.set()

    async def _write(self, w: spb.Workload) -> None:
        try:
            await self.store.update(w)
        except Conflict:
            # A write whose reply was lost in a NATS restart may have landed: then it is ours.
            stored = await self.store.refresh(w.workload_id)
            if stored != w:
                raise
            log.info("write of %s had landed before the retry", w.workload_id)

    async def _write_and_publish(self, w: spb.Workload, placements: list[common.Placement]) -> None:
        """Write the placed record `w` and publish its `placements` at once (different streams, one
        socket write). Both are idempotent — a write that landed is recognised on re-read
        (`_write`), a placement carries its id (JetStream drops a duplicate) and sites apply a
        generation once — so whichever fails is retried until both are done; the workload is never
        offered again once its placements may be out. A restart in between is `_recover_commits`'s."""
        self.store.assume(w)  # readers (GetWorkload after the placement event) see it placed
        todo = {"record": lambda: self._write(w), "placements": lambda: self.publish_placements(w, placements)}
        while todo:
            names = list(todo)
            results = await asyncio.gather(*(todo[n]() for n in names), return_exceptions=True)
            for name, result in zip(names, results, strict=True):
                if not isinstance(result, BaseException):
                    del todo[name]
                elif isinstance(result, Conflict) or self._stopping:
                    raise result  # another writer (a second scheduler): fail loudly
                else:
                    log.warning("commit of %s: %s not done yet (%r); retrying", w.workload_id, name, result)
            if todo:
                self.counters["commit_retries"] += 1
                await asyncio.sleep(self.settings.retry_interval_s)

    async def _recover_commits(self, records: list[spb.Workload]) -> list[spb.Workload]:
        """Commits cut short by a stop between publishing a pending workload's placements and
        writing its record: the placement stream holds placements of the generation its next commit
        would have had. Rolled forward (record written as that commit wrote it) when they are the
        whole commit — the workload's every unit, as arbitration places all or nothing — otherwise
        taken back (zero placements at those sites in a new generation, then the record, still
        pending, written with that generation) and offered again. Returns the records as now stored."""
        pending = {w.workload_id: w for w in records if w.state == domain.PENDING}
        if not pending:
            return records
        since = min(w.created_at.ToNanoseconds() for w in pending.values()) / 1e9 - RECOVERY_CLOCK_SKEW_S
        events = await self.bus.retrying(lambda: self.bus.events_since(subjects.SCHEDULER_PLACEMENT, since),
                                         "read the placements of pending workloads")
        found: dict[str, dict[str, spb.PlacementCommitted]] = {}
        for ev in events:
            p = ev.payload.placement
            w = pending.get(p.workload_id)
            if w is not None and p.generation == w.generation + 1:
                found.setdefault(p.workload_id, {})[p.site_id] = ev.payload
        stored = {w.workload_id: w for w in records}
        for wid, by_site in found.items():
            placed = spb.Workload()
            placed.CopyFrom(pending[wid])
            allocation = {site: (m.placement.gpu_type, m.placement.replicas or len(m.placement.shard_indices))
                          for site, m in by_site.items()}
            at = max(m.committed_at.ToNanoseconds() for m in by_site.values())
            placements = domain.commit_placement(placed, allocation, at)
            if domain.units_of(placed) == domain.need_of(placed).units \
                    and placements == [by_site[p.site_id].placement for p in placements]:
                await self._write(placed)
                self.counters["commits_rolled_forward"] += 1
                log.warning("recovered the commit of %s: its placements were published, its record not", wid)
            else:  # placed (in memory) holds the partial commit; take back every site of it
                released = domain.withdraw(placed, "placement withdrawn after a restart (commit cut short)", now_ns())
                await self.publish_placements(placed, released)
                await self._write(placed)
                self.counters["commits_withdrawn"] += 1
                log.warning("withdrew the partial commit of %s (%d of %d units published); offering it again",
                            wid, sum(units for _, units in allocation.values()), domain.need_of(placed).units)
            stored[wid] = placed
        return list(stored.values())

    def _copy(self, workload_id: str) -> spb.Workload:
        w = self.store.get(workload_id)
        if w is None:
            raise KeyError(workload_id)
        copy = spb.Workload()
        copy.CopyFrom(w)
        return copy

    async def _end(self, w: spb.Workload, state: spb.WorkloadState.ValueType, message: str, actor: str = "") -> spb.Workload:
        before: list[common.Placement] = []
        if w.state in domain.ACTIVE:
            for p in w.placements:
                held = common.Placement()
                held.CopyFrom(p)
                before.append(held)
        changed = domain.end(w, state, message, now_ns())
        await self._write(w)
        for p in before:
            self.inventory.take(p, -1)
        self.waiting.pop(w.workload_id, None)
        self.reconciler.forget(w.workload_id)
        await asyncio.gather(self.publish_placements(w, changed), self.publish_event(w, EVENT_OF_STATE[state], actor))
        return w

    # --- retention ----------------------------------------------------------------------------
    async def expire_ended(self, now: float | None = None) -> list[str]:
        """Remove from the record (memory and bucket) every workload that ended more than
        `ended_retention_s` before `now` (unix seconds; default the clock); the ids removed. A
        workload that has not ended is never removed, whatever its age."""
        cutoff = (time.time() if now is None else now) - self.settings.ended_retention_s
        old = [wid for wid, w in list(self.store.records.items())
               if w.state in domain.ENDED and w.updated_at.ToNanoseconds() / 1e9 < cutoff]
        removed = []
        for wid in old:
            async with self.lock(wid):
                w = self.store.get(wid)
                if w is None or w.state not in domain.ENDED or wid in self.waiting or wid in self.committing:
                    continue
                await self.store.remove(wid)
            if not self.lock(wid).locked():
                self.locks.pop(wid, None)
            self.reconciler.forget(wid)
            removed.append(wid)
        if removed:
            log.info("removed %d workloads ended more than %.0f s ago (ended_retention_s)", len(removed),
                     self.settings.ended_retention_s)
        return removed

    async def _every(self, period_s: float, step, what: str,
                     quiet: tuple[type[Exception], ...] = ()) -> None:
        """Run `step()` every `period_s` until stopped; a failure is logged and the next round tried
        (the same problems — NATS away, this instance not active — are looked at again then): one
        line for the `quiet` kinds, a traceback for anything else."""
        while not self._stopping:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except quiet as exc:
                log.warning("%s failed: %s", what, exc)
            except Exception:
                log.exception("%s failed", what)
            await asyncio.sleep(period_s)

    # --- reconciliation: the reconciler's verdicts, committed -----------------------------------

    async def _reconcile_tick(self) -> None:
        for wid, sites in self.reconciler.due(time.monotonic(), self.inventory.up).items():
            await self._take_off(wid, sites)
        for wid, w in list(self.store.records.items()):
            if w.state == domain.PENDING and wid not in self.waiting and wid not in self.committing:
                self.counters["pending_requeued"] += 1
                log.warning("%s was pending with nothing placing it; offering it again", wid)
                self.enqueue(w, deadline=time.time() + self._timeout_of(w))

    async def _take_off(self, wid: str, sites: dict[str, str]) -> None:
        """Take workload `wid` off the sites that failed it (`sites`: site → what it did)."""
        if wid not in self.store.records:
            return
        async with self.lock(wid):
            w = self._copy(wid)
            step = self.reconciler.take_off(w, sites)
            if step is None:
                return
            self.counters["placements_taken_off"] += len(step.sites)
            log.warning("%s: %s", wid, step.message)
            if step.action == FAIL:
                await self._end(w, domain.FAILED, step.message)
            elif step.action == SHRINK:
                await self._shrink(w, step)
            else:
                await self._withdraw(w, step)

    async def _shrink(self, w: spb.Workload, step: TakeOff) -> None:
        """A service loses its replicas at `step.sites` (a new generation, zero replicas there)."""
        w.generation += 1
        changed = []
        for p in w.placements:
            if p.site_id in step.sites and p.replicas:
                self.inventory.take(p, -1)
                p.replicas = 0
                p.generation = w.generation
                copy = common.Placement()
                copy.CopyFrom(p)
                changed.append(copy)
        w.message = step.message
        w.updated_at.FromNanoseconds(now_ns())
        await self._write(w)
        self.governance.committed(w)
        await self.publish_placements(w, changed)
        await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_RESCALED)

    async def _withdraw(self, w: spb.Workload, step: TakeOff) -> None:
        """Take the workload off every site and offer it again, avoiding `step.exclude`."""
        held = []
        for p in w.placements:
            if p.replicas or p.shard_indices:
                copy = common.Placement()
                copy.CopyFrom(p)
                held.append(copy)
        released = domain.withdraw(w, step.message, now_ns())
        await self._write(w)
        for p in held:
            self.inventory.take(p, -1)
        self.governance.committed(w)
        await self.publish_placements(w, released)
        await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_RESCALED)
        self.enqueue(w, deadline=time.time() + self._timeout_of(w), exclude=step.exclude)

    # --- publishing ---------------------------------------------------------------------------
    async def publish_placements(self, w: spb.Workload, placements: list[common.Placement], *,
                                 track: bool = True) -> None:
        """Publish `placements` of `w`, one event per site; `track`: the reconciler waits for each
        site's report (a republication after a restart is `recover`ed instead)."""
        msgs = []
        for p in placements:
            msg = spb.PlacementCommitted(placement=p)
            copy_spec(w, msg)
            msg.committed_at.CopyFrom(w.updated_at)
            msgs.append(msg)
        if track:  # before the publish: a site may report before it returns
            self.reconciler.published(placements)
        # Nats-Msg-Id = workload/generation/site: JetStream drops a republished duplicate.
        await asyncio.gather(*[
            self.bus.publish(
                subjects.SCHEDULER_PLACEMENT, m,
                event_id=f"{w.workload_id}/{m.placement.generation}/{m.placement.site_id}",
                site=m.placement.site_id,
            )
            for m in msgs
        ])

    async def publish_event(self, w: spb.Workload, kind: spb.WorkloadEventKind.ValueType, actor: str = "") -> None:
        if kind != spb.WORKLOAD_EVENT_KIND_ACCEPTED:
            self._announce(w.workload_id)
            if w.workload_id in self.accepted:
                await self.accepted.pop(w.workload_id)
        ev = spb.WorkloadEvent(
            workload_id=w.workload_id, kind=kind, state=w.state, generation=w.generation,
            placements=[p for p in w.placements if p.replicas or p.shard_indices], message=w.message,
            progress=w.progress, actor=actor,
        )
        ev.at.CopyFrom(w.updated_at)
        await self.bus.publish(
            subjects.SCHEDULER_WORKLOAD, ev,
            event_id=f"{w.workload_id}/{w.generation}/{spb.WorkloadEventKind.Name(kind)}/{round(w.progress, 2)}",
            workload=w.workload_id,
        )

    # --- consumers ----------------------------------------------------------------------------
    async def on_answer(self, event: Event) -> None:
        a: site_pb.OfferAnswer = event.payload
        if a.site_id != event.params["site"]:
            raise ValueError(f"answer from {a.site_id} on {event.subject}")
        self._take_answer(a)

    async def on_answers(self, event: Event) -> None:
        """Several sites' answers to one round from the agent process hosting them. Each counts only
        for a site the scheduler knows (registered), and `_round` keeps only the proposals of an
        answer's own site, as for answers on the sites' own subjects."""
        batch: site_pb.OfferAnswers = event.payload
        agent = event.params["agent"]
        for a in batch.answers:
            if self.bus.identity is not None and self.agent_of.get(a.site_id) != agent:
                self.counters["answers_refused"] += 1
                log.warning("answer for site %r from agent %s refused: the site's registration names agent %r",
                            a.site_id, agent, self.agent_of.get(a.site_id))
                continue
            if a.site_id not in self.inventory.capacity or a.round_id != batch.round_id:
                self.counters["answers_refused"] += 1
                log.warning("answer for site %r (round %s) from agent %s refused: %s", a.site_id, a.round_id,
                            event.params["agent"], "round mismatch" if a.site_id in self.inventory.capacity
                            else "unknown site")
                continue
            self._take_answer(a)

    async def on_registered(self, event: Event, sequence: int) -> None:
        site_id = event.params["site"]
        if event.payload.site.site_id == site_id:
            self.agent_of[site_id] = event.payload.agent_id

    def _take_answer(self, a: site_pb.OfferAnswer) -> None:
        rnd = self.rounds.get(a.round_id)
        if rnd is None:
            self.counters["late_answers"] += 1
            return
        rnd.answers[a.site_id] = a
        if rnd.expected <= rnd.answers.keys() and not rnd.done.done():
            try:
                self._close(rnd)
            finally:
                rnd.done.set_result(None)

    async def on_proposal(self, event: Event) -> None:
        p: site_pb.Proposal = event.payload
        if p.site_id != event.params["site"]:
            raise ValueError(f"proposal from {p.site_id} on {event.subject}")
        if p.kind == site_pb.PROPOSAL_KIND_SCALE:
            await self.on_scale(p)
        else:
            self.counters["proposals_ignored"] += 1  # offers are answered on cnc.site.<site>.answer

    async def on_scale(self, p: site_pb.Proposal) -> None:
        if p.workload_id not in self.store.records:
            self.counters["scale_unknown"] += 1
            return
        if p.HasField("context"):  # coordinated: granted with the other sites' wishes for the service
            wishes = self.scale_wishes.setdefault(p.workload_id, {})
            if not wishes:
                self._spawn(self._coordinate(p.workload_id), f"coordinate scaling of {p.workload_id}")
            wishes[p.site_id] = p  # a site's newer wish replaces its older one
            return
        await self._scale(p, p.units)

    async def _coordinate(self, wid: str) -> None:
        """Grant the coordinated SCALE proposals of `wid` collected over `scale_window_s` together
        (`cncbrain.coordination.admit`): adds in order of priority, only within the pool's uncovered
        demand as the newest proposal's snapshot saw it less what was granted since; removals only
        when nothing was added this time or since and the pool keeps min_replicas."""
        await asyncio.sleep(self.settings.scale_window_s)
        wishes = []
        for p in self.scale_wishes.pop(wid, {}).values():
            c = p.context
            figures = (c.pool_demand_rps, c.pool_capacity_rps, c.replica_rps, c.priority)
            if all(math.isfinite(x) for x in figures) and min(figures[:3]) >= 0:
                wishes.append(p)
            else:  # a context no site's view gives: not granted, not counted against the others
                self.counters["scale_refused"] += 1
                log.warning("scale proposal of %s from %s refused: its pool figures %s are not finite and >= 0",
                            wid, p.site_id, figures)
        w = self.store.get(wid)
        if not wishes or w is None or w.kind != domain.INFERENCE or w.state not in domain.ACTIVE:
            self.counters["scale_refused"] += len(wishes)
            return
        now = time.monotonic()
        grants = [g for g in self.scale_grants.get(wid, []) if now - g[0] <= GRANTS_KEPT_S]
        newest = max(p.context.snapshot_sequence for p in wishes)
        seen = self.snapshot_seen.get(newest)
        if seen is None:  # a snapshot this scheduler has not seen: newer than every one it has, or long gone
            seen = now if newest > max(self.snapshot_seen, default=0) else -math.inf
        since = [g for g in grants if g[0] > seen]  # granted after that snapshot: not in its figures
        ctx = next(p.context for p in wishes if p.context.snapshot_sequence == newest)
        have = {x.site_id: x.replicas for x in w.placements}
        pool = Pool(np.array([ctx.pool_demand_rps]), np.array([ctx.pool_capacity_rps + sum(g[1] for g in since)]),
                    np.array([float(domain.units_of(w))]), np.array([float(sum(g[2] for g in since))]),
                    np.array([float(w.inference_service.min_replicas)]))
        delta = np.array([[p.units - have.get(p.site_id, 0)] for p in wishes], np.int64)
        rate = np.array([[max(p.context.replica_rps, 0.0)] for p in wishes])
        granted = admit(delta, np.array([[p.context.priority] for p in wishes]), rate, rate, pool)[:, 0]
        for p, d, g, r in zip(wishes, delta[:, 0], granted, rate[:, 0], strict=True):
            if g == 0:
                self.counters["scale_held" if d else "scale_refused"] += 1
                continue
            if await self._scale(p, have.get(p.site_id, 0) + int(g)) and g > 0:
                grants.append((time.monotonic(), float(g) * r, int(g)))
        self.scale_grants[wid] = grants

    async def _scale(self, p: site_pb.Proposal, units: int) -> bool:
        """Set `units` replicas of the proposal's service at its site (a site agent's SCALE); whether it was committed."""
        async with self.lock(p.workload_id):
            w = self._copy(p.workload_id)
            try:
                changed = domain.scale(w, p.site_id, units, p.gpu_type, self.inventory, now_ns())
            except domain.ScaleRefused as exc:
                self.counters["scale_refused"] += 1
                log.debug("scale of %s at %s refused: %s", p.workload_id, p.site_id, exc)
                return False
            verdict = self.governance.check(w, w.placements)
            if not verdict.ok:
                self.inventory.rebuild(self.store.records.values())
                self.counters["scale_refused_by_governance"] += 1
                log.debug("scale of %s at %s refused by governance: %s", p.workload_id, p.site_id, verdict.message)
                return False
            try:
                await self._write(w)
            except Exception:
                self.inventory.rebuild(self.store.records.values())
                raise
            self.counters["scale_committed"] += 1
            self.governance.committed(w)
            await self.publish_placements(w, [changed])
            await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_RESCALED)
        return True

    async def on_action(self, event: Event) -> None:
        """Adaptation's action (`cnc.adaptation.action`): the workload's whole new placement, applied
        when it was planned from the record's generation and fits capacity and governance."""
        action: apb.AdaptationAction = event.payload
        if not action.placements:
            return  # WAIT_FOR_CAPACITY and friends carry nothing to apply
        wid = action.workload_id
        if wid not in self.store.records:
            self.counters["adaptation_unknown"] += 1
            return
        async with self.lock(wid):
            w = self._copy(wid)
            if w.state not in domain.ACTIVE:
                return
            if w.generation != action.base_generation:
                self.counters["adaptation_stale"] += 1
                log.info("adaptation action for %s planned from generation %d, record is at %d: ignored",
                         wid, action.base_generation, w.generation)
                return
            refused = self._refusal(w, action)
            if refused:
                self.counters["adaptation_refused"] += 1
                log.warning("adaptation action for %s refused: %s", wid, refused)
                return
            before = {p.site_id for p in w.placements}
            for p in w.placements:
                self.inventory.take(p, -1)
            w.generation += 1
            del w.placements[:]
            changed = []
            for p in action.placements:
                entry = common.Placement()
                entry.CopyFrom(p)
                entry.workload_id, entry.kind, entry.generation = wid, w.kind, w.generation
                if entry.replicas or entry.shard_indices:
                    w.placements.append(entry)
                    self.inventory.take(entry)
                if entry.site_id in before or entry.replicas or entry.shard_indices:
                    changed.append(entry)
            if w.kind == domain.TRAINING and action.lost_progress > 0:
                w.progress = max(0.0, w.progress - action.lost_progress)
            w.message = action.reason + (f"; {action.lost_tokens:,.0f} tokens to redo" if action.lost_tokens > 0 else "")
            w.updated_at.FromNanoseconds(time.time_ns())
            try:
                await self._write(w)
            except Exception:
                self.inventory.rebuild(self.store.records.values())
                raise
            self.governance.committed(w)
            self.counters["adaptation_applied"] += 1
        await self.publish_placements(w, changed)
        await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_RESCALED)

    def _refusal(self, w: spb.Workload, action: apb.AdaptationAction) -> str:
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
            if p.site_id not in self.inventory.up:
                return f"site {p.site_id} is not up"
            need = (p.replicas + len(p.shard_indices)) * p.gpus_per_unit
            room = self.inventory.free(p.site_id, p.gpu_type) + held.get((p.site_id, p.gpu_type), 0)
            if need > room:
                return f"site {p.site_id} has {room} {p.gpu_type} for {need}"
        decision = self.governance.check(w, wanted)
        return "" if decision.ok else decision.message

    async def on_snapshot(self, event: Event) -> None:
        snap = event.payload
        self.snapshot_seen[snap.sequence] = time.monotonic()
        while len(self.snapshot_seen) > SNAPSHOTS_KEPT:
            del self.snapshot_seen[min(self.snapshot_seen)]
        for s in snap.sites:
            self.inventory.set_site(s.site.site_id, s.site.gpu_pools, s.state == common.SITE_STATE_UP)
        if snap.sites:
            self.sites_known.set()
        progress: dict[str, tuple[float, bool]] = {}
        for s in snap.sites:
            for j in s.jobs:
                w = self.store.get(j.workload_id)
                if w is None or not any(p.site_id == s.site.site_id and p.shard_indices for p in w.placements):
                    continue  # only a site that runs shards of the job reports its progress
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
                        await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_PROGRESS)

    async def on_applied(self, event: Event) -> None:
        a: site_pb.PlacementApplied = event.payload
        wid = a.placement.workload_id
        w = self.store.get(wid)
        if w is None:
            return
        if a.placement.site_id != event.params["site"]:
            # A site speaks for itself only: a report naming another site (to fail or start a
            # workload placed there) is not that site's word.
            self.counters["applied_refused"] += 1
            log.warning("report on %s about %s's placement of %s ignored", event.subject, a.placement.site_id, wid)
            return
        self.reconciler.applied(a)
        if not a.ok:
            log.warning("site %s could not apply %s (generation %d): %s", a.placement.site_id, wid,
                        a.placement.generation, a.error)
            self.counters["apply_failed"] += 1
            if a.failed and w.state in domain.ACTIVE:
                # the site gave up on the placement it still holds (its jobs kept failing there)
                async with self.lock(wid):
                    w = self._copy(wid)
                    held = any(p.site_id == a.placement.site_id and p.generation == a.placement.generation
                               and (p.replicas or p.shard_indices) for p in w.placements)
                    if w.state in domain.ACTIVE and held:
                        self.counters["failed_by_site"] += 1
                        await self._end(w, domain.FAILED, f"site {a.placement.site_id}: {a.error}"[:1000])
            return
        at_site = any(p.site_id == a.placement.site_id for p in w.placements)
        if w.state == domain.PLACED and a.placement.generation == w.generation and at_site:
            # The record reads PLACED from the moment its commit is sent (`WorkloadStore.assume`);
            # the lock waits for the commit, as a site may report before the write has returned.
            async with self.lock(wid):
                w = self._copy(wid)
                if w.state != domain.PLACED:
                    return
                w.state = domain.RUNNING
                w.updated_at.FromNanoseconds(now_ns())
                await self._write(w)
                await self.publish_event(w, spb.WORKLOAD_EVENT_KIND_RUNNING)
