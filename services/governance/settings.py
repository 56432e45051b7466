"""Governance's settings (env prefix CNC_GOVERNANCE_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cncbrain.settings import ServiceSettings

DEFAULT_PORT = 50064


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CNC_GOVERNANCE_", extra="ignore")

    grpc_port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    auth_enabled: bool = True
    """Check bearer tokens on every RPC. Off only for a throw-away local brain."""
    bootstrap_token_file: Path | None = None
    """When set and no operator token exists (or the file's token is not known), issue an operator
    token and write it here (mode 0600). `cncbrain up` points this into its state folder."""
    ledger_deny_delete: bool = True
    """Create the ledger stream with deny-delete and deny-purge, so JetStream itself refuses to drop
    entries; verification still catches an operator who rebuilt the stream. Only applies when the
    stream is created."""
    verify_on_start: bool = True
    """Verify the ledger while loading it at start and log every issue found (with a checkpoint: the
    entries after it; `cncbrain ledger verify` checks the whole ledger)."""
    checkpoint_every: int = Field(10_000, ge=0)
    """Write a signed checkpoint of the folded state each time the ledger has grown by this many
    entries since the last one, so a start reads the checkpoint and only the entries after it
    (services/governance/checkpoint.py). 0: none (every start folds the whole ledger)."""
    tls_cert_file: Path | None = None
    """Server certificate (PEM). With `tls_key_file` the gRPC port speaks TLS only."""
    tls_key_file: Path | None = None
    """The certificate's private key (PEM)."""
    tls_client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mutual TLS)."""
