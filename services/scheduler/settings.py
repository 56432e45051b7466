"""Scheduler's settings (env prefix CNC_SCHEDULER_)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cncbrain.settings import ServiceSettings

DEFAULT_PORT = 50062
DAY_S = 86400.0


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CNC_SCHEDULER_", extra="ignore")

    grpc_port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    offer_timeout_s: float = Field(0.25, gt=0)
    """How long an offer round waits for the up sites' answers before arbitrating what it has."""
    max_offers_per_round: int = Field(256, ge=1)
    """Workloads offered in one round at most (the rest go in the next round, right after)."""
    retry_interval_s: float = Field(0.5, gt=0)
    """Pause before re-offering a workload that did not fit."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """An inference service not placed within this fails."""
    default_gang_timeout_s: float = Field(30.0, gt=0)
    """A training job's gang timeout when its spec leaves it at 0."""
    auth_enabled: bool = False
    """Check bearer tokens (cncbrain.auth) on every RPC; `cncbrain up` and compose turn it on."""
    governance_target: str = ""
    """host:port of GovernanceService: admission at submit and the placement check before every
    commit (services/scheduler/governance.py). Empty: no governance (a gate that admits everything)."""
    governance_token: str = ""
    """Token for admission calls made without a caller's token; empty: CNC_TOKEN / the token file."""
    republish_window_s: float = Field(600.0, ge=0)
    """After a restart, placements committed within this window are published again (deduplicated)."""
    reconcile_s: float = Field(3.0, gt=0)
    """The reconciler's tick: how often rejected and unconfirmed placements are acted on."""
    apply_timeout_ticks: int = Field(3, ge=1)
    """A placement its (up) site has not confirmed within this many ticks is taken off that site."""
    max_placement_attempts: int = Field(3, ge=1)
    """Placements of one workload that sites reject or ignore before it FAILS."""
    ended_retention_s: float = Field(7 * DAY_S, ge=60, le=3650 * DAY_S, allow_inf_nan=False)
    """How long a workload's record is kept once it ended (COMPLETED, FAILED, CANCELLED), counted
    from its end; then it leaves the scheduler's memory and the `cnc-workloads` bucket (GetWorkload
    answers NOT_FOUND, its request id may be used again). A workload that has not ended is never
    removed. Its events stay the stream's 7 days, whatever this is. 60 s to 10 years."""
    scale_window_s: float = Field(0.05, gt=0)
    """How long coordinated SCALE proposals of one service are collected (the sites answer one
    snapshot within milliseconds) before they are granted together (`cncbrain.coordination`)."""
