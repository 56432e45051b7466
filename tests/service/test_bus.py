"""The bus against a real nats-server: typed events, durable resume, dedup, dead letter."""

import asyncio

import pytest

from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import Bus, envelope, subjects


async def wait_for(pred, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_core_publish_carries_headers_and_trace(bus):
    got = []

    async def handler(ev):
        got.append(ev)

    await bus.subscribe(subjects.SITE_HEARTBEAT, handler, consumer="t1")
    await bus.publish(subjects.SITE_HEARTBEAT, site_pb.Heartbeat(site_id="s1", sequence=7), site="s1")
    await wait_for(lambda: got)
    ev = got[0]
    assert ev.payload.sequence == 7 and ev.params == {"site": "s1"}
    assert ev.type_id == "cnc.site.v1.Heartbeat"
    assert ev.traceparent.startswith("00-")


async def test_publish_refuses_wrong_payload_type(bus):
    with pytest.raises(TypeError):
        await bus.publish(subjects.SITE_HEARTBEAT, spb.Offer(), site="s1")


async def test_jetstream_dedups_same_event_id(bus):
    ev = spb.WorkloadEvent(workload_id="w1", message="x")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, ev, event_id="same", workload="w1")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, ev, event_id="same", workload="w1")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, ev, event_id="other", workload="w1")
    info = await bus.js.stream_info("CNC_WORKLOADS")
    assert info.state.messages == 2


async def test_durable_consumer_resumes_without_loss_or_repeat(nats_server):
    publisher = await Bus.connect(nats_server.url, "pub")
    seen: list[str] = []

    async def handler(ev):
        seen.append(ev.payload.message)

    consumer = await Bus.connect(nats_server.url, "c1")
    await consumer.subscribe(subjects.SCHEDULER_WORKLOAD, handler, consumer="durable1", durable=True)
    for i in range(5):
        await publisher.publish(subjects.SCHEDULER_WORKLOAD, spb.WorkloadEvent(message=str(i)), workload="w")
    await wait_for(lambda: len(seen) == 5)
    await consumer.close()
    for i in range(5, 10):  # published while the consumer is away
        await publisher.publish(subjects.SCHEDULER_WORKLOAD, spb.WorkloadEvent(message=str(i)), workload="w")
    consumer = await Bus.connect(nats_server.url, "c1")
    await consumer.subscribe(subjects.SCHEDULER_WORKLOAD, handler, consumer="durable1", durable=True)
    await wait_for(lambda: len(seen) == 10)
    await asyncio.sleep(0.2)
    assert seen == [str(i) for i in range(10)]
    await consumer.close()
    await publisher.close()


async def test_garbled_and_unknown_events_go_to_dead_letter_and_consumer_goes_on(bus):
    got = []

    async def handler(ev):
        got.append(ev.payload.workload_id)

    dead = []

    async def on_dead(msg):
        dead.append(msg)

    await bus.nc.subscribe("cnc.deadletter.dl1", cb=on_dead)
    await bus.subscribe(subjects.SCHEDULER_WORKLOAD, handler, consumer="dl1", durable=True)
    subject = subjects.SCHEDULER_WORKLOAD.build(workload="w9")
    await bus.js.publish(subject, b"\x08\xff\xff\xff", headers={envelope.TYPE: "cnc.scheduler.v1.WorkloadEvent", envelope.EVENT_ID: "g1"})
    await bus.js.publish(subject, b"", headers={envelope.TYPE: "cnc.nope.v9.Thing", envelope.EVENT_ID: "g2"})
    await bus.js.publish(subject, b"no headers at all")
    await bus.publish(subjects.SCHEDULER_WORKLOAD, spb.WorkloadEvent(workload_id="ok"), workload="w9")
    await wait_for(lambda: got == ["ok"] and len(dead) == 3)
    assert bus.counters["dl1.dead_lettered"] == 3
    assert all(m.headers["Cnc-Dead-Subject"] == subject for m in dead)
    info = await bus.js.stream_info("CNC_DEADLETTER")
    assert info.state.messages == 3


async def test_failing_handler_is_retried_then_dead_lettered(bus):
    calls = []

    async def handler(ev):
        calls.append(ev.event_id)
        raise RuntimeError("boom")

    await bus.subscribe(subjects.SCHEDULER_WORKLOAD, handler, consumer="fail1", durable=True)
    await bus.publish(subjects.SCHEDULER_WORKLOAD, spb.WorkloadEvent(), workload="w")
    await wait_for(lambda: bus.counters["fail1.dead_lettered"] == 1, timeout=10)
    assert len(calls) == 5


async def test_kv_bucket_exists_after_connect(bus):
    kv = await bus.kv("cnc-workloads")
    await kv.put("k", b"v")
    assert (await kv.get("k")).value == b"v"


async def test_kv_items_lists_every_live_key_with_its_latest_value(bus):
    """The recovery read of a bucket (scheduler, perception, adaptation after a restart): every
    live key once, its latest value and revision, deleted and purged keys left out — also past
    one fetch batch, and with no consumer left behind."""
    kv = await bus.js.create_key_value(bucket="t-items", history=5)
    assert await bus.kv_items("t-items") == {}
    for i in range(2500):
        await kv.put(f"k{i}", f"v{i}".encode())
    last = await kv.put("k7", b"newer")
    await kv.delete("k8")
    await kv.purge("k9")
    items = await bus.kv_items("t-items")
    assert len(items) == 2498 and "k8" not in items and "k9" not in items
    assert items["k7"] == (b"newer", last) and items["k2499"][0] == b"v2499"
    assert (await bus.js.stream_info("KV_t-items")).state.consumer_count == 0


FAILOVER_ERRORS = [
    "nats.errors.TimeoutError", "nats.errors.NoRespondersError", "nats.errors.ConnectionClosedError",
    "nats.errors.ConnectionReconnectingError", "nats.errors.StaleConnectionError",
    "nats.errors.OutboundBufferLimitError", "nats.errors.FlushTimeoutError", "nats.errors.UnexpectedEOF",
    "nats.js.errors.NoStreamResponseError", "nats.js.errors.ServiceUnavailableError",
    "nats.js.errors.TooManyStalledMsgsError", "nats.js.errors.FetchTimeoutError", "nats.js.errors.ServerError",
    "asyncio.TimeoutError",
]


@pytest.mark.parametrize("name", FAILOVER_ERRORS)
async def test_every_error_a_nats_failover_raises_is_retried(bus, name):
    """A JetStream leader election or a NATS restart raises these (a deploy once failed with
    `UNKNOWN: Unexpected NoStreamResponseError`): `retrying` rides each out by name."""
    import importlib

    module, _, cls = name.rpartition(".")
    error = getattr(importlib.import_module(module), cls)
    calls = []

    async def op():
        calls.append(1)
        if len(calls) < 3:
            raise error()
        return "done"

    assert await bus.retrying(op, "test", timeout_s=5) == "done"
    assert len(calls) == 3


async def test_an_error_retrying_cannot_fix_is_raised_at_once(bus):
    import nats.js.errors

    async def op():
        raise nats.js.errors.KeyWrongLastSequenceError()

    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await bus.retrying(op, "test", timeout_s=5)


async def test_a_process_that_cannot_reach_nats_says_where_and_why(caplog):
    import logging

    from cncbrain.errors import CncError
    from cncbrain.natsserver import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING), pytest.raises(CncError, match=f"cannot reach NATS at {url} within 4 s"):
        await Bus.connect(url, "lonely", timeout_s=4)
    said = [r.getMessage() for r in caplog.records if "cannot reach NATS" in r.getMessage()]
    assert said and said[0].startswith(f"lonely: cannot reach NATS at {url} (")  # the URL and why, before giving up


async def test_a_lost_connection_is_reported_with_the_url_until_it_is_back(nats_server, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        b = await Bus.connect(nats_server.url, "watcher", ensure=False)
        nats_server.kill()
        await asyncio.sleep(4)
        nats_server.start()
        await wait_for(lambda: b.connected, timeout=10)
    text = caplog.text
    assert f"watcher: disconnected from NATS at {nats_server.url}" in text
    assert f"watcher: cannot reach NATS at {nats_server.url}" in text
    assert "watcher: reconnected to NATS at 127.0.0.1" in text
    await b.close()
