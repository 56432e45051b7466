"""Adaptation's settings (env prefix CNC_ADAPTATION_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cncbrain.settings import ServiceSettings

DEFAULT_PORT = 50063


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CNC_ADAPTATION_", extra="ignore")

    grpc_port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    auth_enabled: bool = True
    """Check bearer tokens on every RPC (tokens come from governance's KV bucket)."""
    guardrails_enabled: bool = True
    """Run the scaling guardrails on every snapshot (recovery always runs)."""
    checkpoint_interval_s: float = Field(600.0, gt=0)
    """Emulated seconds between a training job's periodic checkpoints (lost work on a failure is
    the progress since the last one)."""
    recovery_retry_ticks: int = Field(3, ge=1)
    """Ticks to wait for the scheduler to apply a re-placement before planning it again."""
    perception_target: str = ""
    """host:port of PerceptionService for demand forecasts (surge scale-up); empty: no forecasts."""
    token: str = ""
    """API token adaptation sends to perception (with auth on); empty: `CNC_TOKEN` / the token file."""
    forecast_horizon_ticks: int = Field(5, ge=1, le=60)
    """Ticks ahead of the demand forecast the surge scale-up looks at."""
    max_actions_kept: int = Field(10_000, ge=100)
    """Actions kept in memory for ListActions (all are in the CNC_ADAPTATION stream)."""
    tls_cert_file: Path | None = None
    """Server certificate (PEM). With `tls_key_file` the gRPC port speaks TLS only."""
    tls_key_file: Path | None = None
    """The certificate's private key (PEM)."""
    tls_client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mutual TLS)."""
