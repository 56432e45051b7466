"""`cncbrain ledger`: list the audit ledger, verify it, or print its head to keep elsewhere."""

from __future__ import annotations

import argparse

from rich.table import Table

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import show, wants_json
from cncbrain.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="list, verify or show the head of the audit ledger (operator)")
    p.add_argument("action", nargs="?", choices=("list", "verify", "head"), default="list")
    p.add_argument("--kind", default="", help="only entries of this kind (admission, placement.committed, …)")
    p.add_argument("--subject", default="", help="only entries about this workload, tenant or unit")
    p.add_argument("--from", dest="from_index", type=int, default=0)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--expect", default=None, metavar="LENGTH:HASH",
                   help="verify against a head recorded earlier (`cncbrain ledger head`)")
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.governance.v1 import governance_pb2 as gpb

    if args.action in ("verify", "head"):
        req = gpb.VerifyLedgerRequest()
        if args.expect:
            length, _, digest = args.expect.partition(":")
            if not length.isdigit() or len(digest) != 64:
                raise UsageError("--expect wants LENGTH:HASH as printed by `cncbrain ledger head`")
            req.expected_length, req.expected_head_hash = int(length), digest
        resp = call(args, "governance", lambda s: s.VerifyLedger(req, timeout=120))
        if wants_json(args):
            dump(resp)
            return 0 if resp.ok else 1
        if args.action == "head":
            print(f"{resp.length}:{resp.head_hash}")
            return 0 if resp.ok else 1
        if resp.ok:
            print(f"ledger OK: {resp.entries_checked} entries verified in {resp.seconds:.2f} s; "
                  f"head {resp.length}:{resp.head_hash}")
            return 0
        removed = [i for i in resp.issues if i.detail.startswith("ledger removed")]
        if removed:
            print(removed[0].detail)
            return 1
        print(f"ledger TAMPERED: {len(resp.issues)} issue(s) in {resp.entries_checked} stored entries")
        for issue in resp.issues:
            print(f"  entry {issue.index}: {issue.kind} — {issue.detail}")
        return 1
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    listing = gpb.ListLedgerEntriesRequest(from_index=args.from_index, limit=args.limit, kind=args.kind,
                                          subject=args.subject)
    resp = call(args, "governance", lambda s: s.ListLedgerEntries(listing, timeout=60))
    if wants_json(args):
        dump(resp)
        return 0
    table = Table(title=f"audit ledger ({resp.length} entries)")
    for col in ("#", "time", "kind", "actor", "subject", "details", "hash"):
        table.add_column(col)
    import datetime as dt

    for e in resp.entries:
        when = dt.datetime.fromtimestamp(e.time_ns / 1e9, dt.UTC).strftime("%H:%M:%S")
        table.add_row(str(e.index), when, e.kind, e.actor, e.subject, e.payload_json[:80], e.hash[:12])
    show(table)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["ledger", *sys.argv[1:]]))
