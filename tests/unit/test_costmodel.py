"""The cost model against the reference figures of docs/cost-model.md (TensorRT-LLM, NIM, derived
decode latencies): each within a factor of 1.5."""

import pytest

from cncbrain.twin import costmodel

A100, H100, L40S = costmodel.gpu("A100-80GB"), costmodel.gpu("H100"), costmodel.gpu("L40S")
M7, M70 = costmodel.model("7b"), costmodel.model("70b")

# (label, model, gpu, tp, precision, prompt tokens, reference TTFT in s) — TensorRT-LLM, batch 1
PREFILL = [
    ("A100 7B 128", M7, A100, 1, "bf16", 128, 0.016),
    ("A100 7B 2048", M7, A100, 1, "bf16", 2048, 0.133),
    ("H100 fp8 7B 128", M7, H100, 1, "fp8", 128, 0.007),
    ("H100 fp8 7B 2048", M7, H100, 1, "fp8", 2048, 0.036),
    ("A100 70B TP4 128", M70, A100, 4, "bf16", 128, 0.047),
    ("A100 70B TP4 2048", M70, A100, 4, "bf16", 2048, 0.377),
    ("H100 fp8 70B TP4 128", M70, H100, 4, "fp8", 128, 0.026),
    ("H100 fp8 70B TP4 2048", M70, H100, 4, "fp8", 2048, 0.109),
]

# (label, model, gpu, tp, precision, reference seconds per output token at batch 1)
DECODE_LATENCY = [
    ("H100 7B bf16 (derived 4.2 ms)", M7, H100, 1, "bf16", 0.0042),
    ("A100 7B bf16 (derived 6.9 ms)", M7, A100, 1, "bf16", 0.0069),
    ("NIM 70B fp8 2xH100 ITL", M70, H100, 2, "fp8", 0.0186),
]

# (label, model, gpu, tp, precision, reference output tokens/s per GPU at 128 in / 128 out)
DECODE_THROUGHPUT = [
    ("H100 fp8 7B", M7, H100, 1, "fp8", 19_694),
    ("A100 7B", M7, A100, 1, "bf16", 5_586),
    ("H100 fp8 70B TP2", M70, H100, 2, "fp8", 2_657),
    ("A100 70B TP4", M70, A100, 4, "bf16", 670),
    ("L40S fp8 7B", M7, L40S, 1, "fp8", 3_240),
]


def within(x: float, ref: float, factor: float = 1.5) -> bool:
    return ref / factor <= x <= ref * factor


@pytest.mark.parametrize("label,m,g,tp,prec,prompt,ref", PREFILL, ids=[p[0] for p in PREFILL])
def test_prefill_matches_reference(label, m, g, tp, prec, prompt, ref):
    t = float(costmodel.prefill_s(m, g, tp, prompt, prec))
    assert within(t, ref), f"{label}: model {t * 1e3:.1f} ms vs reference {ref * 1e3:.1f} ms"


@pytest.mark.parametrize("label,m,g,tp,prec,ref", DECODE_LATENCY, ids=[p[0] for p in DECODE_LATENCY])
def test_decode_latency_matches_reference(label, m, g, tp, prec, ref):
    t = float(costmodel.decode_step_s(m, g, tp, 1, 256, prec))
    assert within(t, ref), f"{label}: model {t * 1e3:.2f} ms vs reference {ref * 1e3:.2f} ms"


@pytest.mark.parametrize("label,m,g,tp,prec,ref", DECODE_THROUGHPUT, ids=[p[0] for p in DECODE_THROUGHPUT])
def test_decode_throughput_matches_reference(label, m, g, tp, prec, ref):
    ctx = 128 + 64  # mean context over a 128-in / 128-out request
    b = costmodel.max_batch(m, g, tp, ctx, prec)
    per_gpu = b / float(costmodel.decode_step_s(m, g, tp, b, ctx, prec)) / tp
    assert within(per_gpu, ref), f"{label}: model {per_gpu:,.0f} tok/s/GPU vs reference {ref:,}"


def test_large_model_needs_tensor_parallelism_on_small_gpus():
    assert costmodel.min_tp(M7, A100) == 1
    assert costmodel.min_tp(M70, A100) == 4  # 140 GB of bf16 weights: 2 × 80 GB is too tight with KV reserve
    assert costmodel.min_tp(M70, costmodel.gpu("L40S")) == 4  # 4 × 48 GB × 0.9 holds 140 GB + KV reserve
    assert costmodel.min_tp(M70, costmodel.gpu("T4")) == 0  # 8 × 16 GB cannot hold it


def test_training_memory_is_16_bytes_per_param():
    # 7B: 16 B × 7e9 × 1.1 = 123 GB → two 80 GB GPUs, not one
    assert not costmodel.train_memory_fits(M7, A100, 1)
    assert costmodel.train_memory_fits(M7, A100, 2)
    assert costmodel.min_train_gpus(M70, A100) == 32


def test_ring_allreduce_and_bubble_formulas():
    # 2(n−1)/n · S/B: 14 GB over 4 ranks at 10 Gb/s = 1.5 · 14e9 / 1.25e9 s
    assert costmodel.ring_allreduce_s(14e9, 4, 10.0) == pytest.approx(1.5 * 14e9 / 1.25e9)
    assert costmodel.ring_allreduce_s(14e9, 1, 10.0) == 0.0
    assert costmodel.pipeline_bubble(4, 16) == pytest.approx(3 / 19)


def test_slow_wan_link_slows_a_training_step():
    shards = [A100] * 4
    inside = costmodel.train_step_s(M7, 2**20, 2, shards, costmodel.INTRA_SITE_BW_GBPS * 2, 5e-6)
    across = costmodel.train_step_s(M7, 2**20, 2, shards, 10.0, 0.02)
    # 14 GB of gradients per step over 10 Gb/s costs ~17 s on top of ~44 s of compute
    assert across > 1.3 * inside
    assert across - inside == pytest.approx(costmodel.ring_allreduce_s(14e9, 4, 10.0, 0.02) - costmodel.ring_allreduce_s(14e9, 4, 800.0, 5e-6), rel=1e-6)


def test_catalog_has_the_required_types_with_sourced_figures():
    cat = costmodel.gpu_catalog()
    for name in ("H100", "A100-80GB", "A100-40GB", "L40S", "L4", "V100", "T4"):
        g = cat[name]
        assert g.tflops > 0 and g.mem_gb > 0 and g.hbm_gbps > 0 and g.price_hr > 0
    assert cat["H100"].tflops == 989 and cat["H100"].hbm_gbps == 3350
    assert cat["L40S"].mem_gb == 48 and cat["L4"].hbm_gbps == 300
    with pytest.raises(KeyError, match="unknown GPU type"):
        costmodel.gpu("B200")
