"""Live-brain figures (print only; compare run to run on the same machine):

1. `up`: seconds from start to every health check SERVING and every site agent registered.
2. latency: gRPC DeployInferenceService call → its committed-placement event on NATS, over 200
   sequential deployments against `up` (abilene, emulated sites, 11 site agents answering offers).
   Each service is cancelled (untimed) once its placement arrived, before the next deploy — a pool
   that keeps 200 more services is heavier for every process (measured: p50 14–16 vs 10–12 ms);
   `--pause S` waits S seconds after the cancel, so each deploy meets a brain that has finished
   the previous one's follow-up work (RUNNING, release, audit ledger).
3. throughput: replica placements committed per second over 10,000, with 20 memory-executor site
   agents and 16 concurrent tenants, twice: 200 services of 50 replicas, and 2,000 services of 5
   replicas (ten times the offers, arbitrations, KV writes and events per replica).

The site agents' policy is `up`'s default (marl when the shipped policy exists) unless
CNC_AGENT_POLICY names one (greedy, marl, marl:PATH); the figures name it. The brain runs as
`cncbrain up` does, with auth on, and the benchmark calls with the operator's token (`--no-auth`:
as `up --no-auth`, every call accepted without a token).

    python -m benchmarks live            # all three
    python -m benchmarks.bench_live latency|throughput|up [--repeat N] [--pause S] [--no-auth] [--nats-tls]
        # latency: N fresh `up`s; S seconds between one deploy's cancel and the next deploy;
        # --nats-tls: as `up --nats-tls`, every NATS connection TLS
    python -m benchmarks.bench_live cpu    # each process's CPU per deploy + cancel (Linux /proc)
    python -m benchmarks.bench_live msgs   # bus messages per deploy + cancel, by subject
    python -m benchmarks.bench_live nice [A B]   # background at nice A vs B (0 vs up's default), in one brain
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain import aio
from cncbrain.auth import bearer_metadata
from cncbrain.bus import Bus, subjects
from cncbrain.commands.up import Brain
from cncbrain.grpcserver import wait_healthy
from cncbrain.natsserver import NatsServer, free_port

N_LATENCY = 200
N_REPLICAS = 10_000
REPLICAS_PER_SERVICE = (50, 5)
CONCURRENCY = 16
THROUGHPUT_SITES = 20
AGENT_PROCESSES = 4
PAUSE_S = 0.0
"""`--pause S`: seconds between one deploy's cancel and the next deploy (0: back to back)."""
AUTH = True
NATS_TLS = False
"""The brain checks bearer tokens, as `cncbrain up` does by default (`--no-auth`: off)."""


def spec(name: str, replicas: int) -> common.InferenceServiceSpec:
    return common.InferenceServiceSpec(name=name, model="7b", params_b=7, slo=common.SloTargets(ttft_ms=500, tpot_ms=50),
                                       expected_rate_rps=0.05, min_replicas=replicas, max_replicas=replicas,
                                       gpus_per_replica=1, trace="code")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _latency(brain: Brain, n: int = N_LATENCY) -> list[float]:
    endpoints = brain.endpoints
    bus = await Bus.connect(endpoints["nats"], "bench", ensure=False, identity="admin",
                            secrets_dir=Path(endpoints["secrets"]), tls_ca=brain.tls_ca)
    arrived: dict[str, float] = {}
    waiters: dict[str, asyncio.Event] = {}

    async def on_placement(ev):
        wid = ev.payload.placement.workload_id
        if ev.payload.placement.generation == 1 and wid not in arrived:
            arrived[wid] = time.perf_counter()
            if wid in waiters:
                waiters[wid].set()

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="bench-latency")
    samples = []
    # the operator's token as call metadata (a client interceptor, as the CLI uses, costs the
    # client ~0.5 ms more per call with grpc.aio — the client's cost, not the brain's)
    md = bearer_metadata(brain.token_file.read_text().strip()) if brain.auth else None
    async with grpc.aio.insecure_channel(endpoints["scheduler"]) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        for i in range(n + 5):  # 5 warm-up calls are not counted
            t0 = time.perf_counter()
            w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec(f"lat{i}", 1)),
                                                   metadata=md)).workload
            ev = waiters.setdefault(w.workload_id, asyncio.Event())
            if w.workload_id in arrived:
                ev.set()
            await asyncio.wait_for(ev.wait(), 10)
            if i >= 5:
                samples.append((arrived[w.workload_id] - t0) * 1e3)
            # keep the pool (and the emulator) light: the service goes away, untimed
            await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w.workload_id), metadata=md)
            if PAUSE_S:
                await asyncio.sleep(PAUSE_S)
    await bus.close()
    return samples


def policy_name() -> str:
    from agents.site_policies import default_site_policy

    return os.environ.get("CNC_AGENT_POLICY") or default_site_policy()


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def running_brain(**kwargs) -> Iterator[Brain]:
    """A started `up` (abilene, emulated sites at 30×, fresh state in a temporary folder), stopped after."""
    with tempfile.TemporaryDirectory() as tmp:
        brain = Brain(Path(tmp), "abilene", nats_port=0, perception_port=0, scheduler_port=0, governance_port=0,
                      adaptation_port=0, speed=30.0, fresh=True, auth=AUTH, nats_tls=NATS_TLS, **kwargs)
        brain.start()
        try:
            yield brain
        finally:
            brain.stop()


def bench_up_and_latency() -> float:
    """One `up` and 200 sequential deploys against it; returns the p50 (ms)."""
    print(f"[{load()}]")
    with running_brain() as brain:
        print(f"up: healthy (health SERVING, {len(brain.sites)} agents registered) in {brain.healthy_after_s:.2f} s")
        samples = aio.run(_latency(brain))
    print(f"deploy → committed-placement event over {len(samples)} sequential deploys (abilene, 11 agents, "
          f"{policy_name()} policy, {aio.loop_name()} loop, auth {'on' if AUTH else 'off'}, NATS {'TLS' if NATS_TLS else 'plain'}, {PAUSE_S:g} s between deploys): p50 {statistics.median(samples):.2f} ms, "
          f"p90 {pct(samples, 90):.2f} ms, p99 {pct(samples, 99):.2f} ms, max {max(samples):.2f} ms [{load()}]")
    return statistics.median(samples)


async def _throughput(url: str, scheduler: str, per_service: int) -> tuple[float, int]:
    bus = await Bus.connect(url, "bench", ensure=False)
    units = 0
    done = asyncio.Event()
    t_last = 0.0

    async def on_placement(ev):
        nonlocal units, t_last
        units += ev.payload.placement.replicas
        if units >= N_REPLICAS:
            t_last = time.perf_counter()
            done.set()

    await bus.subscribe(subjects.SCHEDULER_PLACEMENT, on_placement, consumer="bench-throughput")
    n_services = N_REPLICAS // per_service
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_services):
        queue.put_nowait(i)
    async with grpc.aio.insecure_channel(scheduler) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)

        async def tenant() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
                    service=spec(f"tp{i}", per_service)))

        t0 = time.perf_counter()
        await asyncio.gather(*[tenant() for _ in range(CONCURRENCY)])
        await asyncio.wait_for(done.wait(), 300)
    await bus.close()
    return t_last - t0, units


def bench_throughput() -> None:
    for per_service in REPLICAS_PER_SERVICE:
        print(f"[{load()}]")
        seconds, units = _run_throughput(per_service)
        print(f"commit path: {units} replica placements in {seconds:.2f} s = {units / seconds:.0f} placements/s, "
              f"{units / per_service / seconds:.0f} deployments/s ({units // per_service} deploys × {per_service} "
              f"replicas, {CONCURRENCY} concurrent tenants, {THROUGHPUT_SITES} memory-executor agents in "
              f"{AGENT_PROCESSES} processes, {policy_name()} policy) [{load()}]")


def _run_throughput(per_service: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        port, pport = free_port(), free_port()
        env = {**os.environ, "CNC_SCHEDULER_NATS_URL": nats.url, "CNC_SCHEDULER_GRPC_PORT": str(port),
               "CNC_PERCEPTION_NATS_URL": nats.url, "CNC_PERCEPTION_GRPC_PORT": str(pport),
               "CNC_SCHEDULER_LOG_LEVEL": "WARNING", "CNC_PERCEPTION_LOG_LEVEL": "WARNING"}
        groups = [[arg for i in range(g, THROUGHPUT_SITES, AGENT_PROCESSES) for arg in ("--site", f"site{i}")]
                  for g in range(AGENT_PROCESSES)]
        procs = [
            subprocess.Popen([sys.executable, "-m", "services.perception"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            *[subprocess.Popen([sys.executable, "-m", "cncbrain.commands.agent", "--executor", "memory", "--gpus",
                                "H100:1000", "--nats-url", nats.url, "--policy", policy_name(), *sites], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for sites in groups],
        ]
        try:
            aio.run(wait_healthy(f"127.0.0.1:{port}", 30))
            aio.run(_wait_sites(pport, THROUGHPUT_SITES, 30))
            time.sleep(1.5)  # the scheduler has a snapshot with every site
            return aio.run(_throughput(nats.url, f"127.0.0.1:{port}", per_service))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
            nats.stop()


async def _wait_sites(port: int, n: int, timeout_s: float) -> None:
    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = perception_pb2_grpc.PerceptionServiceStub(ch)
        while len((await stub.ListSites(ppb.ListSitesRequest())).sites) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {n} site agents registered within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


def _cpu_ms(pid: int) -> float:
    """CPU time (user + system) of process `pid` so far, in ms (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def bench_cpu() -> None:
    """Where the CPU of a deploy goes: each process's CPU time per deploy + cancel over the latency
    loop, less what it uses idle (measured for 5 s before)."""
    with running_brain() as brain:
        pids = {name: proc.pid for name, proc in brain.procs.items()}
        if brain.nats and brain.nats.proc:
            pids["nats-server"] = brain.nats.proc.pid
        pids["benchmark client"] = os.getpid()

        def snap() -> dict[str, float]:
            return {name: _cpu_ms(pid) for name, pid in pids.items()}

        a, t0 = snap(), time.perf_counter()
        time.sleep(5)
        b, idle_s = snap(), time.perf_counter() - t0
        samples = aio.run(_latency(brain))
        c, busy_s = snap(), time.perf_counter() - t0 - idle_s
    n = N_LATENCY + 5
    per = {k: (c[k] - b[k] - (b[k] - a[k]) / idle_s * busy_s) / n for k in pids}
    print(f"CPU per deploy + cancel over {n} ({policy_name()} policy, {aio.loop_name()} loop, auth {'on' if AUTH else 'off'}, p50 "
          f"{statistics.median(samples):.2f} ms, one every {busy_s / n * 1e3:.1f} ms) [{load()}]:")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {v:6.2f} ms")
    print(f"  {'total':18s} {sum(per.values()):6.2f} ms = {sum(per.values()) / (busy_s / n * 1e3):.2f} cores busy")


WORKLOAD_ID = re.compile(r"^(svc|job)-[0-9a-f]{6,}$")


def bench_msgs(n: int = 100) -> None:
    """Bus traffic of a deploy + cancel: messages per deploy over the latency loop, by subject (its
    first tokens; `$KV` by bucket), as a client subscribed to `>` sees them — a JetStream push
    delivery to a consumer counts as one more message on the stored subject, so a KV write that two
    processes follow counts three times. Replies (`_INBOX`) and acks are counted too."""
    import nats

    from cncbrain.bus.connection import connect_options

    async def run(brain: Brain) -> tuple[Counter[str], list[float]]:
        nc = await nats.connect(brain.endpoints["nats"], **connect_options("admin", brain.secrets_dir, brain.tls_ca))
        seen: Counter[str] = Counter()

        async def count(msg) -> None:
            t = ["<id>" if WORKLOAD_ID.match(x) else x for x in msg.subject.split(".")]
            seen[t[0] if t[0] == "_INBOX" else ".".join(t[:4] if t[0] in ("$KV", "$JS") else t[:3])] += 1

        await nc.subscribe(">", cb=count, pending_msgs_limit=1_000_000)
        samples = await _latency(brain, n)
        await nc.flush()
        await asyncio.sleep(0.5)  # the last deploy's follow-up work
        await nc.close()
        return seen, samples

    with running_brain() as brain:
        seen, samples = aio.run(run(brain))
    per = n + 5
    print(f"messages per deploy + cancel over {per} ({policy_name()} policy, auth {'on' if AUTH else 'off'}, "
          f"p50 {statistics.median(samples):.2f} ms; idle traffic included) [{load()}]:")
    for k, v in seen.most_common():
        if v / per >= 0.2:
            print(f"  {v / per:6.2f}  {k}")
    print(f"  {sum(seen.values()) / per:6.2f}  in all")


def bench_nice(a: int = 0, b: int | None = None, blocks: int = 10, per_block: int = 60) -> None:
    """Background priority A/B inside one brain: blocks of `per_block` deploys alternate between
    the background processes (`up.BACKGROUND`) at nice `a` and at nice `b` (default: `up`'s), so the
    machine's drift hits both; prints the median of the blocks' p50s."""
    from cncbrain.commands.up import BACKGROUND, DEFAULT_BACKGROUND_NICE, lower_priority

    b = DEFAULT_BACKGROUND_NICE if b is None else b
    res: dict[int, list[float]] = {a: [], b: []}
    with running_brain(background_nice=0) as brain:
        for blk in range(blocks):
            for nice in list(res) if blk % 2 == 0 else list(res)[::-1]:
                for name in BACKGROUND:
                    lower_priority(brain.procs[name].pid, nice)
                res[nice].append(statistics.median(aio.run(_latency(brain, per_block))))
            print(f"  block {blk + 1}/{blocks}: p50 " + ", ".join(f"nice {k} {v[-1]:.2f} ms" for k, v in res.items()),
                  flush=True)
    for nice, p50s in res.items():
        print(f"background ({', '.join(BACKGROUND)}) at nice {nice:2d}: p50 of {blocks} blocks of {per_block} "
              f"deploys: median {statistics.median(p50s):.2f} ms ({' '.join(f'{x:.1f}' for x in p50s)})")
    lower = sum(y < x for x, y in zip(res[a], res[b], strict=True))
    print(f"lower at nice {b} than at nice {a} in {lower} of {blocks} pairs [{load()}]")


def main(argv: list[str] | None = None) -> None:
    which = list(argv or ["up", "throughput"])
    repeat = 1
    if "--repeat" in which:  # a shared machine's latency moves from run to run: several fresh `up`s
        i = which.index("--repeat")
        repeat = int(which[i + 1])
        del which[i:i + 2]
    if "--no-auth" in which:
        global AUTH
        AUTH = False
        which.remove("--no-auth")
    if "--nats-tls" in which:
        global NATS_TLS
        NATS_TLS = True
        which.remove("--nats-tls")
    if "--pause" in which:
        global PAUSE_S
        i = which.index("--pause")
        PAUSE_S = float(which[i + 1])
        del which[i:i + 2]
    if "up" in which or "latency" in which:
        p50s = [bench_up_and_latency() for _ in range(repeat)]
        if repeat > 1:
            print(f"p50 over {repeat} runs: median {statistics.median(p50s):.2f} ms, best {min(p50s):.2f} ms, "
                  f"worst {max(p50s):.2f} ms ({', '.join(f'{x:.2f}' for x in p50s)})")
    if "throughput" in which:
        bench_throughput()
    if "cpu" in which:
        bench_cpu()
    if "msgs" in which:
        bench_msgs()
    if "nice" in which:  # nice [A B]: the two nice values compared (default 0 and up's)
        values = [int(x) for x in which[which.index("nice") + 1:][:2] if x.isdigit()]
        bench_nice(*values)


if __name__ == "__main__":
    main(sys.argv[1:])
