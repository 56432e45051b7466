"""Hard limits at the API: every absurd number or string a tenant can send is refused with
INVALID_ARGUMENT naming the field, quoting at most ~100 characters of it — by the scheduler (its
spec checks and the request-limits interceptor every service runs), and by the CLI before it sends."""

import asyncio
import math
import subprocess
import sys

import grpc
import pytest

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.bus import subjects
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import Settings

BIG = "x" * 10_000


def service(**kw):
    base = dict(name="chat", model="llama-8b", params_b=8, slo=common.SloTargets(ttft_ms=500, tpot_ms=50),
                min_replicas=1, max_replicas=2, gpus_per_replica=1)
    base.update(kw)
    return spb.DeployInferenceServiceRequest(service=common.InferenceServiceSpec(**base))


def job(**kw):
    base = dict(name="train", model="llama-1b", params_b=1.3, shards=1, gpus_per_shard=1, tokens=1e9)
    base.update(kw)
    return spb.SubmitTrainingJobRequest(job=common.TrainingJobSpec(**base))


CASES = [  # (what, request, the field the answer names, text it must hold)
    ("rate 1e300", service(expected_rate_rps=1e300), "service.expected_rate_rps", "10000]"),
    ("rate NaN", service(expected_rate_rps=math.nan), "service.expected_rate_rps", "finite"),
    ("rate negative", service(expected_rate_rps=-1), "service.expected_rate_rps", ""),
    ("TTFT NaN", service(slo=common.SloTargets(ttft_ms=math.nan, tpot_ms=50)), "service.slo.ttft_ms", "finite"),
    ("TTFT a day", service(slo=common.SloTargets(ttft_ms=86_400_000, tpot_ms=50)), "service.slo.ttft_ms", ""),
    ("TPOT infinite", service(slo=common.SloTargets(ttft_ms=500, tpot_ms=math.inf)), "service.slo.tpot_ms", ""),
    ("params infinite", service(params_b=math.inf), "service.params_b", ""),
    ("params too big", service(params_b=1e6), "service.params_b", ""),
    ("name 10 KB", service(name=BIG), "service.name", "10000 characters"),
    ("model 10 KB", service(model=BIG), "service.model", "10000 characters"),
    ("model with a newline", service(model="llama\n8b"), "service.model", "control"),
    ("5000 GPU types", service(allowed_gpu_types=[f"g{i}" for i in range(5000)]), "allowed_gpu_types", ""),
    ("unknown GPU type", service(allowed_gpu_types=["gpt-gpu"]), "service.allowed_gpu_types", "unknown GPU type"),
    ("no such ingress", service(ingress_site_id="atlantis"), "service.ingress_site_id", "not a site"),
    ("70B on 1 GPU", service(model="llama-70b", params_b=70), "service.gpus_per_replica", "at least 3 GPUs"),
    ("min replicas 0", service(min_replicas=0), "service.min_replicas", ""),
    ("max below min", service(min_replicas=3, max_replicas=2), "service.max_replicas", ""),
    ("65 GPUs a replica", service(gpus_per_replica=65), "service.gpus_per_replica", ""),
    ("gang timeout NaN", job(gang_timeout_s=math.nan), "job.gang_timeout_s", "finite"),
    ("gang timeout inf", job(gang_timeout_s=math.inf), "job.gang_timeout_s", "finite"),
    ("gang timeout a year", job(gang_timeout_s=3e7), "job.gang_timeout_s", ""),
    ("gang timeout negative", job(gang_timeout_s=-1), "job.gang_timeout_s", ""),
    ("tokens infinite", job(tokens=math.inf), "job.tokens", ""),
    ("tokens 0", job(tokens=0), "job.tokens", ""),
    ("7B training on 1 GPU a shard", job(model="llama-7b", params_b=7), "job.gpus_per_shard", "at least 2 GPUs"),
    ("0 shards", job(shards=0), "job.shards", ""),
    ("request id 10 KB", service(), "request_id", "10000 characters"),
]


@pytest.fixture
async def stub(nats_server, bus):
    server = await SchedulerServer(Settings(nats_url=nats_server.url, grpc_port=0)).start()
    snap = ppb.Snapshot(sequence=1)
    for sid in ("east", "west"):
        snap.sites.append(ppb.SiteStatus(
            site=common.Site(site_id=sid, gpu_pools=[common.GpuPool(gpu_type="H100", count=16, hbm_gb=80)]),
            state=common.SITE_STATE_UP))
    await bus.publish(subjects.PERCEPTION_SNAPSHOT, snap)
    await asyncio.wait_for(server.coordinator.sites_known.wait(), 5)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield scheduler_pb2_grpc.SchedulerServiceStub(channel)
    await channel.close()
    await server.stop()


async def test_every_absurd_input_is_refused_naming_its_field_and_quoting_little(stub):
    for what, request, field, text in CASES:
        if what == "request id 10 KB":
            request.request_id = BIG
        call = stub.SubmitTrainingJob if isinstance(request, spb.SubmitTrainingJobRequest) else stub.DeployInferenceService
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request)
        details = err.value.details()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, details)
        assert field in details and text in details, (what, details)
        assert len(details) < 400, (what, len(details))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=BIG))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 200
    # what fits still goes through: 70B on 3 H100 per replica, 7B training on 2 per shard
    await stub.DeployInferenceService(service(model="llama-70b", params_b=70, gpus_per_replica=3))
    await stub.SubmitTrainingJob(job(model="llama-7b", params_b=7, gpus_per_shard=2))


@pytest.mark.parametrize("command,args,says", [
    ("deploy", ["--name", "a", "--model", "7b", "--min-replicas", "-1"], "--min-replicas: -1 is not in 1..4096"),
    ("deploy", ["--name", "a", "--model", "7b", "--rate", "1e300"], "--rate"),
    ("deploy", ["--name", "a", "--model", "7b", "--ttft-ms", "nan"], "--ttft-ms"),
    ("deploy", ["--name", "a", "--model", "gpt-99-ultra"], "--params-b"),
    ("submit", ["--name", "a", "--model", "7b", "--gang-timeout-s", "inf"], "--gang-timeout-s"),
    ("submit", ["--name", "a", "--model", "7b", "--shards", "99999"], "--shards"),
])
def test_cli_range_errors_are_usage_errors_not_tracebacks(command, args, says):
    res = subprocess.run([sys.executable, "-m", f"cncbrain.commands.{command}", *args, "--scheduler", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr
    assert "Traceback" not in res.stderr
