"""Whose workload is it: the tenant of each workload id perception shows, read from the scheduler's
record (`cnc-workloads`, by key) the first time it is asked and kept (a workload's tenant never
changes). Perception uses it to show a tenant only its own workloads' details."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable

from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain.bus import KV_WORKLOADS, Bus
from cncbrain.workload import tenant_of

log = logging.getLogger(__name__)
KEPT = 100_000


class Owners:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.tenant: OrderedDict[str, str] = OrderedDict()

    async def resolve(self, workload_ids: Iterable[str]) -> None:
        """Learn the tenant of each id not known yet (one KV read each, together)."""
        missing = [w for w in dict.fromkeys(workload_ids) if w not in self.tenant]
        if not missing:
            return
        kv = await self.bus.kv(KV_WORKLOADS)

        async def one(wid: str) -> None:
            with contextlib.suppress(Exception):  # not stored (yet): unknown, so shown to operators only
                w = spb.Workload.FromString((await kv.get(wid)).value or b"")
                self.tenant[wid] = tenant_of(w)

        await asyncio.gather(*(one(w) for w in missing))
        while len(self.tenant) > KEPT:
            self.tenant.popitem(last=False)

    def of(self, workload_id: str) -> str | None:
        return self.tenant.get(workload_id)


def workload_ids(statuses: Iterable[ppb.SiteStatus], summaries: Iterable[ppb.ServiceSummary] = ()) -> list[str]:
    ids = [s.workload_id for st in statuses for s in st.services] + [j.workload_id for st in statuses for j in st.jobs]
    return ids + [s.workload_id for s in summaries]


def scoped_status(status: ppb.SiteStatus, mine) -> ppb.SiteStatus:
    """The site as a tenant sees it: capacity, state and utilisation, and only its own workloads."""
    out = ppb.SiteStatus()
    out.CopyFrom(status)
    del out.services[:]
    del out.jobs[:]
    out.services.extend(s for s in status.services if mine(s.workload_id))
    out.jobs.extend(j for j in status.jobs if mine(j.workload_id))
    return out


def scoped_snapshot(snap: ppb.Snapshot, mine) -> ppb.Snapshot:
    out = ppb.Snapshot()
    out.CopyFrom(snap)
    del out.sites[:]
    del out.services[:]
    out.sites.extend(scoped_status(s, mine) for s in snap.sites)
    out.services.extend(s for s in snap.services if mine(s.workload_id))
    return out
