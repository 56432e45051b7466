"""Helpers of the Slurm tests: placements to apply, what the cluster runs (seen with squeue, not
through the executor), a report sink."""

from __future__ import annotations

import sys

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain.slurm_local import LocalSlurm


def serve_template(*extra: str) -> common.WorkloadTemplate:
    return common.WorkloadTemplate(command=sys.executable, args=["-m", "agents.demo_workload", "serve", *extra])


def train_template(seconds: float = 60.0) -> common.WorkloadTemplate:
    return common.WorkloadTemplate(command=sys.executable, args=["-m", "agents.demo_workload", "train", "--seconds",
                                                                 str(seconds), "--step-s", "0.2"])


def service(site: str, wid: str, replicas: int, generation: int = 1, gpus: int = 2, gpu: str = "H100",
            template: common.WorkloadTemplate | None = None) -> spb.PlacementCommitted:
    spec = common.InferenceServiceSpec(name=wid, model="7b", params_b=7, min_replicas=1, max_replicas=16,
                                       gpus_per_replica=gpus, template=template or serve_template())
    return spb.PlacementCommitted(placement=common.Placement(
        workload_id=wid, kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, site_id=site, generation=generation,
        replicas=replicas, gpu_type=gpu, gpus_per_unit=gpus), inference_service=spec)


def training(site: str, wid: str, shards: list[int], world: int, generation: int = 1, gpus: int = 2,
             gpu: str = "H100", template: common.WorkloadTemplate | None = None) -> spb.PlacementCommitted:
    spec = common.TrainingJobSpec(name=wid, model="1b", params_b=1, shards=world, gpus_per_shard=gpus, tokens=1e9,
                                  template=template or train_template())
    return spb.PlacementCommitted(placement=common.Placement(
        workload_id=wid, kind=common.WORKLOAD_KIND_TRAINING_JOB, site_id=site, generation=generation,
        shard_indices=shards, gpu_type=gpu, gpus_per_unit=gpus), training_job=spec)


def squeue(cluster: LocalSlurm, prefix: str, states: str = "all") -> list[dict[str, str]]:
    """The cluster's jobs whose names start with `prefix`, as the test sees them (not through the executor)."""
    out = cluster.run("squeue", "-h", "-t", states, "-O",
                      "JobID:|,Name:|,State:|,tres-per-node:|,tres-per-task:|,NodeList:|,NumTasks:|").stdout
    keys = ("id", "name", "state", "gres", "task_gres", "nodes", "tasks")
    return [dict(zip(keys, line.split("|")[:7], strict=True)) for line in out.splitlines()
            if line.split("|")[1].startswith(prefix)]


async def no_telemetry(_):
    return None


class Reports:
    """What the executor reports after `apply` returned."""

    def __init__(self):
        self.items: list[tuple[str, int, bool, str, bool]] = []

    async def __call__(self, p, ok, error, failed):
        self.items.append((p.workload_id, p.generation, ok, error, failed))
