"""`cncbrain cancel ID`: cancel a workload (its placements are removed at every site)."""

from __future__ import annotations

import argparse

import grpc

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cancel", help="cancel a workload")
    p.add_argument("workload_id")
    add_target_args(p, "scheduler")
    add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.scheduler.v1 import scheduler_pb2 as pb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    address = target(args, "scheduler")

    async def call():
        async with channel(address) as ch:
            return await scheduler_pb2_grpc.SchedulerServiceStub(ch).CancelWorkload(
                pb.CancelWorkloadRequest(workload_id=args.workload_id), timeout=10)

    try:
        w = aio.run(call()).workload
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address) from None
    if wants_json(args):
        print_json(w)
    else:
        print(f"{w.workload_id}  {pb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')}")
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["cancel", *sys.argv[1:]]))
