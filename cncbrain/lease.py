"""Active-standby: one active instance per service role, by a lease in NATS KV.

Each role has a bucket of its own (`cnc-lease-<role>`, one key `active`) holding the active
instance's name. The active renews it every `renew_s` by compare-and-set on its revision. A standby
watches the revision; once it has seen it unchanged for `ttl_s` — observing all the while, so a NATS
outage that hid the renewals never counts — it takes the key over by compare-and-set (exactly one
standby wins) and starts serving. An instance restarted under the same name (a supervisor's
restart, a container's) takes its own lease back at once. A supervisor that reaped the active's
process knows it is dead and frees its lease (`release_dead`): the standby takes over at once
instead of after the TTL, which stays the way for an active that is gone without a witness (its
host, its container, a partition).

Fencing: the active may write the state of record only while `fence()` passes — its last
successful renewal is younger than `FENCE_SHARE × ttl_s`, so a standby (which waits a full `ttl_s`
from the last revision it saw) can never write at the same time. While it cannot renew (NATS
away) its writes fail and are retried; once NATS is back, its renewal either succeeds (nobody took
over: it goes on) or finds another holder, and then the process stops (`aio.fatal_event`) to come
back as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from typing import Any

import nats.errors
import nats.js.errors

from cncbrain import aio
from cncbrain.errors import Unavailable

log = logging.getLogger(__name__)

KEY = "active"
FENCE_SHARE = 0.6
"""The active stops writing when its last renewal is older than this share of the TTL."""
ROLES = ("governance", "scheduler", "perception", "adaptation")


def bucket_of(role: str) -> str:
    return f"cnc-lease-{role}"


BUCKETS = tuple(bucket_of(r) for r in ROLES)


class LeaseLost(Unavailable):
    """This instance may not write: it lost its lease, or cannot currently prove it holds it (a
    caller retries, and reaches the active instance)."""


_held: Lease | None = None


def fence() -> None:
    """Raise `LeaseLost` unless this process may write (no lease in use counts as may: tests and
    tools that run a service's parts without one)."""
    if _held is not None:
        _held.check()


class Lease:
    def __init__(self, kv: Any, role: str, instance: str, ttl_s: float = 3.0, renew_s: float = 0.5) -> None:
        if renew_s * 2 >= ttl_s * FENCE_SHARE:
            raise ValueError(f"lease renewal every {renew_s:g} s is too slow for a TTL of {ttl_s:g} s")
        self.kv = kv
        self.role = role
        self.instance = instance
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.revision = 0
        self.renewed_at = 0.0
        self.held = False
        self._task: asyncio.Task[None] | None = None
        self._value = json.dumps({"instance": instance, "host": socket.gethostname(), "pid": os.getpid()}).encode()

    def check(self) -> None:
        if not self.held:
            raise LeaseLost(f"{self.role}: not the active instance; retry")
        age = time.monotonic() - self.renewed_at
        if age >= FENCE_SHARE * self.ttl_s:
            raise LeaseLost(f"{self.role}: lease not renewed for {age:.1f} s (NATS away?); not writing; retry")

    async def acquire(self, stop: asyncio.Event | None = None) -> bool:
        """Wait until this instance holds the lease (True), or `stop` is set (False)."""
        seen: tuple[int, float] | None = None  # (revision, since when it is unchanged)
        said = 0.0
        while stop is None or not stop.is_set():
            try:
                try:
                    entry = await self.kv.get(KEY)
                except nats.js.errors.KeyNotFoundError:  # never held, or released (deleted)
                    entry = None
                if entry is None or not entry.value:
                    await self._take(0 if entry is None else entry.revision, "free")
                    return True
                holder = json.loads(entry.value).get("instance", "?")
                if holder == self.instance:
                    await self._take(entry.revision, "held by this instance before its restart")
                    return True
                now = time.monotonic()
                if seen is None or seen[0] != entry.revision:
                    seen = (entry.revision, now)
                elif now - seen[1] >= self.ttl_s:
                    await self._take(entry.revision, f"{holder} stopped renewing it {now - seen[1]:.1f} s ago")
                    return True
                if now - said > 10.0:
                    log.info("%s %s: standby; %s is active", self.role, self.instance, holder)
                    said = now
            except nats.js.errors.KeyWrongLastSequenceError:
                seen = None  # another standby was quicker
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                seen = None  # not observing: an outage hid the renewals; start counting again
                if time.monotonic() - said > 5.0:
                    log.warning("%s %s: cannot read the lease (%r); waiting", self.role, self.instance, exc)
                    said = time.monotonic()
            await _sleep(self.renew_s / 2, stop)
        return False

    async def _take(self, revision: int, why: str) -> None:
        global _held
        if revision:
            self.revision = await self.kv.update(KEY, self._value, last=revision)
        else:
            self.revision = await self.kv.create(KEY, self._value)
        self.renewed_at = time.monotonic()
        self.held = True
        _held = self
        log.warning("%s %s: active (the lease was %s)", self.role, self.instance, why)
        self._task = aio.background(self._keep(), f"lease-{self.role}")

    async def _keep(self) -> None:
        said = 0.0
        while self.held:
            await asyncio.sleep(self.renew_s)
            try:
                self.revision = await self.kv.update(KEY, self._value, last=self.revision)
                self.renewed_at = time.monotonic()
            except nats.js.errors.KeyWrongLastSequenceError:
                self.held = False
                log.critical("%s %s: another instance took the lease; stopping (to come back as a standby)",
                             self.role, self.instance)
                aio.fatal_event().set()
                return
            except Exception as exc:  # NATS away: writes are fenced until a renewal succeeds
                if time.monotonic() - said > 5.0:
                    log.warning("%s %s: cannot renew the lease (%r); writes wait", self.role, self.instance, exc)
                    said = time.monotonic()

    async def release(self) -> None:
        """Give the lease up (a graceful stop): a standby takes over at once."""
        global _held
        was = self.held
        self.held = False
        if _held is self:
            _held = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if was:
            with contextlib.suppress(Exception):
                await self.kv.delete(KEY, last=self.revision)


async def release_dead(kv: Any, pid: int, host: str | None = None) -> str:
    """Free the lease in `kv` if process `pid` on `host` (default: this one) holds it and is known
    to be dead — its parent reaped it (`cncbrain up`'s supervisor): a standby then takes over at
    its next look (0.25 s) instead of waiting out the TTL. The delete is a compare-and-set on the
    revision read, and the dead can neither renew nor write, so nothing is fenced wrongly. Returns
    the instance whose lease was freed ('' when `pid` did not hold it)."""
    host = host or socket.gethostname()
    try:
        entry = await kv.get(KEY)
    except nats.js.errors.KeyNotFoundError:
        return ""
    holder = json.loads(entry.value) if entry.value else {}
    if holder.get("pid") != pid or holder.get("host") != host:
        return ""
    try:
        await kv.delete(KEY, last=entry.revision)
    except nats.js.errors.KeyWrongLastSequenceError:  # changed meanwhile: a standby took it already
        return ""
    return str(holder.get("instance", "?"))


async def _sleep(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
