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
A restart reuses them. Anonymous clients are refused. The server stays plain on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cncbrain import aio
from cncbrain.commands._live import ENDPOINTS_FILE, STATE_DIR
from cncbrain.errors import CncError, UsageError
from cncbrain.natsserver import NatsServer, port_in_use

SECRETS_DIR = "secrets"
"""Sub-folder of the state folder with the NATS credentials (`cncbrain.bus.credentials`)."""
NATS_PORT, PERCEPTION_PORT, SCHEDULER_PORT = 4222, 50061, 50062
ADAPTATION_PORT, GOVERNANCE_PORT = 50063, 50064
PROMETHEUS_FILE = "prometheus.yml"
"""A Prometheus scrape configuration for this brain, written by `up` (`prometheus --config.file=...`)."""
BACKGROUND = ("adaptation", "emulator")
"""Processes off the deploy → placement path (adaptation's control loop, the emulated sites): they
run at a lower CPU priority (`--background-nice`), so on a small machine the scheduler, the site
agents, perception, governance (admission) and NATS get a core first. `python -m benchmarks.bench_live
nice` (10 interleaved blocks of 60 deploys in one brain) on this project's 2-core machine: deploy →
placement p50 11.97 ms at nice 0 vs 10.20 at 19 (median of the blocks, 9 of 10 pairs lower);
`... nice 10 19`: 8.12 vs 7.63 ms (6 of 10) at a faster hour (docs/live-brain.md)."""
DEFAULT_BACKGROUND_NICE = 19


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


class Brain:
    """The processes of an embedded brain; `start()` returns once every health check is SERVING
    and every site agent has registered."""

    def __init__(self, state_dir: Path = STATE_DIR, scenario: str = "abilene", *, nats_url: str | None = None,
                 nats_port: int = NATS_PORT, perception_port: int = PERCEPTION_PORT,
                 scheduler_port: int = SCHEDULER_PORT, speed: float = 30.0, fresh: bool = False,
                 perception_tick_s: float = 1.0, governance_port: int | None = None,
                 adaptation_port: int | None = None, auth: bool = False, policy: str | None = None,
                 background_nice: int | None = None, log_format: str | None = None) -> None:
        from cncbrain.natsserver import free_port

        # Governance and adaptation: unless given, their default port, or a free one when that is taken (another
        # brain, a test running beside this one); endpoints.json tells the client commands.
        self.governance_port = governance_port or (GOVERNANCE_PORT if not port_in_use(GOVERNANCE_PORT) else free_port())
        self.adaptation_port = adaptation_port or (ADAPTATION_PORT if not port_in_use(ADAPTATION_PORT) else free_port())
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
        self.nats_port = nats_port
        self.perception_port = perception_port
        self.scheduler_port = scheduler_port
        self.speed = speed
        self.fresh = fresh
        self.perception_tick_s = perception_tick_s
        self.nats: NatsServer | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.healthy_after_s: float | None = None
        self.sites: list[str] = []
        self.log_format = log_format
        """`text` or `json` for every child (CNC_LOG_FORMAT); None: the environment's."""
        self.web_url = ""
        """The live web page (served by perception), as perception reported it once bound."""
        self.metrics: dict[str, str] = {}
        """Each child's /metrics URL, as the child reported it once bound."""

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
        if self.web_url:
            found["web"] = self.web_url
        return found

    @property
    def run_dir(self) -> Path:
        """Where the children report the ports they bound (`<name>.metrics`)."""
        return self.state_dir / "run"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "operator.token"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / SECRETS_DIR

    def _credentials(self) -> None:
        """Every process's NATS identity and governance's signing key (kept across restarts; new
        sites get theirs)."""
        from cncbrain.bus.credentials import ensure_identities
        from cncbrain.bus.permissions import ADMIN, SERVICES, site_identity
        from cncbrain.signing import ensure_signing_key

        ensure_identities(self.secrets_dir, [ADMIN, *SERVICES, *(site_identity(s) for s in self.sites)])
        ensure_signing_key(self.secrets_dir)

    async def _provision(self) -> None:
        """Create (or update) every stream and bucket as admin before the services start, so no
        service waits for another's (each would create only its own)."""
        import services.adaptation.subjects  # noqa: F401  (registers the adaptation stream)
        from cncbrain.bus import Bus
        from cncbrain.bus.permissions import BUCKET_OWNERS
        from services.governance.ledger_store import LedgerStore

        bus = await Bus.connect(self.nats_url, "up", identity="admin", secrets_dir=self.secrets_dir)
        try:
            await LedgerStore(bus).ensure()
            for bucket in BUCKET_OWNERS:
                await bus.kv(bucket)
        finally:
            await bus.close()

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child for its life
        report = self.run_dir / f"{name}.metrics"
        report.unlink(missing_ok=True)
        if name == "perception":
            (self.run_dir / "web.url").unlink(missing_ok=True)
        env = {"CNC_METRICS_PORT": "0", "CNC_METRICS_HOST": "127.0.0.1", "CNC_METRICS_PORT_FILE": str(report.resolve()),
               **({"CNC_LOG_FORMAT": self.log_format} if self.log_format else {}), **env}
        self.procs[name] = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "CNC_SECRETS_DIR": str(self.secrets_dir.resolve()), **env},  # its NATS identity
            start_new_session=True,  # Ctrl-C reaches `up`, which then stops the children in order
        )
        if name in BACKGROUND and self.background_nice:
            lower_priority(self.procs[name].pid, self.background_nice)

    def start(self, timeout_s: float = 30.0) -> Brain:
        from agents.executor_emulated import site_ids_of
        from cncbrain.scenario import load_scenario

        started = time.monotonic()
        self.sites = site_ids_of(load_scenario(self.scenario))  # validates the scenario first
        busy = [(n, p) for n, p in (("perception", self.perception_port), ("scheduler", self.scheduler_port),
                                    ("adaptation", self.adaptation_port), ("governance", self.governance_port))
                if port_in_use(p)]
        if not self.external_nats and port_in_use(self.nats_port):
            busy.insert(0, ("nats", self.nats_port))
        if busy:
            raise CncError("port(s) in use: " + ", ".join(f"{n} {p}" for n, p in busy)
                           + " — is another `cncbrain up` running? Stop it, or pick ports with "
                           "--nats-port/--perception-port/--scheduler-port/--adaptation-port/--governance-port "
                           "(or --nats-url for an existing NATS)")
        if self.fresh and self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._credentials()
        if not self.external_nats:
            from cncbrain.bus.credentials import AUTH_FILE, NATS_DIR

            self.nats = NatsServer(self.state_dir / "jetstream", port=self.nats_port, log_file=self.log_path("nats"),
                                   auth=self.secrets_dir / NATS_DIR / AUTH_FILE).start()
        url = self.nats_url
        auth = "true" if self.auth else "false"
        token_file = str(self.token_file.resolve())
        try:
            aio.run(self._provision())
            self._spawn("governance", ["-m", "services.governance"], {
                "CNC_GOVERNANCE_NATS_URL": url, "CNC_GOVERNANCE_GRPC_PORT": str(self.governance_port),
                "CNC_GOVERNANCE_AUTH_ENABLED": auth, "CNC_GOVERNANCE_BOOTSTRAP_TOKEN_FILE": token_file})
            self._spawn("perception", ["-m", "services.perception"], {
                "CNC_PERCEPTION_NATS_URL": url, "CNC_PERCEPTION_GRPC_PORT": str(self.perception_port),
                "CNC_PERCEPTION_TICK_S": str(self.perception_tick_s), "CNC_PERCEPTION_AUTH_ENABLED": auth,
                "CNC_PERCEPTION_WEB_PORT": "0", "CNC_PERCEPTION_WEB_PORT_FILE": str((self.run_dir / "web.url").resolve())})
            self._spawn("scheduler", ["-m", "services.scheduler"], {
                "CNC_SCHEDULER_NATS_URL": url, "CNC_SCHEDULER_GRPC_PORT": str(self.scheduler_port),
                "CNC_SCHEDULER_AUTH_ENABLED": auth, "CNC_SCHEDULER_GOVERNANCE_TARGET": f"127.0.0.1:{self.governance_port}",
                "CNC_TOKEN_FILE": token_file})
            self._spawn("adaptation", ["-m", "services.adaptation"], {
                "CNC_ADAPTATION_NATS_URL": url, "CNC_ADAPTATION_GRPC_PORT": str(self.adaptation_port),
                "CNC_ADAPTATION_AUTH_ENABLED": auth, "CNC_ADAPTATION_PERCEPTION_TARGET": f"127.0.0.1:{self.perception_port}",
                "CNC_TOKEN_FILE": token_file})
            self._spawn("emulator", ["-m", "cncbrain.commands.emulate", "--scenario", self.scenario,
                                     "--speed", str(self.speed), "--nats-url", url], {})
            self._spawn("agents", ["-m", "cncbrain.commands.agent", "--all", "--scenario", self.scenario,
                                   "--nats-url", url, *(["--policy", self.policy] if self.policy else [])], {})
            aio.run(self._wait_ready(timeout_s))
            self.metrics = self._read_reports(max(1.0, timeout_s - (time.monotonic() - started)))
        except BaseException:
            self.stop()
            raise
        self.healthy_after_s = time.monotonic() - started
        (self.state_dir / ENDPOINTS_FILE).write_text(json.dumps(self.endpoints, indent=2))
        (self.state_dir / PROMETHEUS_FILE).write_text(prometheus_config(self.endpoints))
        return self

    def _read_reports(self, timeout_s: float) -> dict[str, str]:
        """The /metrics URL each child wrote once its endpoint was bound (they bind before serving)."""
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
            if (msg := self.dead()) is not None:
                raise CncError(msg)
            if time.monotonic() > deadline:
                missing = [f"{n}'s metrics endpoint" for n in sorted(set(self.procs) - set(found))]
                missing += [] if self.web_url else ["perception's web page"]
                raise CncError(f"not reported within {timeout_s:.0f} s: {', '.join(missing)} "
                               f"(logs in {self.state_dir / 'logs'})")
            time.sleep(0.05)

    def dead(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace").strip().splitlines()[-5:]
                return f"{name} exited with code {proc.returncode}; last log lines:\n  " + "\n  ".join(tail)
        return None

    async def _wait_ready(self, timeout_s: float) -> None:
        import grpc

        from cnc.perception.v1 import perception_pb2, perception_pb2_grpc
        from cncbrain.grpcserver import wait_healthy

        deadline = time.monotonic() + timeout_s
        for port in (self.governance_port, self.perception_port, self.scheduler_port, self.adaptation_port):
            while True:
                if (msg := self.dead()) is not None:
                    raise CncError(msg)
                try:
                    await wait_healthy(f"127.0.0.1:{port}", timeout_s=0.5)
                    break
                except CncError:
                    if time.monotonic() > deadline:
                        raise CncError(f"127.0.0.1:{port} not healthy within {timeout_s:.0f} s "
                                       f"(logs in {self.state_dir / 'logs'})") from None
        from cncbrain.auth import token_interceptors

        token = self.token_file.read_text().strip() if self.auth and self.token_file.exists() else None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.perception_port}",
                                             interceptors=token_interceptors(token)) as ch:
            stub = perception_pb2_grpc.PerceptionServiceStub(ch)
            while True:
                if (msg := self.dead()) is not None:
                    raise CncError(msg)
                sites = (await stub.ListSites(perception_pb2.ListSitesRequest())).sites
                if len(sites) >= len(self.sites):
                    return
                if time.monotonic() > deadline:
                    raise CncError(f"only {len(sites)} of {len(self.sites)} site agents registered "
                                   f"within {timeout_s:.0f} s (logs in {self.state_dir / 'logs'})")
                await asyncio.sleep(0.1)

    def stop(self, grace_s: float = 8.0) -> None:
        for name in ("agents", "emulator", "adaptation", "scheduler", "perception", "governance"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.nats:
            self.nats.stop()
            self.nats = None
        with_file = self.state_dir / ENDPOINTS_FILE
        if with_file.exists():
            with_file.unlink()


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
    p.add_argument("--speed", type=float, default=30.0, help="emulated seconds per wall second")
    p.add_argument("--state-dir", type=Path, default=STATE_DIR)
    p.add_argument("--fresh", action="store_true", help="wipe the state folder first")
    p.add_argument("--background-nice", type=int, default=None, metavar="N",
                   help=f"CPU nice value (0..19) of {' and '.join(BACKGROUND)}, off the deploy path (default "
                        f"$CNC_BACKGROUND_NICE, else {DEFAULT_BACKGROUND_NICE}; 0: same priority as the rest)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="every process's log: text, or json (one object per line with trace and span ids); "
                        "default $CNC_LOG_FORMAT, else text")
    p.add_argument("--policy", default=os.environ.get("CNC_AGENT_POLICY"),
                   help="site agents' policy: greedy, marl or marl:PATH (default $CNC_AGENT_POLICY, else marl "
                        "when the shipped policy file exists, else greedy)")


def run(args: argparse.Namespace) -> int:
    brain = Brain(args.state_dir, args.scenario, nats_url=args.nats_url, nats_port=args.nats_port,
                  perception_port=args.perception_port, scheduler_port=args.scheduler_port,
                  speed=args.speed, fresh=args.fresh, governance_port=args.governance_port,
                  adaptation_port=args.adaptation_port, auth=not args.no_auth, policy=args.policy,
                  background_nice=args.background_nice, log_format=args.log_format)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"starting CNC Brain ({args.scenario}) …", flush=True)
    brain.start()
    ep = brain.endpoints
    print(f"healthy in {brain.healthy_after_s:.1f} s — {len(brain.sites)} site agents registered\n"
          f"  NATS        {ep['nats']}{'  (embedded)' if not args.nats_url else ''}\n"
          f"  perception  {ep['perception']}  (gRPC: cnc.perception.v1.PerceptionService, health, reflection)\n"
          f"  scheduler   {ep['scheduler']}  (gRPC: cnc.scheduler.v1.SchedulerService, health, reflection)\n"
          f"  adaptation  {ep['adaptation']}  (gRPC: cnc.adaptation.v1.AdaptationService, health, reflection)\n"
          f"  governance  {ep['governance']}  (gRPC: cnc.governance.v1.GovernanceService, health, reflection)\n"
          + (f"  operator token  {brain.token_file.resolve()}  ({cli_hint(brain)}; auth on for every service)\n"
             if brain.auth else "  auth OFF (--no-auth): every call is accepted\n") +
          f"  state       {ep['state']}  (logs/, jetstream/)\n"
          + "".join(f"  metrics     {url}  ({name})\n" for name, url in ep.get("metrics", {}).items())
          + (f"  NATS monitoring  {ep['nats_monitor']}/varz  (/jsz, /connz, /healthz)\n" if ep.get("nats_monitor") else "")
          + f"  Prometheus  prometheus --config.file={brain.state_dir.resolve() / PROMETHEUS_FILE}\n"
          + f"  web page    {web_link(brain)}\n" +
          f"  event loop  {aio.loop_name()}  (every process; CNC_EVENT_LOOP=asyncio for the standard one)\n"
          f"try: cncbrain sites · cncbrain deploy --name chat --model 13b · cncbrain watch\n"
          f"Ctrl-C stops everything.", flush=True)
    try:
        while not stop["now"]:
            msg = brain.dead()
            if msg:
                print(f"error: {msg}", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        print("stopping …", flush=True)
        brain.stop()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["up", *sys.argv[1:]]))
