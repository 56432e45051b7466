"""Chaos: a bounded deploy stream against a running brain while one process after another is
killed with SIGKILL — each service (with `--standby`: its active instance), the site agents, the
emulator, nats-server. Per fault it prints:

- healthy_s: seconds from the kill until the brain serves again — every gRPC health check SERVING,
  every site up, and a probe deploy sent after the kill RUNNING (applied at its emulated site);
- accepted: deploys of the stream the brain accepted (each sent with its request id and retried
  while the brain answers UNAVAILABLE or not at all, as the CLI does);
- failed: deploys it refused, or that the client gave up on (60 s);
- lost: accepted, but not in the scheduler's records afterwards;
- duplicated: records beyond one per deploy of the stream;
- stuck: accepted and, after the settle time, neither RUNNING nor explicitly FAILED (PENDING, or
  PLACED with nothing running);
- ended_failed: accepted workloads that ended FAILED (their message says why).

The brain runs as `cncbrain up` does (abilene, auth on, supervised). Figures depend on the machine's
load: each line carries the load average.

    python -m benchmarks.bench_chaos [--standby] [--deploys N] [--rate R] [--json FILE] [--plot FILE]
        [--faults scheduler,governance,...]

With `--compose PROJECT` it drives a running compose stack of deploy/ instead (its published ports
as the `CNC_*_PORT` variables say): each fault is a SIGKILL of the process in its container, which
the restart policy brings back; for the scheduler and governance of the cluster profile, the
active instance of the pair (the one listening on the port); `nats`, `nats-2`, `nats-3` are the
NATS nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.perception.v1 import perception_pb2_grpc
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import bearer_metadata
from cncbrain.certs import client_channel
from cncbrain.commands._live import RETRYABLE
from cncbrain.commands.up import SERVICES, Brain

FAULTS = ("scheduler", "governance", "perception", "adaptation", "agents", "emulator", "nats")
SETTLE_S = 60.0
RETRY_WINDOW_S = 60.0


@dataclass
class Result:
    fault: str
    killed: str
    healthy_s: float | None = None
    accepted: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    ended_failed: int = 0
    load: str = ""
    notes: list[str] = field(default_factory=list)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spec(name: str) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, slo=common.SloTargets(ttft_ms=1000, tpot_ms=100),
                                       expected_rate_rps=0.05, min_replicas=1, max_replicas=1, gpus_per_replica=1,
                                       trace="code")


def scenario_outages(scenario: str) -> frozenset[str]:
    """The sites a scenario takes down by itself (abilene: Chicago, for 600 emulated seconds from
    1500 s — about 50 to 70 s after the emulator starts, at its ×30): not the fault's doing, so
    "every site up" leaves them out (a NATS node's failover of 0.9 s once read 7.9 s, another
    18.3 s, waiting for Chicago to come back)."""
    from agents.executor_emulated import slug
    from cncbrain.scenario import load_scenario

    return frozenset(slug(f.site) for f in load_scenario(scenario).failures)


class Chaos:
    def __init__(self, endpoints: dict[str, str], token: str | None, sites: int, deploys: int, rate: float,
                 outages: frozenset[str] = frozenset()) -> None:
        self.sites = sites
        self.outages = outages
        """Sites the scenario itself takes down (`scenario_outages`), left out of "every site up"."""
        self.deploys = deploys
        self.rate = rate
        self.md = bearer_metadata(token) if token else None
        self.ports = {s: endpoints[s] for s in SERVICES}
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def _retrying(self, call):
        deadline = time.monotonic() + RETRY_WINDOW_S
        delay = 0.1
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def health(self) -> list[str]:
        """The services whose health check is not SERVING (within 1 s), asked at once over channels
        kept open (as a load balancer's checks are: a fresh connection per check timed out on a
        loaded machine)."""
        async def serving(ch: grpc.aio.Channel) -> bool:
            try:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

        answers = await asyncio.gather(*(serving(ch) for ch in self.channels.values()))
        return [s for s, ok in zip(self.channels, answers, strict=True) if not ok]

    async def sites_up(self) -> bool:
        try:
            sites = (await perception_pb2_grpc.PerceptionServiceStub(self.channels["perception"]).ListSites(
                ppb.ListSitesRequest(), metadata=self.md, timeout=1)).sites
        except grpc.aio.AioRpcError:
            return False
        return len(sites) >= self.sites and all(s.state == common.SITE_STATE_UP for s in sites
                                                if s.site.site_id not in self.outages)

    async def time_to_healthy(self, stub, killed_at: float, tag: str, notes: list[str]) -> float | None:
        """Seconds from the kill until every health check SERVING, every site up and a probe
        deploy (sent right after the kill) placed; `notes` get when each was first true."""
        seen: dict[str, float] = {}

        async def probe_placed() -> bool:
            try:
                w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid), metadata=self.md,
                                            timeout=2)).workload
            except grpc.aio.AioRpcError:
                return False
            return w.state == spb.WORKLOAD_STATE_RUNNING  # applied at its site: agents and emulator work

        probe = spb.DeployInferenceServiceRequest(service=spec(f"{tag}-probe"), request_id=f"{tag}-probe")
        wid = (await self._retrying(lambda: stub.DeployInferenceService(probe, metadata=self.md, timeout=10))).workload.workload_id
        seen["probe accepted"] = time.monotonic() - killed_at
        deadline = time.monotonic() + 120
        unhealthy: dict[str, float] = {}  # service → when its health check last failed
        while time.monotonic() < deadline:
            failing = await self.health()
            unhealthy.update({s: time.monotonic() - killed_at for s in failing})
            checks = {"health": not failing, "sites up": await self.sites_up(), "probe running": await probe_placed()}
            for what, ok in checks.items():
                if ok and what not in seen:
                    seen[what] = time.monotonic() - killed_at
            if all(checks.values()):
                notes.append("after the kill: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(seen.items(), key=lambda kv: kv[1]))
                             + (f" (health checks last failing: {', '.join(f'{s} {t:.1f} s' for s, t in unhealthy.items())})"
                                if unhealthy else ""))
                return time.monotonic() - killed_at
            await asyncio.sleep(0.1)
        notes.append("not healthy within 120 s: " + ", ".join(f"{k} {v:.1f} s" for k, v in seen.items()))
        return None

    async def run_fault(self, fault: str, kill) -> Result:
        self.channels = {s: client_channel(address) for s, address in self.ports.items()}
        try:
            return await self._run_fault(fault, kill)
        finally:
            for ch in self.channels.values():
                await ch.close()

    async def ready(self, notes: list[str], timeout_s: float = 120) -> None:
        """Wait until the brain is whole before a fault — every health check SERVING and every site
        up (`sites_up`) — so a fault is timed from a healthy brain."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not await self.health() and await self.sites_up():
                if (waited := time.monotonic() - started) > 0.5:
                    notes.append(f"waited {waited:.1f} s before the kill for every site up and every service serving")
                return
            await asyncio.sleep(0.5)
        notes.append(f"not whole before the kill (waited {timeout_s:.0f} s): "
                     f"failing {await self.health()}, sites up {await self.sites_up()}")

    async def _run_fault(self, fault: str, kill) -> Result:
        tag = f"{fault}-{int(time.time())}"
        notes: list[str] = []
        await self.ready(notes)
        async with client_channel(self.ports["scheduler"]) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            outcome: dict[int, str | None] = {}

            async def one(i: int) -> None:
                request = spb.DeployInferenceServiceRequest(service=spec(f"{tag}-{i}"), request_id=f"{tag}-{i}")
                try:
                    w = (await self._retrying(lambda: stub.DeployInferenceService(
                        request, metadata=self.md, timeout=10))).workload
                    outcome[i] = w.workload_id
                except grpc.aio.AioRpcError:
                    outcome[i] = None

            tasks = []
            killed_at = 0.0
            killed = ""
            for i in range(self.deploys):
                if i == self.deploys // 4:
                    killed = kill()
                    killed_at = time.monotonic()
                    healthy = asyncio.ensure_future(self.time_to_healthy(stub, killed_at, tag, notes))
                tasks.append(asyncio.ensure_future(one(i)))
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*tasks)
            result = Result(fault, killed, healthy_s=await healthy, load=load(), notes=notes)
            accepted = {wid for wid in outcome.values() if wid}
            result.accepted, result.failed = len(accepted), sum(1 for w in outcome.values() if w is None)
            settled = (spb.WORKLOAD_STATE_RUNNING, spb.WORKLOAD_STATE_FAILED, spb.WORKLOAD_STATE_COMPLETED)
            deadline = time.monotonic() + SETTLE_S
            while True:
                listed = (await self._retrying(lambda: stub.ListWorkloads(
                    spb.ListWorkloadsRequest(), metadata=self.md, timeout=10))).workloads
                mine = [w for w in listed if w.inference_service.name.startswith(f"{tag}-")
                        and not w.inference_service.name.endswith("-probe")]
                by_id = {w.workload_id: w for w in mine}
                if all(w.state in settled for w in by_id.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            result.lost = len(accepted - set(by_id))
            result.duplicated = len(mine) - len({w.inference_service.name for w in mine})
            result.stuck = sum(1 for wid in accepted if wid in by_id and by_id[wid].state not in settled)
            result.ended_failed = sum(1 for wid in accepted if wid in by_id and by_id[wid].state == spb.WORKLOAD_STATE_FAILED)
            for w in by_id.values():
                if w.state == spb.WORKLOAD_STATE_FAILED or w.state not in settled:
                    result.notes.append(f"{w.workload_id} {spb.WorkloadState.Name(w.state)}: {w.message[:160]}")
            # the pool back to empty for the next fault
            for w in listed:
                if w.inference_service.name.startswith(f"{tag}-") and w.state in (
                        spb.WORKLOAD_STATE_PENDING, spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING):
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._retrying(lambda w=w: stub.CancelWorkload(
                            spb.CancelWorkloadRequest(workload_id=w.workload_id), metadata=self.md, timeout=10))
        return result


def active_instance(brain: Brain, service: str) -> str:
    """The instance holding `service`'s lease (its log says so last)."""
    best, at = brain.instances(service)[0], -1.0
    for name in brain.instances(service):
        path = brain.log_path(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        i = text.rfind(f"{service} {name}: active")
        if i >= 0 and path.stat().st_mtime > at and text.rfind(" stopping", i) < 0:
            best, at = name, path.stat().st_mtime
    return best


def killer(brain: Brain, fault: str):
    def kill() -> str:
        name = fault
        if fault in SERVICES:
            name = active_instance(brain, fault)
        proc = brain.supervisor.children[name].proc
        if proc is None:
            raise RuntimeError(f"{name} is not running")
        os.kill(proc.pid, signal.SIGKILL)
        return name
    return kill


def supervise(brain: Brain, stop: threading.Event, lines: list[str]) -> None:
    while not stop.is_set():
        try:
            brain.poll()
        except Exception as exc:  # GaveUp
            lines.append(f"supervisor gave up: {exc}")
            return
        time.sleep(0.1)


def plot(results: list[Result], path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.fault for r in results]
    values = [r.healthy_s if r.healthy_s is not None else 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.bar(names, values, color=["#c44e52" if v > 5 else "#4c72b0" for v in values])
    ax.axhline(5.0, color="grey", linestyle="--", linewidth=1, label="target 5 s")
    for b, r in zip(bars, results, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r.healthy_s:.1f}" if r.healthy_s else "n/a",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("kill -9 → healthy again (s)")
    ax.set_title(f"bench_chaos: recovery per fault ({mode})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- a compose stack (deploy/: `--compose PROJECT`) --------------------------------------------
GRPC_PORTS = {"perception": 50061, "scheduler": 50062, "adaptation": 50063, "governance": 50064}
COMPOSE_FAULTS = ("scheduler", "governance", "perception", "adaptation", "agents", "emulator", "nats", "nats-2", "nats-3")
TOKEN_FILE = "/var/lib/cncbrain/token/operator.token"


def podman(*args: str) -> str:
    import subprocess

    return subprocess.run(["podman", *args], capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def container_pid(name: str) -> int:
    """The host pid of a running container's process (0: not running)."""
    try:
        return int(podman("inspect", "--format", "{{.State.Pid}}", name) or 0)
    except Exception:
        return 0


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (its network namespace's
    /proc/net/tcp{,6}: a socket of state LISTEN on that port whose inode is one of its fds)."""
    mine = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                mine.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in mine:
                    return True
    return False


NATS_NODES = ("nats", "nats-2", "nats-3")
KILLED_AT: dict[str, float] = {}
"""fault → the wall-clock time of its last kill (the NATS nodes' logs are read against it)."""


def compose_killer(project: str, fault: str):
    """SIGKILL of the fault's process in its container (the restart policy brings it back): for a
    service with a pair (the cluster profile), its active instance, the one listening on the port."""
    def kill() -> str:
        KILLED_AT[fault] = time.time()
        pair = [f"{project}_{fault}-{i}_1" for i in (1, 2)] if fault in GRPC_PORTS else []
        pids = {name: container_pid(name) for name in pair}
        if any(pids.values()):
            active = [n for n, pid in pids.items() if pid and listens(pid, GRPC_PORTS[fault])]
            if len(active) != 1:
                raise RuntimeError(f"{fault}: {len(active)} instances listen ({pids})")
            name = active[0]
        else:
            name = f"{project}_{fault}_1"
        pid = container_pid(name)
        if not pid:
            raise RuntimeError(f"{name} is not running")
        os.kill(pid, signal.SIGKILL)
        return name.removeprefix(f"{project}_").removesuffix("_1")
    return kill


def elections(project: str, since: float, window_s: float = 30.0) -> list[tuple[float, str]]:
    """Every JetStream leader the NATS nodes of a compose project report elected within `window_s`
    of `since` (a kill's wall-clock time): (seconds after it, '[stream] STREAM', '[consumer]
    STREAM > CONSUMER' or 'meta'), from their logs — where a NATS node's loss spends its time."""
    import datetime
    import re
    import subprocess

    line = re.compile(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) \[INF\] (?:JetStream cluster new (stream|consumer|metadata) "
                      r"leader(?: for '\$G > ([^']+)'|: .*)|Self is new JetStream cluster metadata leader)")
    found = []
    for node in NATS_NODES:
        out = subprocess.run(["podman", "logs", "--since", str(int(since) - 1), f"{project}_{node}_1"],
                             capture_output=True, text=True, timeout=60)
        for m in line.finditer(out.stdout + out.stderr):
            if m[2] == "metadata":  # a (restarted) node learning who leads, not an election
                continue
            at = datetime.datetime.strptime(m[1], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.UTC).timestamp()
            if 0 <= at - since <= window_s:
                found.append((round(at - since, 2), f"[{m[2]}] {m[3]}" if m[3] else "[meta]"))
    return sorted(found)


def compose_explain(project: str, fault: str, result: Result) -> None:
    """After a NATS node's kill: when JetStream elected new leaders for the groups it led."""
    if fault not in NATS_NODES or fault not in KILLED_AT:
        return
    found = elections(project, KILLED_AT[fault])
    if not found:
        result.notes.append("no JetStream leader elected after the kill (the node led nothing)")
        return
    times = [t for t, _ in found]
    result.notes.append(f"JetStream leaders elected after the kill: {len(found)}, {min(times):.1f}–{max(times):.1f} s "
                        f"(median {sorted(times)[len(times) // 2]:.1f} s): "
                        + ", ".join(f"{what} {t:.1f}" for t, what in found))


def compose_target(project: str) -> tuple[dict[str, str], str, int]:
    """Endpoints (the published ports, `CNC_*_PORT` as the compose files read them), the operator
    token (from governance's container) and the number of sites of a running compose stack."""
    from agents.executor_emulated import site_ids_of
    from cncbrain.scenario import load_scenario

    endpoints = {s: f"127.0.0.1:{os.environ.get(f'CNC_{s.upper()}_PORT', p)}" for s, p in GRPC_PORTS.items()}
    token = podman("exec", f"{project}_governance_1", "cat", TOKEN_FILE)
    return endpoints, token, len(site_ids_of(load_scenario(os.environ.get("CNC_SCENARIO", "abilene"))))


def run_faults(chaos: Chaos, faults: list[str], killer_of, deploys: int, explain=None) -> list[Result]:
    results = []
    for fault in faults:
        result = asyncio.run(chaos.run_fault(fault, killer_of(fault)))
        if explain is not None:
            explain(fault, result)
        results.append(result)
        print(f"{fault:11s} killed {result.killed:13s} healthy in "
              f"{result.healthy_s:5.2f} s" if result.healthy_s is not None else f"{fault:11s} NOT healthy",
              f"accepted {result.accepted}/{deploys} failed {result.failed} lost {result.lost} "
              f"duplicated {result.duplicated} stuck {result.stuck} ended_failed {result.ended_failed} "
              f"[load {result.load}]", flush=True)
        for note in result.notes[:6]:
            print(f"    {note}", flush=True)
        time.sleep(3)  # let restarts settle before the next fault
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_chaos")
    parser.add_argument("--standby", action="store_true", help="two instances of each service (up --standby)")
    parser.add_argument("--deploys", type=int, default=24, help="deploys in each fault's stream")
    parser.add_argument("--rate", type=float, default=4.0, help="deploys per second")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the brain's state folder (logs) here")
    parser.add_argument("--compose", metavar="PROJECT", default=None,
                        help="a running compose stack of deploy/ instead of `up` (its published ports as "
                             "CNC_*_PORT say, default the compose files'); faults: " + ",".join(COMPOSE_FAULTS))
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    lines: list[str] = []
    results: list[Result] = []
    if args.compose:
        endpoints, token, sites = compose_target(args.compose)
        print(f"compose project {args.compose}: {endpoints['scheduler']} [load {load()}]", flush=True)
        outages = scenario_outages(os.environ.get("CNC_SCENARIO", "abilene"))
        results = run_faults(Chaos(endpoints, token, sites, args.deploys, args.rate, outages), faults,
                             lambda fault: compose_killer(args.compose, fault), args.deploys,
                             lambda fault, result: compose_explain(args.compose, fault, result))
    else:
        results = run_up(args, faults, lines)
    for line in lines:
        print(f"  supervisor: {line}")
    if args.json:
        args.json.write_text(json.dumps({"standby": args.standby, "compose": args.compose, "deploys": args.deploys,
                                         "rate": args.rate, "results": [asdict(r) for r in results]}, indent=2))
    if args.plot:
        plot(results, args.plot, "compose" if args.compose else "standby" if args.standby else "supervised restart")
    return 0


def run_up(args: argparse.Namespace, faults: list[str], lines: list[str]) -> list[Result]:
    """The faults against a brain `up` starts (abilene, auth on, supervised)."""
    with tempfile.TemporaryDirectory() as tmp:
        brain = Brain(args.keep or Path(tmp), "abilene", nats_port=0, perception_port=0, scheduler_port=0, governance_port=0,
                      adaptation_port=0, speed=30.0, fresh=True, auth=True, standby=args.standby,
                      say=lambda line: lines.append(f"{time.strftime('%H:%M:%S')} {line}"))
        print(f"starting the brain ({'standby' if args.standby else 'one instance each'}) … [load {load()}]", flush=True)
        brain.start()
        print(f"healthy in {brain.healthy_after_s:.1f} s", flush=True)
        stop = threading.Event()
        watcher = threading.Thread(target=supervise, args=(brain, stop, lines), daemon=True)
        watcher.start()
        try:
            chaos = Chaos(brain.endpoints, brain.token_file.read_text().strip() if brain.auth else None,
                          len(brain.sites), args.deploys, args.rate, scenario_outages("abilene"))
            return run_faults(chaos, faults, lambda fault: killer(brain, fault), args.deploys)
        finally:
            stop.set()
            watcher.join(2)
            brain.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
