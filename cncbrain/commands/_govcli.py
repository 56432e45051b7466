"""Helpers of the governance and adaptation commands: one call wrapper, token option, output."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json
from cncbrain.errors import UsageError


def add_common(p: argparse.ArgumentParser, service: str, json_flag: bool = True) -> None:
    add_target_args(p, service)
    if json_flag:
        add_output_arg(p)


def call(args: argparse.Namespace, service: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `fn(stub)` against `service` ("governance" or "adaptation"); gRPC errors become messages."""
    address = target(args, service)
    if service == "governance":
        from cnc.governance.v1 import governance_pb2_grpc

        make: Callable[[grpc.aio.Channel], Any] = governance_pb2_grpc.GovernanceServiceStub
    else:
        from cnc.adaptation.v1 import adaptation_pb2_grpc

        make = adaptation_pb2_grpc.AdaptationServiceStub

    async def run() -> Any:
        async with channel(address, getattr(args, "token", None)) as ch:
            return await fn(make(ch))

    try:
        return aio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, service) from None


def dump(message: Any) -> None:
    print_json(message)


def parse_pairs(items: list[str] | None, what: str) -> dict[str, int]:
    """`H100=8 L4=16` -> {"H100": 8, "L4": 16}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what}: expected TYPE=COUNT, got {item!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise UsageError(f"{what}: {value!r} is not a whole number") from None
        if out[key] < 0:
            raise UsageError(f"{what}: {item!r} must not be negative")
    return out
