"""Scaling guardrails (pure): emergency scale-up on an SLO breach or a forecast surge, replica
bounds always respected, damped scale-down.

The site agents decide replica counts tick by tick; these guardrails only step in when waiting
for them would cost SLOs (breach, surge) or when their counts leave the service's bounds. Every
decision carries the reason that is published with it.

Capacity of one replica is learned from what the service itself showed: it starts at a configured
prior, rises to the highest per-replica rate served within SLO and falls to the per-replica rate
of a breach. A quiet tick teaches nothing (low load says nothing about what a replica could take).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class ScaleKind(enum.StrEnum):
    EMERGENCY_SCALE_UP = "emergency_scale_up"
    SURGE_SCALE_UP = "surge_scale_up"
    SCALE_DOWN = "scale_down"
    ENFORCE_MIN = "enforce_min"
    ENFORCE_MAX = "enforce_max"


@dataclass(frozen=True, slots=True)
class AutoscalingPolicy:
    """Guardrails of one inference service."""

    min_replicas: int = 1
    max_replicas: int = 8
    # An SLO breach is attainment below this share of requests meeting both SLOs.
    target_slo_attainment: float = 0.9
    # Replicas are sized to keep load at most this share of learned capacity.
    target_utilization: float = 0.75
    # A forecast is a surge when its peak exceeds capacity x replicas x this factor.
    surge_threshold: float = 1.0
    # Scale down only after this many consecutive ticks of low load, one replica at a time ...
    scale_down_stable_ticks: int = 3
    scale_down_step: int = 1
    # ... and not within this many ticks of any other scaling action.
    cooldown_ticks: int = 2
    # Requests per second one replica serves within SLO before any tick taught us better.
    prior_capacity_rps: float = 2.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"replica bounds must satisfy 0 <= min <= max, max >= 1; got {self.min_replicas}..{self.max_replicas}")
        if not 0 < self.target_slo_attainment <= 1:
            raise ValueError("target_slo_attainment must be in (0, 1]")
        if not 0 < self.target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        if self.scale_down_stable_ticks < 1 or self.scale_down_step < 1 or self.cooldown_ticks < 0:
            raise ValueError("scale_down_stable_ticks and scale_down_step must be >= 1, cooldown_ticks >= 0")
        if self.prior_capacity_rps <= 0 or self.surge_threshold <= 0:
            raise ValueError("prior_capacity_rps and surge_threshold must be > 0")


@dataclass(frozen=True, slots=True)
class ServiceObservation:
    """One tick of one service, pool-wide."""

    workload_id: str
    tick: int
    replicas: int
    request_rate_rps: float
    slo_attainment: float  # 0..1; 1.0 when no request came
    forecast_peak_rps: float | None = None  # highest predicted rate over the forecast horizon


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    workload_id: str
    kind: ScaleKind
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(slots=True)
class _ServiceMemory:
    capacity_rps: float | None = None
    low_ticks: int = 0
    last_action_tick: int | None = None


@dataclass
class Guardrails:
    """Per-service memory of the guardrails; `observe` once per tick per service."""

    policies: dict[str, AutoscalingPolicy] = field(default_factory=dict)
    default_policy: AutoscalingPolicy = field(default_factory=AutoscalingPolicy)
    _memory: dict[str, _ServiceMemory] = field(default_factory=dict)

    def policy(self, workload_id: str) -> AutoscalingPolicy:
        return self.policies.get(workload_id, self.default_policy)

    def set_policy(self, workload_id: str, policy: AutoscalingPolicy) -> None:
        self.policies[workload_id] = policy

    def forget(self, workload_id: str) -> None:
        self.policies.pop(workload_id, None)
        self._memory.pop(workload_id, None)

    def capacity(self, workload_id: str) -> float:
        mem = self._memory.get(workload_id)
        if mem is not None and mem.capacity_rps:
            return mem.capacity_rps
        return self.policy(workload_id).prior_capacity_rps

    def observe(self, obs: ServiceObservation) -> ScaleDecision | None:
        pol = self.policy(obs.workload_id)
        if not pol.enabled:
            return None
        mem = self._memory.setdefault(obs.workload_id, _ServiceMemory())
        n = obs.replicas
        breach = obs.request_rate_rps > 0 and obs.slo_attainment < pol.target_slo_attainment

        # What a replica serves within SLO: raised by every good tick under load, lowered by a
        # breach (the replicas could not serve that rate), starting from the configured prior.
        if n > 0 and obs.request_rate_rps > 0:
            per_replica = obs.request_rate_rps / n
            current = mem.capacity_rps or pol.prior_capacity_rps
            mem.capacity_rps = min(current, per_replica) if breach else max(current, per_replica)
        cap = self.capacity(obs.workload_id)

        def decide(kind: ScaleKind, target: int, reason: str) -> ScaleDecision:
            mem.last_action_tick = obs.tick
            mem.low_ticks = 0
            return ScaleDecision(obs.workload_id, kind, n, target, reason)

        # Bounds first: they hold whatever the agents did.
        if n < pol.min_replicas:
            return decide(ScaleKind.ENFORCE_MIN, pol.min_replicas,
                          f"{n} replicas is below the service's minimum of {pol.min_replicas}")
        if n > pol.max_replicas:
            return decide(ScaleKind.ENFORCE_MAX, pol.max_replicas,
                          f"{n} replicas is above the service's maximum of {pol.max_replicas}")

        needed = math.ceil(obs.request_rate_rps / (cap * pol.target_utilization)) if obs.request_rate_rps > 0 else 0
        if breach:
            if n >= pol.max_replicas:
                mem.low_ticks = 0
                return None  # nothing a guardrail may do; the breach is still reported by perception
            target = min(pol.max_replicas, max(n + 1, needed))
            return decide(ScaleKind.EMERGENCY_SCALE_UP, target,
                          f"SLO attainment {obs.slo_attainment:.0%} is below {pol.target_slo_attainment:.0%} at "
                          f"{obs.request_rate_rps:.2f} req/s on {n} replicas (about {cap:.2f} req/s each)")

        if obs.forecast_peak_rps is not None and obs.forecast_peak_rps > cap * max(n, 0) * pol.surge_threshold:
            target = min(pol.max_replicas,
                         max(n + 1, math.ceil(obs.forecast_peak_rps / (cap * pol.target_utilization))))
            if target > n:
                return decide(ScaleKind.SURGE_SCALE_UP, target,
                              f"forecast peak {obs.forecast_peak_rps:.2f} req/s exceeds the {cap * n:.2f} req/s "
                              f"that {n} replicas serve")

        # Damped scale-down: a run of quiet ticks, outside the cooldown, one step, never below need.
        peak = max(obs.request_rate_rps, obs.forecast_peak_rps or 0.0)
        keep = max(pol.min_replicas, math.ceil(peak / (cap * pol.target_utilization)) if peak > 0 else 0)
        if n > keep:
            mem.low_ticks += 1
        else:
            mem.low_ticks = 0
        cooling = mem.last_action_tick is not None and obs.tick - mem.last_action_tick < pol.cooldown_ticks
        if mem.low_ticks >= pol.scale_down_stable_ticks and not cooling:
            target = max(keep, n - pol.scale_down_step)
            return decide(ScaleKind.SCALE_DOWN, target,
                          f"load {peak:.2f} req/s needs {keep} replicas for {pol.scale_down_stable_ticks} ticks; "
                          f"removing {n - target} of {n}")
        return None
