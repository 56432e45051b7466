"""What the operations instrumentation adds to the deploy path, per deploy, in CPU microseconds
(print only; compare run to run on the same machine):

- scheduler: the deploy → commit histogram and the `commit` span (bare, as with no exporter);
- site agents (one process hosting 11 sites, as under `up`): the round's answer-time histogram, the
  per-site offer counters, the `answer <site>` check (nothing recorded without an exporter), and per
  placement the `apply <site>` span and its counter;
- a pending workload's reason (`why_unplaced`), once per offer round that does not place it;
- perception, per tick: the snapshot exported as gauges (11 sites, 24 GPU pools, 4 services), and
  per telemetry message the request counters;
- a scrape of a process's /metrics (in the endpoint's thread, not the event loop).

    python -m benchmarks.bench_observability [--sites 11]
"""

from __future__ import annotations

import argparse
import os
import timeit

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import metrics, telemetry
from services.perception.events import export_snapshot
from services.scheduler.domain import Inventory, Need, why_unplaced


def per_call_us(fn, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e6


def snapshot(sites: int) -> ppb.Snapshot:
    snap = ppb.Snapshot(sequence=1)
    for i in range(sites):
        s = snap.sites.add(state=common.SITE_STATE_UP)
        s.site.site_id = f"site-{i}"
        s.gpu_pools.add(gpu_type="H100", count=32, used=i)
        s.gpu_pools.add(gpu_type="L40S", count=16, used=2)
        s.jobs.add(workload_id="job-1", progress=0.4)
    for k in range(4):
        snap.services.add(workload_id=f"svc-{k}", replicas=6, request_rate_rps=12.0, requests=300, requests_ok=297)
    return snap


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_observability")
    ap.add_argument("--sites", type=int, default=11)
    args = ap.parse_args(argv)
    telemetry.setup("bench-observability", "none", log_level="WARNING")  # as every process: no exporter
    sites = [f"site-{i}" for i in range(args.sites)]

    def scheduler_commit():
        with telemetry.span("cncbrain.scheduler", "commit", attributes=None):
            pass
        metrics.DEPLOY_TO_COMMIT.labels("inference").observe(0.012)

    declined = [metrics.AGENT_OFFERS.labels(site, "decline") for site in sites]  # as SiteAgent keeps them
    applied = metrics.AGENT_APPLIED.labels("site-0", "ok")

    def agents_round():
        metrics.AGENT_ANSWER.labels("greedy").observe(0.0004)
        for child in declined:
            child.inc(1)
        telemetry.recording()

    def agent_apply():
        with telemetry.span("cncbrain.agent", "apply site-0", attributes={"cnc.site": "site-0"}):
            pass
        applied.inc()

    inventory = Inventory()
    for site in sites:
        inventory.set_site(site, [common.GpuPool(gpu_type="H100", count=32, hbm_gb=80),
                               common.GpuPool(gpu_type="L40S", count=16, hbm_gb=48)], True)
    proposals = [site_pb.Proposal(site_id=s, units=0, reason="busy") for s in sites]

    def reason():
        why_unplaced(Need(4, 8, (), 30.0), inventory, proposals, training=True)

    snap = snapshot(args.sites)
    telemetry_msg = site_pb.SiteTelemetry(site_id="site-0")
    for k in range(4):
        telemetry_msg.services.add(workload_id=f"svc-{k}", requests=30, requests_ok=29)

    def perception_telemetry():
        for load in telemetry_msg.services:
            metrics.SERVICE_REQUESTS.labels(load.workload_id, "met").inc(load.requests_ok)
            metrics.SERVICE_REQUESTS.labels(load.workload_id, "missed").inc(load.requests - load.requests_ok)

    from prometheus_client import generate_latest

    export_snapshot(snap)
    rows = [
        ("scheduler, per commit: histogram + commit span", per_call_us(scheduler_commit, 20_000)),
        (f"agents, per offer round ({args.sites} sites): histogram + counters", per_call_us(agents_round, 5_000)),
        ("agents, per placement applied: apply span + counter", per_call_us(agent_apply, 20_000)),
        ("scheduler, per unplaced workload and round: why_unplaced", per_call_us(reason, 5_000)),
        (f"perception, per tick: snapshot to gauges ({args.sites} sites)", per_call_us(lambda: export_snapshot(snap), 2_000)),
        ("perception, per telemetry message: request counters", per_call_us(perception_telemetry, 20_000)),
        ("any process, one scrape of /metrics (endpoint thread)", per_call_us(generate_latest, 200)),
    ]
    load = os.getloadavg()
    print(f"CPU µs per call, best of 5 (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}):")
    for what, us in rows:
        print(f"  {us:9.1f} µs  {what}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
