"""Reconciliation: the placement record and the sites converge.

Every placement the scheduler publishes with work in it waits for its site's report
(`PlacementApplied`). Once a tick (`reconcile_s`, 1 s by default), the reconciler acts on
- a placement its site rejected (the report says why), and
- a placement its site, although up, has not confirmed within `apply_timeout_ticks` (3 ticks)
  — a site that is down is adaptation's to recover, not this;
by taking the workload off those sites: a service that keeps at least its minimum replicas
elsewhere just loses them there (a new generation with zero replicas at those sites); any other
workload is withdrawn everywhere and offered again, to sites other than the ones that failed it,
up to `max_placement_attempts` times, after which it FAILS. Either way its message says which
site did what. A workload left PENDING with nothing placing it (a commit that failed on its
way) is offered again.

After a restart (the scheduler's, NATS's, the whole brain's) every placed workload whose sites
have not confirmed it is waited for afresh, so the same holds: every accepted workload ends
running somewhere or explicitly failed, none stays placed with nothing running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as pb
from cnc.site.v1 import events_pb2 as site_pb
from services.scheduler import domain

if TYPE_CHECKING:
    from services.scheduler.events import Coordinator

log = logging.getLogger(__name__)


@dataclass
class Unconfirmed:
    generation: int
    since: float
    """monotonic time it was published (or the scheduler started)"""


class Reconciler:
    def __init__(self, co: Coordinator) -> None:
        self.co = co
        self.settings = co.settings
        self.unconfirmed: dict[tuple[str, str], Unconfirmed] = {}
        """(workload, site) → the generation published there that its site has not confirmed."""
        self.rejected: dict[str, dict[str, str]] = {}
        """workload → site → why the site rejected its current placement (handled at the next tick)."""
        self.attempts: dict[str, int] = {}
        self.failed_sites: dict[str, set[str]] = {}
        """workload → sites that rejected or ignored it (left out of its next offers)."""

    # --- what the coordinator tells it ------------------------------------------------------------
    def published(self, placements: list[common.Placement]) -> None:
        now = time.monotonic()
        for p in placements:
            key = (p.workload_id, p.site_id)
            if p.replicas or p.shard_indices:
                self.unconfirmed[key] = Unconfirmed(p.generation, now)
            else:
                self.unconfirmed.pop(key, None)

    def recover(self, records: list[pb.Workload]) -> None:
        """After a start: the placements of every placed (not yet running) workload wait for their
        sites' reports anew (those sent while the scheduler was away come from the durable consumer)."""
        now = time.monotonic()
        for w in records:
            if w.state == domain.PLACED:
                for p in w.placements:
                    if p.replicas or p.shard_indices:
                        self.unconfirmed[(w.workload_id, p.site_id)] = Unconfirmed(p.generation, now)

    def applied(self, report: site_pb.PlacementApplied) -> None:
        p = report.placement
        key = (p.workload_id, p.site_id)
        waiting = self.unconfirmed.get(key)
        if waiting is None or p.generation < waiting.generation:
            return  # an older generation's report, or nothing outstanding there
        del self.unconfirmed[key]
        if not report.ok:
            self.rejected.setdefault(p.workload_id, {})[p.site_id] = report.error or "rejected"

    def forget(self, workload_id: str) -> None:
        self.attempts.pop(workload_id, None)
        self.failed_sites.pop(workload_id, None)
        self.rejected.pop(workload_id, None)

    # --- the loop -----------------------------------------------------------------------------------
    async def run(self) -> None:
        while not self.co._stopping:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # NATS away: the same problems are there at the next tick
                log.exception("reconciliation tick failed")
            await asyncio.sleep(self.settings.reconcile_s)

    async def tick(self) -> None:
        co = self.co
        now = time.monotonic()
        problems: dict[str, dict[str, str]] = {}
        for wid, sites in list(self.rejected.items()):
            problems.setdefault(wid, {}).update({s: f"rejected it ({why})" for s, why in sites.items()})
        self.rejected.clear()
        timeout = self.settings.apply_timeout_ticks * self.settings.reconcile_s
        for (wid, site), u in list(self.unconfirmed.items()):
            if now - u.since >= timeout and site in co.ledger.up:
                del self.unconfirmed[(wid, site)]
                problems.setdefault(wid, {}).setdefault(site, f"did not confirm it within {timeout:g} s")
        for wid, sites in problems.items():
            await self.take_off(wid, sites)
        for wid, w in list(co.store.records.items()):
            if w.state == domain.PENDING and wid not in co.waiting and wid not in co.committing:
                co.counters["pending_requeued"] += 1
                log.warning("%s was pending with nothing placing it; offering it again", wid)
                co.enqueue(w, deadline=time.time() + co._timeout_of(w))

    async def take_off(self, wid: str, sites: dict[str, str]) -> None:
        """Take workload `wid` off the sites that failed it (`sites`: site → what it did)."""
        co = self.co
        if wid not in co.store.records:
            return
        async with co.lock(wid):
            w = co._copy(wid)
            held = {p.site_id for p in w.placements if p.replicas or p.shard_indices}
            bad = {s: why for s, why in sites.items() if s in held}
            if w.state not in domain.ACTIVE or not bad:
                return
            said = "; ".join(f"site {s} {why}" for s, why in sorted(bad.items()))
            self.failed_sites.setdefault(wid, set()).update(bad)
            co.counters["placements_taken_off"] += len(bad)
            left = sum(p.replicas for p in w.placements if p.site_id not in bad)
            if w.kind == domain.INFERENCE and left >= w.inference_service.min_replicas:
                await self._shrink(w, set(bad), f"{said}: withdrawn from {', '.join(sorted(bad))}, "
                                                f"{left} replicas remain")
                return
            attempts = self.attempts[wid] = self.attempts.get(wid, 0) + 1
            if attempts >= self.settings.max_placement_attempts:
                log.warning("%s failed: %s (placed %d times)", wid, said, attempts)
                self.forget(wid)
                await co._end(w, domain.FAILED, f"{said}; placed {attempts} times without a site running it")
                return
            await self._withdraw(w, f"{said}; placing it again elsewhere (attempt {attempts + 1} of "
                                    f"{self.settings.max_placement_attempts})")

    async def _shrink(self, w: pb.Workload, bad: set[str], message: str) -> None:
        co = self.co
        w.generation += 1
        changed = []
        for p in w.placements:
            if p.site_id in bad and p.replicas:
                co.ledger.take(p, -1)
                p.replicas = 0
                p.generation = w.generation
                copy = common.Placement()
                copy.CopyFrom(p)
                changed.append(copy)
        w.message = message
        w.updated_at.FromNanoseconds(time.time_ns())
        await co._write(w)
        log.warning("%s: %s", w.workload_id, message)
        if co.governance:
            co.governance.committed(w)
        await co.publish_placements(w, changed)
        await co.publish_event(w, pb.WORKLOAD_EVENT_KIND_RESCALED)

    async def _withdraw(self, w: pb.Workload, message: str) -> None:
        co = self.co
        before = [p for p in w.placements if p.replicas or p.shard_indices]
        held = []
        for p in before:
            copy = common.Placement()
            copy.CopyFrom(p)
            held.append(copy)
        released = domain.withdraw(w, message, time.time_ns())
        await co._write(w)
        for p in held:
            co.ledger.take(p, -1)
        log.warning("%s: %s", w.workload_id, message)
        if co.governance:
            co.governance.committed(w)
        await co.publish_placements(w, released)
        await co.publish_event(w, pb.WORKLOAD_EVENT_KIND_RESCALED)
        co.enqueue(w, deadline=time.time() + co._timeout_of(w),
                   exclude=frozenset(self.failed_sites.get(w.workload_id, ())))
