"""`cncbrain up`: the embedded brain on loopback — a nats-server with JetStream (or an existing
server), the perception and scheduler services, the emulator of a scenario's sites and the site
agents, each its own process with its log under the state folder.

Default ports: NATS 4222, perception gRPC 50061, scheduler gRPC 50062, adaptation 50063,
governance 50064. State folder: `.state/` (JetStream store in `jetstream/`, logs in `logs/`,
`endpoints.json` for the client commands, `operator.token` — see below).

Governance and adaptation run beside perception and the scheduler. With `auth` (the `up` command's
default; `--no-auth` turns it off) every gRPC service checks bearer tokens and governance issues an
operator token into `<state>/operator.token`, which the CLI picks up.

NATS is always authenticated (`--no-auth` or not): at first start `up` gives every process its own
NATS identity (nkeys in `<state>/secrets/nats/`, mode 0600; `cncbrain.bus.credentials`) with the
least privilege of `cncbrain.bus.permissions` — perception, scheduler, adaptation, governance, the
emulator, each site agent, and `admin` for `up` itself and the operator's tools (`cncbrain watch`).
A restart reuses them. Anonymous clients are refused. The server stays plain on loopback unless
`--nats-tls`: then it requires TLS of every client, with a certificate for localhost/127.0.0.1 from
the brain's CA (`<state>/secrets/tls/`, made at first start), and every child and the CLI trust only
that CA. A key added to `<state>/secrets/nats/auth.conf` while `up` runs (`cncbrain sites enroll
--key-out`) is admitted at once: `up` has the server reload its configuration.

`--slurm-site ID[=TYPE:N,…]` (repeatable) runs that site on a Slurm cluster started on this machine
(`cncbrain.slurm_local`, under `<state>/slurm/`, one partition per site) instead of the emulator: a
site agent on the Slurm executor per such site, real jobs for its replicas and shards (a workload
without a command runs `agents.demo_workload`). A site of the scenario keeps its place, name and
WAN links; another id is a new site (docs/executors.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cncbrain import aio
from cncbrain.auth import OPERATOR_TOKEN_FILE
from cncbrain.commands._live import ENDPOINTS_FILE, default_state_dir, process_start
from cncbrain.errors import CncError, UsageError
from cncbrain.grpcserver import reported_port
from cncbrain.natsserver import NatsServer, port_in_use
from cncbrain.supervise import SPARE_ENV, GaveUp, Supervisor, die_with_parent

if TYPE_CHECKING:
    from cncbrain.slurm_local import LocalSlurm

AGENTS_IDENTITY = "agents-local"
"""NATS identity of `up`'s one agent process, which speaks for every emulated site (one connection,
one batch of answers per offer round); each site also has its own identity for a separate agent."""
SECRETS_DIR = "secrets"
"""Sub-folder of the state folder with the NATS credentials (`cncbrain.bus.credentials`)."""
NATS_PORT, PERCEPTION_PORT, SCHEDULER_PORT = 4222, 50061, 50062
ADAPTATION_PORT, GOVERNANCE_PORT = 50063, 50064
EMULATOR_STATE = "emulator.state"
"""What runs at each emulated site, kept by the emulator across its restarts."""
PROMETHEUS_FILE = "prometheus.yml"
"""A Prometheus scrape configuration for this brain, written by `up` (`prometheus --config.file=...`)."""
BACKGROUND = ("adaptation",)
"""Processes off the deploy → placement path (adaptation's control loop): they run at a lower CPU
priority (`--background-nice`), so on a small machine the scheduler, the site agents, perception,
governance (admission) and NATS get a core first. `python -m benchmarks.bench_live nice` (10
interleaved blocks of 60 deploys in one brain) on this project's 2-core machine, with the emulator
niced too: deploy → placement p50 11.97 ms at nice 0 vs 10.20 at 19 (median of the blocks, 9 of 10
pairs lower); `... nice 10 19`: 8.12 vs 7.63 ms (6 of 10) at a faster hour (docs/live-brain.md).
The emulated sites are no longer niced: they apply placements, whose confirmation the scheduler's
reconciler waits for, and a starved emulator (nice 19 on a loaded machine) left sites unable to
confirm within the reconciler's ticks. The default is 10, not 19: at 19 adaptation did not answer
its health check within 1 s for 5-23 s while a restarted emulator rebuilt its twin at load 9-12
(`python -m benchmarks.bench_chaos --faults emulator,emulator,emulator`), at 10 it answered
throughout; the deploy path gained little from 19 over 10 (above)."""
DEFAULT_BACKGROUND_NICE = 10


def prometheus_config(endpoints: dict[str, Any], interval_s: float = 5.0) -> str:
    """A Prometheus configuration scraping every process of a brain (`endpoints` as `up` writes
    them): one job `cncbrain`, each target labelled with its `process`."""
    from urllib.parse import urlsplit

    lines = ["# written by `cncbrain up`: prometheus --config.file=THIS_FILE", "global:",
             f"  scrape_interval: {interval_s:g}s", f"  evaluation_interval: {interval_s:g}s", "scrape_configs:",
             "  - job_name: cncbrain", "    metrics_path: /metrics", "    static_configs:"]
    for process, url in sorted(endpoints.get("metrics", {}).items()):
        lines += [f"      - targets: ['{urlsplit(url).netloc}']", f"        labels: {{process: {process}}}"]
    return "\n".join(lines) + "\n"


def process_identity(pid: int) -> dict[str, Any]:
    """What names process `pid` beyond its number, which the kernel gives out again: the host and
    the process's start time (clock ticks since boot, /proc/PID/stat)."""
    return {"pid": pid, "host": socket.gethostname(), "started": process_start(pid)}


def cli_hint(brain: Brain) -> str:
    """How the client commands find this brain's endpoints and token: by themselves when its state
    folder is the one they look in ($CNC_STATE_DIR, else .state), else with --state-dir or the variable."""
    from cncbrain.commands._live import default_state_dir

    if default_state_dir().resolve() == brain.state_dir.resolve():
        return "the CLI picks it up"
    return f"the CLI picks it up with --state-dir {brain.state_dir} or export CNC_STATE_DIR={brain.state_dir}"


def web_link(brain: Brain) -> str:
    """The page's URL; with auth on, with the operator token in the fragment (never sent to the
    server, kept by the page in the tab's session storage), as notebook servers print theirs."""
    if brain.auth and brain.token_file.exists():
        return f"{brain.web_url}#token={brain.token_file.read_text().strip()}"
    return brain.web_url


def lower_priority(pid: int, nice: int) -> None:
    """Have process `pid` yield the CPU to the others (nice value `nice`). Also where the kernel
    shares CPU time by session first (Linux autogroup: each `up` child starts its own session, and a
    plain nice value then only weighs against the processes of that session), through the nice
    value of the process's autogroup."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


LEASE_TTL_S = 3.0
"""The services' lease TTL (their default): a standby takes over this long after the active died."""
SERVICES = ("governance", "perception", "scheduler", "adaptation")
"""In start order: the scheduler needs governance's address, adaptation perception's."""
STOP_ORDER = ("agents", "emulator", "adaptation", "scheduler", "perception", "governance", "nats")


class Brain:
    """The processes of an embedded brain, supervised (`cncbrain.supervise`): `start()` returns once
    every health check is SERVING and every site agent has registered; `poll()` (called by `up`
    every 0.1 s) restarts what crashed and raises `GaveUp` when something keeps crashing.

    Ports: a port given as 0 is bound by the service itself, which then reports it (bind, then
    report: two brains started at the same moment never collide); its restarts and its standby
    reuse it. `standby`: two instances of each service, one active by a lease in NATS KV
    (`cncbrain.lease`); the other takes over the same port when the active dies."""

    def __init__(self, state_dir: Path, scenario: str = "abilene", *, nats_url: str | None = None,
                 nats_port: int = NATS_PORT, perception_port: int = PERCEPTION_PORT,
                 scheduler_port: int = SCHEDULER_PORT, speed: float = 30.0, fresh: bool = False,
                 perception_tick_s: float = 1.0, governance_port: int | None = None,
                 adaptation_port: int | None = None, auth: bool = False, policy: str | None = None,
                 background_nice: int | None = None, log_format: str | None = None, standby: bool = False,
                 say=None, slurm_sites: list[str] | None = None, nats_tls: bool = False,
                 nats_profile: bool = False) -> None:
        # Governance and adaptation: unless given, their default port, or any free port (bound and
        # reported by the service) when that is taken; endpoints.json tells the client commands.
        if governance_port is None:
            governance_port = GOVERNANCE_PORT if not port_in_use(GOVERNANCE_PORT) else 0
        if adaptation_port is None:
            adaptation_port = ADAPTATION_PORT if not port_in_use(ADAPTATION_PORT) else 0
        self.ports = {"perception": perception_port, "scheduler": scheduler_port,
                      "governance": governance_port, "adaptation": adaptation_port}
        """Ports asked for (0: any); the bound ones once started."""
        self.auth = auth
        self.policy = policy or os.environ.get("CNC_AGENT_POLICY") or None
        """Site agents' policy (greedy, marl, marl:PATH); None: the agent's default (marl when shipped)."""
        if background_nice is None:
            raw = os.environ.get("CNC_BACKGROUND_NICE", str(DEFAULT_BACKGROUND_NICE))
            try:
                background_nice = int(raw)
            except ValueError:
                raise UsageError(f"CNC_BACKGROUND_NICE: {raw!r} is not a whole number 0..19") from None
        self.background_nice = background_nice
        """Nice value of the `BACKGROUND` processes (0: the same priority as the others)."""
        if not 0 <= self.background_nice <= 19:
            raise UsageError(f"background nice {self.background_nice}: must be 0..19")
        self.state_dir = Path(state_dir)
        self.scenario = scenario
        self.external_nats = nats_url
        if nats_tls and nats_url:
            raise UsageError("--nats-tls turns TLS on for the embedded NATS server; for one of your own "
                             "(--nats-url), set CNC_NATS_TLS_CA to the CA of its certificate")
        self.nats_tls = nats_tls
        """The embedded server requires TLS (a certificate from the brain's CA in the secrets folder)."""
        self.nats_port = nats_port
        self.speed = speed
        self.fresh = fresh
        self.perception_tick_s = perception_tick_s
        self.standby = standby
        self.nats: NatsServer | None = None
        self.nats_profile = nats_profile
        """Have the embedded nats-server serve Go's profiles (`NatsServer.profile`; benchmarks)."""
        self.supervisor = Supervisor(say=say)
        self.healthy_after_s: float | None = None
        self.sites: list[str] = []
        self._lowered: set[int] = set()
        self.slurm_sites = parse_slurm_sites(slurm_sites or [])
        """Site id → GPUs by type, of the sites run on a local Slurm cluster."""
        self.slurm: LocalSlurm | None = None
        self.log_format = log_format
        """`text` or `json` for every child (CNC_LOG_FORMAT); None: the environment's."""
        self.web_url = ""
        """The live web page (served by perception), as perception reported it once bound."""
        self.metrics: dict[str, str] = {}
        """Each child's /metrics URL, as the child reported it once bound."""
        self._written = ""
        self._next_refresh = 0.0

    @property
    def perception_port(self) -> int:
        return self.ports["perception"]

    @property
    def scheduler_port(self) -> int:
        return self.ports["scheduler"]

    @property
    def governance_port(self) -> int:
        return self.ports["governance"]

    @property
    def adaptation_port(self) -> int:
        return self.ports["adaptation"]

    @property
    def nats_url(self) -> str:
        if self.external_nats:
            return self.external_nats
        assert self.nats
        return self.nats.url

    @property
    def endpoints(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "nats": self.nats_url, "perception": f"127.0.0.1:{self.perception_port}",
            "scheduler": f"127.0.0.1:{self.scheduler_port}", "state": str(self.state_dir.resolve()),
            "governance": f"127.0.0.1:{self.governance_port}", "adaptation": f"127.0.0.1:{self.adaptation_port}",
            "secrets": str(self.secrets_dir.resolve())}
        if self.metrics:
            found["metrics"] = dict(self.metrics)
        if self.nats and self.nats.monitor_url:
            found["nats_monitor"] = self.nats.monitor_url
        if self.tls_ca:
            found["nats_tls_ca"] = str(self.tls_ca.resolve())
        if self.web_url:
            found["web"] = self.web_url
        found["up"] = process_identity(os.getpid())
        return found

    def _write_endpoints(self) -> None:
        """`endpoints.json` (for the client commands) and `prometheus.yml` as they are now, each
        replaced whole; unchanged files are left alone."""
        endpoints = self.endpoints
        text = json.dumps(endpoints, indent=2)
        if text == self._written:
            return
        for name, content in ((ENDPOINTS_FILE, text), (PROMETHEUS_FILE, prometheus_config(endpoints))):
            tmp = self.state_dir / f".{name}.tmp"
            tmp.write_text(content)
            tmp.replace(self.state_dir / name)
        if self._written:
            self.supervisor.say(f"endpoints changed; {ENDPOINTS_FILE} and {PROMETHEUS_FILE} written again")
        self._written = text

    def _refresh_endpoints(self, every_s: float = 1.0) -> None:
        """A restarted child reports its metrics endpoint again (the same port when it can get it),
        nats-server its monitoring port: the files that name them follow, so none names a dead port."""
        now = time.monotonic()
        if self.healthy_after_s is None or now < self._next_refresh:
            return
        self._next_refresh = now + every_s
        for name in self.procs:
            with contextlib.suppress(OSError):
                if url := (self.run_dir / f"{name}.metrics").read_text().strip():
                    self.metrics[name] = url
        with contextlib.suppress(OSError):
            self.web_url = (self.run_dir / "web.url").read_text().strip() or self.web_url
        self._write_endpoints()

    @property
    def run_dir(self) -> Path:
        """Where the children report the ports they bound (`<service>.port`, `<name>.metrics`)."""
        return self.state_dir / "run"

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        """The running children by name, nats-server aside (`nats`)."""
        return {n: c.proc for n, c in self.supervisor.children.items() if n != "nats" and c.proc is not None}

    @property
    def token_file(self) -> Path:
        return self.state_dir / OPERATOR_TOKEN_FILE

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / SECRETS_DIR

    @property
    def tls_ca(self) -> Path | None:
        """The CA every client of the embedded NATS server trusts (None: plain NATS)."""
        return self.secrets_dir / "tls" / "ca.pem" if self.nats_tls else None

    def _credentials(self) -> None:
        """Every process's NATS identity and governance's signing key (kept across restarts; new
        sites get theirs)."""
        from cncbrain.commands.credentials import make_secrets

        make_secrets(self.secrets_dir, self.sites, AGENTS_IDENTITY)

    async def _provision(self) -> None:
        """Create (or update) every stream and bucket as admin before the services start, so no
        service waits for another's (each would create only its own)."""
        from cncbrain.bus import Bus
        from cncbrain.commands.provision import provision

        bus = await Bus.connect(self.nats_url, "up", identity="admin", secrets_dir=self.secrets_dir, tls_ca=self.tls_ca,
                                ensure=False)
        try:
            await provision(bus)
        finally:
            await bus.close()

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def port_file(self, service: str) -> Path:
        return self.run_dir / f"{service}.port"

    def instances(self, service: str) -> list[str]:
        return [service, f"{service}-2"] if self.standby else [service]

    def _add(self, name: str, argv: list[str], env: dict[str, str], min_pause_s: float = 0.0,
             on_exit: Callable[[int], None] | None = None, spare: bool = False) -> None:
        """`spare`: the child keeps a warm spare that takes its place when it ends
        (`cncbrain.supervise`; its command must call `wait_to_take_over` when `is_spare()`)."""
        report = self.run_dir / f"{name}.metrics"
        env = {"CNC_METRICS_PORT": "0", "CNC_METRICS_HOST": "127.0.0.1", "CNC_METRICS_PORT_FILE": str(report.resolve()),
               **({"CNC_LOG_FORMAT": self.log_format} if self.log_format else {}), **env}

        def popen(as_spare: bool = False) -> subprocess.Popen[bytes]:
            # A restarted child finds its predecessor's report and listens on the same port again.
            log = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child for its life
            try:
                proc = subprocess.Popen(
                    die_with_parent([sys.executable, *argv]),  # a SIGKILLed `up` takes them with it
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE if as_spare else None,
                    env={**os.environ, "CNC_SECRETS_DIR": str(self.secrets_dir.resolve()),  # its NATS identity
                         **({"CNC_NATS_TLS_CA": str(self.tls_ca.resolve())} if self.tls_ca else {}), **env,
                         **({SPARE_ENV: "1"} if as_spare else {})},
                    start_new_session=True,  # Ctrl-C reaches `up`, which then stops the children in order
                )
            finally:
                log.close()
            return proc

        self.supervisor.add(name, popen, self.log_path(name), min_pause_s, on_exit,
                            spare=functools.partial(popen, True) if spare else None)

    def _free_lease(self, service: str, pid: int) -> None:
        """A service instance `up` reaped may have held its role's lease: free it for the standby,
        which then takes over at once instead of after the lease's TTL (`cncbrain.lease.release_dead`)."""
        from cncbrain.bus import Bus
        from cncbrain.lease import bucket_of, release_dead

        async def free() -> str:
            bus = await Bus.connect(self.nats_url, "up", identity="admin", secrets_dir=self.secrets_dir,
                                    ensure=False, timeout_s=2.0)
            try:
                return await release_dead(await bus.kv(bucket_of(service)), pid)
            finally:
                await bus.close()

        def run() -> None:  # a thread of its own: `poll` may run inside an event loop (start-up)
            try:
                done["instance"] = aio.run(free())
            except Exception as exc:  # NATS away: the standby takes over after the TTL
                done["error"] = repr(exc)

        done: dict[str, str] = {}
        worker = threading.Thread(target=run, name=f"free-lease-{service}", daemon=True)
        worker.start()
        worker.join(5.0)
        if done.get("instance"):
            self.supervisor.say(f"{service}: freed the lease {done['instance']} held when it ended; "
                                f"the standby takes over")
        elif "error" in done:
            self.supervisor.say(f"{service}: could not free the lease of the ended instance ({done['error']}); "
                                f"the standby takes over after {LEASE_TTL_S:g} s")

    def _add_service(self, service: str, env: dict[str, str], raw_env: dict[str, str] | None = None) -> None:
        prefix = f"CNC_{service.upper()}_"
        for instance in self.instances(service):
            self._add(instance, ["-m", f"services.{service}"], {
                **(raw_env or {}), **{prefix + k: v for k, v in env.items()},
                prefix + "NATS_URL": self.nats_url, prefix + "GRPC_PORT": str(self.ports[service]),
                prefix + "PORT_FILE": str(self.port_file(service).resolve()), prefix + "INSTANCE": instance,
                prefix + "AUTH_ENABLED": "true" if self.auth else "false"},
                # with a standby, a crashed instance comes back after the standby took over
                min_pause_s=LEASE_TTL_S + 1.0 if self.standby else 0.0,
                on_exit=functools.partial(self._free_lease, service) if self.standby else None)
            self.supervisor.start(instance)

    def start(self, timeout_s: float = 90.0) -> Brain:
        from agents.executor_emulated import site_ids_of
        from cncbrain.scenario import load_scenario

        started = time.monotonic()
        self.sites = site_ids_of(load_scenario(self.scenario))  # validates the scenario first
        self.sites += [s for s in self.slurm_sites if s not in self.sites]
        busy = [(n, p) for n, p in self.ports.items() if p and port_in_use(p)]
        if not self.external_nats and self.nats_port and port_in_use(self.nats_port):
            busy.insert(0, ("nats", self.nats_port))
        if busy:
            raise CncError("port(s) in use: " + ", ".join(f"{n} {p}" for n, p in busy)
                           + " — is another `cncbrain up` running? Stop it, or pick ports with "
                           "--nats-port/--perception-port/--scheduler-port/--adaptation-port/--governance-port "
                           "(0: any free port; or --nats-url for an existing NATS)")
        if self.fresh and self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        # Its owner's alone: the operator token, the keys, the NATS store and the logs are in it.
        self.state_dir.chmod(0o700)
        shutil.rmtree(self.run_dir, ignore_errors=True)  # ports reported by an earlier brain
        for name in (ENDPOINTS_FILE, PROMETHEUS_FILE):  # and the files naming them (a SIGKILLed `up`'s)
            (self.state_dir / name).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True)
        self._credentials()
        try:
            if not self.external_nats:
                from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR
                from cncbrain.natsserver import NatsTls

                tls = None
                if self.nats_tls:
                    from cncbrain.certs import ensure_nats_certs

                    cert = ensure_nats_certs(self.secrets_dir / "tls", {"local": []})[0]
                    tls = NatsTls(cert.cert, cert.key, cert.ca)
                nats = self.nats = NatsServer(self.state_dir / "jetstream", port=self.nats_port,
                                              log_file=self.log_path("nats"),
                                              auth=self.secrets_dir / NATS_DIR / AUTH_FILE, tls=tls,
                                              profile=self.nats_profile)
                self.supervisor.add("nats", lambda: nats.start().process, self.log_path("nats"))
                self.supervisor.start("nats")
            aio.run(self._provision())
            token_file = str(self.token_file.resolve())
            self._add_service("governance", {"BOOTSTRAP_TOKEN_FILE": token_file})
            self._add_service("perception", {"TICK_S": str(self.perception_tick_s), "WEB_PORT": "0",
                                             "WEB_PORT_FILE": str((self.run_dir / "web.url").resolve())})
            aio.run(self._wait_listening(("governance", "perception"), started + timeout_s))
            self._add_service("scheduler", {"GOVERNANCE_TARGET": f"127.0.0.1:{self.governance_port}"},
                              {"CNC_TOKEN_FILE": token_file})
            self._add_service("adaptation", {"PERCEPTION_TARGET": f"127.0.0.1:{self.perception_port}"},
                              {"CNC_TOKEN_FILE": token_file})
            # A restarted emulator has its sites as they were (its state file): the agents go on.
            self._add("emulator", ["-m", "cncbrain.commands.emulate", "--scenario", self.scenario,
                                   "--speed", str(self.speed), "--nats-url", self.nats_url,
                                   "--state-file", str((self.state_dir / EMULATOR_STATE).resolve())], {})
            self.supervisor.start("emulator")
            policy = ["--policy", self.policy] if self.policy else []
            skip = [a for s in self.slurm_sites for a in ("--except", s)]
            self._add("agents", ["-m", "cncbrain.commands.agent", "--all", "--scenario", self.scenario,
                                 "--nats-url", self.nats_url, "--identity", AGENTS_IDENTITY, *skip, *policy], {},
                      spare=True)
            self.supervisor.start("agents")
            self._start_slurm_sites(policy)
            aio.run(self._wait_ready(started + timeout_s, timeout_s))
            self.metrics = self._read_reports(max(1.0, timeout_s - (time.monotonic() - started)))
        except BaseException:
            self.stop()
            raise
        self.healthy_after_s = time.monotonic() - started
        self._lower_background()
        self._write_endpoints()
        return self

    def _read_reports(self, timeout_s: float) -> dict[str, str]:
        """The /metrics URL each child wrote once its endpoint was bound (they bind before serving;
        a standby instance binds when it starts, before it waits for its lease)."""
        deadline = time.monotonic() + timeout_s
        found: dict[str, str] = {}
        while True:
            for name in self.procs:
                path = self.run_dir / f"{name}.metrics"
                if name not in found and path.exists():
                    found[name] = path.read_text().strip()
            web = self.run_dir / "web.url"
            if not self.web_url and web.exists():
                self.web_url = web.read_text().strip()
            if len(found) == len(self.procs) and self.web_url:
                return {name: found[name] for name in self.procs}
            self._check()
            if time.monotonic() > deadline:
                missing = [f"{n}'s metrics endpoint" for n in sorted(set(self.procs) - set(found))]
                missing += [] if self.web_url else ["perception's web page"]
                raise CncError(f"not reported within {timeout_s:.0f} s: {', '.join(missing)} "
                               f"(logs in {self.state_dir / 'logs'})")
            time.sleep(0.05)

    def _check(self) -> None:
        """During start-up: restart what ended (a site agent that found the emulator not answering
        yet, ...); raise `GaveUp` when something keeps failing."""
        self.poll()

    def _start_slurm_sites(self, policy: list[str]) -> None:
        """A local Slurm cluster with a partition of nodes (8 GPUs at most each) per Slurm site, and
        a site agent on the Slurm executor for each (supervised like the others)."""
        if not self.slurm_sites:
            return
        from agents.executor_emulated import site_ids_of
        from cncbrain.scenario import load_scenario
        from cncbrain.slurm_local import LocalSlurm, Node, missing

        reason = missing()
        if reason:
            raise CncError(f"--slurm-site: {reason}")
        nodes: list[Node] = []
        for sid, gpus in self.slurm_sites.items():
            for gpu_type, count in gpus.items():
                while count > 0:
                    nodes.append(Node(f"{sid}-{len(nodes)}", {gpu_type.lower(): min(count, 8)}, partitions=(sid,)))
                    count -= 8
        slurm = self.slurm = LocalSlurm(nodes, root=(self.state_dir / "slurm").resolve(), cluster="cncup").start()
        emulated = set(site_ids_of(load_scenario(self.scenario)))
        for sid, gpus in self.slurm_sites.items():
            mapping = [a for t in gpus for a in ("--slurm-gpu-type", f"{t.lower()}={t}")]
            self._add(f"agent-slurm-{sid}", [
                "-m", "cncbrain.commands.agent", "--executor", "slurm", "--site", sid, "--nats-url", self.nats_url,
                "--slurm-conf", str(slurm.conf), "--slurm-partition", sid,
                "--slurm-workdir", str((self.state_dir / "slurm" / "work" / sid).resolve()),
                "--slurm-default-command", f"{shlex.quote(sys.executable)} -m agents.demo_workload", *mapping,
                *(["--slurm-site-from-emulator"] if sid in emulated else []), *policy], {})
            self.supervisor.start(f"agent-slurm-{sid}")

    def dead(self) -> str | None:
        """A message naming a child that has ended (and its last log lines), or None."""
        child = self.supervisor.exited()
        if child is None:
            return None
        assert child.proc is not None
        return f"{child.name} exited with code {child.proc.returncode}; last log lines:{child.tail()}"

    def poll(self) -> list[str]:
        """Restart what crashed (see `Supervisor.poll`); raises `GaveUp`. Has the embedded NATS
        server reload its configuration when `auth.conf` changed (a site's key enrolled)."""
        restarted = self.supervisor.poll()
        self._lower_background()
        if self.nats is not None and self.nats.reload_if_changed():
            self.supervisor.say("nats: auth.conf changed, configuration reloaded (a key added or removed)")
        self._refresh_endpoints()
        return restarted

    def _lower_background(self, settle_s: float = 10.0) -> None:
        """`BACKGROUND` children yield the CPU once started (niced from the first instant, a
        loaded machine can starve their start-up — imports, the twin — past what `up` waits): the
        first ones once the brain is healthy, a restarted one `settle_s` after it started again."""
        if not self.background_nice or self.healthy_after_s is None or self.standby:
            return  # with a standby, not: a niced active starved of CPU misses its lease renewals for
            # the TTL and its standby takes over (adaptation changed hands twice in one bench_chaos
            # run at load 11-12, each time unhealthy for seconds)
        now = time.monotonic()
        for name, child in self.supervisor.children.items():
            proc = child.proc
            if (proc is not None and proc.pid not in self._lowered and name.split("-")[0] in BACKGROUND
                    and (child.started_at is None or now - child.started_at >= settle_s or not child.restarts)):
                lower_priority(proc.pid, self.background_nice)
                self._lowered.add(proc.pid)

    async def _wait_listening(self, services: tuple[str, ...], deadline: float) -> None:
        """Wait until each of `services` has reported the port it listens on (bind, then report)."""
        for service in services:
            while not (port := reported_port(self.port_file(service))):
                self._check()
                if time.monotonic() > deadline:
                    raise CncError(f"{service} did not listen within the start-up time "
                                   f"(logs in {self.state_dir / 'logs'})")
                await asyncio.sleep(0.05)
            self.ports[service] = port

    async def _enroll(self, token: str | None) -> None:
        """Enroll the sites (as the operator): the emulated ones with their inventory as the emulator
        will report it, the Slurm ones with the GPUs `--slurm-site` gave them, at the GPU catalogue's
        prices; a site's key is the one `_credentials` made for it."""
        import grpc

        from agents.executor_emulated import site_inventories
        from cnc.governance.v1 import governance_pb2 as gpb
        from cnc.governance.v1 import governance_pb2_grpc
        from cncbrain.auth import token_interceptors
        from cncbrain.bus.credentials import load_identities
        from cncbrain.commands.sites import scenario_enrollments
        from cncbrain.scenario import load_scenario

        inventories = site_inventories(load_scenario(self.scenario))
        inventories.update(self.slurm_sites)  # a Slurm site is enrolled with the GPUs its cluster has
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.governance_port}",
                                             interceptors=token_interceptors(token)) as ch:
            stub = governance_pb2_grpc.GovernanceServiceStub(ch)
            for enrollment in scenario_enrollments(inventories, load_identities(self.secrets_dir)):
                await stub.EnrollSite(gpb.EnrollSiteRequest(site=enrollment), timeout=10)

    async def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        import grpc

        from cnc.perception.v1 import perception_pb2 as ppb
        from cnc.perception.v1 import perception_pb2_grpc
        from cncbrain.grpcserver import wait_healthy

        await self._wait_listening(SERVICES, deadline)
        for service in SERVICES:
            while True:
                self._check()
                try:
                    await wait_healthy(f"127.0.0.1:{self.ports[service]}", timeout_s=0.5)
                    break
                except CncError:
                    if time.monotonic() > deadline:
                        raise CncError(f"{service} (127.0.0.1:{self.ports[service]}) not healthy within "
                                       f"{timeout_s:.0f} s (logs in {self.state_dir / 'logs'})") from None
        from cncbrain.auth import token_interceptors

        token = self.token_file.read_text().strip() if self.auth and self.token_file.exists() else None
        await self._enroll(token)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.perception_port}",
                                             interceptors=token_interceptors(token)) as ch:
            stub = perception_pb2_grpc.PerceptionServiceStub(ch)
            while True:
                self._check()
                try:
                    listed = len((await stub.ListSites(ppb.ListSitesRequest(), timeout=2)).sites)
                except grpc.aio.AioRpcError:  # perception restarting
                    listed = 0
                if listed >= len(self.sites):
                    return
                if time.monotonic() > deadline:
                    raise CncError(f"only {listed} of {len(self.sites)} site agents registered "
                                   f"within {timeout_s:.0f} s (logs in {self.state_dir / 'logs'})")
                await asyncio.sleep(0.1)

    def stop(self, grace_s: float = 8.0) -> None:
        order = [i for name in STOP_ORDER for i in (self.instances(name) if name in SERVICES else [name])]
        self.supervisor.stop([n for n in order if n != "nats"], grace_s)
        if self.slurm is not None:
            self.slurm.stop()  # its jobs too
            self.slurm = None
        if self.nats:
            self.nats.stop()
            self.nats = None
        with_file = self.state_dir / ENDPOINTS_FILE
        if with_file.exists():
            with_file.unlink()


def parse_slurm_sites(specs: list[str]) -> dict[str, dict[str, int]]:
    """`ID[=TYPE:N[,TYPE:N]]` → {id: {type: n}}; H100:8 when no GPUs are named."""
    from cncbrain.bus.subjects import SubjectError, check_token
    from cncbrain.twin.costmodel import gpu_catalog

    known = gpu_catalog()
    out: dict[str, dict[str, int]] = {}
    for spec in specs:
        sid, _, gpus = spec.partition("=")
        try:
            check_token(sid, "--slurm-site id")
        except SubjectError as exc:
            raise UsageError(str(exc)) from None
        pools: dict[str, int] = {}
        for part in (gpus or "H100:8").split(","):
            name, _, count = part.partition(":")
            if not count.isdigit() or not 0 < int(count) <= 512:
                raise UsageError(f"--slurm-site {spec}: {part!r} is not TYPE:N (a GPU name and 1..512)")
            if name not in known:
                raise UsageError(f"--slurm-site {spec}: unknown GPU type {name!r}; known: {', '.join(known)}")
            pools[name] = pools.get(name, 0) + int(count)
        if sid in out:
            raise UsageError(f"--slurm-site {sid} is given twice")
        out[sid] = pools
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="bring the brain up on loopback (NATS, services, emulator, site agents)")
    add_up_args(p)
    p.set_defaults(func=run)


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="abilene", help="scenario whose sites are emulated (default abilene)")
    p.add_argument("--nats-url", default=os.environ.get("CNC_NATS_URL"),
                   help="use this NATS server (JetStream enabled) instead of starting one")
    p.add_argument("--nats-port", type=int, default=NATS_PORT)
    p.add_argument("--perception-port", type=int, default=PERCEPTION_PORT)
    p.add_argument("--scheduler-port", type=int, default=SCHEDULER_PORT)
    p.add_argument("--adaptation-port", type=int, default=None,
                   help=f"default {ADAPTATION_PORT}, or a free port when that one is taken")
    p.add_argument("--governance-port", type=int, default=None,
                   help=f"default {GOVERNANCE_PORT}, or a free port when that one is taken")
    p.add_argument("--no-auth", action="store_true", help="run every service without token checks (local tries only)")
    p.add_argument("--nats-tls", action="store_true",
                   help="the embedded NATS server requires TLS (a certificate from the brain's CA in "
                        "STATE_DIR/secrets/tls/, made at first start); clients trust only that CA")
    p.add_argument("--speed", type=float, default=30.0, help="emulated seconds per wall second")
    p.add_argument("--state-dir", type=Path, default=default_state_dir())
    p.add_argument("--fresh", action="store_true", help="wipe the state folder first")
    p.add_argument("--background-nice", type=int, default=None, metavar="N",
                   help=f"CPU nice value (0..19) of {' and '.join(BACKGROUND)}, off the deploy path (default "
                        f"$CNC_BACKGROUND_NICE, else {DEFAULT_BACKGROUND_NICE}; 0: same priority as the rest; not with --standby)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="every process's log: text, or json (one object per line with trace and span ids); "
                        "default $CNC_LOG_FORMAT, else text")
    p.add_argument("--standby", action="store_true",
                   help="run two instances of each service: one active (a lease in NATS KV), the other taking over "
                        "within seconds when it dies")
    p.add_argument("--slurm-site", action="append", default=[], metavar="ID[=TYPE:N,...]",
                   help="run this site on a Slurm cluster started on this machine (real jobs; needs root and the "
                        "Debian packages of deploy/slurm/setup.sh); a scenario site keeps its place and links; "
                        "GPUs default to H100:8 (repeatable)")
    p.add_argument("--policy", default=os.environ.get("CNC_AGENT_POLICY"),
                   help="site agents' policy: greedy, marl or marl:PATH (default $CNC_AGENT_POLICY, else marl "
                        "when the shipped policy file exists, else greedy)")


def say(line: str) -> None:
    """A supervision line on `up`'s console."""
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def run(args: argparse.Namespace) -> int:
    brain = Brain(args.state_dir, args.scenario, nats_url=args.nats_url, nats_port=args.nats_port,
                  perception_port=args.perception_port, scheduler_port=args.scheduler_port,
                  speed=args.speed, fresh=args.fresh, governance_port=args.governance_port,
                  adaptation_port=args.adaptation_port, auth=not args.no_auth, policy=args.policy,
                  background_nice=args.background_nice, log_format=args.log_format, standby=args.standby,
                  say=say, slurm_sites=args.slurm_site, nats_tls=args.nats_tls)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting CNC Brain ({args.scenario}{', standby instances' if args.standby else ''}) …", flush=True)
    brain.start()
    ep = brain.endpoints
    print(f"healthy in {brain.healthy_after_s:.1f} s — {len(brain.sites)} site agents registered\n"
          f"  NATS        {ep['nats']}{'  (embedded)' if not args.nats_url else ''}"
          f"{'  TLS, CA ' + ep['nats_tls_ca'] if ep.get('nats_tls_ca') else ''}\n"
          f"  perception  {ep['perception']}  (gRPC: cnc.perception.v1.PerceptionService, health, reflection)\n"
          f"  scheduler   {ep['scheduler']}  (gRPC: cnc.scheduler.v1.SchedulerService, health, reflection)\n"
          f"  adaptation  {ep['adaptation']}  (gRPC: cnc.adaptation.v1.AdaptationService, health, reflection)\n"
          f"  governance  {ep['governance']}  (gRPC: cnc.governance.v1.GovernanceService, health, reflection)\n"
          + (f"  operator token  {brain.token_file.resolve()}  ({cli_hint(brain)}; auth on for every service)\n"
             if brain.auth else "  auth OFF (--no-auth): every call is accepted\n") +
          "".join(f"  slurm       {sid} ({', '.join(f'{t} {n}' for t, n in gpus.items())}): real jobs; "
                  f"SLURM_CONF={brain.slurm.conf if brain.slurm else ''} squeue\n" for sid, gpus in brain.slurm_sites.items()) +
          f"  state       {ep['state']}  (logs/, jetstream/)\n"
          + "".join(f"  metrics     {url}  ({name})\n" for name, url in ep.get("metrics", {}).items())
          + (f"  NATS monitoring  {ep['nats_monitor']}/varz  (/jsz, /connz, /healthz)\n" if ep.get("nats_monitor") else "")
          + f"  Prometheus  prometheus --config.file={brain.state_dir.resolve() / PROMETHEUS_FILE}\n"
          + f"  web page    {web_link(brain)}\n" +
          f"  event loop  {aio.loop_name()}  (every process; CNC_EVENT_LOOP=asyncio for the standard one)\n"
          + ("  standby     a second instance of each service takes over when the active one dies\n"
             if args.standby else "") +
          f"  supervised  a process that crashes is restarted; up stops when one crashes "
          f"{brain.supervisor.max_crashes} times within {brain.supervisor.window_s:.0f} s\n"
          f"try: cncbrain sites · cncbrain deploy --name chat --model 13b · cncbrain watch\n"
          f"Ctrl-C stops everything.", flush=True)
    try:
        while not stop["now"]:
            try:
                brain.poll()
            except GaveUp as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.1)
    finally:
        print("stopping …", flush=True)
        brain.stop()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["up", *sys.argv[1:]]))
