"""How a JetStream stream is described (`StreamSpec`; every stream of the brain is declared in
`cncbrain.bus.subjects`, beside the subjects it stores) and configured, and the KV buckets that
hold the bus's own state of record: `cnc-workloads` (scheduler: one record per workload, with its
placements), `cnc-sites` (perception: registered sites).
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import api

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * DAY_S
    """0: kept for ever."""
    duplicate_window_s: float = 120.0
    at_connect: bool = True
    """Created at connect by every process that may create it (`Bus.ensure_streams`); False: by its
    owner alone, with settings of its own (the ledger)."""
    doc: str = ""


KV_WORKLOADS = "cnc-workloads"
KV_SITES = "cnc-sites"
KV_GOVERNANCE = "cnc-governance"
"""Governance's projection (tenants, quotas, policies, holdings, enrolled sites), written by
governance alone; the gates (`cncbrain.governance.gate`) and perception's enrolment follow it."""
BUCKETS = (KV_WORKLOADS, KV_SITES)


def stream_config(spec: StreamSpec, replicas: int = 1) -> api.StreamConfig:
    return api.StreamConfig(
        num_replicas=replicas,
        name=spec.name,
        subjects=list(spec.subjects),
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        max_age=spec.max_age_s,
        duplicate_window=spec.duplicate_window_s,
    )
