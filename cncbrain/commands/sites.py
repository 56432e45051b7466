"""`cncbrain sites`: the pool as perception sees it; `cncbrain sites enroll`: an operator admits a
site (its terms, and with `--key-out` its agent's NATS key), or with `--scenario` every site of a
built-in scenario as the emulator runs them (what `cncbrain up` and the compose stacks do).

A key enrolled into a running `cncbrain up` is admitted by its NATS server at once: `up` sees the
rewritten `auth.conf` and has the server reload it; the command waits until the server did."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc
from rich.table import Table

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, show, wants_json
from cncbrain.errors import CncError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sites", help="list the sites of a running brain, or enroll one (operator)")
    p.add_argument("action", nargs="?", choices=("list", "enroll"), default="list")
    p.add_argument("site", nargs="?", help="enroll: the site's id")
    p.add_argument("--gpus", action="append", default=[], metavar="TYPE=COUNT@USD",
                   help="enroll: a GPU type the site may offer, at most COUNT, at USD per GPU-hour (repeatable)")
    p.add_argument("--region", default="", help="enroll: the site's region (placement policies name regions)")
    p.add_argument("--key-out", type=Path, default=None, metavar="FILE",
                   help="enroll: write the site agent's new NATS credentials (nkey seed, mode 0600) here; its "
                        "public key is enrolled with the site and admitted by the brain's NATS server (see below)")
    p.add_argument("--scenario", default=None,
                   help="enroll every site of this built-in scenario with the GPUs its emulator reports, at the GPU "
                        "catalogue's prices, each with its NATS key from the secrets folder (`up`, compose)")
    add_output_arg(p)
    add_target_args(p, "perception", "governance")
    p.set_defaults(func=run)


def parse_gpus(values: list[str]) -> list[tuple[str, int, float]]:
    out = []
    for value in values:
        kind, _, rest = value.partition("=")
        count, _, price = rest.partition("@")
        try:
            out.append((kind, int(count), float(price)))
        except ValueError:
            raise CncError(f"--gpus {value!r}: expected TYPE=COUNT@USD, e.g. H100=16@2.5") from None
        if not kind:
            raise CncError(f"--gpus {value!r}: the GPU type is missing")
    if not out:
        raise CncError("enroll: name what the site may offer with --gpus TYPE=COUNT@USD (repeatable)")
    return out


def scenario_enrollments(inventories: dict[str, dict[str, int]], keys: dict[str, str]) -> list:
    """The enrollment of each site of `inventories` (site id -> GPUs by type) at the GPU catalogue's
    prices, with its agent's NATS public key from `keys` (identity -> key; none: no key pinned)."""
    from cnc.governance.v1 import governance_pb2 as gpb
    from cncbrain.bus.permissions import site_identity
    from cncbrain.twin import costmodel

    return [gpb.SiteEnrollment(site_id=site_id, nats_public_key=keys.get(site_identity(site_id), ""),
                               gpus=[gpb.EnrolledGpus(gpu_type=t, max_count=n, price_usd_per_hour=costmodel.gpu(t).price_hr)
                                     for t, n in sorted(gpus.items())])
            for site_id, gpus in inventories.items()]


def _enroll_scenario(args: argparse.Namespace) -> int:
    from agents.executor_emulated import site_inventories
    from cncbrain.bus.credentials import load_identities
    from cncbrain.commands._live import secrets_dir
    from cncbrain.scenario import load_scenario

    if args.site or args.gpus or args.key_out:
        raise CncError("enroll --scenario enrolls the scenario's sites as they are: no SITE, --gpus or --key-out")
    folder = secrets_dir()
    enrollments = scenario_enrollments(site_inventories(load_scenario(args.scenario)),
                                       load_identities(folder) if folder else {})
    sites = _call_enroll(args, enrollments)
    if wants_json(args):
        print_json(sites)
        return 0
    keyed = sum(1 for e in enrollments if e.nats_public_key)
    print(f"enrolled {len(sites)} sites of {args.scenario} ({keyed} with their agent's NATS key)")
    return 0


def _call_enroll(args: argparse.Namespace, enrollments: list) -> list:
    from cnc.governance.v1 import governance_pb2 as gpb
    from cnc.governance.v1 import governance_pb2_grpc

    address = target(args, "governance")

    async def call():
        async with channel(address) as ch:
            stub = governance_pb2_grpc.GovernanceServiceStub(ch)
            return [(await stub.EnrollSite(gpb.EnrollSiteRequest(site=e), timeout=10)).site for e in enrollments]

    try:
        return aio.run(call())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(exc, address, "governance") from None


def enroll(args: argparse.Namespace) -> int:
    """Enroll a site with governance; with --key-out, issue its agent's NATS key too."""
    from cnc.governance.v1 import governance_pb2 as gpb
    from cncbrain.bus.credentials import add_identity, new_seed, public_key, write_private
    from cncbrain.bus.permissions import site_identity
    from cncbrain.commands._live import secrets_dir

    if args.scenario:
        return _enroll_scenario(args)
    if not args.site:
        raise CncError("enroll: name the site: cncbrain sites enroll SITE --gpus TYPE=COUNT@USD")
    gpus = parse_gpus(args.gpus)
    seed = new_seed() if args.key_out else None
    site = _call_enroll(args, [gpb.SiteEnrollment(
        site_id=args.site, region=args.region, nats_public_key=public_key(seed) if seed else "",
        gpus=[gpb.EnrolledGpus(gpu_type=t, max_count=n, price_usd_per_hour=p) for t, n, p in gpus])])[0]
    admitted = None
    if seed is not None:
        write_private(args.key_out, seed + b"\n")
        folder = secrets_dir()
        if folder is not None:  # the brain's own NATS server admits the key from its next (re)load
            written = time.time()
            add_identity(folder, site_identity(args.site), public_key(seed))
            admitted = wait_reloaded(written)
    if wants_json(args):
        print_json(site)
        return 0
    terms = ", ".join(f"{g.gpu_type} ≤ {g.max_count} at ${g.price_usd_per_hour:g}/GPU-h" for g in site.gpus)
    print(f"enrolled {site.site_id}: {terms}")
    if seed is not None:
        print(f"  its agent's NATS credentials: {args.key_out} (give them to the site only; run its agent with "
              f"CNC_SECRETS_DIR holding nats/{site_identity(args.site)}.nk)")
        if admitted:
            print("  the brain's NATS server admits the key now (it reloaded its configuration)")
        else:
            print("  the brain's NATS server admits the key once it reloads its configuration (a running "
                  "`cncbrain up` does within a second; another server: `nats-server --signal reload`)")
    return 0


def wait_reloaded(since: float, timeout_s: float = 5.0) -> bool:
    """Whether the running `cncbrain up`'s NATS server (re)loaded its configuration after `since`
    (its /varz `config_load_time`), waiting up to `timeout_s`; False without a monitor to ask."""
    import datetime as dt
    import json
    import urllib.request

    from cncbrain.commands._live import endpoints

    monitor = endpoints().get("nats_monitor")
    if not monitor:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{monitor}/varz", timeout=2) as reply:
                loaded = json.loads(reply.read()).get("config_load_time", "")
            if dt.datetime.fromisoformat(loaded.replace("Z", "+00:00")).timestamp() >= since:
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


async def fetch(address: str):
    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc

    async with channel(address) as ch:
        return (await perception_pb2_grpc.PerceptionServiceStub(ch).ListSites(
            ppb.ListSitesRequest(), timeout=5)).sites


def run(args: argparse.Namespace) -> int:
    if args.action == "enroll":
        return enroll(args)

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
