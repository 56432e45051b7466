"""PlanParallelism under the twin's cost model: memory always fits, the estimate is the twin's,
bf16 kept unless it cannot fit, WAN makes cross-site data parallelism pay."""

import pytest

from cncbrain.twin import costmodel
from services.adaptation.domain.parallelism import (
    GpuGroup,
    LinkSpec,
    PlanError,
    plan_inference,
    plan_training,
    resolve_model,
)

M70 = costmodel.model("70b")
M7 = costmodel.model("7b")


def test_70b_on_l40s_shards_or_drops_precision_as_memory_demands():
    with pytest.raises(PlanError, match="cannot be served"):
        plan_inference(M70, [GpuGroup("s", "L40S", 1)])
    (two,) = plan_inference(M70, [GpuGroup("s", "L40S", 2)])
    assert two.precision == "fp8" and two.tp == 2 and "do not fit" in two.reason
    (four,) = plan_inference(M70, [GpuGroup("s", "L40S", 4)])
    assert four.precision == "bf16" and four.gpus_per_replica == 4
    assert "PCIe" in " ".join(four.notes)
    # Weights per GPU fit the usable memory of the card.
    for plan in (two, four):
        per_gpu = costmodel.weight_bytes(M70, plan.precision) / plan.gpus_per_replica
        assert per_gpu <= costmodel.gpu("L40S").mem_gb * costmodel.GB * costmodel.USABLE_MEMORY


def test_without_lower_precision_two_l40s_cannot_serve_70b():
    with pytest.raises(PlanError):
        plan_inference(M70, [GpuGroup("s", "L40S", 2)], allow_lower_precision=False)


def test_inference_estimate_is_the_twins():
    (p,) = plan_inference(M7, [GpuGroup("s", "H100", 8)], prompt_tokens=1024, context_tokens=2048)
    assert p.ttft_s == pytest.approx(float(costmodel.prefill_s(M7, costmodel.gpu("H100"), p.tp, 1024, "bf16")))
    assert p.tpot_s == pytest.approx(float(costmodel.decode_step_s(M7, costmodel.gpu("H100"), p.tp, p.max_batch, 2048, "bf16")))
    assert p.tokens_per_s_per_replica == pytest.approx(p.max_batch / p.tpot_s)
    assert p.replicas * p.gpus_per_replica <= 8


def test_tpot_slo_limits_the_batch():
    (free,) = plan_inference(M7, [GpuGroup("s", "A100-80GB", 1)])
    (tight,) = plan_inference(M7, [GpuGroup("s", "A100-80GB", 1)], tpot_slo_s=0.02)
    assert tight.tpot_s <= 0.02 < free.tpot_s
    assert tight.max_batch < free.max_batch
    with pytest.raises(PlanError, match="within the SLO"):
        plan_inference(M70, [GpuGroup("s", "T4", 8)], ttft_slo_s=0.01)


def test_groups_ranked_best_first():
    plans = plan_inference(M7, [GpuGroup("slow", "T4", 4), GpuGroup("fast", "H100", 4)])
    assert [p.site_id for p in plans] == ["fast", "slow"]


def test_training_plan_fits_memory_and_uses_the_gpus():
    (p,) = plan_training(M70, [GpuGroup("a", "H100", 64)])
    assert p.memory_per_gpu_gb <= p.memory_limit_gb
    assert p.tp * p.pp * p.dp == p.gpus_used <= 64
    assert p.tp * p.pp > 1  # 70B cannot train on one 80 GB GPU
    assert 0 < p.mfu <= costmodel.TRAIN_MFU
    assert p.step_s == pytest.approx(p.compute_s / (1 - p.bubble_fraction) + p.allreduce_s + p.wan_activation_s,
                                     rel=0.05)


def test_training_that_cannot_fit_says_how_close_it_came():
    with pytest.raises(PlanError, match="closest was"):
        plan_training(M70, [GpuGroup("a", "A100-80GB", 16)])


def test_fast_link_lets_data_parallelism_span_sites_slow_link_does_not():
    groups = [GpuGroup("a", "H100", 16), GpuGroup("b", "H100", 16)]
    (fast,) = plan_training(M7, groups, {("a", "b"): LinkSpec(2.0, 400.0)})
    assert fast.layout == "dp_across_sites" and set(fast.gpus_by_site) == {"a", "b"}
    (slow,) = plan_training(M7, groups, {("a", "b"): LinkSpec(80.0, 0.5)})
    assert slow.layout == "single_site" and len(slow.gpus_by_site) == 1
    assert fast.tokens_per_s > slow.tokens_per_s


def test_slow_gpus_are_left_out_when_they_would_drag_the_job():
    (p,) = plan_training(M7, [GpuGroup("a", "A100-80GB", 16), GpuGroup("a", "T4", 8)])
    assert p.gpu_types == ("A100-80GB",)


def test_unknown_inputs_are_plan_errors():
    with pytest.raises(PlanError, match="unknown GPU type"):
        plan_training(M7, [GpuGroup("a", "Z9000", 8)])
    with pytest.raises(PlanError, match="no GPUs"):
        plan_inference(M7, [GpuGroup("a", "H100", 0)])
    # Sites with no known link between them are never planned together.
    (p,) = plan_training(M7, [GpuGroup("a", "H100", 8), GpuGroup("b", "H100", 8)], {})
    assert len(p.gpus_by_site) == 1


def test_resolve_model_by_name_or_size():
    assert resolve_model("70b") is M70
    scaled = resolve_model("", 30.0)
    assert scaled.params_b == 30.0 and scaled.hidden == costmodel.model("34b").hidden
    with pytest.raises(PlanError):
        resolve_model("nope")
