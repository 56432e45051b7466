"""Follow a NATS KV bucket: every current value first, then each put and delete as it happens.

One mechanism for every process that keeps a local projection of a bucket (tokens, governance's
tenants and holdings, the scheduler's workload records). `kv` is a nats-py `KeyValue`; this module
does not import NATS, so light modules (e.g. `cncbrain.auth`) can use it. Each follower exports how
many revisions of its bucket it has not applied yet (`cnc_kv_follower_lag`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from cncbrain import aio, metrics

LAG_POLL_S = 5.0
log = logging.getLogger(__name__)


async def newest_revision(kv: Any) -> int:
    """The revision of the newest message the bucket still stores (0: none) — the last one a watcher
    yields. Not the stream's last sequence: a message removed since (a deleted key's marker, gone
    after its TTL) leaves that number behind, and no watcher would ever yield it."""
    state = (await kv.status()).stream_info.state
    if not state.messages:
        return 0
    return (await kv._js.get_last_msg(kv._stream, f"{kv._pre}>")).seq


class KvFollower:
    """`await start()` applies every current entry with `apply(entry)` and returns; a background
    task then applies each update (a deleted key arrives as an entry with an empty value) until
    `await stop()`. A timeout or a reconnect while following is waited out, never fatal."""

    def __init__(self, kv: Any, apply: Callable[[Any], None], name: str) -> None:
        self.kv = kv
        self.apply = apply
        self.name = name
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.revision = 0
        """The highest revision applied."""

    async def start(self, initial_timeout: float = 5.0) -> None:
        self._watcher = await self.kv.watchall()
        # The watcher yields every current value, then None, then live updates — but its None can
        # overtake values already on their way (nats-io/nats.py#842, under load). The bucket's last
        # revision, read after the watch began, is one of the values it must yield (the stream's
        # last message is the latest of its key) and values come in revision order, so the initial
        # load ends once that one is applied.
        last = await newest_revision(self.kv)
        seen, ended = 0, False
        while not (ended and seen >= last):
            try:
                entry = await self._watcher.updates(timeout=initial_timeout)
            except TimeoutError:
                # the one awaited may have gone meanwhile (a marker's TTL ran out): wait for the
                # newest still stored, or fail if that is the one that never came
                newest = await newest_revision(self.kv) if ended else last
                if newest >= last:
                    raise
                last = newest
                continue
            if entry is None:
                ended = True
                continue
            self.apply(entry)
            seen = max(seen, entry.revision or 0)
        self.revision = max(self.revision, seen)
        self._task = aio.background(self._follow(), self.name)
        self._lag_task = aio.background(self._poll_lag(), f"{self.name}-lag")

    async def _poll_lag(self) -> None:
        bucket = getattr(self.kv, "_name", None) or "?"
        while not self._stopping:
            with contextlib.suppress(Exception):  # NATS away: try again next time
                last = await newest_revision(self.kv)
                metrics.KV_LAG.labels(bucket, self.name).set(max(0, last - self.revision))
            await asyncio.sleep(LAG_POLL_S)

    async def _follow(self) -> None:
        while not self._stopping:  # see stop()
            try:
                entry = await self._watcher.updates(timeout=3600.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a timeout without updates, or a reconnect: keep following
                await asyncio.sleep(0.1)
                continue
            if entry is not None:
                try:
                    self.apply(entry)
                except Exception:  # one bad value must not end the projection
                    log.exception("%s: could not apply %s (revision %s); skipped", self.name, entry.key, entry.revision)
                self.revision = max(self.revision, entry.revision or 0)

    async def stop(self) -> None:
        # Ends on the flag as well as the cancel: `updates()` is an `asyncio.wait_for`, which on
        # Python 3.11 drops a cancel that lands as an update arrives; the loop then sees the flag.
        self._stopping = True
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lag_task
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
