"""`cncbrain policy TENANT [--workload ID]`: set the placement policy of a tenant (operator) or of
one of its workloads (narrowing the tenant's): allowed regions and sites (data residency), GPU
types, a cost cap."""

from __future__ import annotations

import argparse

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import wants_json


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regions", nargs="*", default=None, help="allowed regions (data residency)")
    p.add_argument("--sites", nargs="*", default=None, help="allowed sites")
    p.add_argument("--gpu-types", nargs="*", default=None, help="allowed GPU types")
    p.add_argument("--policy-max-cost", type=float, default=None, help="USD per hour cap for one workload")


def policy_from_args(args: argparse.Namespace):
    from cnc.governance.v1 import governance_pb2 as gpb

    p = gpb.PlacementPolicy()
    if args.regions is not None:
        p.allowed_regions.extend(args.regions)
        p.restrict_regions = True
    if args.sites is not None:
        p.allowed_sites.extend(args.sites)
        p.restrict_sites = True
    if args.gpu_types is not None:
        p.allowed_gpu_types.extend(args.gpu_types)
        p.restrict_gpu_types = True
    if args.policy_max_cost is not None:
        p.max_cost_usd_per_hour = args.policy_max_cost
    return p


def policy_text(p) -> str:
    parts = []
    if p.restrict_regions or p.allowed_regions:
        parts.append("regions=" + ",".join(p.allowed_regions))
    if p.restrict_sites or p.allowed_sites:
        parts.append("sites=" + ",".join(p.allowed_sites))
    if p.restrict_gpu_types or p.allowed_gpu_types:
        parts.append("gpus=" + ",".join(p.allowed_gpu_types))
    if p.HasField("max_cost_usd_per_hour"):
        parts.append(f"≤${p.max_cost_usd_per_hour:.2f}/h")
    return " ".join(parts) or "anywhere"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="set the placement policy of a tenant or one of its workloads")
    p.add_argument("tenant_id")
    p.add_argument("--workload", default="", help="the workload whose policy to set (else the tenant's)")
    add_policy_args(p)
    add_common(p, "governance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.governance.v1 import governance_pb2 as gpb

    req = gpb.SetPlacementPolicyRequest(tenant_id=args.tenant_id, workload_id=args.workload,
                                       policy=policy_from_args(args))
    resp = call(args, "governance", lambda s: s.SetPlacementPolicy(req, timeout=10))
    if wants_json(args):
        dump(resp)
    else:
        who = f"{args.tenant_id}/{args.workload}" if args.workload else args.tenant_id
        print(f"{who}: policy in force: {policy_text(resp.effective_policy)}")
    return 0
