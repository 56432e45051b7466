"""The ledger writer outlives its callers and its own errors: a caller that gives up (its gRPC
deadline passed) while the append is failing must not end the writer, and no later change may hang."""

import asyncio
import logging

import nats.errors
import pytest

from cncbrain import aio
from cncbrain.errors import Unavailable
from services.governance.events import Governor
from services.governance.ledger_store import LedgerWriteError
from services.governance.settings import Settings


@pytest.fixture
async def governor(bus):
    g = Governor(bus, Settings(nats_url="unused", ledger_deny_delete=False))
    await g.start()
    yield g
    await g.stop()


def create(governor, tenant_id):
    return governor.submit(lambda state: (None, [state.create_tenant(tenant_id)]), "test")


async def test_a_caller_gone_while_the_append_fails_leaves_the_writer_working(governor, monkeypatch):
    real_append = governor.store.append
    release = asyncio.Event()
    entered = asyncio.Event()

    async def failing_append(entries):
        entered.set()
        await release.wait()
        raise LedgerWriteError(0, TimeoutError("NATS away"))

    monkeypatch.setattr(governor.store, "append", failing_append)
    caller = asyncio.ensure_future(create(governor, "lab1"))
    await asyncio.wait_for(entered.wait(), 5)
    caller.cancel()  # the gRPC deadline passed: the caller's future is cancelled
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    monkeypatch.setattr(governor.store, "append", real_append)
    # Before the fix the writer set a result on the cancelled future, died of InvalidStateError,
    # and this write waited forever.
    _, entries = await asyncio.wait_for(create(governor, "lab2"), 10)
    assert [e.kind for e in entries] == ["tenant.created"]
    assert set(governor.state.tenants) == {"lab2"}  # the failed one's change was taken back
    assert not governor.writer.done()


@pytest.mark.parametrize("failure, expected", [
    (KeyError("a bug"), KeyError),  # a programming error: the caller's RPC answers INTERNAL
    (nats.errors.ConnectionClosedError(), Unavailable),  # NATS away: UNAVAILABLE, nothing changed
])
async def test_an_error_appending_a_batch_fails_that_batch_only(governor, monkeypatch, failure, expected):
    async def broken_append(entries):
        raise failure

    real_append = governor.store.append
    monkeypatch.setattr(governor.store, "append", broken_append)
    with pytest.raises(expected) as raised:
        await asyncio.wait_for(create(governor, "lab1"), 10)
    if expected is Unavailable:
        assert "ledger unavailable" in str(raised.value)
    monkeypatch.setattr(governor.store, "append", real_append)
    _, entries = await asyncio.wait_for(create(governor, "lab2"), 10)
    assert len(entries) == 1
    assert set(governor.state.tenants) == {"lab2"}  # the failed batch's change is not in the state


async def test_a_background_task_that_dies_stops_its_process(caplog):
    async def dies():
        raise ValueError("boom")

    with caplog.at_level(logging.CRITICAL):
        task = aio.background(dies(), "doomed")
        await asyncio.wait_for(aio.fatal_event().wait(), 5)
    assert task.done()
    assert "background task doomed died" in caplog.text


async def test_a_background_task_that_returns_or_is_cancelled_is_normal():
    async def returns():
        return 1

    async def waits():
        await asyncio.sleep(3600)

    done = aio.background(returns(), "short")
    cancelled = aio.background(waits(), "long")
    await done
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert not aio.fatal_event().is_set()
