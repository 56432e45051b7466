"""Memory under a long deploy/cancel stream: every process of a running brain (`cncbrain up`:
abilene, auth on) should come back within 20 % of its resident memory once the load is gone.

Each cycle deploys a one-replica service (with its request id), waits for its placement to be
applied at the emulated site (the workload RUNNING), and cancels it; `--workers` cycles run at
once. RSS is read from /proc before (after a warm-up of `--warmup` cycles, so imports, caches and
the pool's first services are in) and after the `--cycles` cycles plus `--settle` seconds. It
prints, per process, RSS before and after and their ratio, and the deploy → RUNNING p50 of each
block of 500 cycles (a brain that slows as it ages shows here).

    python -m benchmarks.bench_memory [--cycles 5000] [--workers 8] [--warmup 200] [--json FILE]
    python -m benchmarks.bench_memory --compare RUN.json … --plot FILE.png   # runs side by side
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.auth import bearer_metadata
from cncbrain.commands.up import Brain

LIMIT = 1.20
BLOCK = 500


def rss_mb(pid: int) -> float:
    return memory_mb(pid)["rss"]


def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory from /proc/PID/status, in MB: `rss` (all of it, what the target
    is measured on), and its parts `anon` (heap, stacks: memory the process holds), `file` (pages of
    its binary and libraries it has touched: the kernel's page cache, shared, dropped under
    pressure) and `shmem`."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out = dict.fromkeys(keys.values(), 0.0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in keys:
            out[keys[key]] = int(line.split()[1]) / 1024
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds the process has used (user + system, /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def smaps_rollup_mb(pid: int) -> dict[str, float]:
    """/proc/PID/smaps_rollup in MB (Private_Dirty, AnonHugePages, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key.strip()] = int(parts[0]) / 1024
    return out


def processes(brain: Brain) -> dict[str, int]:
    found = {name: proc.pid for name, proc in brain.procs.items()}
    if brain.nats and brain.nats.proc:
        found["nats-server"] = brain.nats.proc.pid
    return found


def jetstream(brain: Brain) -> dict[str, tuple[int, int, int, int]]:
    """nats-server's streams: name → (messages, bytes, subjects, consumers), from its monitoring port."""
    import urllib.request

    if not (brain.nats and brain.nats.monitor_url):
        return {}
    with urllib.request.urlopen(f"{brain.nats.monitor_url}/jsz?streams=1&consumers=1", timeout=5) as r:
        data = json.load(r)
    out = {}
    for account in data.get("account_details", []):
        for st in account.get("stream_detail", []):
            state = st.get("state", {})
            out[st["name"]] = (state.get("messages", 0), state.get("bytes", 0), state.get("num_subjects", 0),
                               len(st.get("consumer_detail") or []))
    return out


def nats_heap(brain: Brain, gc: bool = True) -> dict[str, float]:
    """nats-server's Go memory statistics (`runtime.MemStats`, its profiling port), in MB, right after
    a garbage collection (`gc`, the port's `?gc=1`): `live` what the heap still references, `unused`
    freed heap the runtime keeps for reuse (still resident), `returned` heap given back to the OS;
    then the runtime's own counters: `Sys` (everything it obtained from the OS), `HeapSys`,
    `StackSys`, `MSpanSys`, `GCSys`, `OtherSys`, ... and `NumGC` (a count, not MB)."""
    import re
    import urllib.request

    if not (brain.nats and brain.nats.profile_url):
        return {}
    with urllib.request.urlopen(f"{brain.nats.profile_url}/debug/pprof/heap?debug=1&gc={int(gc)}", timeout=30) as r:
        text = r.read().decode(errors="replace")
    stats = {k: int(v) / 1e6 for k, v in re.findall(r"^# (\w+) = (\d+)$", text, re.MULTILINE)}
    for k, _inuse, sys_ in re.findall(r"^# (\w+) = (\d+) / (\d+)$", text, re.MULTILINE):
        stats[f"{k}Sys"] = int(sys_) / 1e6
    stats["NumGC"] *= 1e6
    return {"live": stats["HeapAlloc"], "unused": stats["HeapIdle"] - stats["HeapReleased"],
            "returned": stats["HeapReleased"], **stats}


GO_SYS = ("Sys", "HeapSys", "HeapInuse", "HeapIdle", "HeapReleased", "StackSys", "MSpanSys", "MCacheSys",
          "BuckHashSys", "GCSys", "OtherSys")


def workloads_of_record(brain: Brain) -> int:
    """How many workloads the scheduler holds (ListWorkloads): ended ones stay for
    CNC_SCHEDULER_ENDED_RETENTION_S."""
    async def count() -> int:
        md = bearer_metadata(brain.token_file.read_text().strip())
        async with grpc.aio.insecure_channel(brain.endpoints["scheduler"]) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            return len((await stub.ListWorkloads(spb.ListWorkloadsRequest(), metadata=md, timeout=60)).workloads)

    return asyncio.run(count())


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def cycles(brain: Brain, n: int, workers: int, tag: str) -> list[float]:
    """`n` deploy → RUNNING → cancel cycles, `workers` at a time; the deploy → RUNNING seconds."""
    md = bearer_metadata(brain.token_file.read_text().strip())
    spec = common.InferenceServiceSpec(model="7b", params_b=7, slo=common.SloTargets(ttft_ms=1000, tpot_ms=100),
                                       expected_rate_rps=0.05, min_replicas=1, max_replicas=1, gpus_per_replica=1,
                                       trace="code")
    took: list[float] = [0.0] * n
    todo = iter(range(n))
    async with grpc.aio.insecure_channel(brain.endpoints["scheduler"]) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)

        async def worker() -> None:
            for i in todo:
                s = common.InferenceServiceSpec()
                s.CopyFrom(spec)
                s.name = f"{tag}{i}"
                t0 = time.perf_counter()
                w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
                    service=s, request_id=f"{tag}-{i}"), metadata=md, timeout=30)).workload
                while w.state not in (spb.WORKLOAD_STATE_RUNNING, spb.WORKLOAD_STATE_FAILED):
                    await asyncio.sleep(0.02)
                    w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id), metadata=md,
                                                timeout=30)).workload
                took[i] = time.perf_counter() - t0
                await stub.CancelWorkload(spb.CancelWorkloadRequest(workload_id=w.workload_id), metadata=md, timeout=30)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return took


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_memory")
    parser.add_argument("--cycles", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after the last cancel")
    parser.add_argument("--linger", type=float, default=0.0,
                        help="read every RSS again this many seconds after the 'after' reading (Go returns its "
                             "freed heap to the OS over minutes)")
    parser.add_argument("--sample-every", type=float, default=0.0,
                        help="during --linger, print nats-server's RSS every this many seconds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG of nats-server's RSS during --linger against its RSS before and the 20 % line")
    parser.add_argument("--keep", type=Path, default=None, help="keep the brain's state folder (logs) here")
    parser.add_argument("--compare", type=Path, nargs="+", default=None,
                        help="no run: print and plot (--plot) nats-server's RSS after the load in these --json files "
                             "(each one run, or runs by name)")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare, args.plot)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        brain = Brain(args.keep or Path(tmp), "abilene", nats_port=0, perception_port=0, scheduler_port=0, governance_port=0,
                      adaptation_port=0, speed=30.0, fresh=True, auth=True, nats_profile=True)
        print(f"starting the brain … [load {load()}]", flush=True)
        brain.start()
        try:
            asyncio.run(cycles(brain, args.warmup, args.workers, "warm"))
            time.sleep(args.settle)
            pids = processes(brain)
            nats_pid = pids.get("nats-server")

            def snapshot() -> dict[str, dict[str, float]]:
                return {name: memory_mb(pid) for name, pid in pids.items()}

            def nats_rollup() -> dict[str, float]:
                return smaps_rollup_mb(nats_pid) if nats_pid else {}

            mem_before = snapshot()
            roll_before = nats_rollup()
            records_before = workloads_of_record(brain)
            js_before = jetstream(brain)
            heap_before = nats_heap(brain)
            print(f"after {args.warmup} warm-up cycles: " + ", ".join(f"{k} {v['rss']:.0f} MB" for k, v in mem_before.items())
                  + f" [load {load()}]", flush=True)
            cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
            started = time.monotonic()
            took = asyncio.run(cycles(brain, args.cycles, args.workers, "m"))
            elapsed = time.monotonic() - started
            cpu = {name: cpu_s(pid) - cpu_before[name] for name, pid in pids.items()}
            mem_peak = snapshot()
            heap_peak = nats_heap(brain, gc=False)
            time.sleep(args.settle)
            mem_after = snapshot()
            roll_after = nats_rollup()
            js_after = jetstream(brain)
            mem_lingered: dict[str, dict[str, float]] = {}
            roll_lingered: dict[str, float] = {}
            samples: list[tuple[float, float]] = []  # (s after the 'after' reading, nats-server MB)
            anon_samples: list[tuple[float, float]] = []
            if args.linger:
                t0 = time.monotonic()
                while (waited := time.monotonic() - t0) < args.linger:
                    time.sleep(min(args.sample_every or args.linger, args.linger - waited))
                    if nats_pid:
                        m = memory_mb(nats_pid)
                        samples.append((time.monotonic() - t0, m["rss"]))
                        anon_samples.append((samples[-1][0], m["anon"]))
                        if args.sample_every:
                            print(f"  {samples[-1][0]:5.0f} s later: nats-server {m['rss']:.1f} MB "
                                  f"(anonymous {m['anon']:.1f}, file {m['file']:.1f}) [load {load()}]", flush=True)
                mem_lingered = snapshot()
                roll_lingered = nats_rollup()
            records_after = workloads_of_record(brain)
            heap_idle = nats_heap(brain, gc=False)
            heap_after = nats_heap(brain)
            nats_after_gc = memory_mb(nats_pid) if nats_pid else {}
            restarted = [n for n, pid in processes(brain).items() if pids.get(n) != pid]
        finally:
            brain.stop()
    before = {n: m["rss"] for n, m in mem_before.items()}
    peak = {n: m["rss"] for n, m in mem_peak.items()}
    after = {n: m["rss"] for n, m in mem_after.items()}
    lingered = {n: m["rss"] for n, m in mem_lingered.items()}
    blocks = [statistics.median(took[i:i + BLOCK]) * 1e3 for i in range(0, len(took), BLOCK)]
    print(f"{args.cycles} deploy → RUNNING → cancel cycles, {args.workers} at a time, in {elapsed:.0f} s "
          f"({args.cycles / elapsed:.1f}/s) [load {load()}]")
    print("deploy → RUNNING p50 per block of 500 (ms): " + " ".join(f"{b:.0f}" for b in blocks))
    print("CPU seconds during the cycles: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print(f"{'process':12s} {'before MB':>10s} {'peak MB':>9s} {'after MB':>9s} {'after/before':>13s}")
    over_after = [n for n in before if after[n] > before[n] * LIMIT]
    over_later = [n for n in lingered if lingered[n] > before[n] * LIMIT]
    for name in before:
        ratio = after[name] / before[name] if before[name] else 0.0
        print(f"{name:12s} {before[name]:10.1f} {peak[name]:9.1f} {after[name]:9.1f} {ratio:12.2f}"
              f"{'' if ratio <= LIMIT else '  over 20 %'}"
              + (f"   {args.linger:.0f} s later: {lingered[name]:.1f} MB ({lingered[name] / before[name]:.2f})"
                 if lingered else ""))
    print("RSS by kind (MB, /proc/PID/status): anonymous (held by the process) + file (its binary's and "
          "libraries' pages, shared page cache) + shmem; before → after" + (" → later" if lingered else ""))
    for name in before:
        row = [mem_before[name], mem_after[name]] + ([mem_lingered[name]] if lingered else [])
        print(f"  {name:12s} " + "   ".join(
            f"{k} " + " → ".join(f"{m[k]:.1f}" for m in row) for k in ("anon", "file", "shmem")))
    if roll_before:
        keys = [k for k in ("Rss", "Anonymous", "AnonHugePages", "Private_Dirty", "Private_Clean", "Shared_Clean",
                            "Swap") if k in roll_before]
        print("nats-server /proc/PID/smaps_rollup (MB) before → after" + (" → later" if roll_lingered else "") + ": "
              + ", ".join(f"{k} " + " → ".join(f"{r.get(k, 0):.1f}" for r in
                                                (roll_before, roll_after, roll_lingered) if r) for k in keys))
    print("JetStream (what nats-server keeps): stream messages / MB / subjects / consumers, before → after")
    for name in sorted(set(js_before) | set(js_after)):
        b, a = js_before.get(name, (0, 0, 0, 0)), js_after.get(name, (0, 0, 0, 0))
        print(f"  {name:24s} {b[0]:7d} → {a[0]:7d} msgs  {b[1] / 1e6:6.1f} → {a[1] / 1e6:6.1f} MB  "
              f"{b[2]:6d} → {a[2]:6d} subjects  {b[3]} → {a[3]} consumers")
    if heap_after:
        print("nats-server's Go heap after a garbage collection, MB before → after: " + ", ".join(
            f"{k} {heap_before[k]:.1f} → {heap_after[k]:.1f}" for k in ("live", "unused", "returned"))
            + " (live: what it references; unused: freed, kept resident for reuse; returned: given back to the OS)")
        print("nats-server's Go runtime (MemStats, MB) before / end of the load / at the last reading, "
              f"no forced GC ({heap_idle['NumGC'] - heap_before['NumGC']:.0f} collections since before): "
              + ", ".join(f"{k} {heap_before[k]:.1f} / {heap_peak[k]:.1f} / {heap_idle[k]:.1f}" for k in GO_SYS))
        print(f"nats-server RSS right after that forced collection: {nats_after_gc['rss']:.1f} MB "
              f"(anonymous {nats_after_gc['anon']:.1f}, file {nats_after_gc['file']:.1f})")
    print(f"workloads of record (the scheduler's ListWorkloads): {records_before} before, {records_after} at the "
          f"last reading (ended ones are kept CNC_SCHEDULER_ENDED_RETENTION_S="
          f"{os.environ.get('CNC_SCHEDULER_ENDED_RETENTION_S', 'default')})")
    if restarted:
        print(f"restarted during the run (their figures are not comparable): {', '.join(restarted)}")
    print(f"{args.settle:.0f} s after the load: " + (f"over 20 % of its RSS before: {', '.join(over_after)}"
                                                    if over_after else "every process within 20 % of its RSS before"))
    if lingered:
        print(f"{args.settle + args.linger:.0f} s after the load: "
              + (f"over 20 % of its RSS before: {', '.join(over_later)}"
                 if over_later else "every process within 20 % of its RSS before"))
    if args.json:
        args.json.write_text(json.dumps({"cycles": args.cycles, "workers": args.workers, "seconds": elapsed,
                                         "p50_ms_per_block": blocks, "cpu_s": cpu, "before_mb": before, "peak_mb": peak,
                                         "after_mb": after, "restarted": restarted,
                                         "linger_s": args.linger, "lingered_mb": lingered,
                                         "memory_before_mb": mem_before, "memory_peak_mb": mem_peak,
                                         "memory_after_mb": mem_after, "memory_lingered_mb": mem_lingered,
                                         "nats_smaps_rollup_mb": {"before": roll_before, "after": roll_after,
                                                                  "lingered": roll_lingered},
                                         "nats_rss_samples": samples, "nats_anon_samples": anon_samples,
                                         "nats_env": {k: os.environ[k] for k in ("GOMEMLIMIT", "GOGC", "GODEBUG")
                                                      if k in os.environ},
                                         "retention_s": os.environ.get("CNC_SCHEDULER_ENDED_RETENTION_S"),
                                         "nats_heap_before_mb": heap_before, "nats_heap_peak_mb": heap_peak,
                                         "nats_heap_idle_mb": heap_idle, "nats_heap_after_mb": heap_after,
                                         "nats_after_forced_gc_mb": nats_after_gc,
                                         "workloads_of_record": [records_before, records_after],
                                         "load": load()}, indent=2))
    if args.plot and samples:
        plot_nats(samples, anon_samples, mem_before["nats-server"], mem_after["nats-server"], args.settle, args.plot)
    return 0


def plot_nats(samples: list[tuple[float, float]], anon: list[tuple[float, float]], before: dict[str, float],
              after: dict[str, float], settle_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = [settle_s / 60] + [(settle_s + t) / 60 for t, _ in samples]
    ax.plot(xs, [after["rss"]] + [mb for _, mb in samples], marker="o", label="nats-server RSS after the load")
    ax.plot(xs, [after["anon"]] + [mb for _, mb in anon], marker=".", color="#dd8452",
            label="of which anonymous (RssAnon)")
    ax.axhline(before["rss"], color="#4c72b0", linestyle=":", label=f"RSS before the load ({before['rss']:.0f} MB)")
    ax.axhline(before["rss"] * LIMIT, color="grey", linestyle="--", label="RSS before + 20 %")
    ax.axhline(before["anon"], color="#dd8452", linestyle=":", label=f"anonymous before ({before['anon']:.0f} MB)")
    _save(fig, ax, path, "RSS (MB)", "bench_memory: nats-server's resident memory once the load is gone")


def _save(fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("minutes after the last cancel")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _label(run: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in run.get("nats_env", {}).items()) or "default"


def compare(paths: list[Path], plot: Path | None) -> None:
    """nats-server in several runs (their --json files): CPU seconds during the cycles, cycles/s,
    RSS before, peak, and RSS / before at each reading after the load."""
    named: list[tuple[str, dict]] = []
    for path in paths:
        data = json.loads(path.read_text())  # one run, or runs by name
        named += [(path.stem, data)] if "cycles" in data else list(data.items())
    for name, run in named:
        before = run["before_mb"]["nats-server"]
        after = run["after_mb"]["nats-server"]
        curve = " ".join(f"{t / 60:.1f} min {mb / before:.2f}" for t, mb in run["nats_rss_samples"][3::4])
        print(f"{name} ({_label(run)}): nats-server CPU {run.get('cpu_s', {}).get('nats-server', float('nan')):.1f} s, "
              f"{run['cycles'] / run['seconds']:.1f} cycles/s [load at the end {run['load']}], RSS before "
              f"{before:.1f} MB, peak {run['peak_mb']['nats-server']:.1f} MB, 20 s after {after / before:.2f}; "
              f"later: {curve}")
    if plot is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for name, run in named:
        before, settle = run["before_mb"]["nats-server"], 20.0
        xs = [settle / 60] + [(settle + t) / 60 for t, _ in run["nats_rss_samples"]]
        ys = [run["after_mb"]["nats-server"] / before] + [mb / before for _, mb in run["nats_rss_samples"]]
        ax.plot(xs, ys, marker=".", label=f"{_label(run)} ({name})")
    ax.axhline(LIMIT, color="grey", linestyle="--", label="target: before + 20 %")
    _save(fig, ax, plot, "nats-server RSS / RSS before", "bench_memory: nats-server after 5000 cycles, by Go runtime setting")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
