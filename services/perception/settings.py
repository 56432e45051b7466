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
    web_enabled: bool = True
    """Serve the live web page (services/perception/web.py)."""
    web_host: str = "127.0.0.1"
    """Interface of the web page; `0.0.0.0` in containers (compose publishes it on loopback)."""
    web_port: int = Field(0, ge=0, le=65535)
    """0: a free port, reported through `web_port_file` and the log (`cncbrain up`); compose fixes 8080."""
    web_port_file: str = ""
    """When set, the page's URL is written there once it is bound (`cncbrain up` reads it)."""
    web_history: int = Field(600, ge=10, le=100_000)
    """Ticks of history the page's charts keep (SLO attainment and placements over time)."""
    mass_silence_share: float = Field(0.5, ge=0, le=1)
    """More than this share of the up sites (and at least two) silent at once is taken for a bus
    failover, not site failures: it is waited out for `mass_silence_hold_s` first."""
    mass_silence_hold_s: float = Field(9.0, ge=0)
    """How long a mass silence is waited out before those sites are marked down."""
