"""`cncbrain submit`: submit a training job (gang-placed) through the scheduler."""

from __future__ import annotations

import argparse

from cncbrain import limits
from cncbrain.commands._live import add_target_args, add_template_args, create_workload, template_from_args
from cncbrain.commands._output import add_output_arg
from cncbrain.commands.deploy import model_size
from cncbrain.limits import arg_float, arg_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a training job")
    p.add_argument("--name", required=True)
    p.add_argument("--model", required=True, help="model, e.g. 1.3b, 7b, 13b")
    p.add_argument("--params-b", type=arg_float(0, limits.MAX_PARAMS_B, lo_open=True), default=None)
    p.add_argument("--shards", type=arg_int(1, limits.MAX_UNITS), default=2, help="data-parallel shards (all or none)")
    p.add_argument("--gpus-per-shard", type=arg_int(1, limits.MAX_GPUS_PER_UNIT), default=8)
    p.add_argument("--tokens", type=arg_float(0, limits.MAX_TOKENS, lo_open=True), default=2e9)
    p.add_argument("--gpu-type", action="append", default=[])
    p.add_argument("--gang-timeout-s", type=arg_float(0, limits.MAX_GANG_TIMEOUT_S), default=0.0,
                   help="0: scheduler default")
    p.add_argument("--tenant", default="",
                   help="tenant the workload belongs to (default: your token's tenant; an operator names one "
                        "that governance knows, or none)")
    p.add_argument("--request-id", default="")
    add_template_args(p, "shard")
    add_target_args(p, "scheduler")
    add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc.common.v1 import common_pb2 as common
    from cnc.scheduler.v1 import scheduler_pb2 as spb

    job = common.TrainingJobSpec(
        name=args.name, model=args.model, params_b=model_size(args),
        shards=args.shards, gpus_per_shard=args.gpus_per_shard, tokens=args.tokens,
        allowed_gpu_types=args.gpu_type, tenant=args.tenant, gang_timeout_s=args.gang_timeout_s,
        template=template_from_args(args))
    return create_workload(args, "SubmitTrainingJob", spb.SubmitTrainingJobRequest(job=job, request_id=args.request_id))


if __name__ == "__main__":
    import sys

    from cncbrain.commands._live import run_alone

    sys.exit(run_alone(register, ["submit", *sys.argv[1:]]))
