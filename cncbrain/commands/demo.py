"""`cncbrain demo`: bring the brain up (fresh state, free ports), run a scripted workload — two
inference services on the Azure traces and a training job, then a site failure — show it live, and
print a closing report (SLO attainment, training progress, GPU utilisation, placements made)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cncbrain import aio
from cncbrain.commands._live import default_state_dir
from cncbrain.errors import CncError, UsageError

if TYPE_CHECKING:
    from cnc.perception.v1.perception_pb2 import Snapshot


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="up + scripted workload + live view + closing report")
    p.add_argument("--duration", type=float, default=45.0, help="wall seconds of workload (default 45)")
    p.add_argument("--scenario", default="abilene")
    p.add_argument("--speed", type=float, default=30.0, help="emulated seconds per wall second (default 30)")
    p.add_argument("--fail-site", default="chicago", help="site failed a third of the way in ('' for none)")
    p.add_argument("--state-dir", type=Path, default=default_state_dir() / "demo")
    p.add_argument("--policy", default=os.environ.get("CNC_AGENT_POLICY"),
                   help="site agents' policy: greedy, marl or marl:PATH (default $CNC_AGENT_POLICY, else marl "
                        "when the shipped policy file exists, else greedy)")
    p.set_defaults(func=run)


@dataclass
class Tally:
    requests: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    ok: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    util: list[float] = field(default_factory=list)
    placements: int = 0
    units: int = 0
    rescales: int = 0
    applied: int = 0
    site_events: list[str] = field(default_factory=list)
    last_sim: float = -1.0
    snapshot: Snapshot | None = None
    workloads: list = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def fold(self, snap: Snapshot) -> None:
        self.snapshot = snap
        if snap.sim_time_s <= self.last_sim:
            return  # same emulated tick seen again
        self.last_sim = snap.sim_time_s
        gpus = sum(p.count for s in snap.sites for p in s.gpu_pools)
        used = sum(p.used for s in snap.sites if s.state == 1 for p in s.gpu_pools)
        if gpus:
            self.util.append(used / gpus)
        for s in snap.sites:
            for load in s.services:
                self.requests[load.workload_id] += load.requests
                self.ok[load.workload_id] += load.requests_ok

    def slo(self, wid: str | None = None) -> float:
        req = self.requests[wid] if wid else sum(self.requests.values())
        ok = self.ok[wid] if wid else sum(self.ok.values())
        return ok / req if req else float("nan")


def _pct(x: float) -> str:
    return "—" if x != x else f"{x:.1%}"  # NaN before the first requests are counted


def view(t: Tally, elapsed: float, duration: float):
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cncbrain.workload import required_spec

    snap = t.snapshot
    sites = Table(title=f"sites — emulated t={snap.sim_time_s / 60 if snap else 0:.0f} min, wall {elapsed:.0f}/{duration:.0f} s")
    for col in ("site", "state", "GPUs used/total", *[t.names.get(w, w)[:10] for w in sorted(t.requests)], "shards"):
        sites.add_column(col)
    if snap:
        for s in snap.sites:
            reps = {x.workload_id: x.replicas for x in s.services}
            sites.add_row(s.site.site_id, "UP" if s.state == 1 else "[red]DOWN[/red]",
                          f"{sum(p.used for p in s.gpu_pools)}/{sum(p.count for p in s.gpu_pools)}",
                          *[str(reps.get(w, 0)) for w in sorted(t.requests)],
                          str(sum(j.shards_running for j in s.jobs)))
    work = Table(title="workloads")
    for col in ("name", "kind", "state", "placed", "SLO / progress"):
        work.add_column(col)
    for w in t.workloads:
        spec = required_spec(w)
        n = sum(p.replicas or len(p.shard_indices) for p in w.placements)
        figure = f"{w.progress:.0%} trained" if w.HasField("training_job") else f"{_pct(t.slo(w.workload_id))} SLO met"
        work.add_row(spec.name, "training" if w.HasField("training_job") else "inference",
                     spb.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_"), str(n), figure)
    emulated = f"{t.last_sim / 60:.0f} min" if t.last_sim >= 0 else "—"
    summary = (f"emulated {emulated} · placements committed {t.placements} ({t.units} units), "
               f"applied {t.applied} · rescales {t.rescales} · SLO all services {_pct(t.slo())}")
    return Group(sites, work, summary, *t.log[-4:])


async def script(endpoints: dict[str, str], args: argparse.Namespace, console: Console) -> Tally:
    import grpc

    from cnc.common.v1 import common_pb2 as common
    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cnc.site.v1 import events_pb2 as site_pb
    from cncbrain.bus import subjects
    from cncbrain.commands._live import admin_bus
    from cncbrain.twin import costmodel
    from cncbrain.twin.traces import load_azure

    t = Tally()
    bus = await admin_bus(endpoints["nats"], "demo", Path(endpoints["secrets"]) if endpoints.get("secrets") else None,
                          tls_ca=Path(endpoints["nats_tls_ca"]) if endpoints.get("nats_tls_ca") else None)

    async def on_placement(ev):
        t.placements += 1
        t.units += ev.payload.placement.replicas + len(ev.payload.placement.shard_indices)

    async def on_workload(ev):
        if ev.payload.kind == spb.WORKLOAD_EVENT_KIND_RESCALED:
            t.rescales += 1

    async def on_applied(ev):
        t.applied += 1

    async def on_site(ev):
        state = common.SiteState.Name(ev.payload.state).removeprefix("SITE_STATE_")
        msg = f"site {ev.payload.site_id} {state}: {ev.payload.reason}"
        t.site_events.append(msg)
        t.log.append(f"[yellow]{time.strftime('%H:%M:%S')} {msg}[/yellow]")

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="demo-placements")
    await bus.subscribe(subjects.SCHEDULER_WORKLOAD, on_workload, consumer="demo-workloads")
    await bus.subscribe(subjects.SITE_APPLIED, on_applied, consumer="demo-applied")
    await bus.subscribe(subjects.PERCEPTION_SITE_STATE, on_site, consumer="demo-sites")
    sched_ch = grpc.aio.insecure_channel(endpoints["scheduler"])
    perc_ch = grpc.aio.insecure_channel(endpoints["perception"])
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(sched_ch)
    perception = perception_pb2_grpc.PerceptionServiceStub(perc_ch)

    def rate(trace: str, scale: float) -> float:
        base = load_azure(trace)
        return scale * len(base.t) / base.length_s

    services = [
        common.InferenceServiceSpec(name="chat", model="13b", params_b=13, trace="conv", expected_rate_rps=rate("conv", 3.0),
                                    slo=common.SloTargets(ttft_ms=1000, tpot_ms=100), min_replicas=4, max_replicas=32,
                                    gpus_per_replica=1, tenant=""),
        common.InferenceServiceSpec(name="code", model="7b", params_b=7, trace="code", expected_rate_rps=rate("code", 4.0),
                                    slo=common.SloTargets(ttft_ms=500, tpot_ms=50), min_replicas=3, max_replicas=32,
                                    gpus_per_replica=1, tenant=""),
    ]
    m7 = costmodel.model("7b")
    tokens = costmodel.shard_tokens_per_s(m7, costmodel.gpu("A100-80GB"), 8) * 4 * 20 * 60  # ~20 emulated min
    job = common.TrainingJobSpec(name="finetune-7b", model="7b", params_b=7, shards=4, gpus_per_shard=8,
                                 tokens=tokens, tenant="", gang_timeout_s=60)
    for spec in services:
        w = (await scheduler.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec))).workload
        t.names[w.workload_id] = spec.name
        t.requests[w.workload_id] += 0.0
        t.log.append(f"deployed {spec.name} → {w.workload_id}")
    w = (await scheduler.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))).workload
    t.names[w.workload_id] = job.name
    t.log.append(f"submitted {job.name} → {w.workload_id}")

    started = time.monotonic()
    failed = False

    async def follow() -> None:
        async for resp in perception.WatchSnapshots(ppb.WatchSnapshotsRequest()):
            t.fold(resp.snapshot)

    follower = asyncio.create_task(follow())
    interactive = console.is_terminal
    last_line = 0.0
    try:
        with Live(view(t, 0, args.duration), console=console, refresh_per_second=2, transient=False) if interactive else _Null() as live:
            while (elapsed := time.monotonic() - started) < args.duration:
                t.workloads = list((await scheduler.ListWorkloads(spb.ListWorkloadsRequest())).workloads)
                if args.fail_site and not failed and elapsed > args.duration / 3:
                    failed = True
                    await bus.publish(subjects.EMULATOR_FAIL, site_pb.EmulatorFailSite(
                        site_id=args.fail_site, duration_s=args.duration * args.speed / 4), site=args.fail_site)
                    t.log.append(f"[red]injected failure of {args.fail_site}[/red]")
                if interactive:
                    live.update(view(t, elapsed, args.duration))
                elif elapsed - last_line >= 5:
                    last_line = elapsed
                    states = " ".join(f"{t.names.get(w.workload_id, '?')}={spb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')}"
                                      for w in t.workloads)
                    console.print(f"[{elapsed:4.0f}s] emulated {t.last_sim / 60:4.0f} min  SLO {t.slo():.1%}  "
                                  f"placements {t.placements}  rescales {t.rescales}  {states}", soft_wrap=True)  # one log line each
                await asyncio.sleep(0.5)
        t.workloads = list((await scheduler.ListWorkloads(spb.ListWorkloadsRequest())).workloads)
    finally:
        follower.cancel()
        await sched_ch.close()
        await perc_ch.close()
        await bus.close()
    return t


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def report(t: Tally, console: Console) -> None:
    from cnc.scheduler.v1 import scheduler_pb2 as spb

    table = Table(title="closing report")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for w in t.workloads:
        name = t.names.get(w.workload_id, w.workload_id)
        if w.HasField("training_job"):
            table.add_row(f"training progress: {name}",
                          f"{w.progress:.0%} ({spb.WorkloadState.Name(w.state).removeprefix('WORKLOAD_STATE_')})")
        else:
            table.add_row(f"SLO attainment: {name}", f"{t.slo(w.workload_id):.1%} of {t.requests[w.workload_id]:.0f} requests")
    table.add_row("SLO attainment: all services", f"{t.slo():.1%}")
    table.add_row("mean GPU utilisation (allocated share)", f"{sum(t.util) / len(t.util):.1%}" if t.util else "n/a")
    table.add_row("placements committed (events / units)", f"{t.placements} / {t.units}")
    table.add_row("replica rescales by site agents", str(t.rescales))
    table.add_row("placements applied by executors", str(t.applied))
    table.add_row("site state changes", str(len(t.site_events)))
    table.add_row("emulated time", f"{t.last_sim / 60:.0f} min")
    console.print(table)
    for e in t.site_events:
        console.print(f"  {e}")


def run(args: argparse.Namespace) -> int:
    from cncbrain.commands.up import Brain, web_link

    if args.duration <= 0:
        raise UsageError("--duration must be > 0")
    console = Console()
    brain = Brain(args.state_dir, args.scenario, nats_port=0, perception_port=0, scheduler_port=0,
                  governance_port=0, adaptation_port=0, speed=args.speed, fresh=True, policy=args.policy)
    console.print(f"starting CNC Brain ({args.scenario}, {args.speed:.0f}× emulated time) …")
    brain.start()
    console.print(f"healthy in {brain.healthy_after_s:.1f} s: {len(brain.sites)} sites, "
                  f"scheduler {brain.endpoints['scheduler']}, perception {brain.endpoints['perception']}, "
                  f"NATS {brain.endpoints['nats']}; logs in {brain.state_dir / 'logs'}")
    console.print(f"watch it live: {web_link(brain)}")
    try:
        tally = aio.run(script(brain.endpoints, args, console))
        if (msg := brain.dead()) is not None:
            raise CncError(msg)
    finally:
        brain.stop()
    report(tally, console)
    if tally.placements == 0 or tally.applied == 0:
        raise CncError("the demo made no placements: see the logs in " + str(brain.state_dir / "logs"))
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["demo", *sys.argv[1:]]))
