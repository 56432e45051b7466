"""Metrics catalogue, trace exporter choice from the standard OTEL_* variables, JSON log lines."""

import io
import json
import logging
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

from cncbrain import metrics, telemetry
from cncbrain.settings import CncSettings


@pytest.mark.parametrize("env, explicit, expected", [
    ({}, None, []),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, None, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console,otlp"}, None, ["console", "otlp"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, None, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "none", []),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None, []),
    ({}, "console", ["console"]),
])
def test_the_exporter_follows_the_sdk_variables_unless_a_setting_names_one(monkeypatch, env, explicit, expected):
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert telemetry.exporter_names(explicit) == expected


def test_a_process_setting_left_unset_is_none_so_the_sdk_decides(monkeypatch):
    monkeypatch.delenv("CNC_OTEL_EXPORTER", raising=False)
    s = CncSettings()
    assert s.otel_exporter is None and s.otlp_endpoint == ""


def test_json_log_lines_carry_the_current_trace_and_span_ids():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(telemetry.JsonFormatter("tester"))
    log = logging.getLogger("cnc.test.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        log.info("inside %s", "a span")
        ctx = span.get_span_context()
    log.warning("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    inside, outside, failed = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["message"] == "inside a span" and inside["process"] == "tester" and inside["level"] == "info"
    assert inside["trace_id"] == trace.format_trace_id(ctx.trace_id)
    assert inside["span_id"] == trace.format_span_id(ctx.span_id)
    assert "trace_id" not in outside
    assert "ValueError: boom" in failed["exc_info"]


def test_a_bad_log_format_or_trace_exporter_is_refused_naming_the_choices(monkeypatch):
    from cncbrain.errors import UsageError

    with pytest.raises(UsageError, match="text, json"):
        telemetry.configure_logging("INFO", "yaml")
    monkeypatch.setattr(telemetry, "_configured", False)
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)  # the tests' provider stays
    with pytest.raises(UsageError, match="'jaeger'.*expected none, console or otlp"):
        telemetry.setup("tester", "jaeger")


def test_every_metric_is_prefixed_catalogued_once_and_every_exported_one_catalogued():
    names = [m.name for m in metrics.CATALOG]
    assert len(names) == len(set(names)), "a metric is catalogued twice"
    assert all(m.name.startswith("cnc_") and m.help for m in metrics.CATALOG)
    lazy = {g.gauge._name for g in vars(metrics).values() if isinstance(g, metrics._ProcessGauge)}
    registered = {n for n in REGISTRY._names_to_collectors if n.startswith("cnc_")}
    suffixes = ("_bucket", "_count", "_sum", "_created")
    for name in registered:  # what the registry exports (histogram parts under their metric's name)
        base = next((name.removesuffix(x) for x in suffixes if name.endswith(x)), name)
        assert base in names or base + "_total" in names, f"{name} is exported but not catalogued"
    for m in metrics.CATALOG:
        assert m.name in registered or m.name in lazy, f"{m.name} is catalogued but never exported"


def test_replace_gauge_drops_series_that_are_gone():
    metrics.replace_gauge(metrics.SITE_UP, {("a",): 1.0, ("b",): 0.0})
    metrics.replace_gauge(metrics.SITE_UP, {("b",): 1.0})
    assert REGISTRY.get_sample_value("cnc_site_up", {"site": "a"}) is None
    assert REGISTRY.get_sample_value("cnc_site_up", {"site": "b"}) == 1.0


def test_the_endpoint_binds_a_free_port_and_reports_it(tmp_path):
    report = tmp_path / "run" / "x.metrics"
    url = metrics.serve("tester", metrics.MetricsSettings(port=0, port_file=str(report)))
    try:
        assert report.read_text() == url and url.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'cnc_build_info{process="tester"' in body
    finally:
        metrics.stop()


def compose_metrics_targets(root) -> dict[str, str]:
    """Every metrics address the compose files give a brain process, `host:port` → the service
    whose process serves it: the base file's services, and the cluster file's on top (its pairs'
    instances share their holder's network namespace, `network_mode: service:X`, so they are
    reached at X's name, each on its own port)."""
    import yaml

    files = [yaml.safe_load((root / "deploy" / name).read_text())["services"]
             for name in ("docker-compose.yml", "docker-compose.cluster.yml")]
    services: dict[str, dict] = {}
    for layer in files:
        for name, svc in layer.items():
            merged = services.setdefault(name, {})
            merged["environment"] = {**(merged.get("environment") or {}), **(svc.get("environment") or {})}
            if "network_mode" in svc:
                merged["network_mode"] = svc["network_mode"]
    targets = {}
    for name, svc in sorted(services.items()):
        port = svc["environment"].get("CNC_METRICS_PORT")
        if port is None:
            continue
        host = svc.get("network_mode", "").removeprefix("service:") or name
        targets.setdefault(f"{host}:{port}", name)
    return targets


def test_composes_prometheus_scrapes_every_metrics_port_the_compose_files_give():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from cncbrain.commands.up import prometheus_config

    root = Path(__file__).resolve().parents[2]
    exposed = compose_metrics_targets(root)
    # The base profile's six processes on 9464; the cluster's pairs add their second instance on
    # 9465 at the pair's address (its first is on the holder's 9464).
    assert exposed == {
        "adaptation:9464": "adaptation", "agents:9464": "agents", "emulator:9464": "emulator",
        "governance:9464": "governance", "perception:9464": "perception", "scheduler:9464": "scheduler",
        "governance:9465": "governance-2", "scheduler:9465": "scheduler-2",
    }
    deployed = (root / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert sorted(re.findall(r"targets: \['([^']+)'\]", deployed)) == sorted(exposed)
    # The same job and labels as `up` writes (`up --standby` names the second instance NAME-2).
    wanted = prometheus_config({"metrics": {p: f"http://{t}/metrics" for t, p in exposed.items()}}, interval_s=15)
    strip = lambda text: [x for x in text.splitlines() if not x.startswith("#")]  # noqa: E731
    assert strip(deployed) == strip(wanted)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", str(root / "deploy" / "prometheus" / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_restarted_process_takes_its_predecessors_metrics_port_again(tmp_path):
    report = tmp_path / "x.metrics"
    first = metrics.serve("tester", metrics.MetricsSettings(port=0, port_file=str(report)))
    metrics.stop()
    try:
        again = metrics.serve("tester", metrics.MetricsSettings(port=0, port_file=str(report)))
        assert again == first == report.read_text()
    finally:
        metrics.stop()
    # that port taken meanwhile: a free one, reported
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", metrics.reported_port(report)))
        squatter.listen()
        try:
            moved = metrics.serve("tester", metrics.MetricsSettings(port=0, port_file=str(report)))
            assert moved != first and report.read_text() == moved
        finally:
            metrics.stop()
