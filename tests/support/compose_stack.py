"""Drive a compose stack of deploy/ with podman-compose: build the image, bring a project up on free
loopback ports, wait for its health checks, stop and start single containers, tear it down and
check that nothing of it is left.

Each `Stack` has its own compose project name and host ports, so runs on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETUP = DEPLOY / "podman" / "setup.sh"
BUILD = DEPLOY / "podman" / "build-image.sh"
HEALTHY = DEPLOY / "podman" / "healthy.sh"
COMPOSE = DEPLOY / "docker-compose.yml"
CLUSTER = DEPLOY / "docker-compose.cluster.yml"
BASE_IMAGE = "localhost/cnc-python:3.11-bookworm"
TEST_IMAGE = os.environ.get("CNC_TEST_IMAGE", "localhost/cncbrain:test")

PORT_VARS = (
    "CNC_NATS_PORT",
    "CNC_NATS_MONITOR_PORT",
    "CNC_PERCEPTION_PORT",
    "CNC_SCHEDULER_PORT",
    "CNC_ADAPTATION_PORT",
    "CNC_GOVERNANCE_PORT",
    "CNC_WEB_PORT",
)
TOKEN_FILE = "/var/lib/cncbrain/token/operator.token"
KIT_FILES = ("nats/admin.nk", "tls/ca.pem", "governance.pub")
"""What the operator takes out of the `secrets` volume (deploy/README.md): the admin NATS key, the
CA of the NATS servers' certificates, governance's public key."""
CLUSTER_PORT_VARS = (
    "CNC_NATS2_PORT",
    "CNC_NATS2_MONITOR_PORT",
    "CNC_NATS3_PORT",
    "CNC_NATS3_MONITOR_PORT",
)


def compose_tool() -> str | None:
    """podman-compose: the project's own (the dev extra's, beside this Python: 1.6 runs the cluster
    profile's shared network namespaces, which 1.0 cannot), else the one on PATH."""
    own = Path(sys.executable).parent / "podman-compose"
    return str(own) if own.exists() else shutil.which("podman-compose")


def why_no_cluster() -> str | None:
    """None when the compose tool runs the cluster profile (its pairs share a network namespace:
    podman-compose 1.6), else the reason to skip."""
    tool = compose_tool()
    out = subprocess.run([str(tool), "version"], capture_output=True, text=True, timeout=60).stdout if tool else ""
    found = re.search(r"podman-compose\S* version\s+(\d+)\.(\d+)", out)
    if found and (int(found[1]), int(found[2])) >= (1, 6):
        return None
    return (f"{tool}: the cluster profile needs podman-compose >= 1.6 (`network_mode: service:`); "
            "pip install 'podman-compose>=1.6' (the dev extra has it)")


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(DEPLOY / "podman" / "containers.conf"))
    return env


def why_no_engine() -> str | None:
    """None when podman + podman-compose can run containers here, else the reason to skip."""
    missing = [tool for tool, where in (("podman", shutil.which("podman")), ("podman-compose", compose_tool()))
               if where is None]
    if missing:
        return (
            f"no container engine: {' and '.join(missing)} not found "
            "(on Debian, as root: deploy/podman/setup.sh installs and prepares them)"
        )
    if os.geteuid() != 0:
        return "the container tests use rootful podman; run them as root"
    return None


def prepare_engine() -> str | None:
    """Run deploy/podman/setup.sh (idempotent, ~1 s when done) where it applies; return a reason to
    skip when the base image is still missing."""
    if shutil.which("apt-get") and shutil.which("dpkg-query"):
        subprocess.run([str(SETUP)], env=engine_env(), check=True, stdout=subprocess.DEVNULL)
    probe = subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=engine_env())
    if probe.returncode != 0 and "CNC_TEST_IMAGE" not in os.environ:
        return f"no base image {BASE_IMAGE}: run deploy/podman/setup.sh, or set CNC_TEST_IMAGE to a built image"
    return None


def build_image() -> str:
    """Build the brain's image from this working tree (cached layers make a rebuild quick)."""
    if "CNC_TEST_IMAGE" not in os.environ:
        subprocess.run([str(BUILD), TEST_IMAGE], env=engine_env(), check=True)
    return TEST_IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(
        ["podman", *args], env=engine_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


@dataclass
class Stack:
    """One compose project of deploy/ (single-node NATS, or clustered)."""

    image: str
    clustered: bool = False
    log_dir: Path | None = None
    project: str = field(default_factory=lambda: f"cnct{uuid.uuid4().hex[:8]}")
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = PORT_VARS + (CLUSTER_PORT_VARS if self.clustered else ())
        self.ports = {name: free_port() for name in names}

    # --- compose ------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        files = ["-f", str(COMPOSE)]
        if self.clustered:
            files += ["-f", str(CLUSTER)]
        return files

    def env(self) -> dict[str, str]:
        env = engine_env()
        env.update({name: str(port) for name, port in self.ports.items()})
        # Only local images exist here: the brain's image stands in for the official NATS one.
        env.update(CNC_IMAGE=self.image, CNC_NATS_IMAGE=self.image, CNC_BIND="127.0.0.1")
        return env

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [str(compose_tool()), "-p", self.project, *self.files, *args]
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if self.log_dir:
            with open(self.log_dir / f"{self.project}-compose.log", "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{out.stdout}\n{out.stderr}\n")
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return out

    def up(self) -> None:
        # --no-deps: no podman `--requires` between the containers (podman 4.3 cannot start one
        # whose dependency has dependencies: "generating dependency graph ... not found"); they
        # still start in dependency order, each waiting for its files (deploy/README.md).
        self.compose("up", "-d", "--no-deps")

    def wait_healthy(self, timeout_s: float = 180) -> float:
        """Run every health check until all pass; returns the seconds it took."""
        started = time.monotonic()
        out = subprocess.run(
            [str(HEALTHY), self.project, str(int(timeout_s))], env=engine_env(), capture_output=True, text=True
        )
        if out.returncode != 0:
            raise AssertionError(f"stack {self.project} not healthy:\n{out.stderr[-6000:]}")
        return time.monotonic() - started

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def containers(self) -> list[str]:
        return podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
                      "--format", "{{.Names}}").split()

    def stop(self, service: str) -> None:
        podman("stop", "-t", "5", self.container(service))

    def start(self, service: str) -> None:
        podman("start", self.container(service))

    def exec(self, service: str, *command: str) -> str:
        return podman("exec", self.container(service), *command)

    def operator_kit(self, dest: Path) -> Path:
        """The operator's files out of the stack's `secrets` volume, the way deploy/README.md says
        (a container of the image reading the volume, tar through a pipe); returns `dest`, a
        secrets folder for the CLI (`CNC_SECRETS_DIR`, `CNC_NATS_TLS_CA=dest/tls/ca.pem`)."""
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["podman", "run", "--rm", "--user", "0", "-v", f"{self.project}_secrets:/s:ro", self.image,
             "tar", "-C", "/s", "-c", *KIT_FILES], env=engine_env(), capture_output=True, timeout=120, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest

    def identities(self) -> dict[str, str]:
        """NATS identity -> public key, as the stack's `secrets` container made them."""
        out = podman("run", "--rm", "--user", "0", "-v", f"{self.project}_secrets:/s:ro", self.image,
                     "cat", "/s/nats/identities.json")
        return json.loads(out)

    def operator_token(self) -> str:
        """The operator token governance issued on its first start."""
        return self.exec("governance", "cat", TOKEN_FILE).strip()

    def healthy(self, service: str) -> bool:
        return subprocess.run(
            ["podman", "healthcheck", "run", self.container(service)], env=engine_env(), capture_output=True
        ).returncode == 0

    def logs(self, service: str) -> str:
        """A container's log, stdout and stderr."""
        out = subprocess.run(["podman", "logs", self.container(service)], env=engine_env(), capture_output=True,
                             text=True)
        return out.stdout + out.stderr

    def save_logs(self) -> None:
        if not self.log_dir:
            return
        for name in self.containers():
            out = subprocess.run(["podman", "logs", name], env=engine_env(), capture_output=True, text=True)
            (self.log_dir / f"{name}.log").write_text(out.stdout + out.stderr)

    def down(self) -> None:
        """Remove the project's containers, volumes and network; check none is left."""
        with contextlib.suppress(Exception):
            self.save_logs()
        self.compose("down", "-v")
        # podman-compose 1.0 leaves the project's network behind.
        for net in self.leftovers()["networks"]:
            podman("network", "rm", "-f", net, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=io.podman.compose.project={self.project}"
        volumes = json.loads(podman("volume", "ls", "--filter", label, "--format", "json") or "[]")
        networks = [n for n in podman("network", "ls", "--format", "{{.Name}}").split()
                    if n.startswith(f"{self.project}_")]
        return {
            "containers": self.containers(),
            "volumes": [v["Name"] for v in volumes],
            "networks": networks,
        }

    # --- endpoints ----------------------------------------------------------------------------
    @property
    def scheduler(self) -> str:
        return f"127.0.0.1:{self.ports['CNC_SCHEDULER_PORT']}"

    @property
    def governance(self) -> str:
        return f"127.0.0.1:{self.ports['CNC_GOVERNANCE_PORT']}"

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.ports['CNC_WEB_PORT']}/"

    @property
    def perception(self) -> str:
        return f"127.0.0.1:{self.ports['CNC_PERCEPTION_PORT']}"

    @property
    def nats_urls(self) -> list[str]:
        names = ["CNC_NATS_PORT"] + (["CNC_NATS2_PORT", "CNC_NATS3_PORT"] if self.clustered else [])
        return [f"nats://127.0.0.1:{self.ports[n]}" for n in names]

    def monitor(self, node: int = 1) -> str:
        name = {1: "CNC_NATS_MONITOR_PORT", 2: "CNC_NATS2_MONITOR_PORT", 3: "CNC_NATS3_MONITOR_PORT"}[node]
        return f"http://127.0.0.1:{self.ports[name]}"
