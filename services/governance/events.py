"""Governance's NATS side: the single writer of the ledger, and the consumers that feed it.

`Governor` owns the state (folded from the ledger), the ledger store and the projections other
processes read (token records, tenants' quotas and policies, holdings) in KV. Every change is a
*command*, a function of the state that validates and returns the record(s) to append; commands
run one at a time in a writer task, so validation always sees every earlier change (no two
admissions can both take the last GPU). The writer applies a batch to the state as it builds it,
stores the batch with one pipelined round trip and only then answers the callers; if storing
fails, the state is rebuilt from what the ledger really holds.

Consumers: perception snapshots (the pool: regions, prices, sites up) and the scheduler's workload
events (durable consumer `governance`: committed placements and ends, for usage and quota), and
adaptation's actions (audited).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from google.protobuf.json_format import MessageToDict

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain import aio, lease
from cncbrain.auth import TOKENS_BUCKET, subscribe_durable
from cncbrain.bus import KV_WORKLOADS, Bus, Event, subjects
from cncbrain.bus.streams import KV_GOVERNANCE
from cncbrain.errors import CncError, Unavailable
from cncbrain.governance.policy import Placement, SiteOffer, placement_to_dict, policy_to_dict, quota_to_dict
from cncbrain.identity import Role, TokenDirectory
from cncbrain.signing import Verifier, signer_from_env
from cncbrain.twin import costmodel
from cncbrain.workload import tenant_of
from services.governance.checkpoint import Checkpoint, CheckpointRefused
from services.governance.checkpoint import decode as checkpoint_of
from services.governance.checkpoint import encode as encode_checkpoint
from services.governance.domain.ledger import (
    LedgerEntry,
    LedgerHead,
    LedgerIssue,
    LedgerVerification,
    signed_chain,
    verify_chain,
)
from services.governance.domain.state import GovernanceState, Record
from services.governance.ledger_store import LedgerRemoved, LedgerStore, LedgerWriteError
from services.governance.settings import Settings

log = logging.getLogger(__name__)

Command = Callable[[GovernanceState], tuple[Any, list[Record]]]
ACTIVE_STATES = (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)
TERMINAL_STATES = (spb.WORKLOAD_STATE_COMPLETED, spb.WORKLOAD_STATE_FAILED, spb.WORKLOAD_STATE_CANCELLED)
MAX_BATCH = 512
TENANT_CACHE = 100_000
"""Workloads whose tenant (read from their record) is remembered."""
NO_TENANT = "_none"
"""Tenant under which workloads that belong to no tenant (an operator's) are accounted."""


@dataclass
class _Pending:
    command: Command
    actor: str
    future: asyncio.Future[tuple[Any, list[LedgerEntry]]]


@dataclass
class _Dirty:
    sites: set[str] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)
    workloads: set[str] = field(default_factory=set)
    holdings: set[tuple[str, str]] = field(default_factory=set)  # (tenant, workload)

    def absorb(self, other: _Dirty) -> None:
        self.sites |= other.sites
        self.tokens |= other.tokens
        self.tenants |= other.tenants
        self.workloads |= other.workloads
        self.holdings |= other.holdings


def unit_id(workload_id: str, site_id: str) -> str:
    """A placement is one workload's share at one site: that pair is the unit quota and usage count."""
    return f"{workload_id}@{site_id}"


class Governor:
    def __init__(self, bus: Bus, settings: Settings, directory: TokenDirectory | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.state = GovernanceState()
        self.head = LedgerHead()
        self.signer = signer_from_env()
        """Governance's signing key: the ledger's blocks and what it projects for others to trust are
        signed with it (None: a brain without NATS credentials, nothing signed)."""
        self.verifier = Verifier([self.signer.key.public_key()]) if self.signer else None
        self.store = LedgerStore(bus, settings.ledger_deny_delete, self.signer)
        self.directory = directory if directory is not None else TokenDirectory()
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.projector: asyncio.Task[None] | None = None
        self._pending = _Dirty()
        self._project_wanted = asyncio.Event()
        self._stopping = False
        self.counters = bus.counters
        self.pool_sites: dict[str, common.Site] = {}
        self.load_verification: LedgerVerification | None = None
        self._legacy = False
        self._checkpointed = 0
        """Ledger length of the last checkpoint written or loaded."""
        self._checkpointing: asyncio.Task[None] | None = None
        self._record_tenants: OrderedDict[str, str | None] = OrderedDict()

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.ensure()
        self.tokens_kv = await self.bus.kv(TOKENS_BUCKET)
        self.kv = await self.bus.kv(KV_GOVERNANCE)
        await self._load()
        await self._project_all()
        if not self._legacy:  # a long ledger folded from the start: the next start reads a checkpoint
            self._maybe_checkpoint()
        self.writer = aio.background(self._write_loop(), "ledger-writer")
        self.projector = aio.background(self._project_loop(), "governance-projections")
        if self._legacy:
            await self.record([Record("ledger.signed", "ledger", {
                "covers": self.head.length, "head_hash": self.head.hash,
                "reason": "the ledger was written before governance signed it; this signature vouches for it"})],
                "governance")
            log.warning("governance: signed the %d entries of a ledger written before signing", self.head.length)
        await self.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, self.on_snapshot, consumer="governance-pool")
        await subscribe_durable(self.bus, subjects.SCHEDULER_WORKLOAD, self.on_workload_event, "governance")
        await subscribe_durable(self.bus, subjects.ADAPTATION_ACTION, self.on_adaptation_action, "governance-adaptation")
        if self.settings.bootstrap_token_file:
            await self.ensure_operator_token(self.settings.bootstrap_token_file)

    async def stop(self) -> None:
        # The loops also end on this flag, not on the cancel alone: on Python 3.11 `asyncio.wait_for`
        # returns the result and drops a cancel that arrives as its future completes (fixed in 3.12),
        # and every NATS request of nats-py awaits one. A cancel landing as, say, the head's KV put
        # is answered is then lost, the loop goes round to wait for work that never comes and
        # `await task` hangs. The flag is set before the cancel, so a loop that loses the cancel
        # ends at its next turn.
        self._stopping = True
        self._project_wanted.set()
        for task in (self.writer, self.projector, self._checkpointing):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _load(self) -> None:
        started = time.perf_counter()
        # The head is written after the entries it names are stored: read it first, so appends racing
        # this read can only make the stream longer than the head, never shorter.
        anchor = await self.store.read_head()
        checkpoint = await self._read_checkpoint()
        entries = await self.store.read_all(after_seq=checkpoint.seq if checkpoint else 0)
        if checkpoint is not None and not await self._continues(checkpoint, entries):
            checkpoint = None
            entries = await self.store.read_all()
        start = checkpoint.head if checkpoint else LedgerHead()
        # A ledger written before governance signed (none of its entries is) is taken as it is and
        # signed once loaded (in `start`); otherwise only what governance signed counts. (A
        # checkpoint is signed: the ledger it folds was.)
        self._legacy = (self.verifier is not None and checkpoint is None and bool(entries)
                        and not any(e.signature for e in entries))
        verifier = None if self._legacy else self.verifier
        if self.settings.verify_on_start:
            self.load_verification = verify_chain(entries, anchor, verifier, start if checkpoint else None)
            for issue in self.load_verification.issues:
                log.error("ledger entry %d %s: %s", issue.index, issue.kind, issue.detail)
        state = checkpoint.state if checkpoint else GovernanceState()
        by_index: dict[int, LedgerEntry] = {}
        if verifier is not None:
            by_index = signed_chain(entries, verifier)
            if skipped := sum(1 for e in entries if e.index >= start.length) - sum(
                    1 for i in by_index if i >= start.length):
                log.error("governance: %d stored ledger entries carry no governance signature; not applied", skipped)
        else:
            for e in entries:
                if e.index >= 0:
                    by_index.setdefault(e.index, e)
        folded = [i for i in sorted(by_index) if i >= start.length]
        for index in folded:
            e = by_index[index]
            state.apply(e.kind, json.loads(e.payload_json))
        self.head = LedgerHead(folded[-1] + 1, by_index[folded[-1]].hash) if folded else start
        self._checkpointed = start.length
        pool = self.state.pool
        self.state = state
        if pool:
            self.state.update_pool(pool.values())
        self.directory.records.clear()
        for rec in state.tokens.values():
            self.directory.put(rec)
        log.info("governance: ledger of %d entries loaded in %.2f s (%s)", self.head.length,
                 time.perf_counter() - started,
                 f"a checkpoint at entry {start.length}, then {len(entries)} stored entries" if checkpoint
                 else f"{len(entries)} stored entries folded from the start")

    async def _read_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint, if there is one governance signed (else logged and None)."""
        if self.verifier is None or not self.settings.checkpoint_every:
            return None
        try:
            blob = await self.store.read_checkpoint()
            if blob is None:
                return None
            return checkpoint_of(blob, self.verifier)
        except CheckpointRefused as exc:
            log.warning("governance: the stored checkpoint is refused (%s); folding the whole ledger", exc)
        except Exception as exc:  # noqa: BLE001 - any failure to read it: the ledger is the state of record
            log.warning("governance: cannot read the stored checkpoint (%r); folding the whole ledger", exc)
        return None

    async def _continues(self, checkpoint: Checkpoint, entries: list[LedgerEntry]) -> bool:
        """Whether the stored ledger is the one `checkpoint` folds: the block it names ends with the
        entry it names, and what is stored after it continues that entry's hash."""
        head = checkpoint.head
        block = await self.store.read_block(checkpoint.seq)
        ok = block is not None and bool(block) and block[-1].index == head.length - 1 and block[-1].hash == head.hash
        following = [e for e in entries if e.index == head.length]
        if ok and following and not any(e.prev_hash == head.hash for e in following):
            ok = False
        if not ok:
            log.warning("governance: the stored checkpoint (entry %d, hash %s…) is not of this ledger (stale or "
                        "from another); folding the whole ledger", head.length - 1, head.hash[:12])
        return ok

    def _maybe_checkpoint(self) -> None:
        """Start writing a checkpoint of the state as it is now (right after a stored batch: the
        state is the stored ledger's) when the ledger grew by `checkpoint_every` since the last."""
        every = self.settings.checkpoint_every
        if (self.signer is None or not every or self.head.length - self._checkpointed < every
                or (self._checkpointing is not None and not self._checkpointing.done())):
            return
        snapshot, head, seq = self.state.snapshot(), self.head, self.store.last_seq
        self._checkpointed = head.length
        self._checkpointing = asyncio.create_task(self._write_checkpoint(snapshot, head, seq), name="checkpoint")

    async def _write_checkpoint(self, snapshot: dict[str, Any], head: LedgerHead, seq: int) -> None:
        started = time.perf_counter()
        try:
            assert self.signer is not None
            blob = await asyncio.to_thread(encode_checkpoint, snapshot, head, seq, self.signer, time.time())
            await self.store.write_checkpoint(blob)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - NATS away, lease lost: the next batch tries again
            self._checkpointed = 0
            log.warning("governance: writing a checkpoint at entry %d failed: %r", head.length - 1, exc)
            return
        log.info("governance: checkpoint at entry %d written (%.1f MB) in %.2f s", head.length - 1,
                 len(blob) / 1e6, time.perf_counter() - started)

    # ---- the writer ------------------------------------------------------------------------------

    async def submit(self, command: Command, actor: str) -> tuple[Any, list[LedgerEntry]]:
        """Run `command` in order with every other change; return its result once its records are durable."""
        future: asyncio.Future[tuple[Any, list[LedgerEntry]]] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(command, actor, future))
        return await future

    async def record(self, records: list[Record], actor: str) -> list[LedgerEntry]:
        _, entries = await self.submit(lambda _s: (None, records), actor)
        return entries

    async def _write_loop(self) -> None:
        while not self._stopping:  # see stop()
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                if await self._write_batch(batch):
                    self._maybe_checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a batch must not end the writer: every later change would hang
                log.exception("governance: writing a batch of %d changes failed; reloading the stored ledger", len(batch))
                for item in batch:
                    aio.settle(item.future, exc=exc)  # the caller's RPC answers INTERNAL (a bug, not an outage)
                with contextlib.suppress(Exception):
                    await self._load()

    async def _write_batch(self, batch: list[_Pending]) -> bool:
        """Run, store and answer one batch; True when it was stored (state and head are the stored
        ledger's), False when storing failed (the state was reloaded, or could not be)."""
        head = self.head
        entries: list[LedgerEntry] = []
        done: list[tuple[_Pending, Any, list[LedgerEntry]]] = []
        dirty = _Dirty()
        for item in batch:
            try:
                result, records = item.command(self.state)
            except Exception as exc:  # a refused command: nothing recorded
                aio.settle(item.future, exc=exc)
                continue
            mine = []
            for rec in records:
                entry = head.next_entry(rec.kind, item.actor, rec.subject, rec.payload, time.time_ns())
                head = head.after(entry)
                self.state.apply(rec.kind, rec.payload)
                self._mark(rec, dirty)
                entries.append(entry)
                mine.append(entry)
            done.append((item, result, mine))
        try:
            await self.store.append(entries)
        except LedgerWriteError as exc:
            log.error("governance: %s; rebuilding state from the stored ledger", exc)
            stored = {e.index for e in entries[: exc.stored]}
            # A caller may have given up meanwhile (its gRPC deadline is shorter than the append's
            # timeout): its future is cancelled, and `settle` leaves it so.
            for item, result, mine in done:
                if all(e.index in stored for e in mine):
                    aio.settle(item.future, (result, mine))
                else:
                    aio.settle(item.future, exc=Unavailable(f"ledger unavailable: {exc.cause!r}"))
            with contextlib.suppress(Exception):
                await self._load()
                await self._project_all()
            return False
        except Exception as exc:
            if isinstance(exc, nats.errors.Error | OSError | asyncio.TimeoutError):  # NATS away: nothing stored
                failure: Exception = Unavailable(f"ledger unavailable: {exc!r}")
            elif isinstance(exc, CncError):  # e.g. LeaseLost: says what it is
                failure = exc
            else:  # a bug: the callers' RPCs answer INTERNAL, not "unavailable, nothing changed"
                log.exception("governance: appending a batch of %d changes failed", len(done))
                failure = exc
            for item, _, _ in done:
                aio.settle(item.future, exc=failure)
            with contextlib.suppress(Exception):
                await self._load()
            return False
        self.head = head
        self.counters["ledger_appended"] += len(entries)
        for item, result, mine in done:
            aio.settle(item.future, (result, mine))
        self._pending.absorb(dirty)
        if entries:  # nothing appended (an event that changed no holding): the projections stand
            self._project_wanted.set()
        return True

    async def _project_loop(self) -> None:
        """Projections trail the ledger by a moment and coalesce under load: each pass writes the
        current value of every key that changed since the last pass, then the head."""
        while True:
            await self._project_wanted.wait()
            if self._stopping:  # see stop()
                return
            self._project_wanted.clear()
            dirty, self._pending = self._pending, _Dirty()
            try:
                await self._project(dirty)
                await self.store.write_head(self.head)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: try again with the next change (or at the next start)
                log.warning("governance: projection update failed: %s", exc)
                self._pending.absorb(dirty)
                await asyncio.sleep(0.5)

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Wait until the projections show every change appended so far (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.queue.empty() and not self._project_wanted.is_set() and not any(
                    (self._pending.tokens, self._pending.tenants, self._pending.workloads, self._pending.holdings)):
                await asyncio.sleep(0.05)
                if not self._project_wanted.is_set():
                    return
            await asyncio.sleep(0.01)

    # ---- projections for the other processes ---------------------------------------------------

    def _mark(self, rec: Record, dirty: _Dirty) -> None:
        p = rec.payload
        if rec.kind.startswith("token."):
            dirty.tokens.add(p["token_id"])
            rec_now = self.state.tokens.get(p["token_id"])
            if rec_now is not None:
                self.directory.put(rec_now)  # usable on this server at once
        elif rec.kind.startswith("tenant."):
            dirty.tenants.add(p["tenant_id"])
        elif rec.kind == "site.enrolled":
            dirty.sites.add(p["site_id"])
        if rec.kind in ("workload.policy_set", "admission"):
            dirty.workloads.add(p["workload_id"])
        if rec.kind in ("admission", "placement.committed", "placement.released", "workload.ended") \
                and p["tenant_id"] != NO_TENANT:  # no gate checks a workload without a tenant
            dirty.holdings.add((p["tenant_id"], p["workload_id"]))

    async def _project_all(self) -> None:
        dirty = _Dirty(set(self.state.enrolled), set(self.state.tokens), set(self.state.tenants),
                       set(self.state.workload_policies),
                       {(t, w) for t, held in self.state.holdings.items() if t != NO_TENANT for w in held})
        await self._project(dirty)
        with contextlib.suppress(Exception):
            # Bus.kv_items, not kv.keys(): that can report a full bucket as empty under load
            # (nats-io/nats.py#842), and a record the ledger no longer has would be left usable.
            for key in await self.bus.kv_items(TOKENS_BUCKET):
                if key not in self.state.tokens:
                    await self.tokens_kv.delete(key)
            # holdings of workloads without a tenant are no longer projected (an older brain did)
            for key in await self.bus.kv_items(KV_GOVERNANCE):
                if key.startswith(f"holding.{NO_TENANT}."):
                    await self.kv.delete(key)

    async def _project(self, dirty: _Dirty) -> None:
        """Write what changed; puts go out together (one round trip for the lot)."""
        await lease.wait_fence()
        puts: list[Any] = []
        for site_id in dirty.sites:  # perception admits and bounds sites by these
            if site_id in self.state.enrolled:
                puts.append(self.kv.put(f"site.{site_id}", self.seal(self.state.enrolled[site_id])))
        for tid in dirty.tokens:
            if tid in self.state.tokens:
                puts.append(self.tokens_kv.put(tid, self._token_value(tid)))
        for tenant_id in dirty.tenants:
            t = self.state.tenants.get(tenant_id)
            if t is not None:
                puts.append(self.kv.put(f"tenant.{tenant_id}", self.seal(
                    {"tenant_id": tenant_id, "quota": quota_to_dict(t.quota), "policy": policy_to_dict(t.policy)})))
        for wid in dirty.workloads:
            pol = self.state.workload_policies.get(wid)
            puts.append(self.kv.put(f"workload.{wid}", self.seal({
                "workload_id": wid, "tenant_id": self.state.workload_tenant.get(wid, ""),
                "policy": policy_to_dict(pol) if pol is not None else None})))
        for tenant_id, wid in dirty.holdings:
            # One key per workload: a tenant's holdings can outgrow one message.
            h = self.state.holdings.get(tenant_id, {}).get(wid)
            key = f"holding.{tenant_id}.{wid}"
            if h is None:
                puts.append(self.kv.delete(key))
            else:
                puts.append(self.kv.put(key, json.dumps({
                    "reserved_gpus": h.reserved_gpus, "reserved_cost_per_hour": h.reserved_cost_per_hour,
                    "placed": {u: placement_to_dict(p) for u, p in h.placed.items()}}).encode()))
        for i in range(0, len(puts), 256):
            await asyncio.gather(*puts[i:i + 256])

    def seal(self, data: dict[str, Any]) -> bytes:
        """A record others trust only from governance: signed when governance holds its key."""
        return self.signer.seal(data) if self.signer else json.dumps(data).encode()

    def _token_value(self, token_id: str) -> bytes:
        return self.seal(self.state.tokens[token_id].to_dict())

    async def publish_token(self, token_id: str) -> None:
        """Write a token's record now (not with the trailing projections): an issued token works,
        and a revoked one stops working, on every service as soon as their feeds see it."""
        await self.tokens_kv.put(token_id, self._token_value(token_id))

    # ---- bootstrap ----------------------------------------------------------------------------------

    async def ensure_operator_token(self, path: Path) -> str:
        """Make sure `path` holds a working operator token; issue one if not. Returns the token."""
        if path.is_file():
            token = path.read_text().strip()
            with contextlib.suppress(Exception):
                if self.directory.verify(token).role is Role.OPERATOR:
                    return token
        token_box: dict[str, str] = {}

        def issue(state: GovernanceState) -> tuple[None, list[Record]]:
            token, rec = state.issue_token(Role.OPERATOR, None, "bootstrap operator token")
            token_box["token"] = token
            return None, [rec]

        await self.submit(issue, "governance")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token_box["token"] + "\n")
        os.replace(tmp, path)
        log.info("governance: operator token written to %s", path)
        return token_box["token"]

    # ---- consumers ---------------------------------------------------------------------------------

    async def on_snapshot(self, event: Event) -> None:
        offers = []
        for s in event.payload.sites:
            site = s.site
            terms = self.state.enrolled.get(site.site_id)
            if terms is None and self.signer is not None:
                continue  # a brain with credentials on counts enrolled sites only
            self.pool_sites[site.site_id] = site
            pools = s.gpu_pools or site.gpu_pools
            prices = {p.gpu_type: p.price_usd_per_hour for p in pools}
            if terms is not None:  # the price the operator enrolled it at, never the one it reports
                prices = {t: float(g["price_usd_per_hour"]) for t, g in terms["gpus"].items()}
            offers.append(SiteOffer(
                site_id=site.site_id, region=terms["region"] if terms and terms["region"] else site.region,
                gpus_by_type={p.gpu_type: p.count for p in pools},
                price_per_gpu_hour=prices,
                up=s.state == common.SITE_STATE_UP))
        self.state.update_pool(offers)

    async def _tenant_of(self, workload_id: str) -> str | None:
        tenant = self.state.workload_tenant.get(workload_id)
        if tenant:
            return tenant
        if workload_id in self._record_tenants:  # a workload's tenant never changes: one read per workload
            self._record_tenants.move_to_end(workload_id)
            return self._record_tenants[workload_id]
        try:
            kv = await self.bus.kv(KV_WORKLOADS)
            entry = await kv.get(workload_id)
        except Exception:
            return None
        w = spb.Workload()
        w.ParseFromString(entry.value or b"")
        found = tenant_of(w) or None
        self._record_tenants[workload_id] = found
        if len(self._record_tenants) > TENANT_CACHE:
            self._record_tenants.popitem(last=False)
        return found

    def placement_of(self, workload_id: str, tenant_id: str, p: common.Placement) -> Placement:
        units = p.replicas + len(p.shard_indices)
        site = self.state.pool.get(p.site_id)
        price = site.price_per_gpu_hour.get(p.gpu_type, 0.0) if site else 0.0
        if not price:  # the pool is not known yet (just started): the catalogue's price of the GPU type
            with contextlib.suppress(KeyError):
                price = costmodel.gpu(p.gpu_type).price_hr
        return Placement(workload_id, tenant_id, unit_id(workload_id, p.site_id), p.site_id,
                         site.region if site else "", p.gpu_type, units * p.gpus_per_unit, price)

    async def on_workload_event(self, event: Event) -> None:
        ev: spb.WorkloadEvent = event.payload
        wid = ev.workload_id
        at = ev.at.ToNanoseconds() / 1e9 if ev.HasField("at") else time.time()
        if ev.state not in TERMINAL_STATES and ev.state not in ACTIVE_STATES:
            return  # ACCEPTED (pending): nothing held yet
        tenant = await self._tenant_of(wid) or NO_TENANT
        if ev.state in TERMINAL_STATES:
            reason = spb.WorkloadState.Name(ev.state).removeprefix("WORKLOAD_STATE_").lower()

            def end(state: GovernanceState) -> tuple[None, list[Record]]:
                if wid not in state.holdings.get(tenant, {}) and not any(
                        a.workload_id == wid for a in state.usage.open_allocations()):
                    return None, []
                return None, [state.workload_ended(wid, tenant, at, reason)]

            await self.submit(end, ev.actor or "scheduler")  # the token behind a cancel
            return
        new = {p.site_id: self.placement_of(wid, tenant, p) for p in ev.placements
               if p.replicas or p.shard_indices}

        def diff(state: GovernanceState) -> tuple[None, list[Record]]:
            held = state.holdings.get(tenant, {}).get(wid)
            old = dict(held.placed) if held else {}
            records = []
            for p in (new[k] for k in sorted(new)):
                prev = old.get(p.unit_id)
                if prev is None or (prev.gpu_type, prev.gpus) != (p.gpu_type, p.gpus):
                    records.append(state.placement_committed(p, at))
            for u, prev in sorted(old.items()):
                if prev.site_id not in new:
                    records.append(state.placement_released(u, wid, tenant, at, "not in the committed placement"))
            return None, records

        await self.submit(diff, "scheduler")

    async def on_adaptation_action(self, event: Event) -> None:
        a = event.payload
        rec = Record("adaptation.action", a.workload_id or a.site_id or "pool",
                     MessageToDict(a, preserving_proto_field_name=True))
        await self.record([rec], "adaptation")

    # ---- verification ------------------------------------------------------------------------------

    async def verify(self, expected: LedgerHead | None = None) -> tuple[LedgerVerification, float]:
        started = time.perf_counter()
        anchor = expected or await self.store.read_head()  # before the entries: see _load
        try:
            entries = await self.store.read_all()
        except LedgerRemoved as exc:
            result = LedgerVerification(issues=[LedgerIssue(0, "removed", str(exc))])
            return result, time.perf_counter() - started
        result = verify_chain(entries, anchor, self.verifier)
        return result, time.perf_counter() - started
