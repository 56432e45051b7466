"""Memory under a long deploy/cancel stream: every process of a running brain (`cncbrain up`:
abilene, auth on) should come back within 20 % of its resident memory once the load is gone.

Each cycle deploys a one-replica service (with its request id), waits for its placement to be
applied at the emulated site (the workload RUNNING), and cancels it; `--workers` cycles run at
once. RSS is read from /proc before (after a warm-up of `--warmup` cycles, so imports, caches and
the pool's first services are in) and after the `--cycles` cycles plus `--settle` seconds. It
prints, per process, RSS before and after and their ratio, and the deploy → RUNNING p50 of each
block of 500 cycles (a brain that slows as it ages shows here).

    python -m benchmarks.bench_memory [--cycles 5000] [--workers 8] [--warmup 200] [--json FILE]
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
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


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


def nats_heap(brain: Brain) -> dict[str, float]:
    """nats-server's Go heap right after a garbage collection (its profiling port, `?gc=1`), in MB:
    `live` what it still references, `unused` freed memory the runtime keeps for reuse (still
    resident), `returned` what it gave back to the OS."""
    import re
    import urllib.request

    if not (brain.nats and brain.nats.profile_url):
        return {}
    with urllib.request.urlopen(f"{brain.nats.profile_url}/debug/pprof/heap?debug=1&gc=1", timeout=30) as r:
        text = r.read().decode(errors="replace")
    stats = {k: int(v) / 1e6 for k, v in re.findall(r"^# (\w+) = (\d+)$", text, re.MULTILINE)}
    return {"live": stats["HeapAlloc"], "unused": stats["HeapIdle"] - stats["HeapReleased"],
            "returned": stats["HeapReleased"]}


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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        brain = Brain(args.keep or Path(tmp), "abilene", nats_port=0, perception_port=0, scheduler_port=0, governance_port=0,
                      adaptation_port=0, speed=30.0, fresh=True, auth=True, nats_profile=True)
        print(f"starting the brain … [load {load()}]", flush=True)
        brain.start()
        try:
            asyncio.run(cycles(brain, args.warmup, args.workers, "warm"))
            time.sleep(args.settle)
            pids = processes(brain)
            before = {name: rss_mb(pid) for name, pid in pids.items()}
            js_before = jetstream(brain)
            heap_before = nats_heap(brain)
            print(f"after {args.warmup} warm-up cycles: " + ", ".join(f"{k} {v:.0f} MB" for k, v in before.items())
                  + f" [load {load()}]", flush=True)
            started = time.monotonic()
            took = asyncio.run(cycles(brain, args.cycles, args.workers, "m"))
            elapsed = time.monotonic() - started
            peak = {name: rss_mb(pid) for name, pid in pids.items()}
            time.sleep(args.settle)
            after = {name: rss_mb(pid) for name, pid in pids.items()}
            js_after = jetstream(brain)
            lingered: dict[str, float] = {}
            samples: list[tuple[float, float]] = []  # (s after the 'after' reading, nats-server MB)
            if args.linger:
                t0 = time.monotonic()
                while (waited := time.monotonic() - t0) < args.linger:
                    time.sleep(min(args.sample_every or args.linger, args.linger - waited))
                    if "nats-server" in pids:
                        samples.append((time.monotonic() - t0, rss_mb(pids["nats-server"])))
                        if args.sample_every:
                            print(f"  {samples[-1][0]:5.0f} s later: nats-server {samples[-1][1]:.1f} MB "
                                  f"[load {load()}]", flush=True)
                lingered = {name: rss_mb(pid) for name, pid in pids.items()}
            heap_after = nats_heap(brain)
            restarted = [n for n, pid in processes(brain).items() if pids.get(n) != pid]
        finally:
            brain.stop()
    blocks = [statistics.median(took[i:i + BLOCK]) * 1e3 for i in range(0, len(took), BLOCK)]
    print(f"{args.cycles} deploy → RUNNING → cancel cycles, {args.workers} at a time, in {elapsed:.0f} s "
          f"({args.cycles / elapsed:.1f}/s) [load {load()}]")
    print("deploy → RUNNING p50 per block of 500 (ms): " + " ".join(f"{b:.0f}" for b in blocks))
    print(f"{'process':12s} {'before MB':>10s} {'peak MB':>9s} {'after MB':>9s} {'after/before':>13s}")
    ok = True
    for name in before:
        ratio = after[name] / before[name] if before[name] else 0.0
        ok &= ratio <= LIMIT
        print(f"{name:12s} {before[name]:10.1f} {peak[name]:9.1f} {after[name]:9.1f} {ratio:12.2f}"
              f"{'' if ratio <= LIMIT else '  over 20 %'}"
              + (f"   {args.linger:.0f} s later: {lingered[name]:.1f} MB ({lingered[name] / before[name]:.2f})"
                 if lingered else ""))
    print("JetStream (what nats-server keeps): stream messages / MB / subjects / consumers, before → after")
    for name in sorted(set(js_before) | set(js_after)):
        b, a = js_before.get(name, (0, 0, 0, 0)), js_after.get(name, (0, 0, 0, 0))
        print(f"  {name:24s} {b[0]:7d} → {a[0]:7d} msgs  {b[1] / 1e6:6.1f} → {a[1] / 1e6:6.1f} MB  "
              f"{b[2]:6d} → {a[2]:6d} subjects  {b[3]} → {a[3]} consumers")
    if heap_after:
        print("nats-server's Go heap after a garbage collection, MB before → after: " + ", ".join(
            f"{k} {heap_before[k]:.1f} → {heap_after[k]:.1f}" for k in ("live", "unused", "returned"))
            + " (live: what it references; unused: freed, kept resident for reuse; returned: given back to the OS)")
    if restarted:
        print(f"restarted during the run (their figures are not comparable): {', '.join(restarted)}")
    print("every process within 20 % of its RSS before" if ok else "SOME PROCESS GREW BY MORE THAN 20 %")
    if args.json:
        args.json.write_text(json.dumps({"cycles": args.cycles, "workers": args.workers, "seconds": elapsed,
                                         "p50_ms_per_block": blocks, "before_mb": before, "peak_mb": peak,
                                         "after_mb": after, "restarted": restarted,
                                         "linger_s": args.linger, "lingered_mb": lingered,
                                         "nats_rss_samples": samples,
                                         "nats_env": {k: os.environ[k] for k in ("GOMEMLIMIT", "GOGC", "GODEBUG")
                                                      if k in os.environ},
                                         "nats_heap_before_mb": heap_before, "nats_heap_after_mb": heap_after,
                                         "load": load()}, indent=2))
    if args.plot and samples:
        plot_nats(samples, before["nats-server"], after["nats-server"], args.settle, args.plot)
    return 0


def plot_nats(samples: list[tuple[float, float]], before: float, after: float, settle_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    xs = [settle_s / 60] + [(settle_s + t) / 60 for t, _ in samples]
    ax.plot(xs, [after] + [mb for _, mb in samples], marker="o", label="nats-server RSS after the load")
    ax.axhline(before, color="#4c72b0", linestyle=":", label=f"before the load ({before:.0f} MB)")
    ax.axhline(before * LIMIT, color="grey", linestyle="--", label="before + 20 %")
    ax.set_xlabel("minutes after the last cancel")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("bench_memory: nats-server's resident memory once the load is gone")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
