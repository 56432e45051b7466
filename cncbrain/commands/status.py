"""`cncbrain status`: the pool at a glance — sites up and down, GPUs by type used and free — and
what waits for placement, with the reason each waits (like `ray status` or Kueue's pending view)."""

from __future__ import annotations

import argparse
import time

import grpc

from cncbrain import aio
from cncbrain.commands._live import add_target_args, channel, endpoints, rpc_error, target
from cncbrain.commands._output import add_output_arg, print_json, show, wants_json


def gpu_counts(sites) -> tuple[dict[str, dict[str, int]], list[str]]:
    """GPUs by type over perception's site statuses — count = used + free + down, where a down site's
    GPUs count as down only (whatever it last reported in use) and a site reporting more in use than
    it has counts as full — and the ids of the sites not up."""
    from cnc.common.v1 import common_pb2 as common

    gpus: dict[str, dict[str, int]] = {}
    down = []
    for s in sites:
        up = s.state == common.SITE_STATE_UP
        if not up:
            down.append(s.site.site_id)
        for p in s.gpu_pools:
            g = gpus.setdefault(p.gpu_type, {"count": 0, "used": 0, "free": 0, "down": 0})
            g["count"] += p.count
            if up:
                used = min(p.used, p.count)
                g["used"] += used
                g["free"] += p.count - used
            else:
                g["down"] += p.count
    return gpus, down


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the pool (sites, GPUs by type used/free) and what waits, with reasons")
    p.add_argument("--failed", type=int, default=5, metavar="N", help="also list the N most recent failures (default 5)")
    add_target_args(p, "perception", "scheduler")
    add_output_arg(p)
    p.set_defaults(func=run)


def collect(args: argparse.Namespace) -> dict:
    from cnc.common.v1 import common_pb2 as common
    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    perception, scheduler = target(args, "perception"), target(args, "scheduler")

    async def ask(address: str, fn):
        async with channel(address) as ch:
            try:
                return await fn(ch)
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, address) from None

    async def call():
        snap = (await ask(perception, lambda ch: perception_pb2_grpc.PerceptionServiceStub(ch).GetSnapshot(
            ppb.GetSnapshotRequest(), timeout=5))).snapshot
        workloads = (await ask(scheduler, lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).ListWorkloads(
            spb.ListWorkloadsRequest(), timeout=5))).workloads
        return snap, list(workloads)

    snap, workloads = aio.run(call())
    now = time.time()
    gpus, down = gpu_counts(snap.sites)
    by_state: dict[str, int] = {}
    for w in workloads:
        key = spb.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_").lower()
        by_state[key] = by_state.get(key, 0) + 1

    def row(w) -> dict:
        job, service = w.training_job, w.inference_service
        training = w.kind == common.WORKLOAD_KIND_TRAINING_JOB
        units = job.shards if training else service.min_replicas
        per = job.gpus_per_shard if training else service.gpus_per_replica
        spec = job if w.WhichOneof("spec") == "training_job" else service  # an unset spec reads as empty
        return {"workload_id": w.workload_id, "name": spec.name, "tenant": spec.tenant,
                "kind": "training_job" if w.kind == common.WORKLOAD_KIND_TRAINING_JOB else "inference_service",
                "gpus": f"{units}×{per}", "since_s": round(now - w.created_at.ToNanoseconds() / 1e9, 1),
                "reason": w.message}

    waiting = sorted((w for w in workloads if w.state == spb.WORKLOAD_STATE_PENDING), key=lambda w: w.created_at.ToNanoseconds())
    failed = sorted((w for w in workloads if w.state == spb.WORKLOAD_STATE_FAILED),
                    key=lambda w: w.updated_at.ToNanoseconds(), reverse=True)[: max(0, args.failed)]
    found = endpoints()
    return {
        "sites": {"total": len(snap.sites), "up": snap.sites_up, "down": sorted(down)},
        "gpus": [{"gpu_type": t, **v} for t, v in sorted(gpus.items())],
        "workloads": dict(sorted(by_state.items())),
        "waiting": [row(w) for w in waiting],
        "failed": [row(w) for w in failed],
        "web": found.get("web", ""),
        "snapshot_sequence": snap.sequence,
    }


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    data = collect(args)
    if wants_json(args):
        print_json(data)
        return 0
    sites = data["sites"]
    down = f"  down: {', '.join(sites['down'])}" if sites["down"] else ""
    total = sum(g["count"] for g in data["gpus"])
    used = sum(g["used"] for g in data["gpus"])
    print(f"sites  {sites['up']}/{sites['total']} up{down}")
    print(f"GPUs   {used}/{total} used  ·  workloads: "
          + (", ".join(f"{n} {s}" for s, n in data["workloads"].items()) or "none"))
    if data["web"]:
        print(f"web    {data['web']}")
    print()
    table = Table(title="GPUs by type")
    for col in ("type", "total", "used", "free", "on down sites"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for g in data["gpus"]:
        table.add_row(g["gpu_type"], str(g["count"]), str(g["used"]), str(g["free"]), str(g["down"]))
    show(table)
    for title, rows in (("waiting", data["waiting"]), ("recently failed", data["failed"])):
        print()
        if not rows:
            print(f"{title}: none")
            continue
        table = Table(title=title)
        for col in ("workload", "name", "kind", "GPUs", "for", "reason"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["workload_id"], r["name"], r["kind"].replace("_", " "), r["gpus"], f"{r['since_s']:.0f} s",
                          r["reason"] or "(first offer round not over yet)")
        show(table)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["status", *sys.argv[1:]]))
