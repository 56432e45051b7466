"""JetStream streams and KV buckets of the live brain, created idempotently at connect.

| stream | subjects | holds |
| --- | --- | --- |
| CNC_WORKLOADS | `cnc.scheduler.workload.>` | lifecycle of every workload (watch replays it) |
| CNC_PLACEMENTS | `cnc.scheduler.placement.>` | committed placements per site |
| CNC_SITES | `cnc.site.*.registered`, `cnc.site.*.applied`, `cnc.perception.site_state.>` | site lifecycle |
| CNC_DEADLETTER | `cnc.deadletter.>` | events a consumer could not decode or handle |

KV buckets (state of record): `cnc-workloads` (scheduler: one record per workload, with its
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
    duplicate_window_s: float = 120.0


STREAMS: list[StreamSpec] = [
    StreamSpec("CNC_WORKLOADS", ("cnc.scheduler.workload.>",)),
    StreamSpec("CNC_PLACEMENTS", ("cnc.scheduler.placement.>",)),
    StreamSpec("CNC_SITES", ("cnc.site.*.registered", "cnc.site.*.applied", "cnc.perception.site_state.>")),
    StreamSpec("CNC_DEADLETTER", ("cnc.deadletter.>",), max_age_s=30 * DAY_S),
]

KV_WORKLOADS = "cnc-workloads"
KV_SITES = "cnc-sites"
BUCKETS = (KV_WORKLOADS, KV_SITES)


def register_stream(spec: StreamSpec) -> None:
    """Another block (adaptation, governance) adds its stream before connecting."""
    if all(s.name != spec.name for s in STREAMS):
        STREAMS.append(spec)


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
