"""The subject registry builds, validates and parses every subject."""

import pytest

from cnc.scheduler.v1 import scheduler_pb2
from cncbrain.bus import envelope, subjects
from cncbrain.bus.subjects import SubjectError


def test_build_and_match_round_trip():
    s = subjects.SCHEDULER_PLACEMENT.build(site="site_3")
    assert s == "cnc.scheduler.placement.site_3"
    assert subjects.SCHEDULER_PLACEMENT.match(s) == {"site": "site_3"}
    assert subjects.SITE_TELEMETRY.build(site="a-b") == "cnc.site.a-b.telemetry"
    assert subjects.SITE_TELEMETRY.wildcard() == "cnc.site.*.telemetry"
    assert subjects.lookup("cnc.site.x.heartbeat")[0] is subjects.SITE_HEARTBEAT


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "*", ">", "x" * 65])
def test_bad_tokens_are_refused(bad):
    with pytest.raises(SubjectError):
        subjects.SCHEDULER_PLACEMENT.build(site=bad)


def test_missing_parameter_is_refused():
    with pytest.raises(SubjectError):
        subjects.SCHEDULER_PLACEMENT.build()


def test_template_shape_is_checked():
    with pytest.raises(SubjectError):
        subjects.Subject("cnc.nope.x", scheduler_pb2.Offer)


def test_every_subject_has_a_distinct_template_and_typed_payload():
    templates = [s.template for s in subjects.ALL]
    assert len(templates) == len(set(templates))
    assert all(s.type_id.startswith("cnc.") for s in subjects.ALL)


def test_envelope_refuses_wrong_type_and_garbage():
    offer = scheduler_pb2.Offer(offer_id="o1", units=2)
    headers = envelope.make_headers(offer)
    ev = envelope.decode("cnc.scheduler.offer", offer.SerializeToString(), headers, scheduler_pb2.Offer, {})
    assert ev.payload.units == 2 and ev.event_id == headers[envelope.EVENT_ID]
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", offer.SerializeToString(), headers, scheduler_pb2.WorkloadEvent, {})
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", b"\xff\xff\xff", headers, scheduler_pb2.Offer, {})
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", b"", {}, scheduler_pb2.Offer, {})
