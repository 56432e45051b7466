"""`cncbrain plan`: parallelism and precision for a model on given GPUs, with the estimate.

Without `--gpus` it asks the running brain's adaptation service, which plans on the pool's free
GPUs; with `--gpus` and `--local` it runs the same planner here, no brain needed.

    cncbrain plan --model 70b --inference --gpus s1:L40S:4
    cncbrain plan --model 7b --training --gpus a:H100:16 b:H100:16 --link a:b:20:100 --local
"""

from __future__ import annotations

import argparse

from cncbrain.commands._govcli import add_common, call, dump
from cncbrain.commands._output import wants_json
from cncbrain.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan TP/PP/DP, micro-batch and precision for a model on GPUs")
    p.add_argument("--model", required=True, help="twin model class (1.3b, 7b, 13b, 34b, 70b) or a name with --params-b")
    p.add_argument("--params-b", type=float, default=0.0)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--training", action="store_true", help="plan a training job (default)")
    kind.add_argument("--inference", action="store_true", help="plan one inference replica per GPU group")
    p.add_argument("--gpus", nargs="*", default=[], metavar="SITE:TYPE:COUNT")
    p.add_argument("--link", nargs="*", default=[], metavar="A:B:LATENCY_MS:GBPS")
    p.add_argument("--global-batch-tokens", type=float, default=0.0)
    p.add_argument("--seq-len", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--tpot-ms", type=float, default=0.0)
    p.add_argument("--bf16-only", action="store_true", help="never plan 8-bit weights")
    p.add_argument("--top", type=int, default=1)
    p.add_argument("--local", action="store_true", help="plan here instead of asking the adaptation service")
    add_common(p, "adaptation")
    p.set_defaults(func=run)


def _groups(items: list[str]):
    out = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise UsageError(f"--gpus: expected SITE:TYPE:COUNT, got {item!r}")
        out.append((parts[0], parts[1], int(parts[2])))
    return out


def _links(items: list[str]):
    out = []
    for item in items:
        parts = item.split(":")
        try:
            a, b, lat, bw = parts[0], parts[1], float(parts[2]), float(parts[3])
        except (IndexError, ValueError):
            raise UsageError(f"--link: expected A:B:LATENCY_MS:GBPS, got {item!r}") from None
        if bw <= 0 or lat < 0:
            raise UsageError(f"--link {item}: bandwidth must be > 0 and latency >= 0")
        out.append((a, b, lat, bw))
    return out


def run(args: argparse.Namespace) -> int:
    from cnc.adaptation.v1 import adaptation_pb2 as apb
    from cnc.common.v1 import common_pb2 as common

    req = apb.PlanParallelismRequest(
        kind=apb.PLAN_KIND_INFERENCE if args.inference else apb.PLAN_KIND_TRAINING, model=args.model,
        params_b=args.params_b, global_batch_tokens=args.global_batch_tokens, seq_len=args.seq_len,
        bf16_only=args.bf16_only, top=args.top,
        gpus=[apb.GpuGroup(site_id=s, gpu_type=t, count=n) for s, t, n in _groups(args.gpus)],
        links=[apb.SiteLink(site_a=a, site_b=b, latency_ms=lat, bandwidth_gbps=bw) for a, b, lat, bw in _links(args.link)])
    if args.ttft_ms or args.tpot_ms:
        req.slo.CopyFrom(common.SloTargets(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms))
    resp = plan_locally(req) if args.local else call(args, "adaptation", lambda s: s.PlanParallelism(req, timeout=30))
    if wants_json(args):
        dump(resp)
        return 0
    for t in resp.training:
        where = ", ".join(f"{g.site_id}:{g.count}" for g in t.gpus)
        print(f"training: TP{t.tensor_parallel} PP{t.pipeline_parallel} DP{t.data_parallel}, micro-batch "
              f"{t.micro_batch_size} x {t.micro_batches}, {t.precision}{' + ZeRO-1' if t.zero1 else ''}, "
              f"{t.layout} on {t.gpus_used} GPUs ({where})")
        print(f"  ≈ {t.tokens_per_s:,.0f} tokens/s; step {t.step_s:.2f} s = compute {t.compute_s:.2f} s, bubble "
              f"{t.bubble_fraction:.1%}, all-reduce {t.allreduce_s:.2f} s, WAN activations {t.wan_activation_s:.2f} s; "
              f"{t.memory_per_gpu_gb:.1f} of {t.memory_limit_gb:.1f} GB per GPU; MFU {t.mfu:.1%}")
        for n in t.notes:
            print(f"  note: {n}")
    for i in resp.inference:
        print(f"inference at {i.site_id} ({i.gpu_type}): TP{i.tensor_parallel} PP{i.pipeline_parallel}, {i.precision}, "
              f"{i.gpus_per_replica} GPU(s)/replica, {i.replicas} replica(s) fit")
        print(f"  ≈ {i.tokens_per_s_per_replica:,.0f} tokens/s per replica at batch {i.max_batch}; TTFT {i.ttft_s*1e3:.0f} ms, "
              f"TPOT {i.tpot_s*1e3:.1f} ms — {i.reason}")
        for n in i.notes:
            print(f"  note: {n}")
    print(f"(cost model: {resp.cost_model})")
    return 0


def plan_locally(req):
    """The planner without a brain: the service's own code (`services.adaptation.rpc.plan_on`) on the
    GPUs and links given on the command line."""
    from services.adaptation.domain.parallelism import GpuGroup, LinkSpec, PlanError, resolve_model
    from services.adaptation.rpc import plan_on

    if not req.gpus:
        raise UsageError("--local needs --gpus")
    try:
        model = resolve_model(req.model, req.params_b)
        groups = [GpuGroup(g.site_id, g.gpu_type, g.count) for g in req.gpus]
        links = {(lk.site_a, lk.site_b): LinkSpec(lk.latency_ms, lk.bandwidth_gbps) for lk in req.links}
        return plan_on(req, model, groups, links)
    except PlanError as exc:
        raise UsageError(str(exc)) from None

