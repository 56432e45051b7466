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
    signature: str = ""
    """Governance's signature over `hash` (last entry of each stored block; `cncbrain.signing`)."""

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
    kind: str  # "changed" | "removed" | "reordered" | "duplicate" | "unsigned"
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


def verify_chain(entries: Iterable[LedgerEntry], expected_head: LedgerHead | None = None,
                 verifier: Any = None, start: LedgerHead | None = None) -> LedgerVerification:
    """Check a ledger read back in stored order; every problem is reported with the entry index.
    `start`: the entries continue a chain that ends there (a checkpoint's head), so they are checked
    from index `start.length` on, the first against `start.hash`; an entry claiming an earlier index
    is a `duplicate`.

    - changed: an entry's content no longer matches its own hash, or it was rewritten with a fresh
      hash (the next entry still records the old one);
    - removed: an index is missing, including a missing tail when `expected_head` is given;
    - reordered: an entry is stored after one with a higher index;
    - duplicate: two stored entries claim the same index (the one that chains is kept);
    - unsigned (with `verifier`, governance's `cncbrain.signing.Verifier`): no valid governance
      signature covers the entry — none on it, and no signed entry after it chains back to it. An
      entry appended by anyone else, with a perfectly valid hash chain, is named so.
    """
    result = LedgerVerification()
    first, genesis = (start.length, start.hash) if start is not None else (0, GENESIS_HASH)
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
        if index < first:
            issues.append(LedgerIssue(index, "duplicate", f"stored after the checkpoint at entry {first}"))
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
        result.head = LedgerHead(first, genesis)
        if expected_head is not None and expected_head.length > first:
            issues.append(LedgerIssue(first, "removed", f"ledger has {first} entries but its head says "
                                      f"{expected_head.length}"))
        return result

    last = max(by_index)
    expected_prev: str | None = genesis
    changed: set[int] = set()
    prev_hash_stored = genesis
    for index in range(first, last + 1):
        found = by_index.get(index)
        if found is None:
            result.issues.append(LedgerIssue(index, "removed", "no entry with this index is stored"))
            expected_prev = None
            continue
        entry = found
        if index in extra:
            # Keep the candidate that chains onto its predecessor (governance's own, when two do);
            # report the others.
            candidates = [entry, *extra[index]]
            chaining = [c for c in candidates if c.prev_hash == expected_prev and c.hash == c.recomputed_hash()]
            if verifier is not None and len(chaining) > 1:
                chaining.sort(key=lambda c: not _vouched(c, index, by_index, extra, verifier))
            entry = chaining[0] if chaining else entry
            by_index[index] = entry
            for other in candidates:
                if other is entry:
                    continue
                if verifier is not None and not _vouched(other, index, by_index, extra, verifier):
                    result.issues.append(LedgerIssue(index, "unsigned", "another stored entry claims this index, "
                                                     "and no governance signature covers this one"))
                else:
                    result.issues.append(LedgerIssue(index, "duplicate", "another stored entry claims this index"))
        self_ok = entry.hash == entry.recomputed_hash()
        if not self_ok:
            changed.add(index)
            result.issues.append(LedgerIssue(index, "changed", "content does not match its recorded hash"))
        if expected_prev is not None and entry.prev_hash != expected_prev and self_ok:
            if index == 0:
                result.issues.append(LedgerIssue(0, "changed", "first entry does not start at the genesis hash"))
            elif index == first:
                result.issues.append(LedgerIssue(index, "changed", "does not continue the checkpoint's chain"))
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
    if verifier is not None:
        _check_signatures(by_index, last, changed, verifier, issues, first)
    result.issues.sort(key=lambda i: (i.index, i.kind))
    return result


def _signed(entry: LedgerEntry, verifier: Any) -> bool:
    return bool(entry.signature) and verifier.valid(entry.hash.encode(), entry.signature)


def _vouched(candidate: LedgerEntry, index: int, by_index: dict[int, LedgerEntry],
             extra: dict[int, list[LedgerEntry]], verifier: Any) -> bool:
    """Whether a candidate for `index` is signed, or an entry claiming the next index chains to it."""
    if _signed(candidate, verifier):
        return True
    following = [e for e in (by_index.get(index + 1), *extra.get(index + 1, ())) if e is not None]
    return any(e.prev_hash == candidate.hash for e in following)


def _check_signatures(by_index: dict[int, LedgerEntry], last: int, changed: set[int], verifier: Any,
                      issues: list[LedgerIssue], first: int = 0) -> None:
    """Name every entry no governance signature covers: walking back from each signed entry along
    the chain (prev hash to hash) covers what it chains to, until a gap or a changed entry."""
    uncovered: list[int] = []
    expected: str | None = None  # the hash the entry at this index must have to be covered
    for index in range(last, first - 1, -1):
        entry = by_index.get(index)
        if entry is None:
            expected = None
            continue
        intact = index not in changed and entry.hash == entry.recomputed_hash()
        if intact and (_signed(entry, verifier) or entry.hash == expected):
            expected = entry.prev_hash
            continue
        expected = None
        if index not in changed:
            uncovered.append(index)
    for index in sorted(uncovered):
        issues.append(LedgerIssue(index, "unsigned", "no governance signature covers this entry "
                                  "(appended by someone other than governance)"))


def signed_chain(entries: Iterable[LedgerEntry], verifier: Any) -> dict[int, LedgerEntry]:
    """The entries governance vouches for, by index: each signed entry and what it chains back to
    (prev hash to hash, index by index). What loading folds into the state; nothing else counts."""
    by_hash: dict[str, LedgerEntry] = {}
    for e in entries:
        if e.index >= 0 and e.hash == e.recomputed_hash():
            by_hash.setdefault(e.hash, e)
    out: dict[int, LedgerEntry] = {}
    for start in sorted((e for e in by_hash.values() if _signed(e, verifier)), key=lambda e: -e.index):
        entry: LedgerEntry | None = start
        while entry is not None and entry.index not in out:
            out[entry.index] = entry
            before = by_hash.get(entry.prev_hash) if entry.index > 0 else None
            entry = before if before is not None and before.index == entry.index - 1 else None
    return out
