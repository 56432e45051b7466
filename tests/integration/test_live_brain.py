"""The live brain with real parts: a real nats-server, real gRPC servers, the scheduler as its own
process where it gets killed, site agents with the memory executor."""

import asyncio
import os
import subprocess
import sys
from collections import Counter

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.executor import MemoryExecutor
from agents.site_agent import SiteAgent
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import telemetry
from cncbrain.bus import Bus, envelope, subjects
from cncbrain.grpcserver import wait_healthy
from cncbrain.natsserver import NatsServer, free_port
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

from support.specs import inference_spec
from support.waiting import until

pytestmark = pytest.mark.integration
SITES = ("east", "west", "north")


async def start_agents(url):
    bus = await Bus.connect(url, "agents")
    agents = []
    for sid in SITES:
        site = common.Site(site_id=sid, gpu_pools=[common.GpuPool(gpu_type="H100", count=64, hbm_gb=80)])
        agents.append(await SiteAgent(bus, sid, MemoryExecutor(site), heartbeat_s=0.2).start())
    return bus, agents


async def stop_agents(bus, agents):
    for a in agents:
        await a.stop()
    await bus.close()


async def placement_stream(bus):
    """Every message of CNC_PLACEMENTS as (workload, generation, site, units)."""
    info = await bus.js.stream_info("CNC_PLACEMENTS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await bus.js.get_msg("CNC_PLACEMENTS", seq)
        p = spb.PlacementCommitted.FromString(raw.data).placement
        out.append((p.workload_id, p.generation, p.site_id, p.replicas))
    return out


def spawn_scheduler(url, port, log):
    env = {**os.environ, "CNC_SCHEDULER_NATS_URL": url, "CNC_SCHEDULER_GRPC_PORT": str(port),
           "CNC_SCHEDULER_OFFER_TIMEOUT_S": "1.0", "CNC_SCHEDULER_RETRY_INTERVAL_S": "0.2"}
    return subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_sigkill_scheduler_with_deployments_in_flight_loses_nothing_places_nothing_twice(nats_server, tmp_path):
    url = nats_server.url
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2,
                                                           heartbeat_timeout_s=30)).start()
    agent_bus, agents = await start_agents(url)
    # A registered site whose agent never answers keeps every offer open for the full offer timeout,
    # so the kill lands while deployments are accepted but not yet placed.
    await agent_bus.publish(subjects.SITE_REGISTERED, site_pb.SiteRegistered(
        site=common.Site(site_id="silent", gpu_pools=[common.GpuPool(gpu_type="H100", count=8)])), site="silent")
    port = free_port()
    log = open(tmp_path / "scheduler.log", "ab")  # noqa: SIM115 - shared by two scheduler processes
    proc = spawn_scheduler(url, port, log)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        await wait_healthy(f"127.0.0.1:{port}", 20)
        await asyncio.sleep(0.5)  # first snapshot reaches the scheduler
        accepted, rejected = {}, []

        async def deploy(i):
            req = spb.DeployInferenceServiceRequest(service=inference_spec(f"svc{i}"), request_id=f"req-{i}")
            try:
                accepted[i] = (await stub.DeployInferenceService(req, timeout=5)).workload.workload_id
            except grpc.aio.AioRpcError:
                rejected.append(i)

        calls = [asyncio.create_task(deploy(i)) for i in range(40)]
        await until(lambda: len(accepted) >= 10, 10, "first acceptances")
        proc.kill()  # SIGKILL, mid-flight
        proc.wait()
        await asyncio.gather(*calls)
        assert accepted, "no deployment was accepted before the kill"
        # Bus.kv_items reads the bucket's stream with a pull consumer; not kv.keys(), whose push watcher
        # can report a full bucket as empty under load (NoKeysError, nats-io/nats.py#842).
        records = await agent_bus.kv_items("cnc-workloads")
        missing = set(accepted.values()) - set(records)
        assert not missing, f"accepted before the kill but no record stored: {sorted(missing)}"
        states = Counter(spb.Workload.FromString(value).state for value, _ in records.values())
        assert states[spb.WORKLOAD_STATE_PENDING] >= 1, f"nothing was in flight at the kill: {states}"
        in_flight = [wid for wid in accepted.values()]
        proc = spawn_scheduler(url, port, log)
        await wait_healthy(f"127.0.0.1:{port}", 20)
        for i in rejected:  # the tenant retries with the same idempotency key
            await deploy(i)
        assert sorted(accepted) == list(range(40))

        async def all_placed():
            ws = (await stub.ListWorkloads(spb.ListWorkloadsRequest())).workloads
            done = [w for w in ws if w.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)]
            return ws if len(done) == 40 else None

        workloads = await until(all_placed, 40, "all 40 placed")
        assert {w.workload_id for w in workloads} == set(accepted.values())
        assert set(in_flight) <= {w.workload_id for w in workloads}  # nothing accepted was lost
        for w in workloads:
            assert w.generation == 1 and sum(p.replicas for p in w.placements) == 2
        stream = await placement_stream(agent_bus)
        keys = Counter((wid, gen, site) for wid, gen, site, _ in stream)
        assert max(keys.values()) == 1, "a placement was published twice"
        per_workload = Counter()
        for wid, _, _, units in stream:
            per_workload[wid] += units
        assert set(per_workload.values()) == {2}
        await asyncio.sleep(0.5)
        running = Counter()
        for a in agents:
            for wid, p in a.executor.placements.items():
                running[wid] += p.replicas
        assert running == {wid: 2 for wid in accepted.values()}, "executors run a different number of replicas"
    finally:
        await channel.close()
        proc.kill()
        proc.wait()
        log.close()
        await stop_agents(agent_bus, agents)
        await perception.stop()



async def test_services_reconnect_and_carry_on_when_nats_restarts(tmp_path):
    server = NatsServer(tmp_path / "js", log_file=tmp_path / "nats.log").start()
    url = server.url
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2)).start()
    scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=0.5)).start()
    agent_bus, agents = await start_agents(url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def placed(wid):
        w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        return w.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING)

    try:
        await until(lambda: len(scheduler.coordinator.inventory.up) == 3, 10, "sites known")
        first = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=inference_spec("before")))).workload
        await until(lambda: placed(first.workload_id), 10, "first placed")
        seq_before = perception.events.latest.sequence
        server.kill()
        await asyncio.sleep(1.0)
        server = NatsServer(tmp_path / "js", port=server.port, log_file=tmp_path / "nats.log").start()
        await until(lambda: scheduler.bus.connected and agent_bus.connected and perception.bus.connected,
                    20, "reconnected")
        second = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=inference_spec("after")))).workload
        await until(lambda: placed(second.workload_id), 20, "placed after the restart")
        await until(lambda: perception.events.latest.sequence > seq_before + 3, 10, "snapshots go on")
        await until(lambda: sum(len(a.executor.placements) for a in agents) >= 2, 10, "applied after restart")
        assert scheduler.bus.counters["disconnects"] >= 1
        listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest())).workloads
        assert {w.workload_id for w in listed} == {first.workload_id, second.workload_id}
    finally:
        await channel.close()
        await stop_agents(agent_bus, agents)
        await scheduler.stop()
        await perception.stop()
        server.stop()


async def test_one_trace_spans_grpc_call_scheduler_and_site_agent(nats_server):
    exporter = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    url = nats_server.url
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=0.2)).start()
    scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=0.5)).start()
    agent_bus, agents = await start_agents(url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}", interceptors=telemetry.client_interceptors())
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    try:
        await until(lambda: len(scheduler.coordinator.inventory.up) == 3, 10, "sites known")
        w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=inference_spec("traced")))).workload

        def spans():
            return exporter.get_finished_spans()

        await until(lambda: any(s.name.startswith("agent-") and "placement" in s.name for s in spans()),
                    10, "agent applied")
        rpc = next(s for s in spans() if s.name.endswith("SchedulerService/DeployInferenceService")
                   and s.kind == trace.SpanKind.SERVER)
        same_trace = [s for s in spans() if s.context.trace_id == rpc.context.trace_id]
        names = {s.name for s in same_trace}
        assert any(n.startswith("agent-") and n.endswith("-offers cnc.scheduler.offer") for n in names), names
        assert any(n.startswith("agent-") and "cnc.scheduler.placement" in n for n in names), names
        # the agents' answers (one OfferAnswers from their process, or one OfferAnswer per site)
        assert any(n.startswith(("scheduler-answers", "scheduler-proposals")) for n in names), names
        assert w.workload_id
    finally:
        await channel.close()
        await stop_agents(agent_bus, agents)
        await scheduler.stop()
        await perception.stop()


async def test_garbled_placement_is_dead_lettered_and_the_agent_keeps_applying(nats_server):
    url = nats_server.url
    agent_bus, agents = await start_agents(url)
    try:
        await agent_bus.js.publish("cnc.scheduler.placement.east", b"\xff\x00garbage",
                                   headers={envelope.TYPE: "cnc.scheduler.v1.PlacementCommitted", envelope.EVENT_ID: "x1"})
        good = spb.PlacementCommitted(placement=common.Placement(
            workload_id="svc-1", kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, site_id="east", generation=1,
            replicas=3, gpu_type="H100", gpus_per_unit=1))
        await agent_bus.publish(subjects.SCHEDULER_PLACEMENT, good, site="east")
        await until(lambda: "svc-1" in agents[0].executor.placements, 10, "good placement applied")
        assert agent_bus.counters["agent-east.dead_lettered"] == 1
        info = await agent_bus.js.stream_info("CNC_DEADLETTER")
        assert info.state.messages == 1
    finally:
        await stop_agents(agent_bus, agents)
