"""`cncbrain watch [SUBJECT]`: the live event stream over NATS (human-readable or --json), or one
workload's lifecycle through the scheduler's WatchWorkload (--workload ID)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
from google.protobuf.message import DecodeError, Message

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, nats_tls_ca, rpc_error, secrets_dir, target
from cncbrain.commands._output import add_output_arg, to_dict, wants_json
from cncbrain.errors import CncError

DEFAULT_SUBJECT = "cnc.>"
NOISY = (".heartbeat", ".telemetry", "cnc.emulator.state.", "cnc.perception.snapshot")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="live event stream (NATS subject filter, default: every event but telemetry)")
    p.add_argument("subject", nargs="?", default=None, help="NATS subject filter, e.g. 'cnc.scheduler.>'")
    p.add_argument("--workload", help="follow one workload's lifecycle (gRPC WatchWorkload) until it ends")
    add_output_arg(p)
    p.add_argument("--count", type=int, default=0, help="stop after this many events (0: until Ctrl-C)")
    add_target_args(p, "nats", "scheduler")
    p.set_defaults(func=run)


def decode(type_id: str, data: bytes) -> Message | None:
    """The payload of an event by its `Cnc-Type` header, with any message the registry declares
    (`cncbrain.bus.subjects`); None for an unknown type or bytes that are not that message."""
    from cncbrain.bus import subjects

    message_type = subjects.BY_TYPE.get(type_id)
    if message_type is None:
        return None
    try:
        return message_type.FromString(data)
    except DecodeError:
        return None


def line(subject: str, type_id: str, payload, as_json: bool) -> str:
    body = to_dict(payload) if payload is not None else {}
    if as_json:
        return json.dumps({"subject": subject, "type": type_id, "event": body})
    short = " ".join(f"{k}={v}" for k, v in body.items() if not isinstance(v, list | dict))
    return f"{subject:<42} {type_id.rsplit('.', 1)[-1]:<18} {short}"[:220]


async def watch_nats(args: argparse.Namespace) -> int:
    import nats

    from cncbrain.bus import envelope
    from cncbrain.bus.connection import connect_options

    url = target(args, "nats")
    folder = secrets_dir()
    auth = connect_options("admin" if folder else None, folder, nats_tls_ca())
    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=-1, **auth)
    except Exception as exc:
        raise CncError(f"cannot reach NATS at {url}: {exc}") from None
    filt = args.subject or DEFAULT_SUBJECT
    seen = 0
    done = asyncio.Event()

    async def on(msg) -> None:
        nonlocal seen
        if args.subject is None and any(n in msg.subject for n in NOISY):
            return
        if msg.subject.startswith("_INBOX") or msg.subject.startswith("$JS"):
            return
        type_id = (msg.headers or {}).get(envelope.TYPE, "?")
        print(line(msg.subject, type_id, decode(type_id, msg.data), wants_json(args)), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    await nc.subscribe(filt, cb=on)
    print(f"watching {filt} on {url} (Ctrl-C to stop)", file=sys.stderr)
    try:
        await done.wait()
    finally:
        await nc.close()
    return 0


async def watch_workload(args: argparse.Namespace) -> int:
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    address = target(args, "scheduler")
    try:
        async with channel(address) as ch:
            stream = scheduler_pb2_grpc.SchedulerServiceStub(ch).WatchWorkload(
                spb.WatchWorkloadRequest(workload_id=args.workload))
            async for resp in stream:
                print(line(f"cnc.scheduler.workload.{args.workload}", "cnc.scheduler.v1.WorkloadEvent",
                           resp.event, wants_json(args)), flush=True)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "scheduler") from None
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return aio.run(watch_workload(args) if args.workload else watch_nats(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["watch", *sys.argv[1:]]))
