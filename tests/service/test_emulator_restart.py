"""An emulator that dies comes back with its sites as they were: what each site ran (a service's
replicas, a training gang's shards) is in its state file and applied again before it answers; an
apply sent while it was away is asked again until it answers; a cancelled workload is gone from the
file, and a garbled file restores what it can."""

import asyncio

from agents.executor_emulated import EmulatedExecutor, EmulatorHost, read_placements, write_placements
from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cncbrain.bus import Bus
from cncbrain.scenario import load_scenario


def service(wid, site, replicas, generation=1):
    msg = spb.PlacementCommitted(placement=common.Placement(
        workload_id=wid, kind=common.WORKLOAD_KIND_INFERENCE_SERVICE, site_id=site, gpu_type="H100",
        gpus_per_unit=1, replicas=replicas, generation=generation))
    msg.inference_service.CopyFrom(common.InferenceServiceSpec(
        name=wid, model="7b", params_b=7, slo=common.SloTargets(ttft_ms=1000, tpot_ms=100), expected_rate_rps=1,
        min_replicas=1, max_replicas=4, gpus_per_replica=1, trace="code"))
    return msg


def shards(wid, site, indices, generation=1):
    msg = spb.PlacementCommitted(placement=common.Placement(
        workload_id=wid, kind=common.WORKLOAD_KIND_TRAINING_JOB, site_id=site, gpu_type="H100", gpus_per_unit=1,
        shard_indices=indices, generation=generation))
    msg.training_job.CopyFrom(common.TrainingJobSpec(name=wid, model="m", params_b=1, shards=2, gpus_per_shard=1,
                                                     tokens=1e12))
    return msg


async def emulator(url, state_file):
    bus = await Bus.connect(url, "emulator")
    host = EmulatorHost(bus, load_scenario("abilene"), speed=1.0, keep_failures=False, state_file=state_file)
    await host.start()
    return bus, host


async def crash(bus, host):
    """As a `kill -9` leaves it: nothing more is written, nobody answers."""
    await host.stop()
    await bus.close()


def replicas_at(host, wid, site):
    return int(host.twin.replicas_by_type().sum(axis=2)[host.index[site], host.twin.service_index[wid]])


async def test_a_restarted_emulator_has_its_sites_as_they_were(nats_server, tmp_path):
    state = tmp_path / "emulator.state"
    agents = await Bus.connect(nats_server.url, "agents")
    ny, chicago = EmulatedExecutor(agents, "new-york"), EmulatedExecutor(agents, "chicago")
    bus, host = await emulator(nats_server.url, state)
    try:
        assert await ny.apply(service("chat", "new-york", 2)) == (True, "")
        assert await ny.apply(service("gone", "new-york", 1)) == (True, "")
        assert await ny.apply(service("gone", "new-york", 0, generation=2)) == (True, "")  # cancelled
        assert await ny.apply(shards("train", "new-york", [0])) == (True, "")
        assert await chicago.apply(shards("train", "chicago", [1])) == (True, "")
        assert host.twin.jobs[host.twin.job_index["train"]].state == "running"
        await crash(bus, host)

        # an apply while no emulator runs waits for the next one instead of failing
        late = asyncio.ensure_future(chicago.apply(service("late", "chicago", 1)))
        await asyncio.sleep(0.5)
        assert not late.done()
        bus, host = await emulator(nats_server.url, state)
        assert await asyncio.wait_for(late, 10) == (True, "")

        assert replicas_at(host, "chat", "new-york") == 2 and replicas_at(host, "late", "chicago") == 1
        assert "gone" not in host.twin.service_index or not host.twin.services[host.twin.service_index["gone"]].active
        job = host.twin.jobs[host.twin.job_index["train"]]
        assert job.state == "running" and sorted(host.job_sites["train"]) == ["chicago", "new-york"]
        loads = {s.workload_id: s.replicas for s in host.site_state("new-york").services}
        assert loads.get("chat") == 2  # what the site reports to its agent after the restart

        # the same gang asked again (a slow answer retried) changes nothing
        assert await ny.apply(shards("train", "new-york", [0])) == (True, "")
        assert "train" not in host.gangs
        # cancelled: out of the file, a third emulator does not bring it back
        assert await ny.apply(service("chat", "new-york", 0, generation=2)) == (True, "")
        assert await ny.apply(shards("train", "new-york", [], generation=2)) == (True, "")
        assert await chicago.apply(shards("train", "chicago", [], generation=2)) == (True, "")
        assert {m.placement.workload_id for m in read_placements(state)} == {"late"}
    finally:
        await crash(bus, host)
        await agents.close()


def test_a_garbled_state_file_restores_the_records_before_the_damage(tmp_path):
    state = tmp_path / "emulator.state"
    write_placements(state, [service("a", "new-york", 1), service("b", "chicago", 2)])
    state.write_bytes(state.read_bytes()[:-3])  # cut off in the last record
    assert [m.placement.workload_id for m in read_placements(state)] == ["a"]
    assert read_placements(tmp_path / "none") == []
