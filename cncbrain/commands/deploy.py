"""`cncbrain deploy`: deploy an inference service through the scheduler."""

from __future__ import annotations

import argparse
import re

from cncbrain import limits
from cncbrain.commands._live import add_target_args, add_template_args, create_workload, template_from_args
from cncbrain.commands._output import add_output_arg
from cncbrain.errors import UsageError
from cncbrain.limits import arg_float, arg_int, quote


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deploy an inference service")
    p.add_argument("--name", required=True, help="service name ([A-Za-z0-9_-])")
    p.add_argument("--model", required=True, help="model, e.g. 7b, 13b, 70b")
    p.add_argument("--params-b", type=arg_float(0, limits.MAX_PARAMS_B, lo_open=True), default=None,
                   help="size in billions (default: from --model, e.g. llama-70b → 70)")
    p.add_argument("--ttft-ms", type=arg_float(0, limits.MAX_TTFT_MS, lo_open=True), default=1000.0)
    p.add_argument("--tpot-ms", type=arg_float(0, limits.MAX_TPOT_MS, lo_open=True), default=100.0)
    p.add_argument("--rate", type=arg_float(0, limits.MAX_RATE_RPS), default=0.0,
                   help="expected requests/s (0: the trace's own rate)")
    p.add_argument("--min-replicas", type=arg_int(1, limits.MAX_UNITS), default=1)
    p.add_argument("--max-replicas", type=arg_int(1, limits.MAX_UNITS), default=16)
    p.add_argument("--gpus-per-replica", type=arg_int(1, limits.MAX_GPUS_PER_UNIT), default=1)
    p.add_argument("--gpu-type", action="append", default=[], help="allowed GPU type (repeatable; default any)")
    p.add_argument("--ingress", default="", help="ingress site id (default: spread by population)")
    p.add_argument("--trace", choices=["conv", "code"], default="conv", help="Azure trace that drives the load")
    p.add_argument("--tenant", default="",
                   help="tenant the workload belongs to (default: your token's tenant; an operator names one "
                        "that governance knows, or none)")
    p.add_argument("--request-id", default="", help="idempotency key")
    add_template_args(p, "replica")
    add_target_args(p, "scheduler")
    add_output_arg(p)
    p.set_defaults(func=run)


SIZE = re.compile(r"(?:^|[-_/ ])(\d+(?:\.\d+)?)b(?=$|[-_/ ])", re.IGNORECASE)


def params_from_model(model: str) -> float:
    """The size in billions a model name states (`7b`, `llama-70b`, `llama-3-8b-instruct`: the last
    `<number>b` part); 0 when it states none."""
    found = SIZE.findall(model)
    return float(found[-1]) if found else 0.0


def model_size(args: argparse.Namespace) -> float:
    """--params-b, else the size --model names; a usage error when neither says."""
    size = args.params_b or params_from_model(args.model)
    if not size:
        raise UsageError(f"cannot tell the size of --model {quote(args.model)}: give it with --params-b "
                       "(billions of parameters)")
    return size


def run(args: argparse.Namespace) -> int:
    from cnc.common.v1 import common_pb2 as common
    from cnc.scheduler.v1 import scheduler_pb2 as spb

    spec = common.InferenceServiceSpec(
        name=args.name, model=args.model, params_b=model_size(args),
        slo=common.SloTargets(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms), expected_rate_rps=args.rate,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica,
        allowed_gpu_types=args.gpu_type, ingress_site_id=args.ingress, tenant=args.tenant, trace=args.trace,
        template=template_from_args(args))
    return create_workload(args, "DeployInferenceService", spb.DeployInferenceServiceRequest(service=spec, request_id=args.request_id))


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["deploy", *sys.argv[1:]]))
