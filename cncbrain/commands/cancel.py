"""`cncbrain cancel ID`: cancel a workload (its placements are removed at every site)."""

from __future__ import annotations

import argparse

import grpc

from cncbrain import aio
from cncbrain.commands._live import add_target_args, call_retrying, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cancel", help="cancel a workload")
    p.add_argument("workload_id")
    add_target_args(p, "scheduler")
    add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    address = target(args, "scheduler")

    async def call():
        async with channel(address) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            request = spb.CancelWorkloadRequest(workload_id=args.workload_id)
            try:
                return await call_retrying(lambda: stub.CancelWorkload(request, timeout=10),
                                           f"scheduler at {address}")
            except grpc.aio.AioRpcError as exc:
                # sent again after a lost answer: the first one may have cancelled it already
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or "already CANCELLED" not in (exc.details() or ""):
                    raise
                return await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=args.workload_id), timeout=10)

    try:
        w = aio.run(call()).workload
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "scheduler") from None
    if wants_json(args):
        print_json(w)
    else:
        print(f"{w.workload_id}  {spb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')}")
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import call_retrying, run_alone

    sys.exit(run_alone(register, ["cancel", *sys.argv[1:]]))
