"""`cncbrain tenants`: list, show and create tenants (with quota and placement policy)."""

from __future__ import annotations

import argparse

from rich.table import Table

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import show, wants_json
from cncbrain.commands.policy import add_policy_args, policy_from_args, policy_text
from cncbrain.commands.quota import add_quota_args, quota_from_args, quota_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tenants", help="list tenants, show one, or create one (operator)")
    p.add_argument("action", nargs="?", choices=("list", "show", "create"), default="list")
    p.add_argument("tenant_id", nargs="?")
    p.add_argument("--name", default="", help="display name (create)")
    add_quota_args(p)
    add_policy_args(p)
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.governance.v1 import governance_pb2 as gpb
    from cncbrain.errors import UsageError

    if args.action in ("show", "create") and not args.tenant_id:
        raise UsageError(f"tenants {args.action} needs a tenant id")
    if args.action == "create":
        req = gpb.CreateTenantRequest(tenant_id=args.tenant_id, display_name=args.name,
                                     quota=quota_from_args(args), policy=policy_from_args(args))
        resp = call(args, "governance", lambda s: s.CreateTenant(req, timeout=10))
        if wants_json(args):
            dump(resp)
        else:
            print(f"created tenant {resp.tenant.tenant_id}; issue it a token with "
                  f"`cncbrain tokens issue --tenant {resp.tenant.tenant_id}`")
        return 0
    if args.action == "show":
        resp = call(args, "governance", lambda s: s.GetTenant(gpb.GetTenantRequest(tenant_id=args.tenant_id), timeout=10))
        dump(resp.tenant)
        return 0
    resp = call(args, "governance", lambda s: s.ListTenants(gpb.ListTenantsRequest(), timeout=10))
    if wants_json(args):
        dump(resp)
        return 0
    table = Table(title="tenants")
    for col in ("tenant", "name", "quota", "policy", "in use"):
        table.add_column(col)
    for t in resp.tenants:
        table.add_row(t.tenant_id, t.display_name, quota_text(t.quota), policy_text(t.policy),
                      f"{t.gpus_in_use} GPUs, ${t.cost_usd_per_hour_in_use:.2f}/h")
    show(table)
    return 0
