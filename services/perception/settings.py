"""Perception's settings (env prefix CNC_PERCEPTION_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cncbrain.settings import ServiceSettings

DEFAULT_PORT = 50061


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CNC_PERCEPTION_", extra="ignore")

    grpc_port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    auth_enabled: bool = False
    """Check bearer tokens (cncbrain.auth) on every RPC; `cncbrain up` and compose turn it on."""
    tick_s: float = Field(1.0, gt=0)
    """Wall-clock seconds between snapshots."""
    heartbeat_timeout_s: float = Field(3.0, gt=0)
    """A site with no heartbeat for this long is marked down (3 missed 1-s heartbeats)."""
    forecast_alpha: float = Field(0.5, gt=0, le=1)
    """Level smoothing of the Holt forecaster."""
    forecast_beta: float = Field(0.3, ge=0, le=1)
    """Trend smoothing of the Holt forecaster."""
