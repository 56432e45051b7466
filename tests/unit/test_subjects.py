"""The subject registry builds, validates and parses every subject."""

import json

import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
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
        subjects.Subject("cnc.nope.x", spb.Offer)


def test_every_subject_has_a_distinct_template_and_typed_payload():
    templates = [s.template for s in subjects.ALL]
    assert len(templates) == len(set(templates))
    assert all(s.type_id.startswith("cnc.") for s in subjects.ALL)


def test_envelope_refuses_wrong_type_and_garbage():
    offer = spb.Offer(offer_id="o1", units=2)
    headers = envelope.make_headers(offer)
    ev = envelope.decode("cnc.scheduler.offer", offer.SerializeToString(), headers, spb.Offer, {})
    assert ev.payload.units == 2 and ev.event_id == headers[envelope.EVENT_ID]
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", offer.SerializeToString(), headers, spb.WorkloadEvent, {})
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", b"\xff\xff\xff", headers, spb.Offer, {})
    with pytest.raises(envelope.EnvelopeError):
        envelope.decode("s", b"", {}, spb.Offer, {})


def probe(m) -> bool:
    """Set the first scalar field of `m` found depth-first (through nested and repeated messages) to
    "probe" or 7, so decoding shows a value; False when there is none."""
    from google.protobuf.descriptor import FieldDescriptor

    ints = (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64)
    for fd in m.DESCRIPTOR.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                continue
            child = getattr(m, fd.name).add() if fd.is_repeated else getattr(m, fd.name)
            if probe(child):
                return True
            if fd.is_repeated:
                del getattr(m, fd.name)[:]
        elif fd.is_repeated:
            continue
        elif fd.type == FieldDescriptor.TYPE_STRING:
            setattr(m, fd.name, "probe")
            return True
        elif fd.type in ints:
            setattr(m, fd.name, 7)
            return True
    return False


@pytest.mark.parametrize("spec", subjects.ALL, ids=lambda s: s.template)
def test_watch_decodes_every_event_type_of_the_registry(spec):
    from cncbrain.commands.watch import decode, line

    message = spec.message()
    assert probe(message), f"{spec.type_id} has no field to show"
    payload = decode(spec.type_id, message.SerializeToString())
    assert payload == message
    shown = json.loads(line(spec.template, spec.type_id, payload, as_json=True))
    assert shown["type"] == spec.type_id and ("probe" in json.dumps(shown["event"]) or "7" in json.dumps(shown["event"]))
    assert spec.type_id.rsplit(".", 1)[-1] in line(spec.template, spec.type_id, payload, as_json=False)


def test_every_stored_subject_is_kept_by_its_declared_stream():
    streams = {s.name: s for s in subjects.STREAMS}
    assert len(streams) == len(subjects.STREAMS)
    for spec in subjects.ALL:
        if spec.stream is None:
            continue
        assert spec.stream in streams, f"{spec.template}: stream {spec.stream} is not declared"
        wildcard = spec.wildcard()
        assert any(_covers(pattern, wildcard) for pattern in streams[spec.stream].subjects), \
            f"{spec.template} is not among the subjects of {spec.stream}"
    # and no stream keeps a subject the registry does not declare (the dead letters excepted)
    for stream in subjects.STREAMS:
        if stream is subjects.DEADLETTER_STREAM:
            continue
        assert any(s.stream == stream.name for s in subjects.ALL), f"{stream.name} keeps no declared subject"


def _covers(pattern: str, subject: str) -> bool:
    """Whether the NATS filter `pattern` matches every subject `subject` (tokens may be `*`)."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def test_no_subject_or_stream_is_added_from_outside_the_registry():
    """Importing every block leaves the registry as declared (no registration as a side effect)."""
    import services.adaptation.events  # noqa: F401
    import services.governance.events  # noqa: F401
    import services.perception.events  # noqa: F401
    import services.scheduler.coordinator  # noqa: F401

    assert not hasattr(subjects, "register")
    declared = [v for v in vars(subjects).values() if isinstance(v, subjects.Subject)]
    assert list(subjects.ALL) == declared
    assert set(subjects.BY_TYPE) == {s.type_id for s in declared}


def test_watch_shows_an_unknown_type_or_garbage_without_fields():
    from cncbrain.commands.watch import decode

    assert decode("cnc.nobody.v1.Nothing", b"") is None
    assert decode(subjects.SCHEDULER_WORKLOAD.type_id, b"\xff\xff\xff") is None
