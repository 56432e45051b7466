"""Talking to a Slurm cluster through its commands (`sbatch`, `squeue`, `sinfo`, `scontrol`,
`scancel`): run with a timeout and a scrubbed environment, parse their parsable output.

Why the commands and not slurmrestd: they are on every submit host, authenticate as the agent's Unix
user through munge with nothing more to set up (slurmrestd needs JWT keys or a local socket and a
daemon the site may not run), and their delimited output (`-O Field:|`) has kept its shape across
releases, where the REST and `--json` schemas change with each one (v0.0.38 in 22.05, another in
every release since). docs/executors.md says more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Node states (`sinfo -O StateComplete`, words joined by "+") that take a node's GPUs out of use.
UNUSABLE = frozenset({"down", "drain", "drained", "draining", "fail", "failing", "not_responding", "inval",
                      "invalid", "future", "maint", "powered_down", "power_down", "powering_down", "powering_up",
                      "reboot_issued", "reboot_requested", "unknown", "no_respond"})
# Job states that still hold (or wait for) resources.
LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                  "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
# Ends that are the cluster's doing, not the workload's: resubmitted without counting a failure.
CLUSTER_FAULT = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REVOKED"})
# Text of a client command's error when the controller cannot be reached (the error is transient).
UNREACHABLE = re.compile(r"unable to contact slurm controller|socket timed out|connection refused|"
                         r"communication connection failure|zero bytes were transmitted|timed out|"
                         r"backup controller|connection reset|munge", re.IGNORECASE)
COMMANDS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


class SlurmError(Exception):
    """A Slurm command failed. `transient`: the cluster did not answer (try again later)."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class SlurmNode:
    name: str
    states: frozenset[str]
    gpus: dict[str, int]
    """GPUs by GRES type, e.g. {"h100": 4}."""
    used: dict[str, int]
    reason: str = ""

    @property
    def usable(self) -> bool:
        return not (self.states & UNUSABLE)


@dataclass(frozen=True)
class SlurmJob:
    job_id: int
    het_id: int
    """The heterogeneous job's leader id (the job's own id when it is not heterogeneous)."""
    het_offset: int
    name: str
    state: str
    reason: str
    nodes: str
    comment: str

    @property
    def live(self) -> bool:
        return self.state in LIVE


def parse_gres(text: str) -> dict[str, int]:
    """GPU counts by type of a `Gres`/`GresUsed` field: "gpu:h100:4,gpu:a100:2(S:0)" → {"h100": 4,
    "a100": 2}; an untyped "gpu:4" counts under "" ."""
    out: dict[str, int] = {}
    for part in re.split(r",(?![^(]*\))", text or ""):
        part = re.sub(r"\(.*?\)", "", part).strip()
        bits = part.split(":")
        if bits[0] != "gpu" or len(bits) < 2:
            continue
        if len(bits) == 2:
            gtype, count = "", bits[1]
        else:
            gtype, count = bits[1], bits[2]
        m = re.match(r"\d+", count)
        if m:
            out[gtype] = out.get(gtype, 0) + int(m.group())
    return out


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


@dataclass
class SlurmCommands:
    """The client commands of one cluster. `conf`: its slurm.conf (`SLURM_CONF`), else the
    commands' own default; `bin_dir`: where they are, else PATH."""

    conf: str = ""
    bin_dir: str = ""
    timeout_s: float = 10.0
    paths: dict[str, str] = field(default_factory=dict)

    def find(self) -> list[str]:
        """The commands that cannot be found (empty when all are there)."""
        missing = []
        for name in COMMANDS:
            path = (str(Path(self.bin_dir) / name) if self.bin_dir else shutil.which(name)) or ""
            if path and os.access(path, os.X_OK):
                self.paths[name] = path
            else:
                missing.append(name)
        return missing

    def environment(self) -> dict[str, str]:
        """What the commands (and, through sbatch, the jobs) see: not the agent's environment,
        which may hold its credentials."""
        env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ") if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        if self.conf:
            env["SLURM_CONF"] = self.conf
        elif "SLURM_CONF" in os.environ:
            env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        return env

    async def run(self, name: str, *args: str, stdin: str | None = None) -> str:
        if not self.paths and self.find():
            raise SlurmError(f"Slurm commands not found: {', '.join(self.find())}", transient=False)
        argv = [self.paths.get(name, name), *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.environment())
        except OSError as exc:
            raise SlurmError(f"{name}: {exc}", transient=False) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None),
                                              self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(f"{name} did not answer within {self.timeout_s:g} s", transient=True) from None
        except asyncio.CancelledError:  # the agent stops: no command left behind
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            raise
        if proc.returncode != 0:
            text = (err.decode(errors="replace").strip() or out.decode(errors="replace").strip())[-500:]
            raise SlurmError(f"{name}: {text or f'exit code {proc.returncode}'}", transient=bool(UNREACHABLE.search(text)))
        return out.decode(errors="replace")

    async def version(self) -> str:
        return (await self.run("sinfo", "--version")).strip()

    async def partitions(self) -> dict[str, bool]:
        """Partition names → whether it is the default."""
        out = await self.run("sinfo", "-h", "-o", "%P")
        names: dict[str, bool] = {}
        for line in out.split():
            names[line.rstrip("*")] = line.endswith("*") or names.get(line.rstrip("*"), False)
        return names

    async def nodes(self, partition: str) -> list[SlurmNode]:
        out = await self.run("sinfo", "-h", "-N", "-p", partition,
                             "-O", "NodeList:|,StateComplete:|,Gres:|,GresUsed:|,Reason:|")
        nodes: dict[str, SlurmNode] = {}
        for line in out.splitlines():
            bits = line.split("|")
            if len(bits) < 5 or not bits[0]:
                continue
            name, state, gres, used = bits[:4]
            reason = "|".join(bits[4:]).rstrip("|")
            words = frozenset(w.rstrip("*~#!%$@^-").lower() for w in state.split("+"))
            if state.endswith("*"):
                words |= {"not_responding"}
            nodes[name] = SlurmNode(name, words, parse_gres(gres), parse_gres(used), "" if reason == "none" else reason)
        return list(nodes.values())

    async def jobs(self, user: str, name_prefix: str) -> list[SlurmJob]:
        """The user's jobs whose names start with `name_prefix`, ended ones too (Slurm keeps them
        for MinJobAge, 300 s by default)."""
        out = await self.run("squeue", "-h", "-t", "all", "-u", user,
                             "-O", "JobID:|,HetJobID:|,HetJobOffset:|,State:|,Name:|,Reason:|,NodeList:|,Comment:|")
        jobs = []
        for line in out.splitlines():
            bits = line.split("|")
            if len(bits) < 8 or not bits[4].startswith(name_prefix):
                continue
            job_id = _int(bits[0], -1)
            if job_id < 0:
                continue
            jobs.append(SlurmJob(job_id, _int(bits[1], job_id), _int(bits[2], 0), bits[4], bits[3], bits[5],
                                 bits[6], "|".join(bits[7:]).rstrip("|").replace("(null)", "")))
        return jobs

    async def submit(self, script: str) -> int:
        out = (await self.run("sbatch", "--parsable", stdin=script)).strip()
        try:
            return int(out.split(";")[0])
        except ValueError:
            raise SlurmError(f"sbatch answered {out!r}, not a job id", transient=False) from None

    async def cancel(self, job_ids: list[int]) -> None:
        if job_ids:
            await self.run("scancel", *map(str, sorted(set(job_ids))))

    async def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key → value (ExitCode, Reason, JobState, StdOut, …); empty when
        the controller has forgotten the job."""
        try:
            out = await self.run("scontrol", "-o", "show", "job", str(job_id))
        except SlurmError as exc:
            if exc.transient:
                raise
            return {}
        info: dict[str, str] = {}
        for token in re.findall(r"(\w+)=(\S*)", out.splitlines()[0] if out else ""):
            info.setdefault(token[0], token[1])
        return info
