"""`cncbrain tokens`: issue, list and revoke API tokens; `whoami` says which one you use."""

from __future__ import annotations

import argparse

from rich.table import Table

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import show, wants_json
from cncbrain.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="issue (operator), list or revoke API tokens, or show whoami")
    p.add_argument("action", nargs="?", choices=("list", "issue", "revoke", "whoami"), default="list")
    p.add_argument("token_id", nargs="?", help="token to revoke")
    p.add_argument("--tenant", default="", help="tenant of the token to issue, or whose tokens to list")
    p.add_argument("--operator", action="store_true", help="issue an operator token")
    p.add_argument("--description", default="")
    p.add_argument("--out", default=None, help="write the issued token to this file (mode 0600) instead of stdout")
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from cnc.governance.v1 import governance_pb2 as gpb

    if args.action == "whoami":
        who = call(args, "governance", lambda s: s.WhoAmI(gpb.WhoAmIRequest(), timeout=10))
        if wants_json(args):
            dump(who)
            return 0
        print(f"{who.token_id}: {gpb.Role.Name(who.role).removeprefix('ROLE_').lower()}"
              + (f" of tenant {who.tenant_id}" if who.tenant_id else ""))
        return 0
    if args.action == "issue":
        if args.operator == bool(args.tenant):
            raise UsageError("tokens issue needs exactly one of --tenant ID or --operator")
        req = gpb.IssueTokenRequest(role=gpb.ROLE_OPERATOR if args.operator else gpb.ROLE_TENANT,
                                   tenant_id=args.tenant, description=args.description)
        resp = call(args, "governance", lambda s: s.IssueToken(req, timeout=10))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(resp.token + "\n")
            print(f"token {resp.info.token_id} written to {args.out} (it is shown only once)")
        elif wants_json(args):
            dump(resp)
        else:
            print(resp.token)
        return 0
    if args.action == "revoke":
        if not args.token_id:
            raise UsageError("tokens revoke needs the token id (tok_…)")
        resp = call(args, "governance", lambda s: s.RevokeToken(gpb.RevokeTokenRequest(token_id=args.token_id), timeout=10))
        if wants_json(args):
            dump(resp)
        else:
            print(f"revoked {resp.info.token_id}")
        return 0
    resp = call(args, "governance", lambda s: s.ListTokens(gpb.ListTokensRequest(tenant_id=args.tenant), timeout=10))
    if wants_json(args):
        dump(resp)
        return 0
    table = Table(title="API tokens (secrets are never stored)")
    for col in ("token", "role", "tenant", "created", "revoked", "description"):
        table.add_column(col)
    for t in resp.tokens:
        table.add_row(t.token_id, gpb.Role.Name(t.role).removeprefix("ROLE_").lower(), t.tenant_id or "-",
                      t.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                      t.revoked_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if t.revoked else "-", t.description)
    show(table)
    return 0
