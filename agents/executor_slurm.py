"""The `slurm` executor: a site that is a Slurm cluster (or one partition of it).

- Inventory: the partition's nodes × their typed GPU GRES (`Gres=gpu:h100:4`), GRES types mapped
  to the brain's GPU names (`h100` → `H100`, or `CNC_SLURM_GPU_TYPES`), only nodes in a usable
  state: a node DOWN, DRAINED or not responding takes its GPUs out, and the agent registers the
  smaller inventory again (perception and adaptation see fewer GPUs).
- A placement is absolute, and so is what it becomes: one batch job per replica, named
  `<prefix>.<site>.<workload>.r<i>`, asking `--gres=gpu:<type>:<gpus per replica>` on one node,
  and one job per training gang at the site, named `<prefix>.<site>.<workload>.gang`, with one
  task per shard and `--gpus-per-task=<type>:<gpus per shard>`, so Slurm starts all the site's
  shards together or none. (Not a heterogeneous job, a component per shard: Slurm 22.05 never
  puts two components on one node, so two 2-GPU shards could not share a 4-GPU node.)
  Reconciling compares those names with the live jobs: applying the same placement twice, or an
  agent that restarts and is replayed its placements, submits nothing new. Scaling down cancels
  pending replicas first, then the highest-numbered running ones.
- A placement the site cannot run (no such GPU type, no command, sbatch refuses the job) is
  refused with the reason: the scheduler takes it off the site and places it elsewhere.
- A job that fails is reported (`PlacementApplied`, ok false) and submitted again, up to
  `max_retries` failures per workload at the site; then the site gives up and reports the
  workload failed with the reason (exit code, Slurm's reason), and the scheduler marks it FAILED.
  A node failure or preemption is the cluster's, not the workload's: resubmitted, not counted.
  A gang whose every shard exits 0 is finished (telemetry says so; the scheduler completes it).
- Telemetry every `poll_s`: usable GPUs and GPUs in use by type (from the nodes, every user's jobs
  counted), replicas running per service, shards running and progress per job.
- Slurm not answering: the site reports itself unavailable (no heartbeats: perception marks it
  down), placements that arrive are kept, and everything is reconciled when it answers again; the
  placements applied then are reported.

Settings (`SlurmSettings`, environment `CNC_SLURM_*`, or `cncbrain agent --slurm-*`) and the job
environment are documented in docs/executors.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.executor import ReportSink, units
from agents.slurm import CLUSTER_FAULT, SlurmCommands, SlurmError, SlurmJob, SlurmNode
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.errors import CncError, UsageError

log = logging.getLogger(__name__)

INFERENCE = common.WORKLOAD_KIND_INFERENCE_SERVICE


class SlurmSettings(BaseSettings):
    """How a site agent reaches and uses its Slurm cluster (environment `CNC_SLURM_*`)."""

    model_config = SettingsConfigDict(env_prefix="CNC_SLURM_", extra="ignore")

    conf: str = ""
    """slurm.conf of the cluster for the commands (`SLURM_CONF`); empty: the commands' default."""
    bin_dir: str = ""
    """Folder of sbatch, squeue, sinfo, scontrol, scancel; empty: PATH."""
    partition: str = ""
    """Partition whose nodes are the site; empty: the cluster's default partition."""
    account: str = ""
    """`--account` of every job; empty: the user's default."""
    qos: str = ""
    """`--qos` of every job; empty: the default QoS."""
    workdir: str = ""
    """Folder for job output and progress files, on a file system the nodes share with the agent;
    empty: ~/.cnc/slurm/<site>."""
    poll_s: float = Field(2.0, gt=0, le=300)
    """Seconds between two looks at the cluster (telemetry, failures, reconciling)."""
    command_timeout_s: float = Field(10.0, gt=0, le=300)
    """How long one Slurm command may take before the cluster counts as not answering."""
    max_retries: int = Field(3, ge=0, le=1000)
    """Failures of a workload's jobs at the site that are resubmitted; one more and it is failed."""
    gpu_types: str = ""
    """GRES type → brain GPU name, `h100=H100,a100=A100-80GB`; unnamed types match the brain's GPU
    names ignoring case and - or _ (`a100-80gb` → `A100-80GB`), else keep their name."""
    cpus_per_gpu: int = Field(0, ge=0, le=1024)
    """`--cpus-per-gpu` of every job; 0: the cluster's default."""
    mem_per_gpu: str = ""
    """`--mem-per-gpu` of every job (e.g. 32G); empty: the cluster's default."""
    default_command: str = ""
    """What runs for a workload without a template command (shell words); empty: such a placement
    is refused with a reason."""
    image_runner: str = ""
    """How a template's image runs: shell words with {image}, e.g. `apptainer exec docker://{image}`,
    followed by the template's command and arguments; empty: a template with an image is refused."""
    job_prefix: str = Field("cnc", pattern=r"^[A-Za-z0-9_-]{1,16}$")
    """First word of every job name (`cnc.<site>.<workload>.r0`)."""
    name: str = ""
    """The site's name as the brain shows it; empty: its id (or the emulator's name for it)."""
    region: str = ""
    """The site's region."""
    latitude: float = 0.0
    """Where the site is (the web page's map); 0: unknown."""
    longitude: float = 0.0
    """Where the site is (the web page's map); 0: unknown."""

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        if v and (not v.startswith("/") or re.search(r"[\s,%]", v)):
            raise ValueError("must be an absolute path without white space, commas or %")
        return v

    @field_validator("image_runner")
    @classmethod
    def _runner(cls, v: str) -> str:
        if v and "{image}" not in v:
            raise ValueError("must contain {image}")
        return v

    def gpu_map(self) -> dict[str, str]:
        out = {}
        for part in filter(None, (p.strip() for p in self.gpu_types.split(","))):
            gres, sep, name = part.partition("=")
            if not sep or not gres or not name:
                raise UsageError(f"CNC_SLURM_GPU_TYPES (--slurm-gpu-type): {part!r} is not GRES_TYPE=GPU_NAME")
            out[gres] = name
        return out


def brain_gpu_name(gres_type: str, mapping: dict[str, str]) -> str:
    """The brain's name of a GRES type: as mapped, else the catalogue name it spells, else itself."""
    if gres_type in mapping:
        return mapping[gres_type]
    from cncbrain.twin.costmodel import gpu_catalog

    key = re.sub(r"[-_]", "", gres_type).lower()
    for name in gpu_catalog():
        if re.sub(r"[-_]", "", name).lower() == key:
            return name
    return gres_type or "gpu"


@dataclass
class _Reported:
    failures: int = 0
    gave_up: str = ""


class SlurmExecutor:
    kind = "slurm"

    def __init__(self, site_id: str, settings: SlurmSettings | None = None, base: common.Site | None = None,
                 commands: SlurmCommands | None = None) -> None:
        self.site_id = site_id
        self.settings = settings or SlurmSettings()
        self.base = base
        self.fresh = True  # the desired state lives in the placement stream: replayed at start
        self.cmd = commands or SlurmCommands(self.settings.conf, self.settings.bin_dir, self.settings.command_timeout_s)
        self.user = getpass.getuser()
        self.prefix = f"{self.settings.job_prefix}.{site_id}."
        self.workdir = Path(self.settings.workdir or Path.home() / ".cnc" / "slurm" / site_id)
        self.partition = self.settings.partition
        self.desired: dict[str, spb.PlacementCommitted] = {}
        self.status: dict[str, _Reported] = {}
        self.finished: set[str] = set()
        self.unreported: dict[str, spb.PlacementCommitted] = {}  # kept while Slurm did not answer
        self.handled: set[int] = set()  # ended jobs already accounted
        self.cancelled: set[int] = set()
        self._strangers: set[str] = set()
        self.gres_of: dict[str, str] = {}  # brain GPU name → GRES type
        self.max_per_node: dict[str, int] = {}  # brain GPU name → most GPUs of it on one node
        self.nodes: list[SlurmNode] = []
        self.jobs: list[SlurmJob] = []
        self.started = time.monotonic()
        self._available = True
        self._telemetry: site_pb.SiteTelemetry | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._on_telemetry: Callable[[site_pb.SiteTelemetry], Awaitable[None]] | None = None
        self._report: ReportSink | None = None

    # --- the Executor interface -------------------------------------------------------------------
    async def inventory(self) -> common.Site:
        """The site from the cluster; a cluster that cannot be used raises one error naming the setting."""
        s = self.settings
        missing = self.cmd.find()
        if missing:
            where = f"CNC_SLURM_BIN_DIR={s.bin_dir}" if s.bin_dir else "PATH (set CNC_SLURM_BIN_DIR / --slurm-bin-dir)"
            raise UsageError(f"Slurm site {self.site_id}: {', '.join(missing)} not found in {where}")
        if s.conf and not Path(s.conf).is_file():
            raise UsageError(f"Slurm site {self.site_id}: CNC_SLURM_CONF (--slurm-conf) {s.conf} is not a file")
        conf = f"CNC_SLURM_CONF={s.conf}" if s.conf else "the default slurm.conf (set CNC_SLURM_CONF / --slurm-conf)"
        try:
            partitions = await self.cmd.partitions()
        except SlurmError as exc:
            raise CncError(f"Slurm site {self.site_id}: the cluster of {conf} does not answer: {exc}") from None
        if not self.partition:
            self.partition = next((p for p, default in partitions.items() if default), "")
            if not self.partition:
                raise UsageError(f"Slurm site {self.site_id}: the cluster has no default partition; "
                               f"name one with CNC_SLURM_PARTITION (--slurm-partition): {', '.join(partitions)}")
        elif self.partition not in partitions:
            raise UsageError(f"Slurm site {self.site_id}: CNC_SLURM_PARTITION (--slurm-partition) {self.partition!r} "
                           f"is not a partition of the cluster of {conf}; it has {', '.join(partitions) or 'none'}")
        self.nodes = await self.cmd.nodes(self.partition)
        mapping = s.gpu_map()
        for n in self.nodes:
            for gres, count in n.gpus.items():
                name = brain_gpu_name(gres, mapping)
                if self.gres_of.setdefault(name, gres) != gres:
                    raise UsageError(f"Slurm site {self.site_id}: GRES types {self.gres_of[name]!r} and {gres!r} "
                                   f"both map to {name}; set CNC_SLURM_GPU_TYPES (--slurm-gpu-type)")
                self.max_per_node[name] = max(self.max_per_node.get(name, 0), count)
        if not self.gres_of:
            raise UsageError(f"Slurm site {self.site_id}: partition {self.partition!r} has no node with GPU GRES "
                           f"(Gres=gpu:TYPE:N in slurm.conf); set CNC_SLURM_PARTITION (--slurm-partition)")
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"Slurm site {self.site_id}: CNC_SLURM_WORKDIR (--slurm-workdir) {self.workdir}: {exc}") from None
        site = common.Site()
        if self.base is not None:
            site.CopyFrom(self.base)
            del site.gpu_pools[:]
        site.site_id = self.site_id
        site.name = s.name or site.name or self.site_id
        site.region = s.region or site.region
        site.latitude = s.latitude or site.latitude
        site.longitude = s.longitude or site.longitude
        site.gpu_pools.extend(self._pools(self.nodes))
        log.info("Slurm site %s: %s, partition %s, %s", self.site_id, await self.cmd.version(), self.partition,
                 ", ".join(f"{p.gpu_type} {p.count}" for p in site.gpu_pools))
        return site

    async def start(self, on_telemetry, on_report: ReportSink | None = None) -> None:
        self._on_telemetry = on_telemetry
        self._report = on_report
        self._task = asyncio.create_task(self._loop(), name=f"slurm-{self.site_id}")

    def available(self) -> bool:
        return self._available

    def last_telemetry(self) -> site_pb.SiteTelemetry | None:
        return self._telemetry

    async def stop(self) -> None:
        """Stops watching; the jobs keep running (the next agent adopts them by their names)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def apply(self, msg: spb.PlacementCommitted) -> tuple[bool, str]:
        p = msg.placement
        wid = p.workload_id
        async with self._lock:
            old = self.desired.get(wid)
            if old is not None and old.placement.generation > p.generation:
                return True, ""  # an older generation than the one held
            self.desired[wid] = msg
            problem = self._unrunnable(msg)
            if problem:  # refused: the scheduler takes it off this site and places it elsewhere
                self.status.setdefault(wid, _Reported()).gave_up = problem
                return False, problem
            if not self._available:
                self.unreported[wid] = msg
                return False, "Slurm does not answer; the placement is kept and applied when it does"
            try:
                self.jobs = await self.cmd.jobs(self.user, self.prefix)
                await self._reconcile(wid)
            except SlurmError as exc:
                if not exc.transient:
                    self.status.setdefault(wid, _Reported()).gave_up = f"Slurm refused the jobs: {exc}"
                    return False, f"Slurm refused the jobs: {exc}"
                self._set_available(False, str(exc))
                self.unreported[wid] = msg
                return False, f"Slurm does not answer ({exc}); the placement is kept and applied when it does"
            self.unreported.pop(wid, None)
            return True, ""

    # --- names and jobs ---------------------------------------------------------------------------
    def job_name(self, wid: str, unit: str) -> str:
        return f"{self.prefix}{wid}.{unit}"

    def parse_name(self, name: str) -> tuple[str, str] | None:
        """(workload, unit: "r<i>" or "gang") of one of this site's job names."""
        if not name.startswith(self.prefix):
            return None
        wid, _, unit = name[len(self.prefix):].rpartition(".")
        return (wid, unit) if wid and (unit == "gang" or re.fullmatch(r"r\d+", unit)) else None

    def jobs_of(self, wid: str) -> list[SlurmJob]:
        return [j for j in self.jobs if (parsed := self.parse_name(j.name)) and parsed[0] == wid]

    def _unrunnable(self, msg: spb.PlacementCommitted) -> str:
        p = msg.placement
        if units(p) == 0:
            return ""
        if p.gpu_type not in self.gres_of:
            return f"site {self.site_id} has no {p.gpu_type} GPUs (it has {', '.join(self.gres_of)})"
        if p.gpus_per_unit > self.max_per_node.get(p.gpu_type, 0):
            return (f"a unit needs {p.gpus_per_unit} {p.gpu_type} GPUs on one node; the most on one node of "
                    f"site {self.site_id} is {self.max_per_node.get(p.gpu_type, 0)}")
        try:
            self.argv(msg)
        except ValueError as exc:
            return str(exc)
        return ""

    def argv(self, msg: spb.PlacementCommitted) -> list[str]:
        """What a unit runs: the template's command (behind the image runner for an image), else
        the site's default command."""
        which = msg.WhichOneof("spec")
        t = getattr(msg, which).template if which else common.WorkloadTemplate()
        s = self.settings
        if t.image:
            if not s.image_runner:
                raise ValueError(f"the workload names image {t.image!r} and site {self.site_id} runs no images "
                                 f"(its CNC_SLURM_IMAGE_RUNNER is not set)")
            runner = [w.replace("{image}", t.image) for w in shlex.split(s.image_runner)]
            return [*runner, *([t.command] if t.command else []), *t.args]
        if t.command:
            return [t.command, *t.args]
        if s.default_command:
            return shlex.split(s.default_command)
        raise ValueError(f"the workload has no command (deploy/submit --command) and site {self.site_id} has no "
                         f"default one (CNC_SLURM_DEFAULT_COMMAND)")

    # --- reconciling ------------------------------------------------------------------------------
    async def _reconcile(self, wid: str) -> None:
        """Make the live jobs of `wid` what its placement says (self.jobs must be fresh)."""
        msg = self.desired[wid]
        p = msg.placement
        live = [j for j in self.jobs_of(wid) if j.live and j.het_id not in self.cancelled]  # not those ending
        blocked = bool(self.status.get(wid, _Reported()).gave_up) or wid in self.finished
        if p.kind == INFERENCE:
            await self._reconcile_replicas(msg, live, p.replicas, submit=not blocked)
        else:
            await self._reconcile_gang(msg, live, submit=not blocked)

    async def _reconcile_replicas(self, msg: spb.PlacementCommitted, live: list[SlurmJob], want: int,
                                  submit: bool) -> None:
        wid = msg.placement.workload_id
        by_index: dict[int, SlurmJob] = {}
        extra: list[SlurmJob] = []
        for j in sorted(live, key=lambda j: (j.state != "RUNNING", j.job_id)):
            i = int(self.parse_name(j.name)[1][1:])
            if i in by_index:
                extra.append(j)  # the same replica twice: one goes
            else:
                by_index[i] = j
        # keep running replicas before pending ones, lower numbers first
        keep = sorted(by_index.items(), key=lambda kv: (kv[1].state != "RUNNING", kv[0]))
        extra += [j for _, j in keep[want:]]
        await self._cancel(extra)
        if not submit:
            return
        taken = {i for i, _ in keep[:want]}
        free = (i for i in range(10 * (want + len(live)) + 1) if i not in taken)
        for _ in range(want - len(taken)):
            i = next(free)
            job_id = await self.cmd.submit(self.replica_script(msg, i))
            log.info("site %s: %s replica %d → Slurm job %d", self.site_id, wid, i, job_id)

    async def _reconcile_gang(self, msg: spb.PlacementCommitted, live: list[SlurmJob], submit: bool) -> None:
        p = msg.placement
        want = ",".join(map(str, sorted(p.shard_indices)))
        gangs: dict[int, list[SlurmJob]] = {}
        for j in live:
            gangs.setdefault(j.het_id, []).append(j)
        keep = next((h for h, comps in gangs.items() if want and self._shards(comps) == want), None)
        await self._cancel([j for h, comps in gangs.items() if h != keep for j in comps])
        if keep is None and want and submit:
            job_id = await self.cmd.submit(self.gang_script(msg))
            log.info("site %s: %s shards %s → Slurm job %d", self.site_id, p.workload_id, want, job_id)

    @staticmethod
    def _shards(components: list[SlurmJob]) -> str:
        lead = min(components, key=lambda j: j.het_offset)
        return lead.comment.removeprefix("shards=") if lead.comment.startswith("shards=") else ""

    async def _cancel(self, jobs: list[SlurmJob]) -> None:
        ids = sorted({j.het_id for j in jobs})
        if ids:
            self.cancelled.update(j.job_id for j in jobs)
            self.cancelled.update(ids)
            await self.cmd.cancel(ids)
            log.info("site %s: cancelled Slurm jobs %s (%s)", self.site_id, ids, ", ".join(sorted({j.name for j in jobs})))

    # --- batch scripts ----------------------------------------------------------------------------
    def _options(self, p: common.Placement, name: str, comment: str = "") -> list[str]:
        s = self.settings
        opts = [f"--job-name={name}", f"--partition={self.partition}", "--nodes=1", "--ntasks=1",
                f"--gres=gpu:{self.gres_of[p.gpu_type]}:{p.gpus_per_unit}",
                f"--output={self.workdir}/{name}.%j.out", f"--chdir={self.workdir}", "--no-requeue", "--export=ALL"]
        opts += [f"--account={s.account}"] if s.account else []
        opts += [f"--qos={s.qos}"] if s.qos else []
        opts += [f"--cpus-per-gpu={s.cpus_per_gpu}"] if s.cpus_per_gpu else []
        opts += [f"--mem-per-gpu={s.mem_per_gpu}"] if s.mem_per_gpu else []
        opts += [f"--comment={comment}"] if comment else []
        return [f"#SBATCH {o}" for o in opts]

    def _environment(self, msg: spb.PlacementCommitted, extra: dict[str, str]) -> list[str]:
        p = msg.placement
        which = msg.WhichOneof("spec")
        t = getattr(msg, which).template if which else common.WorkloadTemplate()
        env = {"CNC_WORKLOAD_ID": p.workload_id, "CNC_SITE_ID": self.site_id, "CNC_GPU_TYPE": p.gpu_type,
               "CNC_GPUS": str(p.gpus_per_unit), **extra}
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines += [f"export {e.name}={shlex.quote(e.value)}" for e in t.env if not e.name.upper().startswith(("CNC_", "SLURM_"))]
        return lines

    def replica_script(self, msg: spb.PlacementCommitted, index: int) -> str:
        p = msg.placement
        name = self.job_name(p.workload_id, f"r{index}")
        return "\n".join([
            "#!/bin/bash", *self._options(p, name),
            *self._environment(msg, {"CNC_UNIT_INDEX": str(index), "CNC_REPLICAS": str(p.replicas)}),
            "exec " + shlex.join(self.argv(msg)), ""])

    def progress_file(self, wid: str, shard: int) -> Path:
        return self.workdir / f"{self.job_name(wid, 'gang')}.shard{shard}.progress"

    def gang_script(self, msg: spb.PlacementCommitted) -> str:
        """One job with a task per shard, each task with its own GPUs (`--gpus-per-task`): Slurm
        allocates every shard of the site or none. The batch step starts them with one srun that
        ends them all when one fails (`--kill-on-bad-exit`), so the gang ends whole; each task
        learns its shard index from its rank (SLURM_PROCID)."""
        p = msg.placement
        shards = sorted(p.shard_indices)
        name = self.job_name(p.workload_id, "gang")
        world = msg.training_job.shards if msg.WhichOneof("spec") == "training_job" else len(shards)
        gpus = f"{self.gres_of[p.gpu_type]}:{p.gpus_per_unit}"
        listed = " ".join(map(str, shards))
        opts = [o for o in self._options(p, name, f"shards={','.join(map(str, shards))}")
                if not o.startswith(("#SBATCH --nodes=", "#SBATCH --ntasks=", "#SBATCH --gres="))]
        progress = f'{shlex.quote(f"{self.workdir}/{name}.shard")}"$CNC_SHARD_INDEX".progress'
        task = (f'shards=({listed}); export CNC_SHARD_INDEX=${{shards[$SLURM_PROCID]}}; '
                f'export CNC_UNIT_INDEX=$CNC_SHARD_INDEX CNC_PROGRESS_FILE={progress}; exec "$@"')
        return "\n".join([
            "#!/bin/bash", *opts, f"#SBATCH --ntasks={len(shards)}", f"#SBATCH --gpus-per-task={gpus}",
            *self._environment(msg, {"CNC_WORLD_SIZE": str(world), "CNC_SITE_SHARDS": ",".join(map(str, shards))}),
            # the address of every shard's node, in shard order, as srun lays the tasks out (block)
            f"shards=({listed})",
            'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
            "counts=()",
            'IFS=, read -ra per_node <<< "$SLURM_TASKS_PER_NODE"',
            'for c in "${per_node[@]}"; do',
            r'  if [[ $c =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then',
            '    for ((r = 0; r < BASH_REMATCH[2]; r++)); do counts+=("${BASH_REMATCH[1]}"); done',
            '  else counts+=("$c"); fi',
            "done",
            "peers=(); k=0",
            'for n in "${!nodes[@]}"; do',
            r'  addr=$(scontrol -o show node "${nodes[$n]}" | tr " " "\n" | sed -n "s/^NodeAddr=//p")',
            '  for ((c = 0; c < counts[n]; c++)); do peers+=("${shards[$k]}=$addr"); k=$((k + 1)); done',
            "done",
            'export CNC_PEERS="$(IFS=,; echo "${peers[*]}")"',
            f"exec srun --ntasks={len(shards)} --gpus-per-task={gpus} --distribution=block --kill-on-bad-exit=1 "
            f"/bin/bash -c {shlex.quote(task)} cnc-shard {shlex.join(self.argv(msg))}",
            "",
        ])

    # --- watching ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Slurm site %s: poll failed", self.site_id)
            await asyncio.sleep(self.settings.poll_s)

    async def poll(self) -> site_pb.SiteTelemetry | None:
        """One look at the cluster: account ended jobs, reconcile, report, measure."""
        try:
            async with self._lock:
                self.nodes = await self.cmd.nodes(self.partition)
                self.jobs = await self.cmd.jobs(self.user, self.prefix)
                self._set_available(True, "")
                await self._account()
                for wid in list(self.desired):
                    try:
                        await self._reconcile(wid)
                    except SlurmError as exc:
                        if exc.transient:
                            raise
                        await self._give_up(wid, f"Slurm refused the jobs: {exc}")
                    else:
                        late = self.unreported.pop(wid, None)
                        if late is not None and self._report is not None:
                            await self._report(late.placement, True, "", False)
                self._forget_ended()
                self._note_strangers()
        except SlurmError as exc:
            self._set_available(False, str(exc))
            return None
        t = self._measure()
        self._telemetry = t
        if self._on_telemetry is not None:
            await self._on_telemetry(t)
        return t

    def _set_available(self, up: bool, why: str) -> None:
        if up != self._available:
            if up:
                log.warning("Slurm site %s: the cluster answers again; reconciling", self.site_id)
            else:
                log.warning("Slurm site %s: the cluster does not answer (%s); site unavailable", self.site_id, why)
        self._available = up

    async def _account(self) -> None:
        """Ended jobs not seen before: a replica that ended, a gang that failed or finished."""
        ended: dict[int, list[SlurmJob]] = {}
        for j in self.jobs:
            if not j.live and j.job_id not in self.handled:
                ended.setdefault(j.het_id, []).append(j)
        for het_id, comps in ended.items():
            lead = min(comps, key=lambda j: j.het_offset)
            parsed = self.parse_name(lead.name)
            msg = self.desired.get(parsed[0]) if parsed else None
            if msg is None:
                continue  # not (yet) known: a restarted agent accounts it once its placement is replayed
            self.handled.update(j.job_id for j in comps)
            if het_id in self.cancelled or lead.job_id in self.cancelled or units(msg.placement) == 0:
                continue
            wid, unit = parsed
            if lead.state == "CANCELLED":
                log.warning("site %s: Slurm job %d of %s was cancelled outside the brain; submitting it again",
                            self.site_id, het_id, wid)
                continue
            if unit == "gang" and lead.state == "COMPLETED":
                if self._shards(comps) == ",".join(map(str, sorted(msg.placement.shard_indices))):
                    self.finished.add(wid)
                    log.info("site %s: %s finished its shards %s", self.site_id, wid, self._shards(comps))
                continue
            what = f"replica {unit[1:]}" if unit != "gang" else f"shards {self._shards(comps) or '?'}"
            info = await self.cmd.job_info(het_id)
            code = info.get("ExitCode", "?")
            reason = info.get("Reason", lead.reason) or lead.reason
            detail = (f"{what} (Slurm job {het_id}) ended {lead.state}, exit code {code}"
                      + (f", reason {reason}" if reason and reason != "None" else ""))
            if lead.state == "COMPLETED":
                detail += " (a replica serves until it is cancelled)"
            if lead.state in CLUSTER_FAULT:
                log.warning("site %s: %s; submitted again", self.site_id, detail)
                await self._tell(msg.placement, False, f"{detail}; submitted again", False)
                continue
            st = self.status.setdefault(wid, _Reported())
            st.failures += 1
            if st.failures > self.settings.max_retries:
                await self._give_up(wid, f"{detail}; {st.failures} failures at site {self.site_id}, "
                                         f"retries ({self.settings.max_retries}) spent")
            else:
                log.warning("site %s: %s; retry %d of %d", self.site_id, detail, st.failures, self.settings.max_retries)
                await self._tell(msg.placement, False, f"{detail}; retry {st.failures} of {self.settings.max_retries}", False)

    async def _give_up(self, wid: str, reason: str) -> None:
        st = self.status.setdefault(wid, _Reported())
        if st.gave_up:
            return
        st.gave_up = reason
        log.error("site %s: gives up on %s: %s", self.site_id, wid, reason)
        await self._tell(self.desired[wid].placement, False, reason, True)

    async def _tell(self, p: common.Placement, ok: bool, error: str, failed: bool) -> None:
        if self._report is not None:
            await self._report(p, ok, error, failed)

    def _forget_ended(self) -> None:
        """Workloads that left the site and have no job left."""
        for wid, msg in list(self.desired.items()):
            if units(msg.placement) == 0 and not any(j.live for j in self.jobs_of(wid)):
                del self.desired[wid]
                self.status.pop(wid, None)
                self.finished.discard(wid)
        ids = {j.job_id for j in self.jobs}
        self.handled &= ids
        self.cancelled &= ids | {j.het_id for j in self.jobs}

    def _note_strangers(self) -> None:
        """Live jobs of this site's names for workloads it was never told about (placements gone
        from the stream, another brain): left alone, said once."""
        for wid in sorted({p[0] for j in self.jobs if j.live and (p := self.parse_name(j.name))} - set(self.desired)):
            if wid not in self._strangers:
                self._strangers.add(wid)
                log.warning("site %s: Slurm runs jobs of %s, which no placement here names; left alone "
                            "(scancel them if they are not wanted)", self.site_id, wid)

    # --- telemetry --------------------------------------------------------------------------------
    def _pools(self, nodes: list[SlurmNode]) -> list[common.GpuPool]:
        from cncbrain.twin.costmodel import gpu_catalog

        catalog = gpu_catalog()
        mapping = self.settings.gpu_map()
        count: dict[str, int] = dict.fromkeys(self.gres_of, 0)
        used: dict[str, int] = dict.fromkeys(self.gres_of, 0)
        for n in nodes:
            for gres, c in n.gpus.items():
                name = brain_gpu_name(gres, mapping)
                count.setdefault(name, 0)
                used.setdefault(name, 0)
                if n.usable:
                    count[name] += c
                    used[name] += min(c, n.used.get(gres, 0))
        pools = []
        for name in sorted(count):
            g = catalog.get(name)
            pools.append(common.GpuPool(gpu_type=name, count=count[name], used=used[name],
                                        hbm_gb=g.mem_gb if g else 0.0, peak_tflops=g.tflops if g else 0.0,
                                        price_usd_per_hour=g.price_hr if g else 0.0))
        return pools

    def progress(self, wid: str, shards: list[int]) -> float:
        values = []
        for i in shards:
            try:
                values.append(min(1.0, max(0.0, float(self.progress_file(wid, i).read_text().strip() or 0))))
            except (OSError, ValueError):
                values.append(0.0)
        return min(values) if values else 0.0

    def _measure(self) -> site_pb.SiteTelemetry:
        t = site_pb.SiteTelemetry(site_id=self.site_id, available=True, sim_time_s=time.monotonic() - self.started)
        t.observed_at.GetCurrentTime()
        t.gpu_pools.extend(self._pools(self.nodes))
        total = sum(p.count for p in t.gpu_pools)
        t.gpu_utilization = sum(p.used for p in t.gpu_pools) / total if total else 0.0
        for wid in sorted({*self.desired, *(parsed[0] for j in self.jobs if j.live and (parsed := self.parse_name(j.name)))}):
            jobs = [j for j in self.jobs_of(wid) if j.state == "RUNNING"]
            msg = self.desired.get(wid)
            gang = any(j.name.endswith(".gang") for j in self.jobs_of(wid)) or (
                msg is not None and msg.placement.kind != INFERENCE)
            if not gang:
                t.services.append(site_pb.ServiceLoad(workload_id=wid, replicas=len(jobs), slo_attainment=1.0))
            else:
                shards = sorted(msg.placement.shard_indices) if msg is not None else []
                done = wid in self.finished
                running = sum(len(self._shards([j]).split(",")) for j in jobs if self._shards([j]))
                t.jobs.append(site_pb.JobProgress(workload_id=wid, shards_running=running,
                                                  progress=1.0 if done else self.progress(wid, shards), finished=done))
        return t
