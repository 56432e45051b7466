"""The committed generated code in cnc/ is exactly what proto/ produces."""

from cncbrain import protogen


def test_generated_code_matches_protos():
    problems = protogen.drift()
    assert problems == [], "run `make protos` and commit:\n" + "\n".join(problems)


def test_every_block_package_is_importable():
    from cnc.common.v1 import common_pb2 as common
    from cnc.perception.v1 import perception_pb2_grpc
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc

    assert spb.DESCRIPTOR.package == "cnc.scheduler.v1"
    assert common.Placement(replicas=3).replicas == 3
    assert hasattr(scheduler_pb2_grpc, "SchedulerServiceStub")
    assert hasattr(perception_pb2_grpc, "add_PerceptionServiceServicer_to_server")
