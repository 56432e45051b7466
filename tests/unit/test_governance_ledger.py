"""The hash-chained ledger: building, verifying, and naming each kind of tampering."""

import dataclasses

from services.governance.domain.ledger import GENESIS_HASH, LedgerEntry, LedgerHead, verify_chain


def build(n: int) -> tuple[list[LedgerEntry], LedgerHead]:
    head = LedgerHead()
    entries = []
    for i in range(n):
        e = head.next_entry("admission", "tok_x", f"w{i}", {"gpus": i, "site": "a"}, time_ns=1_000 + i)
        head = head.after(e)
        entries.append(e)
    return entries, head


def test_clean_chain_verifies_and_reports_its_head():
    entries, head = build(50)
    result = verify_chain(entries, head)
    assert result.ok, result.issues
    assert result.entries_checked == 50
    assert result.head == head
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(entries[i].prev_hash == entries[i - 1].hash for i in range(1, 50))


def test_edited_payload_is_named_changed():
    entries, head = build(20)
    entries[7] = dataclasses.replace(entries[7], payload_json='{"gpus":700,"site":"a"}')
    result = verify_chain(entries, head)
    assert result.indices("changed") == [7]
    assert not result.indices("removed") and not result.indices("reordered")


def test_rewritten_entry_with_fresh_hash_is_still_named_changed():
    entries, head = build(20)
    e = entries[5]
    forged_payload = '{"gpus":0,"site":"b"}'
    forged_hash = LedgerEntry.compute_hash(e.index, e.time_ns, e.kind, e.actor, e.subject, forged_payload, e.prev_hash)
    entries[5] = dataclasses.replace(e, payload_json=forged_payload, hash=forged_hash)
    result = verify_chain(entries, head)
    assert result.indices("changed") == [5]


def test_removed_entry_is_named():
    entries, head = build(20)
    del entries[11]
    result = verify_chain(entries, head)
    assert result.indices("removed") == [11]
    assert not result.indices("changed")


def test_removed_tail_needs_the_head_and_is_named():
    entries, head = build(20)
    truncated = entries[:17]
    assert verify_chain(truncated).ok  # without the head a clean truncation is invisible
    result = verify_chain(truncated, head)
    assert result.indices("removed") == [17, 18, 19]


def test_reordered_entries_are_named():
    entries, head = build(20)
    entries[3], entries[9] = entries[9], entries[3]
    result = verify_chain(entries, head)
    assert 3 in result.indices("reordered") or 9 in result.indices("reordered")
    assert not result.indices("changed") and not result.indices("removed")


def test_inserted_duplicate_is_named_and_chaining_one_kept():
    entries, head = build(10)
    forged = dataclasses.replace(entries[4], payload_json='{"evil":true}')
    entries.append(forged)
    result = verify_chain(entries, head)
    assert 4 in result.indices("duplicate")
    assert 4 in result.indices("reordered")
    assert not result.indices("changed")


def test_head_refuses_an_entry_that_does_not_extend_it():
    entries, head = build(3)
    try:
        head.after(entries[0])
    except ValueError:
        return
    raise AssertionError("head accepted an entry with the wrong index")


def test_signatures_cover_what_they_chain_back_to_and_nothing_appended_after():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cncbrain.signing import Signer, Verifier
    from services.governance.domain.ledger import signed_chain

    governance, other = Signer(Ed25519PrivateKey.generate()), Signer(Ed25519PrivateKey.generate())
    verifier = Verifier([governance.key.public_key()])
    head, entries = LedgerHead(), []
    for i in range(6):
        e = head.next_entry("k", "a", "s", {"i": i}, i)
        head = head.after(e)
        entries.append(e)
        if i in (2, 4):  # the last entry of each stored block is signed
            e.signature = governance.sign(e.hash.encode())
    assert verify_chain(entries, head, verifier).ok is False  # entry 5: after the last signature
    assert verify_chain(entries, head, verifier).indices("unsigned") == [5]
    entries[5].signature = other.sign(entries[5].hash.encode())
    assert verify_chain(entries, head, verifier).indices("unsigned") == [5]
    entries[5].signature = governance.sign(entries[5].hash.encode())
    assert verify_chain(entries, head, verifier).ok
    assert sorted(signed_chain(entries, verifier)) == [0, 1, 2, 3, 4, 5]
    forged = head.next_entry("token.issued", "governance", "tok", {"x": 1}, 9)
    assert verify_chain([*entries, forged], None, verifier).indices("unsigned") == [6]
    assert 6 not in signed_chain([*entries, forged], verifier)


def test_the_entries_after_a_checkpoint_verify_from_its_head():
    entries, head = build(30)
    start = LedgerHead(20, entries[19].hash)
    result = verify_chain(entries[20:], head, start=start)
    assert result.ok, result.issues
    assert result.head == head and result.entries_checked == 10
    assert verify_chain([], start, start=start).ok  # nothing after the checkpoint
    # a tail that does not continue the checkpoint's hash, a removed tail, a changed entry
    assert verify_chain(entries[20:], head, start=LedgerHead(20, "f" * 64)).indices("changed") == [20]
    assert verify_chain(entries[20:25], head, start=start).indices("removed") == list(range(25, 30))
    changed = list(entries[20:])
    changed[3] = dataclasses.replace(changed[3], payload_json='{"gpus":0,"site":"b"}')
    assert verify_chain(changed, head, start=start).indices("changed") == [23]
    # an entry claiming an index the checkpoint already folds, stored after it
    assert verify_chain([*entries[20:], entries[3]], head, start=start).indices("duplicate") == [3]
