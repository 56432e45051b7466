"""The audit ledger kept durable in JetStream (stream CNC_LEDGER, subject `cnc.governance.ledger`).

Entries are stored in blocks: one message (`LedgerBlock`) holds the consecutive entries the writer
appended together, up to BLOCK_ENTRIES, so a busy ledger costs one publish per batch rather than per
entry, and reading 100,000 entries back is a few hundred messages. The hash chain runs across
blocks; deleting a message removes a run of entries, which verification names. Only the
governance service writes (the only NATS identity that may publish there), and it signs the last
entry of every block (`cncbrain.signing`): an entry anyone else appends, even with a valid chain,
is named `unsigned` by verification and skipped when governance loads the ledger. Blocks of one batch are pipelined and each carries
`Nats-Expected-Last-Sequence`, so if one publish fails every later one fails too and the stored
chain never gets a hole from a crash mid-batch. The head (length and last hash) is also written to KV
(bucket `cnc-ledger-head`, key `ledger.head`) as the anchor that makes a removed tail visible. It has
a bucket of its own, not `cnc-governance`: the processes that follow that bucket (the scheduler's
and adaptation's governance gates) read tenants, policies and holdings, and every batch's head
write used to wake each of them for nothing (a head kept in `cnc-governance` by an older brain is
moved on start).

The stream has no age or size limit: an audit ledger is kept, not aged out.

Checkpoints: governance's folded state at some length of the ledger, signed, is kept as one object
(`state`) in the object store `cnc-ledger-checkpoint` (NATS's object store: chunked, with a digest),
so a start reads that and only the blocks stored after it (`read_all(after_seq=…)`); what it holds
and how it is checked is `services/governance/checkpoint.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import time
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import api
from nats.js.object_store import ObjectStore

from cnc.governance.v1 import governance_pb2 as gpb
from cncbrain import lease
from cncbrain.bus import Bus
from cncbrain.bus.streams import KV_GOVERNANCE, stream_config
from cncbrain.bus.subjects import GOVERNANCE_LEDGER, LEDGER_STREAM
from cncbrain.errors import DataLoss, Unavailable
from cncbrain.signing import Signer
from services.governance.domain.ledger import LedgerEntry, LedgerHead

log = logging.getLogger(__name__)

STREAM = LEDGER_STREAM.name
BLOCK_ENTRIES = 256
HEAD_BUCKET = "cnc-ledger-head"
HEAD_KEY = "ledger.head"
CHECKPOINT_BUCKET = "cnc-ledger-checkpoint"
CHECKPOINT_OBJECT = "state"


def to_proto(e: LedgerEntry) -> gpb.LedgerEntry:
    return gpb.LedgerEntry(index=e.index, time_ns=e.time_ns, kind=e.kind, actor=e.actor, subject=e.subject,
                          payload_json=e.payload_json, prev_hash=e.prev_hash, hash=e.hash, signature=e.signature)


def from_proto(m: gpb.LedgerEntry) -> LedgerEntry:
    return LedgerEntry(m.index, m.time_ns, m.kind, m.actor, m.subject, m.payload_json, m.prev_hash, m.hash,
                       m.signature)


class LedgerRemoved(DataLoss):
    """The ledger's stream does not exist (deleted)."""


class LedgerStore:
    def __init__(self, bus: Bus, deny_delete: bool = True, signer: Signer | None = None) -> None:
        self.bus = bus
        self.js = bus.js
        self.deny_delete = deny_delete
        self.signer = signer
        """Governance's key: the last entry of every stored block carries its signature."""
        self.last_seq = 0  # stream sequence of the last stored entry

    async def ensure(self) -> None:
        config = dataclasses.replace(stream_config(LEDGER_STREAM, self.bus.replicas), max_msgs=-1, max_bytes=-1,
                                     deny_delete=self.deny_delete, deny_purge=self.deny_delete)
        try:
            await self.js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
        info = await self.js.stream_info(STREAM)
        self.last_seq = info.state.last_seq
        self.kv = await self.bus.kv(HEAD_BUCKET)
        await self._move_old_head()

    async def read_all(self, after_seq: int = 0) -> list[LedgerEntry]:
        """Every stored entry (of the blocks stored after stream sequence `after_seq`), in stream
        order (which `verify_chain` checks against index order). Raises `LedgerRemoved` when the
        stream is gone."""
        try:
            info = await self.js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            raise LedgerRemoved(f"ledger removed: the stream {STREAM} does not exist") from None
        total = info.state.messages
        self.last_seq = info.state.last_seq
        if total == 0 or after_seq >= info.state.last_seq:
            return []
        out: list[LedgerEntry] = []
        done = asyncio.Event()
        last_seq = info.state.last_seq

        async def on_msg(msg) -> None:
            block = gpb.LedgerBlock()
            try:
                block.ParseFromString(msg.data)
                out.extend(from_proto(m) for m in block.entries)
            except Exception:  # a garbled message is a changed entry of unknown index
                out.append(LedgerEntry(-1, 0, "garbled", "", "", "", "", ""))
            if msg.metadata.sequence.stream >= last_seq or msg.metadata.num_pending == 0:
                done.set()

        where = (api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
                 if after_seq else api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL))
        sub = await self.js.subscribe(
            GOVERNANCE_LEDGER.template, stream=STREAM, cb=on_msg, ordered_consumer=True, config=where,
            pending_msgs_limit=-1, pending_bytes_limit=-1,
        )
        try:
            await asyncio.wait_for(done.wait(), timeout=max(30.0, total / 5_000))
        finally:
            await sub.unsubscribe()
        return out

    async def read_block(self, seq: int) -> list[LedgerEntry] | None:
        """The entries of the block stored at stream sequence `seq` (None: no such block, or not one)."""
        try:
            msg = await self.js.get_msg(STREAM, seq)
            block = gpb.LedgerBlock.FromString(msg.data or b"")
        except (nats.js.errors.NotFoundError, DecodeError):
            return None
        return [from_proto(m) for m in block.entries]

    async def _checkpoints(self) -> ObjectStore:
        try:
            return await self.js.object_store(CHECKPOINT_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(CHECKPOINT_BUCKET, api.ObjectStoreConfig(
                storage=api.StorageType.FILE, replicas=self.bus.replicas,
                description="governance's signed checkpoint of its state folded from the ledger"))

    async def write_checkpoint(self, blob: bytes) -> None:
        """Replace the stored checkpoint (the object store drops the old one's chunks)."""
        await lease.wait_fence()
        await (await self._checkpoints()).put(CHECKPOINT_OBJECT, blob)

    async def read_checkpoint(self) -> bytes | None:
        """The stored checkpoint as written (None: there is none)."""
        store = await self._checkpoints()
        out = io.BytesIO()
        try:
            await store.get(CHECKPOINT_OBJECT, writeinto=out)
        except (nats.js.errors.NotFoundError, nats.js.errors.ObjectDeletedError):
            return None
        return out.getvalue()

    async def append(self, entries: Sequence[LedgerEntry]) -> None:
        """Store `entries` (consecutive, extending the stored chain) or raise; pipelined."""
        if not entries:
            return
        await lease.wait_fence()  # only the active governance writes the ledger
        futures = []
        base = self.last_seq
        blocks = [entries[i:i + BLOCK_ENTRIES] for i in range(0, len(entries), BLOCK_ENTRIES)]
        for i, chunk in enumerate(blocks):
            first, last = chunk[0], chunk[-1]
            if self.signer is not None:  # vouches for the block and, through the chain, all before it
                last.signature = self.signer.sign(last.hash.encode())
            headers = {
                "Cnc-Type": gpb.LedgerBlock.DESCRIPTOR.full_name,
                "Cnc-Event-Id": f"ledger-{first.index}-{last.index}",
                "Nats-Msg-Id": f"ledger-{first.index}-{last.hash[:16]}",
                "Nats-Expected-Last-Sequence": str(base + i),
            }
            block = gpb.LedgerBlock(entries=[to_proto(e) for e in chunk])
            futures.append(await self.js.publish_async(GOVERNANCE_LEDGER.template, block.SerializeToString(),
                                                       headers=headers, wait_stall=5.0))
        try:
            acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=10.0)
        except TimeoutError as exc:
            for f in futures:
                f.cancel()
            await self._resync()
            stored = sum(len(c) for c in blocks[: self.last_seq - base])
            raise LedgerWriteError(stored, exc) from None
        stored = 0
        for ack, chunk in zip(acks, blocks, strict=True):
            if isinstance(ack, BaseException):
                break
            stored += len(chunk)
            self.last_seq = ack.seq
        if stored < len(entries):
            failure = next(a for a in acks if isinstance(a, BaseException))
            await self._resync()
            raise LedgerWriteError(stored, failure)

    async def _resync(self) -> None:
        try:
            info = await self.js.stream_info(STREAM)
            self.last_seq = info.state.last_seq
        except Exception as exc:  # NATS away: the next append fails on the expected sequence and resyncs
            log.warning("ledger: cannot read the stream state after a failed append: %s", exc)


    async def write_head(self, head: LedgerHead) -> None:
        await lease.wait_fence()
        await self.kv.put(HEAD_KEY, json.dumps({"length": head.length, "hash": head.hash,
                                                "at": time.time()}).encode())

    async def read_head(self) -> LedgerHead | None:
        try:
            entry = await self.kv.get(HEAD_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        d = json.loads(entry.value or b"")
        return LedgerHead(int(d["length"]), str(d["hash"]))

    async def _move_old_head(self) -> None:
        """A head an older brain kept in `cnc-governance` moves to `cnc-ledger-head` (unless that
        one has a head already), so the anchor is not lost."""
        old = await self.bus.kv(KV_GOVERNANCE)
        try:
            entry = await old.get(HEAD_KEY)
        except nats.js.errors.KeyNotFoundError:
            return
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):  # a head here already is the newer one
            await self.kv.create(HEAD_KEY, entry.value or b"")
        await old.delete(HEAD_KEY)
        log.info("governance: moved the ledger head from %s to %s", KV_GOVERNANCE, HEAD_BUCKET)


class LedgerWriteError(Unavailable):
    """An append stopped part way: `stored` entries landed, the rest did not (nothing after them)."""

    def __init__(self, stored: int, cause: BaseException) -> None:
        super().__init__(f"ledger append stopped after {stored} entries: {cause!r}")
        self.stored = stored
        self.cause = cause

