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

A renewal is one KV request with a short deadline of its own (`attempt_s`, a quarter of the TTL),
tried again at once when it goes unanswered: a reply lost on the way (a NATS node leaving or
rejoining the cluster, a client failing over to another node) costs that deadline, not the bus's
5 s request timeout, which outlasted the fence (a deploy answered "lease not renewed for 4.3 s").
An attempt given up on may still have landed; the next one then finds the revision moved, reads
the key, and takes a newer revision holding this very lease's value (a token of its own) as its
renewal — only another holder's value means the lease is lost. Writers wait for a renewal under
way (`wait_fence`, up to the TTL) before they give up with `LeaseLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
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


async def wait_fence(timeout_s: float | None = None) -> None:
    """`fence()`, waiting up to `timeout_s` (default: the lease's TTL) for a renewal under way —
    one that a NATS failover held up — instead of failing at once; raises `LeaseLost` when none
    came, or the lease is lost."""
    if _held is not None:
        await _held.wait_fresh(timeout_s)


class Lease:
    def __init__(self, kv: Any, role: str, instance: str, ttl_s: float = 3.0, renew_s: float = 0.5,
                 attempt_s: float | None = None) -> None:
        if renew_s * 2 >= ttl_s * FENCE_SHARE:
            raise ValueError(f"lease renewal every {renew_s:g} s is too slow for a TTL of {ttl_s:g} s")
        self.attempt_s = ttl_s / 4 if attempt_s is None else attempt_s
        """How long one renewal request may go unanswered before it is sent again."""
        self.kv = kv
        self.role = role
        self.instance = instance
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.revision = 0
        self.renewed_at = 0.0
        self.held = False
        self._task: asyncio.Task[None] | None = None
        # the token tells this lease's own value from that of a later holder of the same name and pid
        # (a container's process restarted as pid 1 again)
        self._value = json.dumps({"instance": instance, "host": socket.gethostname(), "pid": os.getpid(),
                                  "token": uuid.uuid4().hex}).encode()

    def check(self) -> None:
        if not self.held:
            raise LeaseLost(f"{self.role}: not the active instance; retry")
        age = time.monotonic() - self.renewed_at
        if age >= FENCE_SHARE * self.ttl_s:
            raise LeaseLost(f"{self.role}: lease not renewed for {age:.1f} s (NATS away?); not writing; retry")

    async def wait_fresh(self, timeout_s: float | None = None) -> None:
        """`check()`, waiting up to `timeout_s` (default the TTL) for a renewal while it fails only
        for an old renewal (not for a lost lease)."""
        deadline = time.monotonic() + (self.ttl_s if timeout_s is None else timeout_s)
        while True:
            try:
                self.check()
                return
            except LeaseLost:
                if not self.held or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    async def acquire(self, stop: asyncio.Event | None = None) -> bool:
        """Wait until this instance holds the lease (True), or `stop` is set (False)."""
        seen: tuple[int, float] | None = None  # (revision, since when it is unchanged)
        said = 0.0
        while stop is None or not stop.is_set():
            try:
                asked = time.monotonic()
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
                if seen is None or seen[0] != entry.revision or now - asked > self.attempt_s:
                    # a slow answer may have waited out an outage (nats-py holds a request while it
                    # reconnects) that held the holder's renewals too: count from this answer
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
        pause = self.renew_s
        since = 0.0  # when the first attempt since the last known renewal was sent
        while self.held:
            await asyncio.sleep(pause)
            pause = self.renew_s
            sent = time.monotonic()
            since = since or sent
            try:
                self.revision = await asyncio.wait_for(
                    self.kv.update(KEY, self._value, last=self.revision), self.attempt_s)
                self.renewed_at = time.monotonic()
                since = 0.0
            except nats.js.errors.KeyWrongLastSequenceError:
                landed = await self._landed()
                if landed is None:  # cannot tell now: the next attempt conflicts again and asks again
                    pause = 0.05
                    continue
                if landed:
                    # an attempt given up on was written after all, no earlier than the first was sent
                    self.renewed_at = since
                    since = 0.0
                    pause = 0.0
                    continue
                self.held = False
                log.critical("%s %s: another instance took the lease; stopping (to come back as a standby)",
                             self.role, self.instance)
                aio.fatal_event().set()
                return
            except Exception as exc:  # NATS away or failing over: writes are fenced until a renewal succeeds
                if time.monotonic() - said > 5.0:
                    log.warning("%s %s: cannot renew the lease (%r); writes wait", self.role, self.instance, exc)
                    said = time.monotonic()
                # unanswered: send again at once; refused (no responders, …): a moment later
                pause = 0.0 if isinstance(exc, TimeoutError | nats.errors.TimeoutError) else 0.05

    async def _landed(self) -> bool | None:
        """Whether the key holds this lease's own value at a revision newer than the last renewal
        this instance knows of — an attempt given up on that was written after all (then that
        revision is taken as the current one); None: the key could not be read."""
        try:
            entry = await asyncio.wait_for(self.kv.get(KEY), self.attempt_s)
        except nats.js.errors.KeyNotFoundError:
            return False
        except Exception:
            return None
        if entry.value != self._value:
            return False  # another holder's
        if entry.revision > self.revision:
            self.revision = entry.revision
            return True
        return None  # this lease's value at a revision already known: a reader behind the leader

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
