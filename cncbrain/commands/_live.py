"""Helpers shared by the live-brain commands: where the brain is (endpoints), gRPC channels with
tracing, and turning gRPC errors into user messages."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import grpc

from cncbrain import aio, telemetry
from cncbrain.errors import CncError
from cncbrain.settings import DEFAULT_NATS_URL

STATE_DIR = Path(os.environ.get("CNC_STATE_DIR", ".state"))
ENDPOINTS_FILE = "endpoints.json"
DEFAULTS = {"nats": DEFAULT_NATS_URL, "perception": "127.0.0.1:50061", "scheduler": "127.0.0.1:50062",
            "adaptation": "127.0.0.1:50063", "governance": "127.0.0.1:50064"}


def endpoints() -> dict[str, str]:
    """Endpoints of the running brain: env, then the state folder `cncbrain up` wrote, then defaults."""
    found = dict(DEFAULTS)
    path = STATE_DIR / ENDPOINTS_FILE
    if path.exists():
        found.update(json.loads(path.read_text()))
    env = {"nats": "CNC_NATS_URL", "perception": "CNC_PERCEPTION_ADDR", "scheduler": "CNC_SCHEDULER_ADDR",
           "adaptation": "CNC_ADAPTATION_ADDR", "governance": "CNC_GOVERNANCE_ADDR"}
    for key, var in env.items():
        if os.environ.get(var):
            found[key] = os.environ[var]
    return found


def secrets_dir() -> Path | None:
    """The NATS credentials the operator's tools use (`admin`): `CNC_SECRETS_DIR`, else the state
    folder's `secrets/` that `cncbrain up` made; None when there are none (a server without auth)."""
    if os.environ.get("CNC_SECRETS_DIR"):
        return Path(os.environ["CNC_SECRETS_DIR"])
    found = Path(endpoints().get("secrets") or STATE_DIR / "secrets")
    return found if found.is_dir() else None


async def admin_bus(url: str, name: str, folder: Path | None = None, **kwargs):
    """A `Bus` for the operator's tools: the `admin` identity when credentials are at hand (`folder`,
    else `secrets_dir()`)."""
    from cncbrain.bus import Bus

    folder = folder or secrets_dir()
    return await Bus.connect(url, name, identity="admin" if folder else None, secrets_dir=folder, **kwargs)


def add_target_args(parser: argparse.ArgumentParser, *which: str) -> None:
    for name in which:
        flag = "--nats-url" if name == "nats" else f"--{name}"
        parser.add_argument(flag, dest=f"target_{name}", default=None,
                            help=f"{name} endpoint (default: from {STATE_DIR}/{ENDPOINTS_FILE} or {DEFAULTS[name]})")


def target(args: argparse.Namespace, name: str) -> str:
    return getattr(args, f"target_{name}", None) or endpoints()[name]


def channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """A channel to a brain service with tracing, the API token (`--token`, `CNC_TOKEN`,
    `CNC_TOKEN_FILE` or the operator token `cncbrain up` wrote to the state folder) and TLS when
    `CNC_TLS_CA` is set."""
    from cncbrain.auth import load_token, token_interceptors
    from cncbrain.certs import client_channel

    telemetry.setup("cncbrain-cli", os.environ.get("CNC_OTEL_EXPORTER") or None, log_level="WARNING")
    interceptors = [*telemetry.client_interceptors(), *token_interceptors(load_token(token, required=False))]
    return client_channel(address, interceptors=interceptors)


def rpc_error(exc: grpc.aio.AioRpcError, address: str) -> CncError:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return CncError(f"no brain answers at {address}: start one with `cncbrain up` (or pass the address)")
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CncError(f"UNAUTHENTICATED: {exc.details()} (pass --token, set CNC_TOKEN, or use the operator "
                        f"token `cncbrain up` wrote to {STATE_DIR}/operator.token)")
    return CncError(f"{exc.code().name}: {exc.details()}")


def run_alone(register, argv: list[str]) -> int:
    """`python -m cncbrain.commands.<name>`: one command without importing every other one (the
    full CLI imports torch for the training commands, seconds per call)."""
    from cncbrain.cli import run_command

    parser = argparse.ArgumentParser(prog="cncbrain")
    register(parser.add_subparsers(dest="command"))
    return run_command(parser.parse_args(argv))


def create_workload(args, rpc: str, request) -> int:
    """Send a deploy/submit request to the scheduler and print the new workload's id and state."""

    from cnc.scheduler.v1 import scheduler_pb2 as pb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    address = target(args, "scheduler")

    async def call():
        async with channel(address) as ch:
            return await getattr(scheduler_pb2_grpc.SchedulerServiceStub(ch), rpc)(request, timeout=10)

    try:
        w = aio.run(call()).workload
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address) from None
    print(f"{w.workload_id}  {pb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')}  "
          f"(follow it: cncbrain watch --workload {w.workload_id})")
    return 0


def add_template_args(parser: argparse.ArgumentParser, unit: str) -> None:
    """`--command`, `--arg`, `--env`, `--image`: what each replica or shard runs at a site whose
    executor starts real processes (Slurm); the emulated sites ignore them."""
    g = parser.add_argument_group(f"what each {unit} runs (sites with a real executor; docs/executors.md)")
    g.add_argument("--command", default="", help=f"program each {unit} runs (a path or a name on the site's PATH)")
    g.add_argument("--arg", action="append", default=[], metavar="ARG",
                   help="an argument of --command (repeatable, in order; write --arg=-x for one starting with -)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help=f"an environment variable of each {unit} (repeatable)")
    g.add_argument("--image", default="", help="container image, for executors that run images")


def template_from_args(args: argparse.Namespace):
    """The `WorkloadTemplate` of the template flags (the scheduler validates it; this only splits
    NAME=VALUE)."""
    from cnc.common.v1 import common_pb2 as common

    t = common.WorkloadTemplate(command=args.command, args=args.arg, image=args.image)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CncError(f"--env {item!r}: expected NAME=VALUE")
        t.env.add(name=name, value=value)
    return t
