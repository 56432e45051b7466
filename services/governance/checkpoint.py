"""Governance's checkpoint: its state folded from the ledger up to some length, signed with
governance's key, so a start reads the checkpoint and only the ledger's blocks stored after it
instead of folding the whole ledger (`Governor._load`).

Stored form (one object, `ledger_store.CHECKPOINT_OBJECT`): a line of sealed JSON — the manifest,
signed like governance's other records (`cncbrain.signing.Signer.seal`) — then the state
(`GovernanceState.to_dict`) as zlib-compressed JSON. The manifest names the ledger length `length`
the state folds, the hash of its last entry (`hash`), the stream sequence of the block that ends
with that entry (`seq`), and the sha256 of the compressed state, which the signature thereby
covers. So nobody without governance's key can make a checkpoint governance loads; what someone
with write access to the store can do is withhold it or put back an older one of governance's —
a true state at an earlier point of the same chain, from which the entries after it fold to the
same state (the chain only grows). A checkpoint whose hash is not the stored ledger's entry at
that length (another ledger, a rewritten one) is ignored, as is one that does not verify; both
are logged and the start folds the whole ledger.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

from cncbrain.signing import SignatureError, Signer, Verifier
from services.governance.domain.ledger import LedgerHead
from services.governance.domain.state import GovernanceState, as_json

VERSION = 1


class CheckpointRefused(ValueError):
    """A stored checkpoint that is not governance's, or not readable: the start folds the ledger."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    head: LedgerHead
    """The ledger the state folds: `head.length` entries, the last with hash `head.hash`."""
    seq: int
    """Stream sequence of the ledger block that ends with entry `head.length - 1`."""
    state: GovernanceState
    written_at: float


def encode(snapshot: dict[str, Any], head: LedgerHead, seq: int, signer: Signer, now: float) -> bytes:
    """The stored form of `snapshot` (`GovernanceState.snapshot()` taken at `head`): CPU-bound, so it
    may run in a thread once the snapshot is taken."""
    body = zlib.compress(json.dumps(as_json(snapshot), separators=(",", ":")).encode(), 1)
    manifest = signer.seal({"version": VERSION, "length": head.length, "hash": head.hash, "seq": seq,
                            "state_sha256": hashlib.sha256(body).hexdigest(), "written_at": now})
    return manifest + b"\n" + body


def decode(blob: bytes, verifier: Verifier) -> Checkpoint:
    """The checkpoint in `blob`, or `CheckpointRefused` saying why not."""
    manifest_raw, newline, body = blob.partition(b"\n")
    if not newline:
        raise CheckpointRefused("not a checkpoint (no manifest line)")
    try:
        manifest = verifier.unseal(manifest_raw)
    except SignatureError as exc:
        raise CheckpointRefused(f"its manifest is not signed by governance ({exc})") from None
    if manifest.get("version") != VERSION:
        raise CheckpointRefused(f"version {manifest.get('version')!r}, this governance reads {VERSION}")
    if hashlib.sha256(body).hexdigest() != manifest.get("state_sha256"):
        raise CheckpointRefused("its state is not the one its signed manifest names (sha256 differs)")
    try:
        head = LedgerHead(int(manifest["length"]), str(manifest["hash"]))
        seq = int(manifest["seq"])
        state = GovernanceState.from_dict(json.loads(zlib.decompress(body)))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:  # signed, yet unreadable: a bug, not a forgery
        raise CheckpointRefused(f"unreadable: {exc!r}") from None
    if head.length < 1 or seq < 1:
        raise CheckpointRefused(f"names no ledger entry (length {head.length}, sequence {seq})")
    return Checkpoint(head, seq, state, float(manifest.get("written_at", 0.0)))
