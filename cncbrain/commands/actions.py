"""`cncbrain actions`: what adaptation did and why; `cncbrain autoscale WORKLOAD`: its guardrails."""

from __future__ import annotations

import argparse

from rich.table import Table

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import show, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("actions", help="adaptation's actions (re-placements, scaling) with their reasons")
    p.add_argument("--workload", default="")
    p.add_argument("--site", default="")
    p.add_argument("--limit", type=int, default=50)
    add_common(p, "adaptation")
    p.set_defaults(func=run)

    a = sub.add_parser("autoscale", help="show or set the scaling guardrails of an inference service")
    a.add_argument("workload_id")
    a.add_argument("--min", dest="min_replicas", type=int, default=None)
    a.add_argument("--max", dest="max_replicas", type=int, default=None)
    a.add_argument("--target-slo", type=float, default=None, help="SLO attainment below which it scales up (0..1)")
    a.add_argument("--scale-down-ticks", type=int, default=None, help="quiet ticks before one step down")
    a.add_argument("--disable", action="store_true")
    add_common(a, "adaptation")
    a.set_defaults(func=run_autoscale)


def run(args: argparse.Namespace) -> int:
    from cnc.adaptation.v1 import adaptation_pb2 as apb

    req = apb.ListActionsRequest(workload_id=args.workload, site_id=args.site, limit=args.limit)
    resp = call(args, "adaptation", lambda s: s.ListActions(req, timeout=10))
    if wants_json(args):
        dump(resp)
        return 0
    table = Table(title="adaptation actions (newest first)")
    for col in ("time", "action", "workload", "site", "reason"):
        table.add_column(col)
    for a in resp.actions:
        table.add_row(a.at.ToDatetime().strftime("%H:%M:%S"), apb.ActionKind.Name(a.kind).removeprefix("ACTION_KIND_").lower(),
                      a.workload_id, a.site_id or "-", a.reason)
    show(table)
    return 0


def run_autoscale(args: argparse.Namespace) -> int:
    from cnc.adaptation.v1 import adaptation_pb2 as apb

    current = call(args, "adaptation", lambda s: s.GetAutoscalingPolicy(
        apb.GetAutoscalingPolicyRequest(workload_id=args.workload_id), timeout=10))
    policy = current.policy
    changed = any(v is not None for v in (args.min_replicas, args.max_replicas, args.target_slo,
                                           args.scale_down_ticks)) or args.disable
    if changed:
        if args.min_replicas is not None:
            policy.min_replicas = args.min_replicas
        if args.max_replicas is not None:
            policy.max_replicas = args.max_replicas
        if args.target_slo is not None:
            policy.target_slo_attainment = args.target_slo
        if args.scale_down_ticks is not None:
            policy.scale_down_stable_ticks = args.scale_down_ticks
        policy.enabled = not args.disable
        policy = call(args, "adaptation", lambda s: s.SetAutoscalingPolicy(
            apb.SetAutoscalingPolicyRequest(workload_id=args.workload_id, policy=policy), timeout=10)).policy
    if wants_json(args):
        dump(policy)
    else:
        print(f"{args.workload_id}: replicas {policy.min_replicas}..{policy.max_replicas}, scale up below "
              f"{policy.target_slo_attainment:.0%} SLO attainment, down after {policy.scale_down_stable_ticks} quiet "
              f"ticks, {'enabled' if policy.enabled else 'DISABLED'}"
              + ("" if changed or current.explicit else " (defaults from the service's spec)"))
    return 0
