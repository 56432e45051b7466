"""Why a workload waits (services/scheduler/domain.why_unplaced), one case per cause."""

import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.site.v1 import events_pb2 as site_pb
from services.scheduler.domain import NO_TYPE_WITHIN_QUOTA, Inventory, Need, why_unplaced


def inventory(up=("a", "b"), used=None):
    led = Inventory()
    led.set_site("a", [common.GpuPool(gpu_type="H100", count=8, hbm_gb=80),
                       common.GpuPool(gpu_type="T4", count=4, hbm_gb=16)], "a" in up)
    led.set_site("b", [common.GpuPool(gpu_type="A100-40GB", count=4, hbm_gb=40)], "b" in up)
    for (site, t), n in (used or {}).items():
        led.used[site][t] = n
    return led


def why(need, led=None, proposals=(), training=False, **kw):
    return why_unplaced(need, led or inventory(), list(proposals), training=training, **kw)


def test_a_unit_larger_than_every_allowed_gpu_names_the_memory_and_the_gpus_it_would_need():
    r = why(Need(1, 1, (), 200.0))
    assert r.code == "fits_no_gpu"
    assert r.text == ("fits no GPU's memory: a replica needs 200 GB (weights and KV cache), 200 GB on each of its "
                      "1 GPU(s), but the largest allowed GPU type, H100, has 80 GB: give it at least 3 GPUs per replica")
    # restricted to T4: the largest allowed is the T4
    assert "the largest allowed GPU type, T4, has 16 GB" in why(Need(1, 1, ("T4",), 40.0)).text


def test_the_api_refusal_and_the_waiting_reason_say_the_same_about_memory():
    """One message for a unit no GPU can hold, whether the API refuses it (the catalogue's types)
    or a workload waits for it (the pool's, which may be smaller than the catalogue's)."""
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from services.scheduler.domain import SpecError, check_placeable, need_of

    job = common.TrainingJobSpec(name="t", model="llama-7b", params_b=7, shards=1, gpus_per_shard=1, tokens=1e9,
                                 allowed_gpu_types=["H100"])
    w = spb.Workload(kind=common.WORKLOAD_KIND_TRAINING_JOB, training_job=job)
    with pytest.raises(SpecError) as refused:
        check_placeable(w, inventory())
    waiting = why(need_of(w), training=True).text
    assert waiting in str(refused.value) and waiting.startswith("fits no GPU's memory: a shard of a 7 B model needs 112 GB "
                                                     "(weights, gradients and optimizer state)"), (str(refused.value), waiting)
    assert waiting.endswith("the largest allowed GPU type, H100, has 80 GB: give it at least 2 GPUs per shard")


def test_no_site_within_policy_has_the_gpus_free():
    led = inventory(used={("a", "H100"): 8, ("b", "A100-40GB"): 4})
    r = why(Need(2, 1, ("H100", "A100-40GB"), 30.0), led)
    assert (r.code, r.text) == ("no_capacity", "no site within policy has 1 free A100-40GB or H100 GPU(s)")
    # policy: site a only, with its H100s taken -> none, though b has room
    r = why(Need(2, 2, ("H100", "A100-40GB"), 30.0), inventory(used={("a", "H100"): 8}),
            allowed=lambda site, t: site == "a")
    assert r.text == "no site within policy has 2 free A100-40GB or H100 GPU(s)"


def test_some_room_but_not_enough_for_every_replica_or_the_whole_gang():
    led = inventory(used={("a", "H100"): 6})
    r = why(Need(5, 1, ("H100",), 30.0), led)
    assert r.text == "waiting for capacity: the sites within policy have room for 2 of 5 replicas of 1 H100 GPU(s)"
    r = why(Need(5, 1, ("H100",), 30.0), led, training=True)
    assert (r.code, r.text) == ("gang_incomplete", "waiting for a gang of 5 shards: the sites within policy have "
                                                   "room for 2 now (all or none, 1 H100 GPU(s) each)")


def test_room_enough_then_the_agents_answers_say_why():
    decline = site_pb.Proposal(site_id="a", units=0, reason="site is draining")
    half = site_pb.Proposal(site_id="b", units=2, gpu_type="A100-40GB")
    r = why(Need(4, 1, (), 30.0), proposals=[decline, half], training=True)
    assert r.text == "waiting for a gang of 4 shards: the site agents offered 2 of 4 shards; most said: site is draining"
    assert why(Need(1, 1, (), 1.0)).text == "no site agent answered the last offer in time"


def test_quota_type_and_liveness_causes():
    assert why(Need(1, 1, (), 1.0), offered_types=(NO_TYPE_WITHIN_QUOTA,)).code == "quota"
    assert why(Need(1, 1, ("MI300X",), 1.0)).text == "no site has GPUs of type MI300X"
    assert why(Need(1, 1, (), 1.0), inventory(up=())).text == "no site is up (2 known)"
