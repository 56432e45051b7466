"""KvFollower's initial load is complete when start() returns, also when the watcher's
end-of-initial-values marker overtakes values still on their way (nats-io/nats.py#842)."""

import asyncio
from types import SimpleNamespace

import pytest

from cncbrain.kvfeed import KvFollower


class FakeKv:
    """A bucket whose watcher yields `script` (entries in revision order, as the server delivers
    them, and the None marker somewhere) in that order."""

    def __init__(self, script, last_seq, stored=None):
        self.queue: asyncio.Queue = asyncio.Queue()
        for item in script:
            self.queue.put_nowait(item)
        self.last_seq = last_seq
        self.stored = [last_seq] if stored is None else stored
        """Revisions that stay stored, newest last (a list a test may change)."""
        self._js, self._stream, self._pre = self, "KV_t", "$KV.t."

    async def watchall(self):
        queue = self.queue

        class Watcher:
            async def updates(self, timeout):
                return await asyncio.wait_for(queue.get(), timeout)

            async def stop(self):
                return None

        return Watcher()

    async def status(self):
        return SimpleNamespace(stream_info=SimpleNamespace(state=SimpleNamespace(
            last_seq=self.last_seq, messages=len([r for r in self.stored if r]))))

    async def get_last_msg(self, stream, subject):
        assert (stream, subject) == ("KV_t", "$KV.t.>")
        return SimpleNamespace(seq=self.stored[-1])


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


async def test_the_stream_s_last_message_gone_does_not_hold_the_start():
    """A deleted key's marker expires (its TTL): the stream's last sequence stays behind, no watcher
    yields it; the load ends at the newest message still stored."""
    follower = KvFollower(FakeKv([entry("a", 1), entry("b", 3), None], last_seq=7, stored=[1, 3]),
                          lambda e: None, "t")
    await asyncio.wait_for(follower.start(initial_timeout=2), 1)
    await follower.stop()


async def test_the_newest_message_going_away_during_the_start_ends_it():
    kv = FakeKv([entry("a", 1), None], last_seq=4)  # 4 is stored when the start looks, gone after
    applied = []
    follower = KvFollower(kv, lambda e: applied.append(e.key), "t")
    task = asyncio.create_task(follower.start(initial_timeout=0.2))
    await asyncio.sleep(0.05)
    kv.stored = [1]
    await asyncio.wait_for(task, 2)
    assert applied == ["a"]
    await follower.stop()
