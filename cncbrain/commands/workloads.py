"""`cncbrain workloads`: list (or show one of) the scheduler's workloads."""

from __future__ import annotations

import argparse

import grpc
from rich.table import Table

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, show, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workloads", help="list workloads (or show one)")
    p.add_argument("workload_id", nargs="?", help="show this workload in full")
    add_output_arg(p)
    add_target_args(p, "scheduler")
    p.set_defaults(func=run)


def placements_text(w) -> str:
    parts = []
    for p in w.placements:
        n = p.replicas or len(p.shard_indices)
        if n:
            parts.append(f"{p.site_id}:{n}×{p.gpu_type}")
    return " ".join(parts) or "-"


def run(args: argparse.Namespace) -> int:
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cncbrain.workload import required_spec

    address = target(args, "scheduler")

    async def call():
        async with channel(address) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            if args.workload_id:
                return [(await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=args.workload_id), timeout=5)).workload]
            return list((await stub.ListWorkloads(spb.ListWorkloadsRequest(), timeout=5)).workloads)

    try:
        items = aio.run(call())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "scheduler") from None
    if wants_json(args) or args.workload_id:
        print_json(items[0] if args.workload_id else items)
        return 0
    table = Table(title=f"workloads ({address})")
    for col in ("id", "kind", "name", "state", "gen", "placements", "progress", "message"):
        table.add_column(col)
    for w in items:
        spec = required_spec(w)
        table.add_row(w.workload_id, "training" if w.HasField("training_job") else "inference", spec.name,
                      spb.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_"), str(w.generation),
                      placements_text(w), f"{w.progress:.0%}" if w.HasField("training_job") else "", w.message)
    show(table)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["workloads", *sys.argv[1:]]))
