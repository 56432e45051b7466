"""`cncbrain quota TENANT`: replace a tenant's quota (GPUs by type, GPUs in all, cost per hour)."""

from __future__ import annotations

import argparse

from cncbrain.commands._govcli import add_common, call, dump, parse_pairs
from cncbrain.commands._output import wants_json


def add_quota_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", nargs="*", metavar="TYPE=N", help="GPUs of a type the tenant may hold, e.g. H100=8")
    p.add_argument("--max-gpus", type=int, default=None, help="GPUs of all types together")
    p.add_argument("--max-cost", type=float, default=None, help="USD per hour for all the tenant's work")


def quota_from_args(args: argparse.Namespace):
    from cnc.governance.v1 import governance_pb2 as gpb
    from cncbrain.errors import UsageError

    q = gpb.Quota(gpus=[gpb.GpuQuota(gpu_type=t, max_gpus=n) for t, n in parse_pairs(args.gpus, "--gpus").items()])
    if args.max_gpus is not None:
        if args.max_gpus < 0:
            raise UsageError("--max-gpus must not be negative")
        q.max_gpus = args.max_gpus
    if args.max_cost is not None:
        if args.max_cost < 0:
            raise UsageError("--max-cost must not be negative")
        q.max_cost_usd_per_hour = args.max_cost
    return q


def quota_text(q) -> str:
    parts = [f"{g.gpu_type}≤{g.max_gpus}" for g in q.gpus]
    if q.HasField("max_gpus"):
        parts.append(f"GPUs≤{q.max_gpus}")
    if q.HasField("max_cost_usd_per_hour"):
        parts.append(f"≤${q.max_cost_usd_per_hour:.2f}/h")
    return " ".join(parts) or "unlimited"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quota", help="set a tenant's quota (operator)")
    p.add_argument("tenant_id")
    add_quota_args(p)
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.governance.v1 import governance_pb2 as gpb

    req = gpb.SetQuotaRequest(tenant_id=args.tenant_id, quota=quota_from_args(args))
    resp = call(args, "governance", lambda s: s.SetQuota(req, timeout=10))
    if wants_json(args):
        dump(resp)
    else:
        print(f"{resp.tenant.tenant_id}: quota {quota_text(resp.tenant.quota)}")
    return 0
