"""`cncbrain emulate`: emulate the sites of a scenario with the digital twin in accelerated
wall-clock time, for site agents with the `emulated` executor."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from cncbrain import aio, telemetry
from cncbrain.commands._live import add_target_args, target
from cncbrain.errors import UsageError

log = logging.getLogger("emulator")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("emulate", help="emulate a scenario's sites (the twin, accelerated) for the site agents")
    p.add_argument("--scenario", default="abilene", help="built-in scenario name or YAML path (default abilene)")
    p.add_argument("--speed", type=float, default=30.0, help="emulated seconds per wall second (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--horizon-s", type=float, default=24 * 3600.0, help="emulated time covered by the traces")
    p.add_argument("--no-failures", action="store_true", help="ignore the scenario's scripted site failures")
    p.add_argument("--state-file", type=Path, default=None,
                   help="keep what runs at each site in this file, so a restarted emulator has its sites as they were "
                        "(default: nowhere; `cncbrain up` uses <state>/emulator.state)")
    p.add_argument("--log-format", choices=telemetry.LOG_FORMATS, default=None,
                   help="text or json (one object per line, with trace and span ids); default $CNC_LOG_FORMAT, else text")
    add_target_args(p, "nats")
    p.set_defaults(func=run)


async def emulate(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    from agents.executor_emulated import EmulatorHost
    from cncbrain.bus import Bus
    from cncbrain.grpcserver import stop_event_on_signals, wait_for_stop
    from cncbrain.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    stop = stop or stop_event_on_signals()
    bus = await Bus.connect(target(args, "nats"), "emulator", identity="emulator")
    host = EmulatorHost(bus, scenario, seed=args.seed, speed=args.speed, horizon_s=args.horizon_s,
                        keep_failures=not args.no_failures, state_file=args.state_file)
    await host.start()
    try:
        return await wait_for_stop(stop)
    finally:
        await host.stop()
        await bus.close()


def run(args: argparse.Namespace) -> int:
    if args.speed <= 0:
        raise UsageError("--speed must be > 0")
    from cncbrain.settings import CncSettings, load_settings

    telemetry.setup_process("emulator", load_settings(CncSettings, log_format=args.log_format))
    return aio.run(emulate(args))



if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["emulate", *sys.argv[1:]]))
