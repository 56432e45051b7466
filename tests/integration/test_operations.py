"""Operating a running brain as a platform engineer does, on one embedded brain (`cncbrain up`'s
processes, auth on): the real Prometheus server scrapes every process's /metrics; one deploy's trace
is followed from the CLI call through the scheduler, the offer round, every answering site agent,
the commit and the executor's apply, as exported over OTLP by each process (an in-process OTLP
collector, configured only through the standard OTEL_* variables); logs as JSON carry trace ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from agents.executor_emulated import slug
from cncbrain.commands.up import Brain, prometheus_config
from cncbrain.natsserver import free_port
from cncbrain.scenario import load_scenario

pytestmark = pytest.mark.integration


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append({
                            "service": resource.get("service.name"), "process": resource.get("cnc.process"),
                            "name": sp.name, "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                            "parent": sp.parent_span_id.hex(),
                            "attributes": {a.key: a.value for a in sp.attributes}})
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def collector():
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.endpoint = f"http://127.0.0.1:{port}"
    yield servicer
    server.stop(None)


@pytest.fixture(scope="module")
def brain(tmp_path_factory, collector):
    state = tmp_path_factory.mktemp("ops") / "state"
    with pytest.MonkeyPatch.context() as mp:
        # Only the OpenTelemetry SDK's own variables: every process (and the CLI) exports over OTLP.
        mp.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        mp.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        mp.delenv("OTEL_SERVICE_NAME", raising=False)
        brain = Brain(state, "abilene", nats_port=0, perception_port=0,  # every port: bind, then report
                      scheduler_port=0, governance_port=0, adaptation_port=0,
                      auth=True, policy="greedy", speed=60, log_format="json",
                      background_nice=0)  # under a loaded machine a niced emulator starts too late
        brain.start(90)
        try:
            yield brain
        finally:
            brain.stop()


def cli(brain, name, *args, env=None, timeout=60):
    env = {**os.environ, "CNC_STATE_DIR": str(brain.state_dir), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cncbrain.cli", name, *args], env=env,  # imports only `name`
                          capture_output=True, text=True, timeout=timeout)


def workload(brain, wid):
    import asyncio

    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cncbrain.auth import token_interceptors

    async def get():
        token = brain.token_file.read_text().strip()
        async with grpc.aio.insecure_channel(brain.endpoints["scheduler"], interceptors=token_interceptors(token)) as ch:
            return (await scheduler_pb2_grpc.SchedulerServiceStub(ch).GetWorkload(
                spb.GetWorkloadRequest(workload_id=wid))).workload

    return asyncio.run(get())


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def deployed(brain, collector):
    """One service deployed with the CLI, as a user would (its trace is exported like the brain's)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    out = cli(brain, "deploy", "--name", "observed", "--model", "7b", "--min-replicas", "3", env=env)
    assert out.returncode == 0, out.stderr + out.stdout
    wid = out.stdout.split()[0]
    wait_for(lambda: workload(brain, wid).state == 3, 30, "the service RUNNING")  # WORKLOAD_STATE_RUNNING
    return wid


def prom_query(base, query):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_process_of_a_running_brain(brain, deployed, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` binary (Debian package prometheus; .ci/run installs it)")
    # the configuration `up` wrote, at a 1 s interval so the test waits less
    assert (brain.state_dir / "prometheus.yml").read_text() == prometheus_config(brain.endpoints)
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(brain.endpoints, interval_s=1))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        # a call with a forged token, counted by the scheduler as an auth denial
        bad = cli(brain, "workloads", env={"CNC_TOKEN": "cnc_forged_0000"})
        assert bad.returncode != 0

        def every_target_up():
            try:
                up = prom_query(base, 'up{job="cncbrain"}')
            except OSError:
                return None
            return {r["metric"]["process"] for r in up if r["value"][1] == "1"} == set(brain.metrics)

        wait_for(every_target_up, 60, "Prometheus scraping all six processes")

        def series(query, at_least=1):
            def found():
                with_values = prom_query(base, query)
                return with_values if len(with_values) >= at_least else None
            return wait_for(found, 30, f"{query} in Prometheus")

        assert {r["metric"]["site"] for r in series("cnc_site_up == 1", len(brain.sites))} == set(brain.sites)
        used = series('sum(cnc_site_gpus{state="used"}) > 0')
        assert float(used[0]["value"][1]) >= 3
        assert series(f'cnc_service_replicas{{workload_id="{deployed}"}} >= 3')
        assert series('cnc_scheduler_deploy_to_commit_seconds_count{kind="inference"} >= 1')
        assert series("cnc_scheduler_commits_total >= 1")
        assert series("cnc_scheduler_offer_rounds_total >= 1")
        assert series('cnc_scheduler_workloads{kind="inference",state="running"} >= 1')
        assert series('cnc_agent_offers_answered_total{answer="accept"} >= 1')
        assert series('cnc_agent_placements_applied_total{result="ok"} >= 1')
        assert series('cnc_auth_denials_total{reason="unauthenticated"} >= 1')
        assert series("cnc_emulator_sim_time_seconds > 0")
        assert series('cnc_bus_consumer_pending{process="scheduler",consumer="scheduler-applied"}')
        assert series('cnc_kv_follower_lag{follower="token-feed"}')
        assert series('cnc_build_info{process="governance"}')
        # the embedded nats-server's monitoring port, reported like the rest
        varz = json.loads(urllib.request.urlopen(brain.endpoints["nats_monitor"] + "/varz", timeout=5).read())
        assert varz["server_id"] and varz["jetstream"]
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_one_trace_from_the_cli_through_offer_agents_commit_and_apply(brain, deployed, collector):
    def trace_of_deploy():
        spans = collector.snapshot()
        root = [s for s in spans if s["service"] == "cncbrain-cli" and s["name"].endswith("/DeployInferenceService")]
        return root[0] if root else None

    root = wait_for(trace_of_deploy, 30, "the CLI's span at the collector")
    tid = root["trace_id"]

    def complete():
        spans = [s for s in collector.snapshot() if s["trace_id"] == tid]
        names = {(s["process"], s["name"]) for s in spans}
        applied = {n.removeprefix("apply ") for p, n in names if p == "agents" and n.startswith("apply ")}
        # one emulator span per site applied (their names are the subject's template, alike: count spans)
        emulated = [s for s in spans if s["process"] == "emulator" and "cnc.emulator.apply" in s["name"]]
        return (spans, names, applied) if applied and len(emulated) >= len(applied) else None

    spans, names, applied = wait_for(complete, 30, "every apply of the deploy in its trace")
    processes = {s["process"] for s in spans}
    assert {"cncbrain-cli", "scheduler", "governance", "agents", "emulator"} <= processes, processes
    assert ("scheduler", "cnc.scheduler.v1.SchedulerService/DeployInferenceService") in names
    assert ("scheduler", "offer round") in names
    assert ("scheduler", "commit") in names
    # every site agent answered the round, each with its own span in the trace
    answered = {n.removeprefix("answer ") for p, n in names if p == "agents" and n.startswith("answer ")}
    assert answered == set(brain.sites), answered
    commit = next(s for s in spans if s["name"] == "commit")
    placed = {v.string_value for v in commit["attributes"]["cnc.sites"].array_value.values}
    assert applied == placed, (applied, placed)
    # each span's parent is in the trace: nothing points to a span that never arrived
    ids = {s["span_id"] for s in spans}
    orphans = [s["name"] for s in spans if s["parent"] and s["parent"] not in ids]
    assert not orphans, orphans


def test_every_process_logs_json_with_trace_ids(brain, deployed):
    for name in brain.metrics:
        lines = [x for x in brain.log_path(name).read_text().splitlines() if x.startswith("{")]
        assert lines, f"{name}: no JSON log lines"
        records = [json.loads(x) for x in lines]
        assert all({"time", "level", "logger", "message", "process"} <= r.keys() for r in records)
    # the refused call of the Prometheus test (or this one) is logged inside its server span
    cli(brain, "workloads", env={"CNC_TOKEN": "cnc_forged_0001"})

    def refusal_logged():
        records = [json.loads(x) for x in brain.log_path("scheduler").read_text().splitlines() if x.startswith("{")]
        return [r for r in records if r["message"].startswith("refused ") and "UNAUTHENTICATED" in r["message"]]

    refused = wait_for(refusal_logged, 10, "the refused call in the scheduler's JSON log")
    assert all(len(r["trace_id"]) == 32 and len(r["span_id"]) == 16 for r in refused), refused


def test_the_web_page_shows_the_sites_and_updates_after_a_deploy(brain, deployed, tmp_path):
    import asyncio

    from support.chromium import Chromium, binary

    if binary() is None:
        pytest.skip("no chromium binary (Debian package chromium; .ci/run installs it)")
    url = brain.web_url
    assert url.startswith("http://127.0.0.1:")
    # the data is behind the operator token: none, a forged one -> 401; the page itself holds no data
    for headers in ({}, {"Authorization": "Bearer tok_0123456789abcdef.forgedforgedforgedforged"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "api/state", headers=headers), timeout=5)
        assert refused.value.code == 401
    # a tenant's token is valid, but the page is the operator's: 403
    assert cli(brain, "tenants", "create", "webco", "--max-gpus", "8").returncode == 0
    issued = cli(brain, "tokens", "issue", "--tenant", "webco")
    assert issued.returncode == 0, issued.stderr

    def refusal_for_the_tenant():
        try:
            urllib.request.urlopen(urllib.request.Request(url + "api/state", headers={
                "Authorization": f"Bearer {issued.stdout.strip()}"}), timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code if exc.code != 401 else None  # 401 until perception has the new token
        return "served"

    assert wait_for(refusal_for_the_tenant, 10, "the tenant's token known to perception") == 403
    token = brain.token_file.read_text().strip()

    async def drive():
        async with Chromium() as page:
            await page.open(url)  # no token: the page asks for it
            await page.until("getComputedStyle(document.getElementById('login')).display === 'flex'", 20,
                             "the page asking for the operator token")
            await page.open(f"{url}#token={token}")
            await page.evaluate("location.reload()")
            sites = await page.until(f"[...document.querySelectorAll('#map g.site')].map(g => g.dataset.site)"
                                     f".length === {len(brain.sites)} && [...document.querySelectorAll('#map g.site')]"
                                     ".map(g => g.dataset.site)", 30, "every site on the map")
            assert sorted(sites) == sorted(brain.sites)
            assert "token=" not in await page.evaluate("location.href"), "the token stays out of the address bar"
            shown = await page.until(f"document.querySelector('tr[data-workload=\"{deployed}\"]')?.dataset.state", 20)
            assert shown in ("placed", "running")
            out = cli(brain, "deploy", "--name", "late", "--model", "13b", "--min-replicas", "2")
            assert out.returncode == 0, out.stderr
            wid = out.stdout.split()[0]
            row = f"document.querySelector('tr[data-workload=\"{wid}\"]')"
            await page.until(f"{row}?.dataset.state === 'running' && {row}.querySelectorAll('.chip').length > 0", 30,
                             "the new workload running with its placements on the page")
            # the sites' next telemetry shows the GPUs in use: 3 + 2 replicas of one GPU each
            await page.until("parseInt(document.getElementById('k-gpus').textContent) >= 5", 30, "5 GPUs in use")
            await page.screenshot(tmp_path / "web-page.png")

    asyncio.run(drive())
    assert (tmp_path / "web-page.png").stat().st_size > 10_000


def test_status_shows_the_pool_and_why_a_workload_waits(brain, deployed):
    # one replica on 40 H100s: the pool has 64, no site more than 32
    out = cli(brain, "deploy", "--name", "wide", "--model", "7b", "--gpus-per-replica", "40", "--gpu-type", "H100",
              "-o", "json")
    assert out.returncode == 0, out.stderr
    giant = json.loads(out.stdout)
    assert giant["workload_id"].startswith("svc-") and giant["state"] == "WORKLOAD_STATE_PENDING"
    assert "inference_service" in giant and "created_at" in giant  # snake_case, as the protos name fields

    def waiting_with_reason():
        res = cli(brain, "status", "-o", "json")
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        rows = [w for w in data["waiting"] if w["workload_id"] == giant["workload_id"] and w["reason"]]
        return (data, rows[0]) if rows else None

    data, row = wait_for(waiting_with_reason, 20, "the wide service waiting with a reason")
    assert row["reason"] == "no site within policy has 40 free H100 GPU(s)", row
    # every site up but those the scenario fails itself (abilene: Chicago 1500 s into emulated time,
    # 25 s after the emulator started at x60, which a slow run reaches)
    scheduled = {slug(f.site) for f in load_scenario("abilene").failures}
    down = data["sites"]["down"]
    assert set(down) <= scheduled and data["sites"] == {"total": len(brain.sites), "up": len(brain.sites) - len(down),
                                                        "down": down}, data["sites"]
    assert sum(g["used"] for g in data["gpus"]) >= 3 and all(g["count"] == g["used"] + g["free"] + g["down"]
                                                             for g in data["gpus"])
    assert data["workloads"]["running"] >= 1 and data["web"] == brain.web_url
    table = cli(brain, "status")  # a pipe: plain columns, nothing cut
    assert table.returncode == 0 and giant["workload_id"] in table.stdout
    assert "no site within policy has 40 free H100 GPU(s)" in table.stdout
    cancel = cli(brain, "cancel", giant["workload_id"], "--json")
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["state"] == "WORKLOAD_STATE_CANCELLED"


def test_the_cli_is_scriptable(brain, deployed, tmp_path):
    # nothing truncated on a pipe: the full id, every site, one line per row
    listed = cli(brain, "workloads")
    assert listed.returncode == 0 and deployed in listed.stdout, listed.stdout
    assert listed.stdout.splitlines()[0].split() == ["id", "kind", "name", "state", "gen", "placements", "progress",
                                                     "message"]
    sites = cli(brain, "sites")
    assert all(s in sites.stdout for s in brain.sites) and len(sites.stdout.splitlines()) == len(brain.sites) + 1
    # one key style everywhere
    for name, args in (("sites", ["-o", "json"]), ("workloads", ["--json"]), ("workloads", [deployed, "-o", "json"])):
        text = cli(brain, name, *args).stdout
        assert "siteId" not in text and "workloadId" not in text and ("site_id" in text or "workload_id" in text)
    # the token and the state folder: --state-dir finds both, from anywhere; --token wins over the file
    elsewhere = {"CNC_STATE_DIR": str(tmp_path / "nothing-here")}
    lost = cli(brain, "workloads", env=elsewhere)
    assert lost.returncode == 1 and "no brain answers" in lost.stderr
    found = cli(brain, "workloads", "--state-dir", str(brain.state_dir), "-o", "json", env=elsewhere)
    assert found.returncode == 0 and any(w["workload_id"] == deployed for w in json.loads(found.stdout))
    forged = cli(brain, "workloads", "--token", "tok_0123456789abcdef.forgedforgedforgedforged")
    assert forged.returncode == 1 and "UNAUTHENTICATED" in forged.stderr
    # exit codes: 0 done, 1 failed, 2 usage
    assert cli(brain, "workloads", "svc-0000000000000000").returncode == 1
    assert cli(brain, "deploy", "--name", "x").returncode == 2  # --model missing (argparse)
    assert cli(brain, "deploy", "--name", "x", "--model", "7b", "--env", "NOVALUE").returncode == 2
    version = subprocess.run([sys.executable, "-m", "cncbrain.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("cncbrain ")


def test_a_restarted_process_serves_metrics_where_prometheus_looks(brain):
    import signal

    url = brain.metrics["adaptation"]
    before = brain.procs["adaptation"].pid
    os.kill(before, signal.SIGKILL)

    def back():
        brain.supervisor.poll()  # what `up`'s loop does
        proc = brain.procs.get("adaptation")
        if proc is None or proc.pid == before:
            return None
        try:
            return 'cnc_build_info{process="adaptation"' in urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return None

    assert wait_for(back, 60, "adaptation restarted, its metrics at the same URL")
    assert (brain.run_dir / "adaptation.metrics").read_text() == url
