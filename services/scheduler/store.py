"""The state of record: one `Workload` per key in the `cnc-workloads` KV bucket, written with
compare-and-set on the revision so two writers can never both win."""

from __future__ import annotations

import logging

import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js.kv import KeyValue

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain import lease
from cncbrain.bus import KV_WORKLOADS, Bus
from cncbrain.errors import Aborted

log = logging.getLogger(__name__)

MARKER_TTL_S = 3600.0
"""A removed record leaves a purge marker in the bucket (what tells every follower the key is gone);
the server removes the marker this long after (its `Nats-TTL`), so removed records cost no disk and
no subject in the server for good. A follower cut off for longer misses the removal: it keeps the
ended record until its process restarts."""


TTL_DISABLED = 10166
"""JetStream's error code for a message TTL on a stream that does not allow them."""


class Conflict(Aborted):
    """The record changed since it was read (or already exists on create)."""


class WorkloadStore:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.kv: KeyValue | None = None
        self.records: dict[str, spb.Workload] = {}
        self.revisions: dict[str, int] = {}
        self._markers_stay = False
        self.unreadable: list[str] = []
        """Keys whose record could not be decoded at `open` (logged; kept in the bucket as they are)."""

    async def open(self) -> list[spb.Workload]:
        self.kv = await self.bus.kv(KV_WORKLOADS)
        for key, (value, revision) in (await self.bus.retrying(
                lambda: self.bus.kv_items(KV_WORKLOADS), "read the workload records")).items():
            if not value:
                continue
            try:
                self.records[key] = spb.Workload.FromString(value)
            except DecodeError:  # left where it is, untouched: the scheduler starts without it
                self.unreadable.append(key)
                log.error("workload record %s in %s is not a Workload (%d bytes); skipped", key, KV_WORKLOADS, len(value))
                continue
            self.revisions[key] = revision
        return list(self.records.values())

    def get(self, workload_id: str) -> spb.Workload | None:
        return self.records.get(workload_id)

    async def create(self, w: spb.Workload) -> None:
        assert self.kv
        await lease.wait_fence()  # only the active scheduler writes records
        kv = self.kv
        try:
            rev = await self.bus.retrying(lambda: kv.create(w.workload_id, w.SerializeToString()), "store workload")
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(w.workload_id) from None
        self.records[w.workload_id] = w
        self.revisions[w.workload_id] = rev

    async def refresh(self, workload_id: str) -> spb.Workload | None:
        assert self.kv
        try:
            entry = await self.kv.get(workload_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        w = spb.Workload.FromString(entry.value or b"")
        self.records[workload_id] = w
        self.revisions[workload_id] = entry.revision or 0
        return w

    def assume(self, w: spb.Workload) -> None:
        """Serve `w` as the record from now on, before its write has returned — for a write that is
        decided and retried until it lands (a commit whose placements are going out with it). The
        compare-and-set still expects the revision last written."""
        self.records[w.workload_id] = w

    async def update(self, w: spb.Workload) -> None:
        """Write `w` if nobody wrote since our last read; raise Conflict otherwise."""
        assert self.kv
        await lease.wait_fence()
        kv = self.kv
        last = self.revisions.get(w.workload_id, 0)
        try:
            rev = await self.bus.retrying(
                lambda: kv.update(w.workload_id, w.SerializeToString(), last=last), "store workload"
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Conflict(w.workload_id) from None
        self.records[w.workload_id] = w
        self.revisions[w.workload_id] = rev

    async def remove(self, workload_id: str) -> None:
        """Take a record out of the bucket and of memory (`Coordinator.expire_ended`): a purge, which
        also drops the key's earlier revisions, its marker kept `MARKER_TTL_S`."""
        assert self.kv
        await lease.wait_fence()
        kv = self.kv
        try:
            await self.bus.retrying(lambda: kv.purge(workload_id, msg_ttl=MARKER_TTL_S), "remove workload")
        except nats.js.errors.APIError as exc:
            if exc.err_code != TTL_DISABLED:
                raise
            # a bucket created before per-message TTLs (nats-server < 2.11 or an older client): the
            # marker stays for good, as a deleted key's always did
            if not self._markers_stay:
                self._markers_stay = True
                log.warning("%s does not allow message TTLs (created before them): removed records leave "
                            "their marker for good", KV_WORKLOADS)
            await self.bus.retrying(lambda: kv.purge(workload_id), "remove workload")
        self.records.pop(workload_id, None)
        self.revisions.pop(workload_id, None)
