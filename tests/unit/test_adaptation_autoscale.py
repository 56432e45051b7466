"""Scaling guardrails: emergency scale-up, surge, bounds, damped scale-down, reasons."""

import pytest

from services.adaptation.domain.autoscale import (
    AutoscalingPolicy,
    Guardrails,
    ScaleKind,
    ServiceObservation,
)


def obs(tick, replicas, rate, slo=1.0, forecast=None, wid="svc"):
    return ServiceObservation(wid, tick, replicas, rate, slo, forecast)


def test_breach_scales_up_at_once_within_max_and_says_why():
    g = Guardrails(default_policy=AutoscalingPolicy(min_replicas=1, max_replicas=5, prior_capacity_rps=2.0))
    assert g.observe(obs(0, 2, 3.0)) is None  # 1.5 rps/replica met the SLO: capacity learned
    d = g.observe(obs(1, 2, 9.0, slo=0.4))
    assert d is not None and d.kind is ScaleKind.EMERGENCY_SCALE_UP
    assert d.from_replicas == 2 and 3 <= d.to_replicas <= 5
    assert "40%" in d.reason and "9.00 req/s" in d.reason
    # Already at max: no action beyond the bound.
    assert g.observe(obs(2, 5, 50.0, slo=0.1)) is None


def test_surge_forecast_scales_before_the_breach():
    g = Guardrails(default_policy=AutoscalingPolicy(max_replicas=10, prior_capacity_rps=1.0, target_utilization=1.0))
    d = g.observe(obs(0, 2, 1.0, forecast=6.0))
    assert d is not None and d.kind is ScaleKind.SURGE_SCALE_UP and d.to_replicas == 6
    assert "forecast peak 6.00" in d.reason


def test_bounds_are_enforced_whatever_the_agents_did():
    g = Guardrails(default_policy=AutoscalingPolicy(min_replicas=2, max_replicas=4))
    d = g.observe(obs(0, 0, 0.0))
    assert d.kind is ScaleKind.ENFORCE_MIN and d.to_replicas == 2
    d = g.observe(obs(1, 7, 0.0))
    assert d.kind is ScaleKind.ENFORCE_MAX and d.to_replicas == 4


def test_scale_down_is_damped_and_stepwise():
    pol = AutoscalingPolicy(min_replicas=1, max_replicas=10, scale_down_stable_ticks=3, cooldown_ticks=2,
                            prior_capacity_rps=1.0, target_utilization=1.0)
    g = Guardrails(default_policy=pol)
    assert g.observe(obs(0, 6, 0.5)) is None
    assert g.observe(obs(1, 6, 0.5)) is None
    d = g.observe(obs(2, 6, 0.5))
    assert d is not None and d.kind is ScaleKind.SCALE_DOWN and d.to_replicas == 5
    # The count of quiet ticks restarts and the cooldown holds.
    assert g.observe(obs(3, 5, 0.5)) is None
    assert g.observe(obs(4, 5, 0.5)) is None
    d = g.observe(obs(5, 5, 0.5))
    assert d is not None and d.to_replicas == 4


def test_a_busy_tick_resets_the_scale_down_count():
    pol = AutoscalingPolicy(scale_down_stable_ticks=2, cooldown_ticks=0, prior_capacity_rps=1.0, target_utilization=1.0)
    g = Guardrails(default_policy=pol)
    assert g.observe(obs(0, 4, 0.5)) is None
    assert g.observe(obs(1, 4, 4.0)) is None  # busy: needs all 4
    assert g.observe(obs(2, 4, 0.5)) is None
    assert g.observe(obs(3, 4, 0.5)).kind is ScaleKind.SCALE_DOWN


def test_per_service_policy_and_disabled():
    g = Guardrails()
    g.set_policy("a", AutoscalingPolicy(enabled=False))
    assert g.observe(obs(0, 0, 10.0, slo=0.0, wid="a")) is None
    assert g.observe(obs(0, 0, 10.0, slo=0.0, wid="b")).kind is ScaleKind.ENFORCE_MIN


@pytest.mark.parametrize("kwargs", [dict(min_replicas=5, max_replicas=2), dict(max_replicas=0),
                                    dict(target_slo_attainment=0), dict(scale_down_step=0)])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        AutoscalingPolicy(**kwargs)
