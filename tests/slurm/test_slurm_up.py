"""`cncbrain up --slurm-site`: a mixed pool, the scenario's emulated sites beside sites on a Slurm
cluster that `up` starts on this machine; a deploy there becomes real jobs."""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cncbrain.natsserver import free_port
from cncbrain.slurm_local import missing

from support.cli import cli, command

pytestmark = [pytest.mark.integration, pytest.mark.skipif(missing() is not None, reason=missing() or "")]


def test_up_runs_slurm_sites_beside_the_emulated_ones_and_deploys_become_jobs(tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "CNC_STATE_DIR": str(state)}
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([*command("up"), "--nats-port", str(ports[0]), "--perception-port", str(ports[1]),
                             "--scheduler-port", str(ports[2]), "--state-dir", str(state), "--policy", "greedy", "--background-nice", "0",
                             "--slurm-site", "chicago=L4:2", "--slurm-site", "lab=H200:4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops everything" in line or proc.poll() is not None:
                break
        text = "".join(lines)
        assert "12 site agents registered" in text, text
        found = re.search(r"slurm +lab \(H200 4\): real jobs; SLURM_CONF=(\S+) squeue", text)
        assert found, text
        conf = found.group(1)
        sites = {s["site"]["site_id"]: s["site"] for s in json.loads(cli("sites", "--json", env=env).stdout)}
        assert {(p["gpu_type"], p["count"]) for p in sites["chicago"]["gpu_pools"]} == {("L4", 2)}
        assert sites["chicago"]["links"] and sites["chicago"]["name"] == "Chicago"  # its place in the scenario
        assert {(p["gpu_type"], p["count"]) for p in sites["lab"]["gpu_pools"]} == {("H200", 4)}
        assert sites["lab"]["links"] == []
        dep = cli("deploy", "--name", "chat", "--model", "7b", "--min-replicas", "2", "--max-replicas", "2",
                  "--gpu-type", "H200", "--gpus-per-replica", "2", env=env)
        assert dep.returncode == 0, dep.stderr
        wid = dep.stdout.split()[0]
        slurm_env = {**os.environ, "SLURM_CONF": conf}
        jobs = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(jobs) < 2:
            out = subprocess.run(["squeue", "-h", "-t", "running", "-O", "JobID:|,Name:|,tres-per-node:|"],
                                 env=slurm_env, capture_output=True, text=True).stdout
            jobs = [line.split("|")[:3] for line in out.splitlines() if f".{wid}." in line]
            time.sleep(0.5)
        assert sorted(j[1] for j in jobs) == [f"cnc.lab.{wid}.r0", f"cnc.lab.{wid}.r1"], jobs
        assert {j[2] for j in jobs} == {"gres:gpu:h200:2"}
        work = state / "slurm" / "work" / "lab"
        for job_id, name, _ in jobs:  # the default command: the demo workload, serving /health
            deadline = time.monotonic() + 30
            port = None
            while port is None and time.monotonic() < deadline:
                out = work / f"{name}.{job_id}.out"
                m = re.search(r"serving on http://\S+:(\d+)", out.read_text() if out.exists() else "")
                port = m and m.group(1)
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                assert json.loads(r.read())["CNC_WORKLOAD_ID"] == wid
        assert cli("cancel", wid, env=env).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and jobs:
            out = subprocess.run(["squeue", "-h", "-t", "pending,running", "-O", "Name:|"], env=slurm_env,
                                 capture_output=True, text=True).stdout
            jobs = [x for x in out.splitlines() if wid in x]
            time.sleep(0.3)
        assert not jobs, "cancel left jobs behind"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped." in out
        left = [(p / "cmdline").read_bytes() for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, conf)]
        assert not left, f"processes left: {left}"
    finally:
        if proc.poll() is None:  # a failed assertion: up stops what it started (its Slurm too) …
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid_dir in Path("/proc").iterdir():  # … and whatever outlived it (its children have sessions of their own)
            if pid_dir.name.isdigit() and _mentions(pid_dir, str(state), "environ"):
                with contextlib.suppress(OSError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)


def _mentions(pid_dir: Path, text: str, *where: str) -> bool:
    try:
        return any(text.encode() in (pid_dir / w).read_bytes() for w in ("cmdline", *where))
    except OSError:
        return False
