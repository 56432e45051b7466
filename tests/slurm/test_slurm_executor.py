"""The Slurm executor against a real slurmctld/slurmd: placements become jobs, re-applying changes
nothing, scale-down cancels the right jobs, a gang starts whole, failures are retried then fatal,
an unreachable cluster is waited out."""

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest

from agents.executor_slurm import SlurmExecutor, SlurmSettings
from cnc.common.v1 import common_pb2 as common
from cncbrain.errors import CncError

from support.slurm import Reports, no_telemetry, service, squeue, train_template, training
from support.waiting import until

pytestmark = pytest.mark.integration


async def running(cluster, prefix, n, what=None):
    async def check():
        jobs = [j for j in squeue(cluster, prefix) if j["state"] == "RUNNING"]
        return jobs if len(jobs) == n else None
    return await until(check, 30, what or f"{n} running jobs {prefix}*", poll_s=0.2)


def health(workdir: Path, name: str, job_id: str) -> dict:
    """GET /health of the replica whose output file says where it serves."""
    out = workdir / f"{name}.{job_id}.out"
    text = out.read_text() if out.exists() else ""
    m = re.search(r"serving on http://[^:]+:(\d+)", text)
    if not m:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/health", timeout=5) as r:
        return json.loads(r.read()) if r.status == 200 else {}


async def test_replicas_run_as_jobs_with_their_gres_and_answer_health(executor_for, slurm):
    ex = executor_for("s1")
    site = await ex.inventory()
    assert {p.gpu_type: p.count for p in site.gpu_pools} == {"H100": 8, "L40S": 2}
    await ex.start(no_telemetry, Reports())
    ok, err = await ex.apply(service("s1", "svc-a", 3))
    assert ok, err
    jobs = await running(slurm, "cnc.s1.svc-a.", 3)
    assert sorted(j["name"] for j in jobs) == ["cnc.s1.svc-a.r0", "cnc.s1.svc-a.r1", "cnc.s1.svc-a.r2"]
    assert {j["gres"] for j in jobs} == {"gres:gpu:h100:2"}
    for j in jobs:
        got = await until(lambda j=j: asyncio.to_thread(health, ex.workdir, j["name"], j["id"]), 20, "health")
        assert got["status"] == "ok" and got["CNC_WORKLOAD_ID"] == "svc-a" and got["CNC_SITE_ID"] == "s1"
        assert got["CNC_UNIT_INDEX"] == j["name"][-1] and got["CNC_GPUS"] == "2" and got["CNC_GPU_TYPE"] == "H100"
    t = await ex.poll()
    assert {(p.gpu_type, p.count, p.used) for p in t.gpu_pools} == {("H100", 8, 6), ("L40S", 2, 0)}
    assert [(s.workload_id, s.replicas) for s in t.services] == [("svc-a", 3)]
    # the same placement again, and a poll, submit nothing
    ids = sorted(j["id"] for j in jobs)
    assert (await ex.apply(service("s1", "svc-a", 3))) == (True, "")
    await ex.poll()
    assert sorted(j["id"] for j in squeue(slurm, "cnc.s1.", "pending,running")) == ids
    await ex.stop()


async def test_scale_down_cancels_pending_replicas_first_then_the_highest(executor_for, slurm):
    ex = executor_for("s2")
    await ex.inventory()
    await ex.start(no_telemetry, Reports())
    assert (await ex.apply(service("s2", "svc-b", 4, gpus=3))) == (True, "")  # 2 nodes × 4 H100: 2 fit
    await running(slurm, "cnc.s2.", 2)
    pending = {j["name"] for j in squeue(slurm, "cnc.s2.", "pending")}
    assert len(pending) == 2
    assert (await ex.apply(service("s2", "svc-b", 2, generation=2, gpus=3))) == (True, "")
    left = await until(lambda: _ready(squeue(slurm, "cnc.s2.", "pending,running"), 2), 15, "2 left")
    assert {j["state"] for j in left} == {"RUNNING"} and not pending & {j["name"] for j in left}
    assert (await ex.apply(service("s2", "svc-b", 1, generation=3, gpus=3))) == (True, "")
    left = await until(lambda: _ready(squeue(slurm, "cnc.s2.", "pending,running"), 1), 15, "1 left")
    assert left[0]["name"] == min(j["name"] for j in squeue(slurm, "cnc.s2.", "running"))
    assert (await ex.apply(service("s2", "svc-b", 0, generation=4, gpus=3))) == (True, "")  # cancelled
    await until(lambda: _ready(squeue(slurm, "cnc.s2.", "pending,running"), 0), 15, "none left")
    await ex.stop()


async def _ready(jobs, n):
    return (jobs or True) if len(jobs) == n else None


async def test_a_training_gang_starts_whole_as_one_job_with_a_task_per_shard(executor_for, slurm):
    ex = executor_for("s3")
    await ex.inventory()
    await ex.start(no_telemetry, Reports())
    blocker = slurm.run("sbatch", "--parsable", "-p", "site-a", "--gres=gpu:h100:3", "-o", "/dev/null",
                        "--wrap", "sleep 300").stdout.strip()
    await until(lambda: any(j["id"] == blocker and j["state"] == "RUNNING" for j in squeue(slurm, "")),
                20, "blocker running")
    # 3 shards × 2 H100 = 6 GPUs, 5 free: none of the shards may start
    ok, err = await ex.apply(training("s3", "job-a", [1, 3, 4], world=6, template=train_template(3)))
    assert ok, err
    await asyncio.sleep(2)
    (job,) = squeue(slurm, "cnc.s3.")
    assert job["state"] == "PENDING" and job["tasks"] == "3" and job["task_gres"] == "gres:gpu:h100:2"
    assert not list(ex.workdir.glob("cnc.s3.job-a.gang.*.out"))  # nothing ran
    slurm.run("scancel", blocker)
    # room for all three: they start together, each told who it is and who its peers are
    await running(slurm, "cnc.s3.", 1)
    text = await until(lambda: _lines(ex.workdir, 3), 20, "the three shards started")
    for i in (1, 3, 4):
        assert f"shard {i} of 6 (workload job-a, peers 1=127.0.0.1,3=127.0.0.1,4=127.0.0.1)" in text
    t = await ex.poll()
    assert [(j.workload_id, j.shards_running, j.finished) for j in t.jobs] == [("job-a", 3, False)]
    assert {(p.gpu_type, p.used) for p in t.gpu_pools} >= {("H100", 6)}
    # the shards finish: the site reports the job finished
    t = await until(lambda: _finished(ex), 30, "gang finished")
    assert t.jobs[0].progress == 1.0
    await ex.stop()


async def _lines(workdir, n):
    """The gang's output once `n` shards have said who they are (the file appears as the job starts)."""
    out = next(workdir.glob("cnc.s3.job-a.gang.*.out"), None)
    text = out.read_text() if out is not None else ""
    return text if text.count("shard ") >= n else None


async def _finished(ex):
    t = await ex.poll()
    return t if t is not None and t.jobs and t.jobs[0].finished else None


async def test_a_failing_job_is_reported_retried_then_the_workload_given_up(executor_for, slurm):
    ex = executor_for("s4", max_retries=1)
    await ex.inventory()
    reports = Reports()
    await ex.start(no_telemetry, reports)
    fail = common.WorkloadTemplate(command="/bin/sh", args=["-c", "echo boom >&2; exit 3"])
    assert (await ex.apply(service("s4", "svc-f", 1, template=fail))) == (True, "")
    await until(lambda: any(r[4] for r in reports.items), 30, "given up")
    retries = [r for r in reports.items if not r[4]]
    final = [r for r in reports.items if r[4]]
    assert len(retries) == 1 and "retry 1 of 1" in retries[0][3] and "exit code 3:0" in retries[0][3]
    assert len(final) == 1 and "retries (1) spent" in final[0][3] and "exit code 3:0" in final[0][3]
    await asyncio.sleep(1)
    assert not squeue(slurm, "cnc.s4.", "pending,running")  # no more submissions once given up
    # a placement the site cannot run at all is refused at once, with the reason (the scheduler
    # takes it elsewhere), and nothing is submitted for it
    ok, err = await ex.apply(service("s4", "svc-g", 1, gpus=8))
    assert not ok and "needs 8 H100 GPUs on one node" in err and len(reports.items) == 2
    ok, err = await ex.apply(service("s4", "svc-h", 1, template=common.WorkloadTemplate()))
    assert not ok and "no command" in err and "CNC_SLURM_DEFAULT_COMMAND" in err
    ok, err = await ex.apply(service("s4", "svc-i", 1, template=common.WorkloadTemplate(image="nginx:1")))
    assert not ok and "runs no images" in err
    await ex.stop()



async def test_unreachable_cluster_keeps_placements_and_reconciles_when_back(executor_for, slurm):
    ex = executor_for("s5", command_timeout_s=2)
    await ex.inventory()
    reports = Reports()
    await ex.start(no_telemetry, reports)
    assert (await ex.apply(service("s5", "svc-u", 1))) == (True, "")
    await running(slurm, "cnc.s5.", 1)
    slurm.stop_controller()
    try:
        await until(lambda: not ex.available(), 20, "site unavailable")
        ok, err = await ex.apply(service("s5", "svc-u", 2, generation=2))
        assert not ok and "kept" in err
        ok, err = await ex.apply(service("s5", "svc-v", 1))
        assert not ok and "kept" in err
    finally:
        slurm.start_controller()
    await until(lambda: ex.available(), 30, "site available again")
    await running(slurm, "cnc.s5.", 3)
    assert sorted(j["name"] for j in squeue(slurm, "cnc.s5.", "running")) == [
        "cnc.s5.svc-u.r0", "cnc.s5.svc-u.r1", "cnc.s5.svc-v.r0"]
    assert {(r[0], r[1]) for r in reports.items if r[2]} == {("svc-u", 2), ("svc-v", 1)}  # applied late, reported
    await ex.stop()


async def test_a_bad_setting_stops_the_agent_with_one_error_naming_it(slurm, tmp_path):
    async def fails(settings, words):
        with pytest.raises(CncError) as err:
            await SlurmExecutor("bad", settings).inventory()
        assert all(w in str(err.value) for w in words), str(err.value)

    await fails(SlurmSettings(conf=str(tmp_path / "nope.conf")), ["CNC_SLURM_CONF", "is not a file"])
    await fails(SlurmSettings(conf=str(slurm.conf), partition="gpu"),
                ["CNC_SLURM_PARTITION", "'gpu' is not a partition", "site-a"])
    await fails(SlurmSettings(conf=str(slurm.conf), bin_dir=str(tmp_path)), ["CNC_SLURM_BIN_DIR", "sbatch"])
    dead = tmp_path / "dead.conf"
    dead.write_text(slurm.conf.read_text().replace(f"SlurmctldPort={slurm.ctld_port}", "SlurmctldPort=9"))
    await fails(SlurmSettings(conf=str(dead), command_timeout_s=2), ["CNC_SLURM_CONF", "does not answer"])


def test_the_agent_command_stops_with_one_error_naming_the_setting(slurm, nats_server):
    import subprocess
    import sys

    def agent(*args):
        return subprocess.run([sys.executable, "-m", "cncbrain.commands.agent", "--executor", "slurm",
                               "--nats-url", nats_server.url, "--policy", "greedy", *args],
                              capture_output=True, text=True, timeout=60)

    r = agent("--site", "x", "--slurm-conf", str(slurm.conf), "--slurm-partition", "nope")
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr  # a usage error: exit 2
    assert "CNC_SLURM_PARTITION (--slurm-partition) 'nope' is not a partition" in r.stderr
    r = agent("--site", "x", "--slurm-poll-s", "-1")
    assert r.returncode == 2 and "CNC_SLURM_POLL_S" in r.stderr, r.stderr
    r = agent("--site", "x", "--slurm-gpu-type", "h100")
    assert r.returncode == 2 and "is not GRES_TYPE=GPU_NAME" in r.stderr, r.stderr
    r = agent("--site", "x", "--site", "y")
    assert r.returncode == 2 and "one site per process" in r.stderr, r.stderr
