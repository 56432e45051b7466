"""A Slurm cluster on this machine, for the tests and for `cncbrain up --slurm-site`: munged,
slurmctld and one slurmd per node, all children of this process, in one folder, on free ports.

Needs the Debian packages `slurmctld`, `slurmd`, `slurm-client` and `munge` (`.ci/run` installs
them) and root (slurmd starts jobs as their users). `missing()` says what is not there, so a caller
can skip with that reason.

How it is laid out (the parts that took finding out, on Slurm 22.05):

- Several nodes on one host without a multiple-slurmd build: every `NodeName` has its own `Port`,
  each slurmd runs as `slurmd -D -N <node>`, and `%n` in the spool, pid and log paths keeps their
  files apart.
- GPUs without GPUs: slurmd drops a typed GPU GRES that has no `File=` ("Removing file-less GPU",
  the node then goes INVALID), so every GPU gets a device file of its own in `dev/` — a character
  device with /dev/null's numbers (`mknod c 1 3`), or an empty file where mknod is not allowed
  (slurmd then logs that it is not a device and counts it anyway). Nothing opens them: jobs get
  `CUDA_VISIBLE_DEVICES` and the count, not a GPU.
- `SlurmdParameters=config_overrides`: the configured CPUs count even when the host has fewer.
- `ReturnToService=1`: a node set DOWN by an operator (`scontrol update … state=down`) stays down
  until resumed; `bf_interval=1`: heterogeneous jobs (a gang) are started by the backfill
  scheduler, every second here instead of every 30.
- munged runs with its own key, on a socket in a folder of its own under /tmp (`AuthInfo=socket=…`):
  it refuses a socket below a folder that is not open to all, as pytest's and many homes are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cncbrain.errors import CncError
from cncbrain.natsserver import free_port

log = logging.getLogger(__name__)

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
PACKAGES = "slurmctld slurmd slurm-client munge"


def missing() -> str | None:
    """Why a local cluster cannot run here, or None."""
    absent = [b for b in BINARIES if _which(b) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found; Debian: apt-get install {PACKAGES})"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their users)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None)


def _binary(name: str) -> str:
    """The path of a Slurm or MUNGE program (`missing()` says when one is absent)."""
    path = _which(name)
    if path is None:
        raise CncError(f"{name} not found (Debian: apt-get install {PACKAGES})")
    return path


@dataclass(frozen=True)
class Node:
    """One node: its name, its GPUs by Slurm GRES type (e.g. {"h100": 4}) and its CPUs."""

    name: str
    gpus: dict[str, int]
    cpus: int = 0
    partitions: tuple[str, ...] = ("cnc",)

    @property
    def cpu_count(self) -> int:
        return self.cpus or max(4, 2 * sum(self.gpus.values()))


@dataclass
class LocalSlurm:
    """Start with `start()` (or `with LocalSlurm(...)`); the client commands need `env` (SLURM_CONF)."""

    nodes: list[Node]
    root: Path | None = None
    cluster: str = "cnc"
    default_partition: str = ""
    kill_wait_s: int = 2
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _own_root: bool = False
    folder: Path = field(init=False)
    """`root`, resolved (a new temporary folder when `root` is None)."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a cluster needs at least one node")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names repeat: {names}")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="cnc-slurm-"))
            self._own_root = True
        self.folder = Path(self.root).resolve()
        # munged wants every folder above its socket open to all (o+x), which a private temp folder
        # (pytest's, a 0700 home) is not: the socket lives in a folder of its own under /tmp
        self.munge_dir = Path(tempfile.mkdtemp(prefix="cnc-munge-"))
        self.munge_dir.chmod(0o755)
        self.ctld_port = free_port()
        self.node_ports = {n.name: free_port() for n in self.nodes}

    # --- paths and environment ------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.folder / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        """What a client command needs on top of the caller's environment."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def partitions(self) -> list[str]:
        seen: dict[str, None] = {}
        for n in self.nodes:
            for p in n.partitions:
                seen.setdefault(p, None)
        return list(seen)

    # --- configuration ------------------------------------------------------------------------
    def write_config(self) -> None:
        root = self.folder
        for sub in ("etc", "state", "spool", "log", "dev", "run"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "etc" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)  # munged refuses a key others can read
        lines = [
            f"ClusterName={self.cluster}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={next(iter(self.node_ports.values()))}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "ReturnToService=1",
            "SlurmdParameters=config_overrides",
            f"KillWait={self.kill_wait_s}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        gres_lines = ["AutoDetect=off"]
        for n in self.nodes:
            gres = ",".join(f"gpu:{t}:{c}" for t, c in n.gpus.items() if c > 0)
            lines.append(f"NodeName={n.name} NodeHostname=localhost NodeAddr=127.0.0.1 "
                         f"Port={self.node_ports[n.name]} CPUs={n.cpu_count} RealMemory=1000"
                         + (f" Gres={gres}" if gres else "") + " State=UNKNOWN")
            for t, c in n.gpus.items():
                if c > 0:
                    files = [self._device(f"{n.name}-{t}-{i}") for i in range(c)]
                    gres_lines.append(f"NodeName={n.name} Name=gpu Type={t} File={','.join(files)}")
        default = self.default_partition or self.partitions[0]
        for p in self.partitions:
            members = ",".join(n.name for n in self.nodes if p in n.partitions)
            lines.append(f"PartitionName={p} Nodes={members} Default={'YES' if p == default else 'NO'} "
                         "MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (root / "etc" / "gres.conf").write_text("\n".join(gres_lines) + "\n")

    def _device(self, name: str) -> str:
        path = self.folder / "dev" / name
        if not path.exists():
            try:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:
                path.touch()  # slurmd logs that it is not a device and counts it anyway
        return str(path)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> LocalSlurm:
        reason = missing()
        if reason:
            raise CncError(reason)
        self.write_config()
        try:
            self._start_munge()
            self.start_controller(clean=True)
            for n in self.nodes:
                self.start_node(n.name)
            self.wait_nodes(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, key: str, argv: list[str]) -> None:
        out = open(self.folder / "log" / f"{key}.stdout", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[key] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                           start_new_session=True)
        out.close()

    def _start_munge(self) -> None:
        r = self.folder
        self._spawn("munged", [_binary("munged"), "-F", f"--socket={self.munge_socket}",
                               f"--key-file={r / 'etc' / 'munge.key'}", f"--log-file={r / 'log' / 'munged.log'}",
                               f"--pid-file={r / 'run' / 'munged.pid'}", f"--seed-file={r / 'run' / 'munged.seed'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise CncError(f"munged did not start: {self._tail(r / 'log' / 'munged.stdout')}")
            time.sleep(0.05)

    def start_controller(self, clean: bool = False) -> None:
        """slurmctld in the foreground; `clean` forgets saved jobs (the first start)."""
        argv = [_binary("slurmctld"), "-D", "-f", str(self.conf)] + (["-c", "-i"] if clean else [])
        self._spawn("slurmctld", argv)
        deadline = time.monotonic() + 15
        while self.run("scontrol", "ping", check=False).returncode != 0:
            if self.procs["slurmctld"].poll() is not None or time.monotonic() > deadline:
                raise CncError(f"slurmctld did not start: {self._tail(self.folder / 'log' / 'slurmctld.log')}")
            time.sleep(0.1)

    def stop_controller(self) -> None:
        """Stop slurmctld (the cluster becomes unreachable; jobs keep running on their nodes)."""
        self._stop("slurmctld")

    def start_node(self, name: str) -> None:
        (self.folder / "spool" / name).mkdir(parents=True, exist_ok=True)
        self._spawn(f"slurmd-{name}", [_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)])

    def wait_nodes(self, timeout_s: float = 30.0) -> None:
        """Until every node is up (idle, mixed or allocated)."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            bad = {n.name: states.get(n.name, "?") for n in self.nodes
                   if states.get(n.name, "?").rstrip("*") not in ("idle", "mixed", "allocated", "completing")}
            if not bad:
                return
            for n, p in self.procs.items():
                if p.poll() is not None:
                    raise CncError(f"{n} exited with code {p.returncode}: "
                                   f"{self._tail(self.folder / 'log' / (n + '.log'))}")
            if time.monotonic() > deadline:
                raise CncError(f"Slurm nodes not up within {timeout_s:.0f} s: {bad}")
            time.sleep(0.2)

    def run(self, *argv: str, check: bool = True, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
        """A client command (`scontrol`, `squeue`, …) against this cluster."""
        proc = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise CncError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _stop(self, key: str, timeout_s: float = 10.0) -> None:
        p = self.procs.pop(key, None)
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove the folder when it was made here."""
        if "slurmctld" in self.procs:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--user=root", check=False, timeout_s=5)
                deadline = time.monotonic() + self.kill_wait_s + 3
                while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "running,completing",
                                                               check=False, timeout_s=5).stdout.strip():
                    time.sleep(0.2)
        for key in [k for k in self.procs if k.startswith("slurmd-")] + ["slurmctld", "munged"]:
            self._stop(key)
        self._kill_job_processes()
        shutil.rmtree(self.munge_dir, ignore_errors=True)
        if self._own_root and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_job_processes(self) -> None:
        """slurmstepd and job processes can outlive a stopped slurmd: end those of this cluster
        (their environment names its slurm.conf; a job's also has SLURM_JOB_ID)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                environ = (pid_dir / "environ").read_bytes().split(b"\0")
                if mine in environ and (any(e.startswith(b"SLURM_JOB_ID=") for e in environ)
                                        or (pid_dir / "cmdline").read_bytes().startswith(b"slurmstepd")):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid_dir.name), signal.SIGKILL)

    @staticmethod
    def _tail(path: Path, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"(no log at {path})"

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
