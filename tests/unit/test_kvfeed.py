"""KvFollower's initial load is complete when start() returns, also when the watcher's
end-of-initial-values marker overtakes values still on their way (nats-io/nats.py#842)."""

import asyncio
from types import SimpleNamespace

import pytest

from cncbrain.kvfeed import KvFollower


class FakeKv:
    """A bucket whose watcher yields `script` (entries in revision order, as the server delivers
    them, and the None marker somewhere) in that order."""

    def __init__(self, script, last_seq):
        self.queue: asyncio.Queue = asyncio.Queue()
        for item in script:
            self.queue.put_nowait(item)
        self.last_seq = last_seq

    async def watchall(self):
        queue = self.queue

        class Watcher:
            async def updates(self, timeout):
                return await asyncio.wait_for(queue.get(), timeout)

            async def stop(self):
                return None

        return Watcher()

    async def status(self):
        return SimpleNamespace(stream_info=SimpleNamespace(state=SimpleNamespace(last_seq=self.last_seq)))


def entry(key, revision):
    return SimpleNamespace(key=key, value=b"v", revision=revision)


@pytest.mark.parametrize("script", [
    [entry("a", 1), entry("b", 3), entry("c", 5), None],  # the marker after the values (usual)
    [None, entry("a", 1), entry("b", 3), entry("c", 5)],  # the marker overtook them (the race)
    [entry("a", 1), None, entry("b", 3), entry("c", 5)],
], ids=["in-order", "marker-first", "marker-between"])
async def test_start_returns_with_every_current_value_applied(script):
    applied = []
    follower = KvFollower(FakeKv(script, last_seq=5), lambda e: applied.append(e.key), "t")
    await follower.start(initial_timeout=2)
    try:
        assert sorted(applied) == ["a", "b", "c"]
    finally:
        await follower.stop()


async def test_an_empty_bucket_starts_at_once():
    follower = KvFollower(FakeKv([None], last_seq=0), lambda e: None, "t")
    await asyncio.wait_for(follower.start(initial_timeout=2), 1)
    await follower.stop()


async def test_a_value_that_never_comes_fails_the_start():
    follower = KvFollower(FakeKv([None, entry("a", 1)], last_seq=4), lambda e: None, "t")
    with pytest.raises(asyncio.TimeoutError):
        await follower.start(initial_timeout=0.2)
