"""The audit ledger's hash chain (pure): building entries and verifying a stored sequence.

Every entry carries the hash of the one before it, so a stored entry cannot be changed, removed,
reordered or slipped in without `verify` saying which one. Hashes cover a canonical byte form of
the entry (fields joined by newlines, payload as sorted-key JSON kept verbatim), not the wire
encoding, so any reader can re-derive them. The head (last index and hash) is also kept apart from
the entries (KV, and printable for safekeeping off the pool), which is what makes a removed *tail*
visible too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GENESIS_HASH = "0" * 64


def canonical_json(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(slots=True)  # not frozen: frozen init costs 3x, and a verify builds 100,000 of them
class LedgerEntry:
    """One recorded decision."""

    index: int  # 0-based position in the chain
    time_ns: int  # wall-clock time of recording, ns since the epoch
    kind: str  # e.g. "admission", "placement", "tenant.created"
    actor: str  # who caused it: a token id, or a service name
    subject: str  # what it is about: a workload id, tenant id, site id
    payload_json: str  # canonical JSON of the details, hashed verbatim
    prev_hash: str
    hash: str

    @staticmethod
    def compute_hash(
        index: int, time_ns: int, kind: str, actor: str, subject: str, payload_json: str, prev_hash: str
    ) -> str:
        return hashlib.sha256(
            f"{index}\n{time_ns}\n{kind}\n{actor}\n{subject}\n{prev_hash}\n{payload_json}".encode()
        ).hexdigest()

    def recomputed_hash(self) -> str:
        return self.compute_hash(
            self.index, self.time_ns, self.kind, self.actor, self.subject, self.payload_json, self.prev_hash
        )

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "index": self.index,
                "time_ns": self.time_ns,
                "kind": self.kind,
                "actor": self.actor,
                "subject": self.subject,
                "payload_json": self.payload_json,
                "prev_hash": self.prev_hash,
                "hash": self.hash,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LedgerEntry:
        d = json.loads(raw)
        return cls(
            index=int(d["index"]),
            time_ns=int(d["time_ns"]),
            kind=str(d["kind"]),
            actor=str(d["actor"]),
            subject=str(d["subject"]),
            payload_json=str(d["payload_json"]),
            prev_hash=str(d["prev_hash"]),
            hash=str(d["hash"]),
        )


@dataclass(frozen=True, slots=True)
class LedgerHead:
    """Where the chain ends: the next entry gets index `length` and prev hash `hash`."""

    length: int = 0
    hash: str = GENESIS_HASH

    def next_entry(
        self, kind: str, actor: str, subject: str, payload: Mapping[str, Any], time_ns: int
    ) -> LedgerEntry:
        payload_json = canonical_json(payload)
        digest = LedgerEntry.compute_hash(
            self.length, time_ns, kind, actor, subject, payload_json, self.hash
        )
        return LedgerEntry(self.length, time_ns, kind, actor, subject, payload_json, self.hash, digest)

    def after(self, entry: LedgerEntry) -> LedgerHead:
        if entry.index != self.length or entry.prev_hash != self.hash:
            raise ValueError(f"entry {entry.index} does not extend a chain of length {self.length}")
        return LedgerHead(self.length + 1, entry.hash)


@dataclass(frozen=True, slots=True)
class LedgerIssue:
    """One thing wrong with the stored ledger, naming the entry."""

    index: int
    kind: str  # "changed" | "removed" | "reordered" | "duplicate"
    detail: str


@dataclass(slots=True)
class LedgerVerification:
    entries_checked: int = 0
    head: LedgerHead = field(default_factory=LedgerHead)
    issues: list[LedgerIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def indices(self, kind: str) -> list[int]:
        return sorted({i.index for i in self.issues if i.kind == kind})


def verify_chain(entries: Iterable[LedgerEntry], expected_head: LedgerHead | None = None) -> LedgerVerification:
    """Check a ledger read back in stored order; every problem is reported with the entry index.

    - changed: an entry's content no longer matches its own hash, or it was rewritten with a fresh
      hash (the next entry still records the old one);
    - removed: an index is missing, including a missing tail when `expected_head` is given;
    - reordered: an entry is stored after one with a higher index;
    - duplicate: two stored entries claim the same index (the one that chains is kept).
    """
    result = LedgerVerification()
    by_index: dict[int, LedgerEntry] = {}
    extra: dict[int, list[LedgerEntry]] = {}  # further entries claiming an index already seen
    highest_seen = -1
    count = 0
    issues = result.issues
    for position, entry in enumerate(entries):
        count += 1
        index = entry.index
        if index < 0:  # stored bytes that are not an entry at all
            issues.append(LedgerIssue(-1, "changed", f"stored message {position} is not a readable entry"))
            continue
        if index < highest_seen:
            issues.append(LedgerIssue(index, "reordered", f"stored after entry {highest_seen}"))
        else:
            highest_seen = index
        if index in by_index:
            extra.setdefault(index, []).append(entry)
        else:
            by_index[index] = entry
    result.entries_checked = count
    if not by_index:
        if expected_head is not None and expected_head.length > 0:
            issues.append(
                LedgerIssue(0, "removed", f"ledger is empty but its head says {expected_head.length} entries")
            )
        return result

    last = max(by_index)
    expected_prev: str | None = GENESIS_HASH
    changed: set[int] = set()
    prev_hash_stored = GENESIS_HASH
    for index in range(last + 1):
        entry = by_index.get(index)
        if entry is None:
            result.issues.append(LedgerIssue(index, "removed", "no entry with this index is stored"))
            expected_prev = None
            continue
        if index in extra:
            # Keep the candidate that chains onto its predecessor; report the others.
            candidates = [entry, *extra[index]]
            chaining = [c for c in candidates if c.prev_hash == expected_prev and c.hash == c.recomputed_hash()]
            entry = chaining[0] if chaining else entry
            for other in candidates:
                if other is not entry:
                    result.issues.append(
                        LedgerIssue(index, "duplicate", "another stored entry claims this index")
                    )
        self_ok = entry.hash == entry.recomputed_hash()
        if not self_ok:
            changed.add(index)
            result.issues.append(LedgerIssue(index, "changed", "content does not match its recorded hash"))
        if expected_prev is not None and entry.prev_hash != expected_prev and self_ok:
            if index == 0:
                result.issues.append(LedgerIssue(0, "changed", "first entry does not start at the genesis hash"))
            elif index - 1 not in changed:
                changed.add(index - 1)
                result.issues.append(
                    LedgerIssue(
                        index - 1,
                        "changed",
                        f"rewritten: entry {index} records a different hash for it",
                    )
                )
        expected_prev = entry.hash
        prev_hash_stored = entry.hash
    result.head = LedgerHead(last + 1, prev_hash_stored)

    if expected_head is not None:
        if expected_head.length > last + 1:
            for index in range(last + 1, expected_head.length):
                result.issues.append(LedgerIssue(index, "removed", "missing from the tail of the ledger"))
        elif expected_head.length >= 1:
            anchored = by_index.get(expected_head.length - 1)
            if anchored and anchored.hash != expected_head.hash and expected_head.length - 1 not in changed:
                result.issues.append(
                    LedgerIssue(expected_head.length - 1, "changed", "does not match the recorded head hash")
                )
    result.issues.sort(key=lambda i: (i.index, i.kind))
    return result
