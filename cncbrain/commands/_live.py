"""Helpers shared by the live-brain commands: where the brain is (endpoints), the one token lookup,
gRPC channels with tracing, and turning gRPC errors into user messages.

Where the brain is, for every client command: `--state-dir DIR`, else `$CNC_STATE_DIR`, else
`.state` — the folder `cncbrain up` writes `endpoints.json` and `operator.token` to. The token:
`--token`, else `$CNC_TOKEN`, else the file `$CNC_TOKEN_FILE`, else `operator.token` in that
state folder (`cncbrain.auth.load_token`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import grpc

from cncbrain import aio, telemetry
from cncbrain.errors import CncError, UsageError
from cncbrain.settings import DEFAULT_NATS_URL

ENDPOINTS_FILE = "endpoints.json"
DEFAULTS = {"nats": DEFAULT_NATS_URL, "perception": "127.0.0.1:50061", "scheduler": "127.0.0.1:50062",
            "adaptation": "127.0.0.1:50063", "governance": "127.0.0.1:50064"}


EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
"""Exit codes of every command: 0 done, 1 it failed (the brain refused, is unreachable, ...), 2 the
command line or a setting is wrong (argparse's own code for a malformed command line)."""

_chosen: dict[str, object] = {}
"""What the command line chose (`configure`): the state folder and the token."""


def configure(args: argparse.Namespace) -> None:
    """Take `--state-dir` and `--token` from a parsed command line (called once per command)."""
    _chosen.clear()
    if getattr(args, "state_dir", None):
        _chosen["state_dir"] = Path(args.state_dir)
    if getattr(args, "token", None):
        _chosen["token"] = args.token


def default_state_dir() -> Path:
    """Where a command looks without `--state-dir`: `$CNC_STATE_DIR`, else `.state`."""
    return Path(os.environ.get("CNC_STATE_DIR") or ".state")


def state_dir() -> Path:
    """The state folder of the brain the command talks to: `--state-dir`, `$CNC_STATE_DIR`, `.state`."""
    chosen = _chosen.get("state_dir")
    return chosen if isinstance(chosen, Path) else default_state_dir()


def api_token(explicit: str | None = None, *, required: bool = False) -> str | None:
    """The one token lookup of the CLI (see the module's doc)."""
    from cncbrain.auth import load_token

    chosen = _chosen.get("token")
    return load_token(explicit or (chosen if isinstance(chosen, str) else None), required=required,
                      state_dir=state_dir())


def endpoints() -> dict[str, str]:
    """Endpoints of the running brain: env, then the state folder `cncbrain up` wrote, then defaults."""
    found = dict(DEFAULTS)
    path = state_dir() / ENDPOINTS_FILE
    if path.exists():
        found.update(json.loads(path.read_text()))
    env = {"nats": "CNC_NATS_URL", "perception": "CNC_PERCEPTION_ADDR", "scheduler": "CNC_SCHEDULER_ADDR",
           "adaptation": "CNC_ADAPTATION_ADDR", "governance": "CNC_GOVERNANCE_ADDR"}
    for key, var in env.items():
        if os.environ.get(var):
            found[key] = os.environ[var]
    return found


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot; None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counting from the pid
    except (OSError, ValueError, IndexError):
        return None


def process_age_s() -> float | None:
    """Seconds since this process started (its exec, imports included); None without /proc."""
    started = process_start(os.getpid())
    if started is None:
        return None
    try:
        return float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def left_behind(address: str) -> str:
    """Why nothing answers at `address` when the state folder's endpoints.json named it and the
    `cncbrain up` that wrote it is gone (killed, crashed, its machine restarted): that, else ''."""
    path = state_dir() / ENDPOINTS_FILE
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    up = written.get("up") if isinstance(written, dict) else None
    if not isinstance(up, dict) or address not in written.values() or up.get("host") != socket.gethostname():
        return ""
    pid, started = up.get("pid"), up.get("started")
    if not isinstance(pid, int) or started is None or process_start(pid) == started:
        return ""
    return f"{path} is left from a `cncbrain up` (pid {pid}) that is no longer running"


def secrets_dir() -> Path | None:
    """The NATS credentials the operator's tools use (`admin`): `CNC_SECRETS_DIR`, else the state
    folder's `secrets/` that `cncbrain up` made; None when there are none (a server without auth)."""
    if os.environ.get("CNC_SECRETS_DIR"):
        return Path(os.environ["CNC_SECRETS_DIR"])
    found = Path(endpoints().get("secrets") or state_dir() / "secrets")
    return found if found.is_dir() else None


def nats_tls_ca() -> Path | None:
    """The CA of the brain's NATS server when it requires TLS: `CNC_NATS_TLS_CA`, else the one a
    running `cncbrain up --nats-tls` wrote to its endpoints; None: plain NATS."""
    found = os.environ.get("CNC_NATS_TLS_CA") or endpoints().get("nats_tls_ca")
    return Path(found) if found else None


async def admin_bus(url: str, name: str, folder: Path | None = None, **kwargs):
    """A `Bus` for the operator's tools: the `admin` identity when credentials are at hand (`folder`,
    else `secrets_dir()`), over TLS when the brain's NATS requires it (`nats_tls_ca`)."""
    from cncbrain.bus import Bus

    folder = folder or secrets_dir()
    kwargs.setdefault("timeout_s", 10.0)  # a person waits: say soon that no NATS answers
    kwargs.setdefault("tls_ca", nats_tls_ca())
    return await Bus.connect(url, name, identity="admin" if folder else None, secrets_dir=folder, **kwargs)


def add_target_args(parser: argparse.ArgumentParser, *which: str) -> None:
    """Where the brain is (one flag per service the command calls, `--state-dir`) and, for commands
    that call a gRPC service, `--token`."""
    for name in which:
        flag = "--nats-url" if name == "nats" else f"--{name}"
        parser.add_argument(flag, dest=f"target_{name}", default=None,
                            help=f"{name} endpoint (default: from STATE_DIR/{ENDPOINTS_FILE}, else {DEFAULTS[name]})")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="the state folder of `cncbrain up` (endpoints, operator token); default $CNC_STATE_DIR, "
                             "else .state")
    if set(which) - {"nats"}:
        parser.add_argument("--token", default=None,
                            help="API token (default $CNC_TOKEN, else the file $CNC_TOKEN_FILE, else STATE_DIR/operator.token)")


def target(args: argparse.Namespace, name: str) -> str:
    return getattr(args, f"target_{name}", None) or endpoints()[name]


def channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """A channel to a brain service with tracing, the API token (`--token`, `CNC_TOKEN`,
    `CNC_TOKEN_FILE` or the operator token `cncbrain up` wrote to the state folder) and TLS when
    `CNC_TLS_CA` is set."""
    from cncbrain.auth import token_interceptors
    from cncbrain.certs import client_channel

    telemetry.setup("cncbrain-cli", os.environ.get("CNC_OTEL_EXPORTER") or None, log_level="WARNING")
    interceptors = [*telemetry.client_interceptors(), *token_interceptors(api_token(token))]
    return client_channel(address, interceptors=interceptors)


NO_ANSWER = ("failed to connect", "connection refused", "socket closed", "connection reset", "dns resolution",
             "no route to host", "network is unreachable", "deadline exceeded while waiting for connections",
             "unavailable to connect", "connections to all backends failing")
"""Details gRPC gives when nothing answered at the address (as opposed to a server answering
UNAVAILABLE because something behind it is down)."""


def unanswered(exc: grpc.aio.AioRpcError) -> bool:
    """Did the call fail because nothing answered at the address?"""
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and (not details or any(t in details for t in NO_ANSWER))


def rpc_error(exc: grpc.aio.AioRpcError, address: str, component: str = "") -> CncError:
    """The user's message for a failed call to `component` (scheduler, governance, …) at `address`:
    nothing answering there is not the same as that service answering that something it needs is
    down (governance unavailable behind the scheduler)."""
    who = f"{component} at {address}" if component else address
    if unanswered(exc):
        stale = left_behind(address)
        return CncError(f"no brain answers at {address}{f' (the {component})' if component else ''}"
                        f"{f'; {stale}' if stale else ''}: start one with `cncbrain up` (or pass the address)")
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CncError(f"UNAUTHENTICATED: {exc.details()} (pass --token, set CNC_TOKEN, or use the operator "
                        f"token `cncbrain up` wrote to {state_dir() / 'operator.token'}; --state-dir names its folder)")
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CncError(f"{who} answered {exc.code().name}: {exc.details()}")
    return CncError(f"{exc.code().name}: {exc.details()}")


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def retry_window_s() -> float:
    """How long a change the CLI sends (deploy, submit, cancel) is retried while the service is
    unavailable (restarting, failing over): `CNC_RETRY_S`, default 20 s."""
    raw = os.environ.get("CNC_RETRY_S", "20")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"CNC_RETRY_S: {raw!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise UsageError(f"CNC_RETRY_S: {value:g} is not in 0..3600 seconds")
    return value


async def call_retrying(call, what: str, window_s: float | None = None):
    """`await call()` until it succeeds, fails for a reason retrying cannot fix, or the window ends.
    Safe only for calls that are idempotent (a deploy with its request id, a cancel)."""
    import sys

    window_s = retry_window_s() if window_s is None else window_s
    deadline = time.monotonic() + window_s
    delay, said = 0.2, False
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() + delay > deadline:
                raise
            if not said:
                print(f"{what}: {exc.code().name} ({(exc.details() or '')[:200]}); retrying for up to "
                      f"{window_s:.0f} s", file=sys.stderr, flush=True)
                said = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit code (`EXIT_*`); an error is printed on stderr, Ctrl-C 130."""
    try:
        configure(args)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `cncbrain workloads | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def run_alone(register, argv: list[str]) -> int:
    """`python -m cncbrain.commands.<name>`: one command without importing every other one (the
    full CLI imports torch for the training commands, seconds per call)."""
    parser = argparse.ArgumentParser(prog="cncbrain")
    register(parser.add_subparsers(dest="command"))
    return run_command(parser.parse_args(argv))


def create_workload(args, rpc: str, request) -> int:
    """Send a deploy/submit request to the scheduler and print the new workload's id and state.
    Without --request-id the CLI makes one, so that it can send the request again while the
    scheduler is unavailable (a restart, a failover) without creating the workload twice."""

    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    address = target(args, "scheduler")
    if not request.request_id:
        request.request_id = f"cli-{uuid.uuid4().hex}"

    async def call():
        async with channel(address) as ch:
            stub = getattr(scheduler_pb2_grpc.SchedulerServiceStub(ch), rpc)
            return await call_retrying(lambda: stub(request, timeout=10),
                                       f"scheduler at {address} (request id {request.request_id})")

    try:
        w = aio.run(call()).workload
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "scheduler") from None
    from cncbrain.commands._output import print_json, wants_json

    if wants_json(args):
        print_json(w)
    else:
        print(f"{w.workload_id}  {spb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')}  "
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
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        t.env.add(name=name, value=value)
    return t
