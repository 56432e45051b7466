"""Prometheus metrics of every process of the brain (services, site agents, emulator).

One catalogue (`CATALOG`) names every metric the brain exports — its type, labels and meaning —
and docs/operations.md is generated from it (`python -m cncbrain.opsdoc`; a test fails when they
drift). Every name starts with `cnc_`.

- Metrics kept by one place in the code are prometheus_client objects defined here (`DEPLOY_TO_COMMIT`,
  `ADMISSION_DENIALS`, ...) and updated where the thing happens.
- The counters each process already keeps on its `Bus` (offer rounds, commit retries, messages per
  consumer, ...) are read at scrape time by `BusCollector`, so the hot paths keep their plain
  `Counter` increments.
- State that is a picture (GPUs used per site and type, workloads by state, SLO attainment) is set
  by its owner as a gauge, replaced whole on each update (`replace_gauge`), so a site or workload
  that is gone disappears from the series.

`serve(process)` starts the HTTP endpoint (`/metrics`) on `CNC_METRICS_HOST:CNC_METRICS_PORT` (port
0: the port of the URL already in `CNC_METRICS_PORT_FILE` — a restarted process keeps its
predecessor's — else a free port) and, once bound, writes `http://HOST:PORT/metrics` to that file —
how `cncbrain up` learns where each child listens without fixing ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class MetricsSettings(BaseSettings):
    """The `/metrics` endpoint of a process (env prefix `CNC_METRICS_`, the same for every process)."""

    model_config = SettingsConfigDict(env_prefix="CNC_METRICS_", extra="ignore")

    enabled: bool = True
    """Serve `/metrics`; false: no endpoint (metrics are still counted in-process)."""
    host: str = "127.0.0.1"
    """Interface of the endpoint; `0.0.0.0` in containers."""
    port: int = Field(0, ge=0, le=65535)
    """0: a free port, reported through `port_file` and the log (`cncbrain up`); compose fixes 9464."""
    port_file: str = ""
    """When set, the endpoint's URL is written there once it is bound (`cncbrain up` reads it)."""


class _ScrapeHooks(Collector):
    """Runs the owners' export callbacks (`on_scrape`) first at every scrape; yields nothing itself."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def collect(self) -> Iterator[Any]:
        for hook in list(self.hooks):
            try:
                hook()
            except Exception:  # a picture read while the event loop changes it: the next scrape has it
                log.debug("metrics export hook %r failed", hook, exc_info=True)
        return iter(())


_HOOKS = _ScrapeHooks()
REGISTRY.register(_HOOKS)  # before every metric below, so hooks run before those are read


def on_scrape(hook: Callable[[], None]) -> None:
    """Call `hook` (which sets gauges from a picture it owns) at the start of every scrape."""
    _HOOKS.hooks.append(hook)


def off_scrape(hook: Callable[[], None]) -> None:
    with contextlib.suppress(ValueError):
        _HOOKS.hooks.remove(hook)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str
    process: str  # which process exports it


CATALOG: list[Metric] = []


def _m(name: str, kind: str, labels: Iterable[str], help: str, process: str) -> Metric:
    assert name.startswith("cnc_"), name
    metric = Metric(name, kind, tuple(labels), help, process)
    CATALOG.append(metric)
    return metric


def _counter(name: str, help: str, labels: Iterable[str], process: str) -> Counter:
    _m(name + "_total", "counter", labels, help, process)
    return Counter(name, help, list(labels))


def _gauge(name: str, help: str, labels: Iterable[str], process: str) -> Gauge:
    _m(name, "gauge", labels, help, process)
    return Gauge(name, help, list(labels))


class _ProcessGauge:
    """A gauge without labels that only the process owning it exports: registered at its first `set`
    (a plain one would read 0 from every process that imports this module)."""

    def __init__(self, name: str, help: str) -> None:
        self.gauge = Gauge(name, help, registry=None)
        self.registered = False

    def set(self, value: float) -> None:
        if not self.registered:
            with contextlib.suppress(ValueError):  # registered already (a second owner in one process)
                REGISTRY.register(self.gauge)
            self.registered = True
        self.gauge.set(value)


def _process_gauge(name: str, help: str, process: str) -> _ProcessGauge:
    _m(name, "gauge", (), help, process)
    return _ProcessGauge(name, help)


def _histogram(name: str, help: str, labels: Iterable[str], process: str, buckets: Iterable[float]) -> Histogram:
    _m(name, "histogram", labels, help, process)
    return Histogram(name, help, list(labels), buckets=list(buckets))


LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# --- every process -----------------------------------------------------------------------------------
BUILD_INFO = _gauge("cnc_build_info", "1, labelled with the cncbrain version and the process", ["version", "process"], "every")
AUTH_DENIALS = _counter("cnc_auth_denials", "gRPC calls refused by the token check, by reason "
                        "(unauthenticated: no, unknown or revoked token; permission_denied: a tenant on an "
                        "operator method)", ["service", "reason"], "every gRPC service")
_m("cnc_bus_published_total", "counter", ("process",), "events this process published on NATS", "every")
_m("cnc_bus_consumer_messages_total", "counter", ("process", "consumer", "outcome"),
   "messages per consumer: received, handled, duplicates (dropped by event id), handler_errors, "
   "dead_lettered", "every")
_m("cnc_bus_retries_total", "counter", ("process",), "NATS operations retried (timeouts, reconnects)", "every")
_m("cnc_bus_disconnects_total", "counter", ("process",), "times the NATS connection dropped", "every")
CONSUMER_PENDING = _gauge("cnc_bus_consumer_pending", "consumer lag: messages of a durable JetStream consumer's "
                          "stream not yet delivered to it (polled every few seconds)", ["process", "consumer"], "every")
CONSUMER_ACK_PENDING = _gauge("cnc_bus_consumer_ack_pending", "messages delivered to a durable consumer and not yet "
                              "acknowledged", ["process", "consumer"], "every")
KV_LAG = _gauge("cnc_kv_follower_lag", "KV lag: revisions of a bucket that a local copy (follower) has not applied "
                "yet (polled every few seconds)", ["bucket", "follower"], "every")
_m("cnc_events_total", "counter", ("process", "event"),
   "other events a process counts (late answers, stale placements, ...; the name says which)", "every")

# --- scheduler -----------------------------------------------------------------------------------------
DEPLOY_TO_COMMIT = _histogram(
    "cnc_scheduler_deploy_to_commit_seconds",
    "from a workload's acceptance to its placement committed (record written, placements published)",
    ["kind"], "scheduler", LATENCY_BUCKETS)
ADMISSION_DENIALS = _counter("cnc_scheduler_admission_denials", "deploys and submits governance refused, by reason "
                             "(quota, policy, permission, unavailable, other)", ["reason"], "scheduler")
PLACEMENT_FAILURES = _counter("cnc_scheduler_placement_failures", "workloads that failed to place, by reason "
                              "(fits_no_gpu, quota, policy, no_gpu_type, no_site_up, no_capacity, gang_incomplete, "
                              "declined)", ["reason"], "scheduler")
WORKLOADS = _gauge("cnc_scheduler_workloads", "workloads of record by kind and state", ["kind", "state"], "scheduler")
WAITING = _process_gauge("cnc_scheduler_waiting", "workloads waiting for placement", "scheduler")
SCHEDULER_COUNTERS = {
    "offer_rounds": ("cnc_scheduler_offer_rounds_total", "offer rounds sent to the site agents"),
    "offers": ("cnc_scheduler_offers_total", "workload offers sent (a round carries several)"),
    "placements_committed": ("cnc_scheduler_commits_total", "placements committed"),
    "units_placed": ("cnc_scheduler_units_placed_total", "replicas and shards placed by commits"),
    "commit_retries": ("cnc_scheduler_commit_retries_total",
                       "commits retried (the record write or the placement publish had failed)"),
    "placements_refused_by_governance": ("cnc_scheduler_governance_refusals_total",
                                         "arbitrated placements refused by the policy/quota check"),
    "answers_refused": ("cnc_scheduler_answers_refused_total", "site answers refused (unknown site, wrong round)"),
    "late_answers": ("cnc_scheduler_late_answers_total", "site answers that arrived after their round closed"),
    "scale_committed": ("cnc_scheduler_scale_commits_total", "scale proposals committed"),
    "apply_failed": ("cnc_scheduler_apply_failures_total", "placements a site reported it could not apply"),
}
for _key, (_name, _help) in SCHEDULER_COUNTERS.items():
    _m(_name, "counter", ("process",), _help, "scheduler")

# --- perception ----------------------------------------------------------------------------------------
SITE_UP = _gauge("cnc_site_up", "1 when the site is up (heartbeats arrive), 0 when down", ["site"], "perception")
SITE_GPUS = _gauge("cnc_site_gpus", "GPUs per site and type, by state (used, free) from the last telemetry",
                   ["site", "gpu_type", "state"], "perception")
SERVICE_REPLICAS = _gauge("cnc_service_replicas", "replicas of an inference service, pool-wide", ["workload_id"],
                          "perception")
SERVICE_SLO = _gauge("cnc_service_slo_attainment", "share of an inference service's requests that met both "
                     "SLOs during the last tick (1 with no requests)", ["workload_id"], "perception")
SERVICE_RATE = _gauge("cnc_service_request_rate_rps", "requests per second arriving at an inference service",
                      ["workload_id"], "perception")
SERVICE_REQUESTS = _counter("cnc_service_requests", "requests served by an inference service, by whether they "
                            "met both SLOs (slo=met|missed)", ["workload_id", "slo"], "perception")
TRAINING_PROGRESS = _gauge("cnc_training_progress", "share of a training job's tokens trained (0..1)",
                           ["workload_id"], "perception")
SNAPSHOT_SEQUENCE = _process_gauge("cnc_perception_snapshot_sequence", "sequence number of the last snapshot published",
                           "perception")

# --- governance ----------------------------------------------------------------------------------------
ADMISSIONS = _counter("cnc_governance_admissions", "admission decisions (result=admitted|refused, reason)",
                      ["result", "reason"], "governance")

# --- adaptation ----------------------------------------------------------------------------------------
ACTIONS = _counter("cnc_adaptation_actions", "adaptation actions published, by kind", ["kind"], "adaptation")

# --- site agents -----------------------------------------------------------------------------------------
AGENT_ANSWER = _histogram("cnc_agent_answer_seconds", "time to answer one offer round, all sites of the process",
                          ["policy"], "agents", (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
AGENT_OFFERS = _counter("cnc_agent_offers_answered", "offers answered per site (units 0 declines)",
                        ["site", "answer"], "agents")
AGENT_APPLIED = _counter("cnc_agent_placements_applied", "placements applied by the site's executor (result=ok|error)",
                         ["site", "result"], "agents")

# --- emulator ------------------------------------------------------------------------------------------
EMULATOR_SIM_TIME = _process_gauge("cnc_emulator_sim_time_seconds", "emulated time of the digital twin", "emulator")
EMULATOR_SPEED = _process_gauge("cnc_emulator_speed", "emulated seconds per wall second", "emulator")
EMULATOR_GPUS_USED = _gauge("cnc_emulator_gpus_used", "GPUs in use in the emulated sites, by site and type",
                            ["site", "gpu_type"], "emulator")


Labels = TypeVar("Labels", bound=tuple[str, ...])


def replace_gauge(gauge: Gauge, values: Mapping[Labels, float]) -> None:
    """Set `gauge` to exactly `values` (label tuple → value): series not in `values` are removed."""
    known: set[tuple[str, ...]] = getattr(gauge, "_cnc_known", set())
    for labels in known - set(values):
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    gauge._cnc_known = set(values)  # type: ignore[attr-defined]


# --- the Bus counters ------------------------------------------------------------------------------------
_CONSUMER_OUTCOMES = ("received", "handled", "duplicates", "handler_errors", "dead_lettered")


class BusCollector(Collector):
    """Reads the counters of every `Bus` of the process at scrape time."""

    def __init__(self) -> None:
        self.buses: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        published = CounterMetricFamily("cnc_bus_published", "events this process published on NATS", labels=["process"])
        consumer = CounterMetricFamily("cnc_bus_consumer_messages", "messages per consumer",
                                       labels=["process", "consumer", "outcome"])
        retries = CounterMetricFamily("cnc_bus_retries", "NATS operations retried", labels=["process"])
        disconnects = CounterMetricFamily("cnc_bus_disconnects", "times the NATS connection dropped", labels=["process"])
        other = CounterMetricFamily("cnc_events", "other events a process counts", labels=["process", "event"])
        named = {k: CounterMetricFamily(name.removesuffix("_total"), help, labels=["process"])
                 for k, (name, help) in SCHEDULER_COUNTERS.items()}
        for bus in list(self.buses):
            process = bus.name
            counts = dict(bus.counters)  # one C-level copy: the event loop may add keys meanwhile
            published.add_metric([process], counts.pop("published", 0))
            retries.add_metric([process], counts.pop("retries", 0))
            disconnects.add_metric([process], counts.pop("disconnects", 0))
            for key, value in counts.items():
                head, _, tail = key.rpartition(".")
                if head and tail in _CONSUMER_OUTCOMES:
                    consumer.add_metric([process, head, tail], value)
                elif key in named and process == "scheduler":
                    named[key].add_metric([process], value)
                else:
                    other.add_metric([process, key], value)
        yield from (published, consumer, retries, disconnects, other, *named.values())


BUS_COLLECTOR = BusCollector()
REGISTRY.register(BUS_COLLECTOR)


def track_bus(bus: Any) -> None:
    """Export `bus`'s counters (called by `Bus.__init__`)."""
    BUS_COLLECTOR.buses.add(bus)


# --- the endpoint ----------------------------------------------------------------------------------------
_served: dict[str, Any] = {}
_lock = threading.Lock()


def serve(process: str, settings: MetricsSettings | None = None) -> str | None:
    """Start this process's `/metrics` endpoint (once) and return its URL; None when disabled."""
    from prometheus_client import start_http_server

    from cncbrain import __version__
    from cncbrain.settings import load_settings

    settings = settings or load_settings(MetricsSettings)
    BUILD_INFO.labels(__version__, process).set(1)
    if not settings.enabled:
        return None
    with _lock:
        if "url" in _served:
            return _served["url"]
        port = settings.port or reported_port(settings.port_file)
        try:
            server, thread = start_http_server(port, addr=settings.host)
        except OSError as exc:
            if settings.port or not port:
                from cncbrain.errors import CncError

                raise CncError(f"metrics endpoint: cannot listen on {settings.host}:{port} ({exc})") from None
            log.warning("%s: the metrics port of the previous run, %d, is taken (%s); using a free one", process, port, exc)
            server, thread = start_http_server(0, addr=settings.host)
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"http://{host}:{server.server_port}/metrics"
        _served.update(url=url, server=server, thread=thread)
    if settings.port_file:
        write_report(Path(settings.port_file), url)
    log.info("%s: metrics on %s", process, url)
    return url


def reported_port(port_file: str | Path | None) -> int:
    """The port in the URL a predecessor wrote to `port_file` (0: none): a restarted process (`up`
    supervises its children) listens where Prometheus and the page's users already look."""
    if not port_file:
        return 0
    try:
        from urllib.parse import urlsplit

        return urlsplit(Path(port_file).read_text().strip()).port or 0
    except (OSError, ValueError):
        return 0


def write_report(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a reader never sees half a URL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def stop() -> None:
    """Close the endpoint (tests)."""
    with _lock:
        server = _served.pop("server", None)
        _served.clear()
    if server is not None:
        server.shutdown()
        server.server_close()
