"""Enrolled sites: the operator's admission of each site (governance's signed `site.<id>` records in
`cnc-governance`). With a brain's credentials on, perception counts a site only once enrolled — a
registration before that waits — and cuts what it reports to the enrolled terms: only the enrolled
GPU types, at most the enrolled count, at the enrolled price. Without credentials (no governance
key to check with) every registered site counts as it reports itself."""

from __future__ import annotations

import logging
from typing import Any

from cnc.common.v1 import common_pb2 as common
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.kvfeed import KvFollower
from cncbrain.signing import SignatureError, Verifier

log = logging.getLogger(__name__)


class Enrollments:
    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.terms: dict[str, dict[str, Any]] = {}
        self.changed: set[str] = set()
        """Sites whose terms arrived or changed since the last `take_changed`."""
        self._follower: KvFollower | None = None

    async def start(self, kv: Any) -> None:
        self._follower = KvFollower(kv, self._apply, "perception-enrollments")
        await self._follower.start()

    async def stop(self) -> None:
        if self._follower is not None:
            await self._follower.stop()

    def _apply(self, entry: Any) -> None:
        if not entry.key.startswith("site.") or not entry.value:
            return
        try:
            terms = self.verifier.unseal(entry.value)
            if terms.get("site_id") != entry.key.removeprefix("site."):
                raise SignatureError(f"terms of {terms.get('site_id')!r} stored under {entry.key}")
        except SignatureError as exc:
            log.error("refusing site enrollment %s, not vouched for by governance: %s", entry.key, exc)
            return
        self.terms[terms["site_id"]] = terms
        self.changed.add(terms["site_id"])

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def bound_pools(self, site_id: str, pools: Any) -> list[common.GpuPool]:
        gpus = self.terms[site_id]["gpus"]
        out = []
        for p in pools:
            g = gpus.get(p.gpu_type)
            if g is None:
                continue
            pool = common.GpuPool()
            pool.CopyFrom(p)
            pool.count = min(p.count, int(g["max_count"]))
            pool.used = min(pool.used, pool.count)
            pool.price_usd_per_hour = float(g["price_usd_per_hour"])
            out.append(pool)
        return out

    def bound_site(self, site: common.Site) -> common.Site:
        """The site as enrolled: its own report cut to the terms (call only for an enrolled site)."""
        out = common.Site()
        out.CopyFrom(site)
        del out.gpu_pools[:]
        out.gpu_pools.extend(self.bound_pools(site.site_id, site.gpu_pools))
        region = self.terms[site.site_id].get("region")
        if region:
            out.region = region
        return out

    def bound_telemetry(self, t: site_pb.SiteTelemetry) -> site_pb.SiteTelemetry:
        out = site_pb.SiteTelemetry()
        out.CopyFrom(t)
        del out.gpu_pools[:]
        out.gpu_pools.extend(self.bound_pools(t.site_id, t.gpu_pools))
        return out
