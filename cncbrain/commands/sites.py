"""`cncbrain sites`: the pool as perception sees it."""

from __future__ import annotations

import argparse

import grpc
from rich.table import Table

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, show, wants_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sites", help="list the sites of a running brain")
    add_output_arg(p)
    add_target_args(p, "perception")
    p.set_defaults(func=run)


async def fetch(address: str):
    from cnc.perception.v1 import perception_pb2, perception_pb2_grpc

    async with channel(address) as ch:
        return (await perception_pb2_grpc.PerceptionServiceStub(ch).ListSites(
            perception_pb2.ListSitesRequest(), timeout=5)).sites


def run(args: argparse.Namespace) -> int:

    from cnc.common.v1 import common_pb2 as common

    address = target(args, "perception")
    try:
        sites = aio.run(fetch(address))
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "perception") from None
    if wants_json(args):
        print_json(list(sites))
        return 0
    table = Table(title=f"sites ({address})")
    for col in ("site", "name", "region", "state", "GPUs used/total", "pools", "replicas", "shards"):
        table.add_column(col)
    for s in sites:
        used = sum(p.used for p in s.gpu_pools)
        total = sum(p.count for p in s.gpu_pools)
        table.add_row(
            s.site.site_id, s.site.name, s.site.region, common.SiteState.Name(s.state).removeprefix("SITE_STATE_"),
            f"{used}/{total}", " ".join(f"{p.gpu_type}:{p.count}" for p in s.gpu_pools),
            str(sum(x.replicas for x in s.services)), str(sum(j.shards_running for j in s.jobs)),
        )
    show(table)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["sites", *sys.argv[1:]]))
