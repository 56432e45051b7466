"""A Slurm site in a live brain: real nats-server, perception, scheduler and adaptation, a site
agent on the Slurm executor (the shared test cluster's partition `site-a`: 2 nodes × 4 H100 and one
with 2 L40S) and a second site on the memory executor (8 H100) for work to move to."""

import asyncio

import grpc
import pytest

from agents.executor import MemoryExecutor
from agents.executor_slurm import SlurmExecutor, SlurmSettings
from agents.site_agent import SiteAgent
from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.bus import Bus, subjects
from services.adaptation.server import AdaptationServer
from services.adaptation.settings import Settings as AdaptationSettings
from services.perception.server import PerceptionServer
from services.perception.settings import Settings as PerceptionSettings
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings as SchedulerSettings

from support.slurm import serve_template, squeue, train_template
from support.specs import inference_spec
from support.waiting import until

pytestmark = pytest.mark.integration
TICK_S = 0.5
SITE = "a-slurm"
FULL_SITE = {"H100": 8, "L40S": 2}


class Brain:
    def __init__(self, url, slurm, workdir):
        self.url, self.slurm, self.workdir = url, slurm, workdir

    def executor(self, **overrides):
        settings = SlurmSettings(conf=str(self.slurm.conf), partition="site-a", workdir=str(self.workdir),
                                 poll_s=0.2, command_timeout_s=2, **overrides)
        return SlurmExecutor(SITE, settings)

    async def start_agent(self, **overrides):
        self.agent = await SiteAgent(self.agent_bus, SITE, self.executor(**overrides), heartbeat_s=0.2).start()
        return self.agent

    async def start(self, spare=True, **overrides):
        url = self.url
        self.perception = await PerceptionServer(PerceptionSettings(
            nats_url=url, grpc_port=0, tick_s=TICK_S, heartbeat_timeout_s=1.0)).start()
        self.agent_bus = await Bus.connect(url, "agents")
        await self.start_agent(**overrides)
        self.mem_bus = await Bus.connect(url, "mem-agent")
        self.spare = None
        sites = {SITE}
        if spare:
            site = common.Site(site_id="b-mem", name="b-mem",
                               gpu_pools=[common.GpuPool(gpu_type="H100", count=8, hbm_gb=80)])
            self.spare = await SiteAgent(self.mem_bus, "b-mem", MemoryExecutor(site), heartbeat_s=0.2).start()
            sites.add("b-mem")
        self.scheduler = await SchedulerServer(SchedulerSettings(nats_url=url, grpc_port=0, offer_timeout_s=0.5,
                                                                 retry_interval_s=0.2)).start()
        self.adaptation = await AdaptationServer(AdaptationSettings(nats_url=url, grpc_port=0, auth_enabled=False,
                                                                    guardrails_enabled=False)).start()
        inventory = self.scheduler.coordinator.inventory
        await until(lambda: inventory.up >= sites, 20, "the sites up")
        # every node of the partition in service (one may still be resuming after the test before)
        await until(lambda: inventory.capacity.get(SITE) == FULL_SITE, 20, f"{SITE} with {FULL_SITE}")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.scheduler.port}")
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        self.bus = await Bus.connect(url, "test")
        return self

    async def stop(self):
        await self.channel.close()
        await self.adaptation.stop()
        await self.scheduler.stop()
        await self.agent.stop()
        if self.spare:
            await self.spare.stop()
        for b in (self.agent_bus, self.mem_bus, self.bus):
            await b.close()
        await self.perception.stop()

    async def workload(self, wid):
        return (await self.stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload

    async def in_state(self, wid, state, timeout=30):
        async def check():
            w = await self.workload(wid)
            return w if w.state == state else None
        return await until(check, timeout, f"{wid} {spb.WorkloadState.Name(state)}", poll_s=0.2)


@pytest.fixture
async def brain(nats_server, slurm, tmp_path):
    b = await Brain(nats_server.url, slurm, tmp_path / "work").start()
    yield b
    await b.stop()


@pytest.fixture
async def brain_alone(nats_server, slurm, tmp_path):
    """The brain with the Slurm site as its only site: every placement lands there."""
    b = await Brain(nats_server.url, slurm, tmp_path / "work").start(spare=False)
    yield b
    await b.stop()



def service_spec(name, replicas, gpus, template=None):
    # its demand enters at the Slurm site (a service without an ingress site starts one replica per site)
    return inference_spec(name, replicas, gpus_per_replica=gpus, allowed_gpu_types=["H100"], ingress_site_id=SITE,
                          template=template or serve_template())


def live_jobs(slurm, wid=""):
    """The site's pending and running jobs (of workload `wid`, else all)."""
    return [j for j in squeue(slurm, f"cnc.{SITE}.{wid}.".replace("..", ".")) if j["state"] in ("RUNNING", "PENDING")]


class Ticks:
    def __init__(self):
        self.n = 0
        self.sites = {}

    async def on(self, ev):
        self.n += 1
        for s in ev.payload.sites:
            self.sites[s.site.site_id] = {p.gpu_type: p.count for p in s.site.gpu_pools}


async def test_a_node_down_takes_its_gpus_out_and_adaptation_moves_the_overflow_within_3_ticks(brain, slurm):
    resp = await brain.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec("chat", 2, 4)))
    wid = resp.workload.workload_id
    w = await brain.in_state(wid, spb.WORKLOAD_STATE_RUNNING)
    assert [(p.site_id, p.replicas) for p in w.placements] == [(SITE, 2)]
    jobs = await until(lambda: ([j for j in live_jobs(slurm, wid) if j["state"] == "RUNNING"] or None)
                       if len([j for j in live_jobs(slurm, wid) if j["state"] == "RUNNING"]) == 2 else None,
                       30, "2 replicas running")
    assert {j["gres"] for j in jobs} == {"gres:gpu:h100:4"} and {j["nodes"] for j in jobs} == {"a1", "a2"}
    victim = next(j for j in jobs if j["name"].endswith(".r0"))
    ticks, actions = Ticks(), []
    await brain.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, ticks.on, consumer="test-ticks")

    async def on_action(ev):
        actions.append((ticks.n, ev.payload))

    await brain.bus.subscribe(subjects.ADAPTATION_ACTION, on_action, consumer="test-actions")
    slurm.run("scontrol", "update", f"nodename={victim['nodes']}", "state=down", "reason=test")
    await until(lambda: actions, 15, "an adaptation action")
    n, action = actions[0]
    print(f"adaptation acted {n} tick(s) of {TICK_S} s after the node went down: {action.reason}")
    assert n <= 3, f"adaptation acted after {n} ticks"
    assert action.kind == apb.ACTION_KIND_REPLACE_REPLICAS and action.site_id == SITE
    assert "fewer GPUs in service" in action.reason and "1 to b-mem" in action.reason
    assert ticks.sites[SITE] == {"H100": 4, "L40S": 2}  # perception's picture of the site: 4 H100 left

    async def moved():
        w = await brain.workload(wid)
        where = {p.site_id: p.replicas for p in w.placements if p.replicas}
        jobs = live_jobs(slurm, wid)
        return (w, jobs) if where == {SITE: 1, "b-mem": 1} and len(jobs) == 1 else None

    w, jobs = await until(moved, 20, "one replica moved, one job left")
    assert jobs[0]["state"] == "RUNNING" and jobs[0]["nodes"] != victim["nodes"]


async def test_an_agent_restart_adopts_the_jobs_and_a_gang_completes(brain_alone, slurm):
    # The Slurm site alone: with a spare site the gang goes wherever is emptier when its offer round
    # runs (a training proposal's cost counts the site's busy share), which is not what this tests.
    brain = brain_alone
    svc = await brain.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec("chat", 2, 2)))
    job = common.TrainingJobSpec(name="ft", model="1b", params_b=1, shards=2, gpus_per_shard=2, tokens=1e9,
                                 allowed_gpu_types=["H100"], template=train_template(8))
    ft = await brain.stub.SubmitTrainingJob(spb.SubmitTrainingJobRequest(job=job))
    sid, jid = svc.workload.workload_id, ft.workload.workload_id
    placed = [await brain.in_state(sid, spb.WORKLOAD_STATE_RUNNING), await brain.in_state(jid, spb.WORKLOAD_STATE_RUNNING)]
    assert {p.site_id for w in placed for p in w.placements} == {SITE}
    await until(lambda: (len([j for j in live_jobs(slurm) if j["state"] == "RUNNING"]) == 3), 30,
                "2 replicas and the gang running")
    before = sorted(j["id"] for j in squeue(slurm, f"cnc.{SITE}."))
    await brain.agent.stop()
    await brain.start_agent()  # a new executor: empty memory, the placements replayed
    await asyncio.sleep(2)  # ten polls of the new executor
    after = sorted(j["id"] for j in squeue(slurm, f"cnc.{SITE}."))
    assert after == before, "the restarted agent submitted or cancelled jobs"
    assert brain.agent.counters["placements_stale"] >= 2  # the stream's copies, after the catch-up
    w = await brain.in_state(jid, spb.WORKLOAD_STATE_COMPLETED, timeout=40)
    assert w.progress == 1.0
    assert [p.shard_indices for p in w.placements if p.site_id == SITE] == [[]]  # released


async def test_a_workload_whose_jobs_keep_failing_is_failed_with_the_reason(brain, slurm):
    await brain.agent.stop()
    await brain.start_agent(max_retries=1)
    bad = common.WorkloadTemplate(command="/bin/sh", args=["-c", "echo 'model not found' >&2; exit 3"])
    resp = await brain.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(
        service=service_spec("broken", 1, 1, template=bad)))
    w = await brain.in_state(resp.workload.workload_id, spb.WORKLOAD_STATE_FAILED, timeout=40)
    print(w.message)
    assert f"site {SITE}:" in w.message and "exit code 3:0" in w.message and "retries (1) spent" in w.message
    assert brain.scheduler.coordinator.counters["apply_failed"] >= 2  # the retry reported, then the end
    await until(lambda: not live_jobs(slurm, resp.workload.workload_id), 10, "no job left")


async def test_slurm_unreachable_marks_the_site_down_and_the_agent_reconciles_when_it_returns(brain, slurm):
    resp = await brain.stub.DeployInferenceService(spb.DeployInferenceServiceRequest(service=service_spec("chat", 1, 2)))
    wid = resp.workload.workload_id
    await brain.in_state(wid, spb.WORKLOAD_STATE_RUNNING)
    await until(lambda: len(live_jobs(slurm, wid)) == 1, 20, "1 job")
    states = []

    async def on_state(ev):
        states.append((ev.payload.site_id, ev.payload.state))

    await brain.bus.subscribe(subjects.PERCEPTION_SITE_STATE, on_state, consumer="test-states")
    slurm.stop_controller()
    try:
        await until(lambda: (SITE, common.SITE_STATE_DOWN) in states, 20, "perception marks the site down")

        async def moved():  # adaptation moves the replica away; the placement for the site is kept
            w = await brain.workload(wid)
            return w if {p.site_id: p.replicas for p in w.placements if p.replicas} == {"b-mem": 1} else None

        await until(moved, 20, "replica re-placed off the unreachable site")
    finally:
        slurm.start_controller()
    await until(lambda: (SITE, common.SITE_STATE_UP) in states, 30, "the site is up again")
    await until(lambda: not live_jobs(slurm, wid), 20, "the moved replica's job cancelled at the site")
