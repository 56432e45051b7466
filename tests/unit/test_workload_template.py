"""The workload template (what a replica or shard runs) is validated like every other input."""

import pytest

from cnc.common.v1 import common_pb2 as common
from services.scheduler import domain


def template(**kw):
    env = kw.pop("env", [])
    t = common.WorkloadTemplate(**kw)
    for name, value in env:
        t.env.add(name=name, value=value)
    return t


@pytest.mark.parametrize("t", [
    template(),
    template(command="python3", args=["-m", "http.server", "--bind", "0.0.0.0"]),
    template(command="/opt/serve", env=[("MODEL", "llama"), ("_X", "a\nb\tc"), ("EMPTY", "")]),
    template(image="registry.example:5000/llm/serve:1.4"),
    template(image="ghcr.io/org/train@sha256:" + "0" * 64, command="torchrun", args=["train.py"]),
])
def test_good_templates_pass(t):
    domain.validate_template(t, "service.template")


@pytest.mark.parametrize("t,field,words", [
    (template(args=["x"]), "service.template.command", "required when args"),
    (template(env=[("A", "1")]), "service.template.command", "required when args"),
    (template(command="x" * 1025), "service.template.command", "longer than 1024"),
    (template(command="run\x00me"), "service.template.command", "control character"),
    (template(command="a\nb"), "service.template.command", "control character"),
    (template(command=" serve"), "service.template.command", "white space"),
    (template(command="x", args=["ok", "no\x00pe"]), "service.template.args[1]", "control character"),
    (template(command="x", args=["a"] * 257), "service.template.args", "at most 256"),
    (template(command="x", args=["y" * 4097]), "service.template.args[0]", "longer than 4096"),
    (template(command="x", env=[("1BAD", "v")]), "service.template.env[0].name", "is not [A-Za-z_]"),
    (template(command="x", env=[("A-B", "v")]), "service.template.env[0].name", "is not [A-Za-z_]"),
    (template(command="x", env=[("A", "1"), ("A", "2")]), "service.template.env[1].name", "twice"),
    (template(command="x", env=[("CNC_WORKLOAD_ID", "forged")]), "service.template.env[0].name", "set by the executor"),
    (template(command="x", env=[("slurm_job_id", "1")]), "service.template.env[0].name", "set by the executor"),
    (template(command="x", env=[("A", "\x1b[31m")]), "service.template.env[0].value", "control character"),
    (template(command="x", env=[(f"V{i}", "") for i in range(129)]), "service.template.env", "at most 128"),
    (template(command="x", args=["y" * 4000] * 17), "service.template", "at most 65536"),
    (template(image="not an image"), "service.template.image", "image reference"),
    (template(image="a" * 600), "service.template.image", "image reference"),
])
def test_bad_templates_name_the_field(t, field, words):
    with pytest.raises(domain.SpecError) as err:
        domain.validate_template(t, "service.template")
    assert err.value.field == field
    assert words in str(err.value)
    assert len(str(err.value)) < 300  # a huge value is quoted cut short


def test_specs_validate_their_templates():
    svc = common.InferenceServiceSpec(name="chat", model="m", params_b=1, slo=common.SloTargets(ttft_ms=1, tpot_ms=1),
                                      min_replicas=1, max_replicas=1, gpus_per_replica=1,
                                      template=template(args=["orphan"]))
    with pytest.raises(domain.SpecError, match=r"^service\.template\.command"):
        domain.validate_inference(svc)
    job = common.TrainingJobSpec(name="ft", model="m", params_b=1, shards=1, gpus_per_shard=1, tokens=1,
                                 template=template(command="x", env=[("CNC_SHARD_INDEX", "0")]))
    with pytest.raises(domain.SpecError, match=r"^job\.template\.env\[0\]\.name"):
        domain.validate_training(job)
