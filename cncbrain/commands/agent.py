"""`cncbrain agent`: run the site agents of one or more sites (one logical agent per site)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cncbrain import aio, telemetry
from cncbrain.commands._live import add_target_args, target
from cncbrain.errors import CncError, UsageError

if TYPE_CHECKING:
    from agents.executor_slurm import SlurmSettings

log = logging.getLogger("agents")

# numpy's OpenBLAS runs on one thread in the agents' process (read when numpy loads, which nothing
# above does; a test checks). The policy's matrix products are small — one site, or a process's
# sites by a few services — and on a busy host OpenBLAS's extra threads wait for cores other
# processes hold and spin after each product, slowing the decisions after them: on the 300-site
# pool at load 4–5, a site decision's p99 8.3 ms with the default threads, 0.87 ms with one
# (docs/marl.md, Speed). An operator's own setting is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run site agents (one per --site, or every site of --scenario with --all)")
    p.add_argument("--site", action="append", default=[], help="site id (repeatable)")
    p.add_argument("--all", action="store_true", help="every site of --scenario")
    p.add_argument("--scenario", default="abilene", help="scenario whose sites --all means (default abilene)")
    p.add_argument("--except", dest="skip", action="append", default=[], metavar="ID",
                   help="with --all: leave this site out (repeatable; `up --slurm-site` runs it on Slurm)")
    p.add_argument("--executor", choices=["emulated", "memory", "slurm"], default="emulated",
                   help="emulated: the twin's sites (`cncbrain emulate`); memory: nothing runs (dry runs); "
                        "slurm: a Slurm cluster, one --site per process (docs/executors.md)")
    p.add_argument("--gpus", default="A100-80GB:16", help="memory executor inventory per site, TYPE:N[,TYPE:N]")
    g = p.add_argument_group("slurm executor (each also CNC_SLURM_<NAME>; docs/executors.md)")
    for flag, meta, text in SLURM_FLAGS:
        g.add_argument(f"--slurm-{flag}", dest=f"slurm_{flag.replace('-', '_')}", metavar=meta, default=None,
                       action="append" if flag == "gpu-type" else None, help=text)
    g.add_argument("--slurm-site-from-emulator", action="store_true",
                   help="take the site's name, region, location and WAN links from the emulator's copy of it "
                        "(`cncbrain up --slurm-site` does); its GPUs still come from Slurm")
    p.add_argument("--policy", default=None,
                   help="site policy: greedy, marl (the shipped learned policy) or marl:PATH (a policy .npz); "
                        "default $CNC_AGENT_POLICY, else marl when the shipped policy file exists, else greedy")
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--identity", default=None, metavar="agents-NAME",
                   help="with NATS credentials: one connection as this agent host identity, which speaks for all "
                        "these sites (one batch of answers per offer round); default: each site its own identity "
                        "and connection")
    p.add_argument("--log-format", choices=telemetry.LOG_FORMATS, default=None,
                   help="text or json (one object per line, with trace and span ids); default $CNC_LOG_FORMAT, else text")
    add_target_args(p, "nats")
    p.set_defaults(func=run)


SLURM_FLAGS = (
    ("conf", "PATH", "slurm.conf of the cluster (SLURM_CONF of the commands; default: theirs)"),
    ("partition", "NAME", "partition whose nodes are the site (default: the cluster's default partition)"),
    ("workdir", "DIR", "job output and progress files, on a file system the nodes share (default ~/.cnc/slurm/SITE)"),
    ("account", "NAME", "--account of every job"),
    ("qos", "NAME", "--qos of every job"),
    ("gpu-type", "GRES=NAME", "GRES type → the brain's GPU name, e.g. a100=A100-80GB (repeatable; default: "
                              "the GPU name the type spells, ignoring case and -/_)"),
    ("default-command", "WORDS", "what runs for a workload that names no command (default: such a placement is refused)"),
    ("image-runner", "WORDS", "how a template's image runs, with {image}, e.g. 'apptainer exec docker://{image}'"),
    ("cpus-per-gpu", "N", "--cpus-per-gpu of every job"),
    ("mem-per-gpu", "SIZE", "--mem-per-gpu of every job, e.g. 32G"),
    ("poll-s", "S", "seconds between two looks at the cluster (default 2)"),
    ("max-retries", "N", "failures of a workload's jobs resubmitted before it is failed (default 3)"),
    ("command-timeout-s", "S", "how long one Slurm command may take (default 10)"),
    ("bin-dir", "DIR", "folder of sbatch, squeue, sinfo, scontrol, scancel (default: PATH)"),
)


def slurm_settings(args: argparse.Namespace):
    """`SlurmSettings` from CNC_SLURM_* overridden by the --slurm-* flags; a bad value names its setting."""
    from agents.executor_slurm import SlurmSettings
    from cncbrain.settings import load_settings

    given = {flag.replace("-", "_"): getattr(args, f"slurm_{flag.replace('-', '_')}") for flag, _, _ in SLURM_FLAGS}
    if given["gpu_type"] is not None:
        given["gpu_types"] = ",".join(given.pop("gpu_type"))
    given.pop("gpu_type", None)
    settings = load_settings(SlurmSettings, **given)
    settings.gpu_map()  # GRES=NAME pairs checked before anything starts
    return settings


def parse_gpus(text: str):
    from cnc.common.v1 import common_pb2 as common

    pools = []
    for part in text.split(","):
        name, _, count = part.partition(":")
        if not name or not count.isdigit():
            raise UsageError(f"--gpus: {part!r} is not TYPE:N")
        pools.append(common.GpuPool(gpu_type=name, count=int(count)))
    return pools


@dataclass
class Plan:
    """What a run of agents needs before it connects: its sites and policy, checked, and every
    module imported (a spare prepares this much before it waits, `cncbrain.supervise`)."""

    sites: list[str]
    policy: str
    slurm: SlurmSettings | None


def prepare(args: argparse.Namespace, phases: Phases) -> Plan:
    import agents.executor
    import agents.executor_emulated
    import agents.site_agent  # noqa: F401 - imported here, so a spare has them before it waits
    import cncbrain.bus
    import cncbrain.grpcserver  # noqa: F401
    from agents.executor_emulated import site_ids_of
    from agents.site_policies import default_site_policy, make_site_policy
    from cncbrain.bus.subjects import SubjectError, check_token
    from cncbrain.scenario import load_scenario

    phases.mark("imports")
    sites = list(args.site)
    if args.all:
        sites += [s for s in site_ids_of(load_scenario(args.scenario)) if s not in sites]
    sites = [s for s in sites if s not in args.skip]
    if not sites:
        raise UsageError("name the sites: --site ID (repeatable) or --all --scenario NAME")
    if args.executor == "slurm" and len(sites) != 1:
        raise UsageError(f"--executor slurm drives one site per process (its settings are the site's); got {len(sites)}")
    slurm = slurm_settings(args) if args.executor == "slurm" else None
    try:
        for s in sites:
            check_token(s, "site id")
        policy_name = args.policy or os.environ.get("CNC_AGENT_POLICY") or default_site_policy()
        make_site_policy(policy_name)  # read once: each site's agent shares what it loaded
    except (SubjectError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    phases.mark("policy")
    return Plan(sites, policy_name, slurm)


async def run_agents(args: argparse.Namespace, plan: Plan, phases: Phases, stop: asyncio.Event | None = None) -> int:
    from agents.executor import Executor, MemoryExecutor
    from agents.executor_emulated import EmulatedExecutor
    from agents.site_agent import OfferDesk, SiteAgent
    from agents.site_policies import make_site_policy
    from cnc.common.v1 import common_pb2 as common
    from cncbrain.bus import Bus
    from cncbrain.bus.permissions import site_identity
    from cncbrain.grpcserver import stop_event_on_signals, wait_for_stop
    from cncbrain.settings import BusSettings, load_settings

    sites, policy_name, slurm = plan.sites, plan.policy, plan.slurm
    stop = stop or stop_event_on_signals()
    url = target(args, "nats")
    authenticated = load_settings(BusSettings).secrets_dir is not None
    # With credentials each site agent speaks for its own site only, on its own connection (its
    # site's NATS identity), unless the process is an agent host (--identity) that speaks for all of
    # them; the process takes each offer round once (one shared desk) either way.
    host = args.identity if authenticated else None
    shared = None if authenticated and not host else await Bus.connect(url, "agents", identity=host)
    buses = [] if shared is None else [shared]
    agents = []
    try:
        if shared is None:  # every site's connection at once: a restart is back sooner
            buses = list(await asyncio.gather(*(Bus.connect(url, f"agent-{sid}", identity=site_identity(sid),
                                                            ensure=False) for sid in sites)))
        desk = OfferDesk(buses[0])
        phases.mark("NATS")

        async def start(sid: str, bus: Bus) -> SiteAgent:
            executor: Executor
            if args.executor == "emulated":
                executor = EmulatedExecutor(bus, sid)
            elif args.executor == "slurm":
                from agents.executor_slurm import SlurmExecutor

                base = None
                if args.slurm_site_from_emulator:
                    try:
                        base = await EmulatedExecutor(bus, sid).inventory()
                    except Exception as exc:
                        raise CncError(f"--slurm-site-from-emulator: the emulator did not describe site {sid} "
                                       f"({exc!r}; is `cncbrain emulate` running with it?)") from None
                executor = SlurmExecutor(sid, slurm, base)
            else:
                executor = MemoryExecutor(common.Site(site_id=sid, name=sid, gpu_pools=parse_gpus(args.gpus)))
            agent = SiteAgent(bus, sid, executor, make_site_policy(policy_name), heartbeat_s=args.heartbeat_s,
                              desk=desk, agent_id=host)
            try:
                return await agent.start()
            except CncError:
                raise  # says what is wrong (a Slurm setting, …)
            except Exception as exc:
                hint = " (is `cncbrain emulate` running?)" if args.executor == "emulated" else ""
                raise CncError(f"agent for {sid} could not start: {exc!r}{hint}") from None

        pairs = [(sid, shared or buses[i]) for i, sid in enumerate(sites)]
        agents.append(await start(*pairs[0]))  # the first one subscribes the shared desk
        started = await asyncio.gather(*(start(sid, bus) for sid, bus in pairs[1:]), return_exceptions=True)
        agents.extend(a for a in started if isinstance(a, SiteAgent))
        if failed := [a for a in started if isinstance(a, BaseException)]:
            raise failed[0]
        phases.mark("sites")
        log.info("%d site agents running, %s", len(agents), phases)
        return await wait_for_stop(stop)
    finally:
        for a in agents:
            await a.stop()
        for bus in buses:
            await bus.close()


class Phases:
    """How long a start took, phase by phase, from the process's start (its exec: the interpreter
    and the command's own imports count as `start`) or from a spare's take-over, for the log line
    that says it is up."""

    def __init__(self) -> None:
        from cncbrain.commands._live import process_age_s

        self.at = time.monotonic()
        self.since = "the process started"
        self.took = {"start": process_age_s()}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.took[phase], self.at = now - self.at, now

    def took_over(self) -> None:
        """A spare told to take over: count from now."""
        self.at, self.since, self.took = time.monotonic(), "the spare took over", {}

    def __str__(self) -> str:
        known = {k: v for k, v in self.took.items() if v is not None}
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in known.items())
        if self.took.get("start", 0.0) is None:
            return f"start-up: {parts}"
        return f"{sum(known.values()):.2f} s after {self.since} ({parts})"


def run(args: argparse.Namespace) -> int:
    from cncbrain.settings import CncSettings, load_settings
    from cncbrain.supervise import is_spare, wait_to_take_over

    phases = Phases()
    plan = prepare(args, phases)
    if is_spare():  # prepared: wait until the running agents end and the supervisor says so
        if not wait_to_take_over():
            return 0
        phases.took_over()
    telemetry.setup_process("agents", load_settings(CncSettings, log_format=args.log_format))
    phases.mark("metrics")
    return aio.run(run_agents(args, plan, phases))



if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["agent", *sys.argv[1:]]))
