"""Site failure in the emulator, end to end: real nats-server, the emulator (the twin) with site
agents on emulated executors, perception, scheduler and adaptation servers.

A site holding replicas of a service (or shards of a training job) is failed in the emulator; its
agent goes silent, perception marks it down, adaptation re-places what ran there, the scheduler
commits the new placement and the emulated sites run it. Inference capacity must be back within 3
ticks (perception snapshots) of the failure; the job resumes with its lost work recorded.
"""

import asyncio

import grpc
import pytest

from agents.executor_emulated import EmulatedExecutor, EmulatorHost
from agents.site_agent import SiteAgent
from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import Bus, subjects
from cncbrain.scenario import load_scenario
from services.adaptation.server import AdaptationServer
from services.adaptation.settings import Settings as AdaptationSettings
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

from support.waiting import until

pytestmark = pytest.mark.integration
TICK_S = 0.5


@pytest.fixture
async def live(nats_server):
    url = nats_server.url
    scenario = load_scenario("abilene")
    emu_bus = await Bus.connect(url, "emulator")
    host = EmulatorHost(emu_bus, scenario, speed=scenario.tick_s / 0.25, keep_failures=False)  # 4 ticks/s
    await host.start()
    perception = await PerceptionServer(PerceptionSettings(nats_url=url, grpc_port=0, tick_s=TICK_S,
                                                           heartbeat_timeout_s=0.3)).start()
    agent_bus = await Bus.connect(url, "agents")
    agents = [await SiteAgent(agent_bus, sid, EmulatedExecutor(agent_bus, sid), heartbeat_s=0.1).start()
              for sid in host.ids]
    scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=0.5,
                                                        retry_interval_s=0.2)).start()
    adaptation = await AdaptationServer(AdaptationSettings(nats_url=url, grpc_port=0, auth_enabled=False,
                                                           guardrails_enabled=False,
                                                           checkpoint_interval_s=host.tick_s * 40)).start()
    await until(lambda: len(scheduler.coordinator.inventory.up) == len(host.ids), 20, "all sites up")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
    test_bus = await Bus.connect(url, "test")
    yield scheduler_pb2_grpc.SchedulerServiceStub(channel), test_bus, scheduler, adaptation
    await channel.close()
    await adaptation.stop()
    await scheduler.stop()
    for a in agents:
        await a.stop()
    await agent_bus.close()
    await perception.stop()
    await host.stop()
    await emu_bus.close()
    await test_bus.close()



class Ticks:
    """Counts perception snapshots (the control tick) from a moment on."""

    def __init__(self):
        self.n = 0

    async def on(self, _):
        self.n += 1


async def running(stub, wid):
    async def check():
        w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
        return w if w.state == spb.WORKLOAD_STATE_RUNNING else None
    return await until(check, 20, f"{wid} running")


async def test_inference_capacity_is_back_within_3_ticks_of_a_site_failure(live):
    stub, bus, scheduler, adaptation = live
    spec = common.InferenceServiceSpec(name="chat", model="7b", params_b=7, min_replicas=6, max_replicas=6,
                                       gpus_per_replica=1, slo=common.SloTargets(ttft_ms=500, tpot_ms=50))
    w = (await stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=spec))).workload
    w = await running(stub, w.workload_id)
    victim = max(w.placements, key=lambda p: p.replicas).site_id
    lost = sum(p.replicas for p in w.placements if p.site_id == victim)
    ticks = Ticks()
    await bus.subscribe(subjects.PERCEPTION_SNAPSHOT, ticks.on, consumer="test-ticks")
    await bus.publish(subjects.EMULATOR_FAIL, site_pb.EmulatorFailSite(site_id=victim, duration_s=24 * 3600),
                      site=victim)

    async def restored():
        now = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id))).workload
        up = scheduler.coordinator.inventory.up
        healthy = sum(p.replicas for p in now.placements if p.site_id in up and p.site_id != victim)
        return now if healthy >= 6 and victim not in up else None

    now = await until(restored, 15, "replicas re-placed")
    print(f"capacity back after {ticks.n} tick(s) of {TICK_S} s")
    assert ticks.n <= 3, f"capacity came back after {ticks.n} ticks"
    assert all(p.site_id != victim for p in now.placements if p.replicas)
    assert now.generation > w.generation
    actions = adaptation.adapter.list_actions(workload_id=w.workload_id)
    assert actions and actions[0].kind == apb.ACTION_KIND_REPLACE_REPLICAS and actions[0].site_id == victim
    assert f"re-placed {lost} of {lost}" in actions[0].reason


async def test_training_shards_resume_elsewhere_with_lost_work_recorded(live):
    stub, bus, scheduler, adaptation = live
    job = common.TrainingJobSpec(name="pretrain", model="7b", params_b=7, shards=3, gpus_per_shard=8, tokens=2e9,
                                 gang_timeout_s=10)
    w = (await stub.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))).workload
    w = await running(stub, w.workload_id)
    await until(lambda: adaptation.adapter.checkpoints.get(w.workload_id) is not None, 10, "progress seen")
    await asyncio.sleep(6 * TICK_S)  # progress past the checkpoint (checkpoints every 40 emulated ticks)
    victim = next(p.site_id for p in w.placements if p.shard_indices)
    seen = []

    async def on_action(ev):
        seen.append(ev.payload)

    await bus.subscribe(subjects.ADAPTATION_ACTION, on_action, consumer="test-actions")
    await bus.publish(subjects.EMULATOR_FAIL, site_pb.EmulatorFailSite(site_id=victim, duration_s=24 * 3600),
                      site=victim)

    async def resumed():
        now = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=w.workload_id))).workload
        shards = sorted(i for p in now.placements if p.site_id != victim for i in p.shard_indices)
        return now if shards == [0, 1, 2] else None

    now = await until(resumed, 15, "shards resumed")
    resume = [a for a in seen if a.workload_id == w.workload_id and a.kind == apb.ACTION_KIND_RESUME_SHARDS]
    assert resume and resume[0].site_id == victim
    assert "checkpoint" in resume[0].reason
    assert resume[0].lost_progress > 0.0 and resume[0].lost_tokens > 0.0
    assert "resumed" in now.message and "tokens to redo" in now.message  # recorded in the job's record
    print(f"lost {resume[0].lost_progress:.2%} of the job ({resume[0].lost_tokens:,.0f} tokens): {now.message}")
