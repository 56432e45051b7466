"""The workload spec as every block reads it: the messages that carry one (`Workload`, `Offer`,
`PlacementCommitted`) hold it in a `spec` oneof of `training_job` or `inference_service`."""

from __future__ import annotations

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb

Spec = common.TrainingJobSpec | common.InferenceServiceSpec
HasSpec = spb.Workload | spb.Offer | spb.PlacementCommitted
"""The messages with the `spec` oneof."""


def spec_of(m: HasSpec) -> Spec | None:
    """The spec that is set; None when neither is."""
    if m.HasField("training_job"):
        return m.training_job
    if m.HasField("inference_service"):
        return m.inference_service
    return None


def tenant_of(m: HasSpec) -> str:
    """The tenant the spec names ("" when none or no spec)."""
    spec = spec_of(m)
    return spec.tenant if spec is not None else ""


def copy_spec(source: HasSpec, target: HasSpec) -> None:
    """Set `target`'s spec to `source`'s (nothing when `source` has none)."""
    if source.HasField("training_job"):
        target.training_job.CopyFrom(source.training_job)
    elif source.HasField("inference_service"):
        target.inference_service.CopyFrom(source.inference_service)


def required_spec(m: HasSpec) -> Spec:
    """The spec that is set; a record without one (never stored by the scheduler) is an error."""
    spec = spec_of(m)
    if spec is None:
        raise ValueError(f"{type(m).__name__} {getattr(m, 'workload_id', '')!r} carries no spec")
    return spec
