"""Subjects the adaptation block publishes, added to the shared registry (`cncbrain.bus.subjects`)."""

from cnc.adaptation.v1 import adaptation_pb2 as pb
from cncbrain.bus import subjects
from cncbrain.bus.streams import StreamSpec, register_stream
from cncbrain.bus.subjects import Subject

STREAM = "CNC_ADAPTATION"
ACTION = subjects.register(
    Subject("cnc.adaptation.action", pb.AdaptationAction, STREAM, "adaptation actions with their reasons")
)
register_stream(StreamSpec(STREAM, (ACTION.template,), max_age_s=30 * 24 * 3600.0))
