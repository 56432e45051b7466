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

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final, Literal

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from services.scheduler import domain
from services.scheduler.settings import Settings

Action = Literal["shrink", "withdraw", "fail"]
SHRINK: Final = "shrink"
WITHDRAW: Final = "withdraw"
FAIL: Final = "fail"


@dataclass(frozen=True)
class TakeOff:
    """The reconciler's verdict on a workload some of whose sites failed it; the coordinator commits it."""

    action: Action
    """shrink: a service keeps its minimum elsewhere and loses its replicas at `sites`; withdraw: taken
    off everywhere and offered again, avoiding `exclude`; fail: placed too often, it FAILS."""
    sites: frozenset[str]
    message: str
    exclude: frozenset[str] = frozenset()


@dataclass
class Unconfirmed:
    generation: int
    since: float
    """monotonic time it was published (or the scheduler started)"""


class Reconciler:
    """The bookkeeping of what the sites confirmed, and the verdicts; the commits are the
    coordinator's (`Coordinator._reconcile_tick`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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

    def recover(self, records: list[spb.Workload]) -> None:
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

    # --- what the coordinator asks at each tick ------------------------------------------------------
    def due(self, now: float, up: Collection[str]) -> dict[str, dict[str, str]]:
        """The problems to act on at this tick (`now`: monotonic): workload → site → what the site
        did (rejected the placement, or, being `up`, did not confirm it in time)."""
        problems: dict[str, dict[str, str]] = {}
        for wid, sites in list(self.rejected.items()):
            problems.setdefault(wid, {}).update({s: f"rejected it ({why})" for s, why in sites.items()})
        self.rejected.clear()
        timeout = self.settings.apply_timeout_ticks * self.settings.reconcile_s
        for (wid, site), u in list(self.unconfirmed.items()):
            if now - u.since >= timeout and site in up:
                del self.unconfirmed[(wid, site)]
                problems.setdefault(wid, {}).setdefault(site, f"did not confirm it within {timeout:g} s")
        return problems

    def take_off(self, w: spb.Workload, sites: dict[str, str]) -> TakeOff | None:
        """What to do with workload `w` (its record) whose `sites` failed it (site → what it did);
        None when it no longer holds any of them or has ended."""
        wid = w.workload_id
        held = {p.site_id for p in w.placements if p.replicas or p.shard_indices}
        bad = {s: why for s, why in sites.items() if s in held}
        if w.state not in domain.ACTIVE or not bad:
            return None
        said = "; ".join(f"site {s} {why}" for s, why in sorted(bad.items()))
        self.failed_sites.setdefault(wid, set()).update(bad)
        left = sum(p.replicas for p in w.placements if p.site_id not in bad)
        if w.kind == domain.INFERENCE and left >= w.inference_service.min_replicas:
            return TakeOff(SHRINK, frozenset(bad), f"{said}: withdrawn from {', '.join(sorted(bad))}, "
                                                   f"{left} replicas remain")
        attempts = self.attempts[wid] = self.attempts.get(wid, 0) + 1
        if attempts >= self.settings.max_placement_attempts:
            self.forget(wid)
            return TakeOff(FAIL, frozenset(bad), f"{said}; placed {attempts} times without a site running it")
        return TakeOff(WITHDRAW, frozenset(bad), f"{said}; placing it again elsewhere (attempt {attempts + 1} of "
                                                 f"{self.settings.max_placement_attempts})",
                       exclude=frozenset(self.failed_sites.get(wid, ())))
