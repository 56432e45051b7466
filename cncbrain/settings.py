"""Settings shared by every process of the live brain (services, site agents, emulator).

Each process has one `Settings` class deriving from `CncSettings` with its own env prefix
(`CNC_SCHEDULER_`, `CNC_PERCEPTION_`, `CNC_AGENT_`, ...). A wrong value stops start-up with the
field named (`load_settings` turns pydantic's error into a `CncError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cncbrain.errors import UsageError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class CncSettings(BaseSettings):
    """Fields every process has. Subclasses set `model_config` with their env prefix."""

    model_config = SettingsConfigDict(env_prefix="CNC_", extra="ignore")

    nats_url: str = Field(DEFAULT_NATS_URL, description="NATS server URL (JetStream enabled)")
    """Where the bus is; `cncbrain up` passes its embedded server's URL."""
    otel_exporter: Literal["none", "console", "otlp", "otlp,console", "console,otlp"] | None = None
    """Where spans go: `console` prints them to stderr, `otlp` sends them to an OTLP/gRPC collector.
    Unset (or `auto`): the OpenTelemetry SDK's own variables decide — `OTEL_TRACES_EXPORTER`, else
    `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, else none."""
    otlp_endpoint: str = ""
    """OTLP/gRPC collector endpoint. Empty: the SDK's `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` (default
    http://localhost:4317); TLS follows the scheme and `OTEL_EXPORTER_OTLP_INSECURE` / `..._CERTIFICATE`."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the process's log."""
    log_format: Literal["text", "json"] | None = None
    """`json`: one JSON object per line with `trace_id` and `span_id`. Unset: `CNC_LOG_FORMAT`, else text."""

    @field_validator("otel_exporter", "log_format", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable, or `auto`, counts as unset (compose files pass `${X:-auto}` through)."""
        return None if value in ("", "auto") else value


class BusSettings(BaseSettings):
    """How every process lays out JetStream (env prefix `CNC_NATS_`, the same for all processes)."""

    model_config = SettingsConfigDict(env_prefix="CNC_NATS_", extra="ignore")

    replicas: int = Field(1, ge=1, le=5)
    """`CNC_NATS_REPLICAS`: replicas of every stream and KV bucket (3 on a 3-node cluster)."""
    connect_timeout_s: float = Field(60.0, ge=0)
    """`CNC_NATS_CONNECT_TIMEOUT_S`: how long a process tries to reach NATS at start before it gives
    up (0: for ever), saying every few seconds which URL it tries and why it fails."""
    secrets_dir: Path | None = Field(None, validation_alias=AliasChoices("CNC_SECRETS_DIR"))
    """`CNC_SECRETS_DIR`: the folder with this process's NATS credentials (`nats/<identity>.nk`) and
    governance's public key (`cncbrain.bus.credentials`); unset: connect without credentials."""
    tls_ca: Path | None = None
    """`CNC_NATS_TLS_CA`: the CA certificate (PEM) that signed the NATS servers' certificates
    (`cncbrain credentials --nats-tls`, `cncbrain certs --nats`). Set: every connection is TLS, the
    server's certificate must be this CA's and name the host of the URL, and a server that does not
    require TLS is refused. Unset: plain connections."""
    tls_cert: Path | None = None
    """`CNC_NATS_TLS_CERT`: a client certificate (PEM) for a NATS server that verifies its clients'
    (`tls { verify: true }`); with `CNC_NATS_TLS_KEY`. Unset: none is presented."""
    tls_key: Path | None = None
    """`CNC_NATS_TLS_KEY`: the key of `CNC_NATS_TLS_CERT`."""


class ServiceSettings(CncSettings):
    """A gRPC service: where it listens and how long it drains on shutdown."""

    grpc_host: str = "127.0.0.1"
    """Interface to bind; `0.0.0.0` in containers."""
    grpc_port: int = Field(0, ge=0, le=65535)
    """0: the port `port_file` names (a predecessor's, when this is a restart or a standby taking
    over), else any free port (tests; `cncbrain up` when a port is not given)."""
    bind_wait_s: float = Field(5.0, ge=0)
    """How long a busy port is tried again before giving up (a predecessor shutting down)."""
    port_file: Path | None = None
    """Where the bound port is written once listening (bind, then report: nothing can take the port
    between a check and the bind); `cncbrain up` reads it."""
    shutdown_grace_s: float = Field(2.0, ge=0)
    """Seconds in-flight RPCs get to finish after SIGTERM."""
    lease: bool = True
    """Serve only while holding the role's lease in NATS KV (`cncbrain.lease`): a second instance
    waits as a standby and takes over when the active one stops renewing it."""
    instance: str = Field("", max_length=64)
    """This instance's name in the lease (empty: the host's name); an instance restarted under the
    same name takes its lease back at once. `cncbrain up --standby` names them `<role>`, `<role>-2`."""
    lease_ttl_s: float = Field(3.0, ge=1.0, le=60.0)
    """A standby takes over once the lease has not been renewed for this long."""
    max_pending_requests: int = Field(10_000, ge=1)
    """`grpc.server.max_pending_requests`: requests queued beyond the workers before RESOURCE_EXHAUSTED."""


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build settings from the environment plus explicit overrides; name the bad field on error."""
    try:
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return cls(**given)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise UsageError(f"bad settings for {cls.__name__}: {problems}") from None
