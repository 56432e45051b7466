"""The live site agent: one logical agent per site (a process may host several).

Each agent registers its site (inventory, links), heartbeats, forwards its executor's telemetry,
answers the scheduler's offers from its site's point of view, proposes replica changes for the
services it hosts from perception's snapshot, and applies committed placements through its
executor, reporting each result.

Policy: `SitePolicy` decides offers and scaling from the agent's local observation (its site, its
links, the snapshot). `greedy` is built in: take what fits on the allowed GPU type with the most
free GPUs, priced by latency to the ingress site (nearest-feasible; a service without one is spread
over the pool, and priced by the mean latency from where its demand enters — the sites' ingress
weights — so it starts near its demand), and a threshold autoscaler
(add a replica above `scale_up_util`, remove one below `scale_down_util`, open a site that has
demand and no replica while the service misses its SLO). The twin's pool-wide `cncbrain.policies`
act on a whole-pool `PoolView`; see docs/live-brain.md for how a learned per-site policy plugs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import aio, metrics, telemetry
from cncbrain.bus import Bus, Event, subjects

log = logging.getLogger(__name__)


@dataclass
class ScaleWish:
    workload_id: str
    replicas: int
    gpu_type: str
    reason: str
    context: site_pb.ScaleContext | None = None
    """What the site saw of the service's pool, for the scheduler's coordination (None: applied alone)."""


class SitePolicy:
    """Built-in `greedy` policy of one site."""

    name = "greedy"

    def __init__(self, scale_up_util: float = 0.85, scale_down_util: float = 0.30, slo_floor: float = 0.90,
                 cooldown_s: float = 3.0) -> None:
        self.scale_up_util = scale_up_util
        self.scale_down_util = scale_down_util
        self.slo_floor = slo_floor
        self.cooldown_s = cooldown_s
        self._last_change: dict[str, float] = {}
        self._state: tuple | None = None
        self.snapshot: ppb.Snapshot | None = None
        self._spread: tuple | None = None

    async def observe(self, bus, snapshot: ppb.Snapshot, site: common.Site) -> None:
        """Keep perception's latest snapshot (the pool's sites and their ingress weights)."""
        self.snapshot = snapshot

    def demand_latency_ms(self, site: common.Site) -> float:
        """Mean latency from where a spread service's demand enters to this site, ms: the sites'
        ingress weights (the snapshot's; uniform over the up sites where none is known) times this
        site's latency to each (0 to itself, 100 ms to a site it has no link to). Worked out once
        per snapshot and site message."""
        snap = self.snapshot
        cached = self._spread
        if cached is not None and cached[0] is snap and cached[1] is site:
            return cached[2]
        weights: dict[str, float] = {}
        if snap is not None:
            for st in snap.sites:
                if st.state == common.SITE_STATE_UP:
                    weights[st.site.site_id] = max(st.site.ingress_weight, 0.0)
        weights.setdefault(site.site_id, max(site.ingress_weight, 0.0))
        if sum(weights.values()) <= 0:
            weights = dict.fromkeys(weights, 1.0)
        latency_to = {lk.peer_site_id: lk.latency_ms for lk in reversed(site.links)}
        total = sum(weights.values())
        mean = sum(w * (0.0 if sid == site.site_id else latency_to.get(sid, 100.0))
                   for sid, w in weights.items()) / total
        self._spread = (snap, site, mean)
        return mean

    @staticmethod
    def free_by_type(site: common.Site, telemetry: site_pb.SiteTelemetry | None) -> dict[str, int]:
        used = {g.gpu_type: g.used for g in telemetry.gpu_pools} if telemetry else {}
        return {g.gpu_type: g.count - used.get(g.gpu_type, 0) for g in site.gpu_pools}

    def _site_state(self, site: common.Site, telemetry: site_pb.SiteTelemetry | None) -> tuple:
        """(free GPUs by type, HBM by type, busy share, link latency by peer) of the site, worked
        out once per telemetry message (executors replace the message, never change it)."""
        state = self._state
        if state is None or state[0] is not site or state[1] is not telemetry:
            free = self.free_by_type(site, telemetry)
            total = sum(g.count for g in site.gpu_pools) or 1
            state = self._state = (site, telemetry, free, {g.gpu_type: g.hbm_gb for g in site.gpu_pools},
                                   1.0 - sum(free.values()) / total,
                                   {lk.peer_site_id: lk.latency_ms for lk in reversed(site.links)})
        return state[2:]

    def answer(self, offer: spb.Offer, site: common.Site, telemetry: site_pb.SiteTelemetry | None,
               available: bool) -> tuple[int, str, float, str]:
        """(units, gpu_type, cost, reason) this site offers for `offer`."""
        if not available:
            return 0, "", 0.0, "site unavailable"
        free, hbm, busy, latency_to = self._site_state(site, telemetry)
        allowed = offer.allowed_gpu_types
        per_unit, min_hbm = offer.gpus_per_unit, offer.min_hbm_gb  # read once (protobuf fields)
        best = None  # the largest (units that fit, GPU type) of an allowed type with enough HBM
        for t, n in free.items():
            if (not allowed or t in allowed) and (not hbm.get(t) or hbm[t] >= min_hbm):
                c = (n // per_unit, t)
                if c[0] > 0 and (best is None or c > best):
                    best = c
        if best is None:
            return 0, "", 0.0, "no free GPUs of an allowed type with enough HBM"
        room, gpu_type = best
        units = min(room, offer.units)
        if offer.kind == common.WORKLOAD_KIND_TRAINING_JOB:
            # fewer, fuller sites keep a gang's all-reduce off the WAN
            cost = -float(units) + busy
        else:
            if offer.ingress_site_id:  # near where its requests enter
                latency = 0.0 if offer.ingress_site_id == site.site_id else latency_to.get(offer.ingress_site_id, 100.0)
            else:  # spread over the pool: near where most of its demand enters
                latency = self.demand_latency_ms(site)
            cost = latency + 5.0 * busy
        return units, gpu_type, cost, f"{units}×{offer.gpus_per_unit} {gpu_type} free"

    def answer_round(self, offers, site: common.Site, telemetry: site_pb.SiteTelemetry | None,
                     available: bool) -> list[tuple[int, str, float, str]]:
        """(units, gpu_type, cost, reason) for each offer of a round."""
        return [self.answer(o, site, telemetry, available) for o in offers]

    def scale(self, snapshot: ppb.Snapshot, site: common.Site,
              telemetry: site_pb.SiteTelemetry | None, now: float) -> list[ScaleWish]:
        if telemetry is None or not telemetry.available:
            return []
        pool_slo: dict[str, tuple[float, float]] = {}
        for s in snapshot.sites:
            for load in s.services:
                req, ok = pool_slo.get(load.workload_id, (0.0, 0.0))
                pool_slo[load.workload_id] = (req + load.requests, ok + load.requests_ok)
        free = self.free_by_type(site, telemetry)
        best_type = max(free, key=lambda t: free[t]) if free else ""
        wishes = []
        for load in telemetry.services:
            wid = load.workload_id
            if now - self._last_change.get(wid, 0.0) < self.cooldown_s:
                continue
            req, ok = pool_slo.get(wid, (0.0, 0.0))
            slo = ok / req if req else 1.0
            wish = None
            if load.replicas > 0 and load.utilization > self.scale_up_util and free.get(best_type, 0) > 0:
                wish = ScaleWish(wid, load.replicas + 1, best_type, f"utilisation {load.utilization:.2f}")
            elif load.replicas > 1 and load.utilization < self.scale_down_util and slo >= self.slo_floor:
                wish = ScaleWish(wid, load.replicas - 1, best_type, f"utilisation {load.utilization:.2f}")
            elif load.replicas == 0 and load.request_rate_rps > 0 and slo < self.slo_floor and free.get(best_type, 0) > 0:
                wish = ScaleWish(wid, 1, best_type, f"local demand {load.request_rate_rps:.1f} rps, SLO {slo:.2f}")
            if wish:
                self._last_change[wid] = now
                wishes.append(wish)
        return wishes


class OfferDesk:
    """The offer rounds of one process: one subscription for every site agent it hosts.

    A round is decoded once (one consumer span) and answered from inside that span, every local
    site's decision made together (`answer_round`). Where the agents share one connection (an agent
    host identity, `cncbrain up`; or no credentials), the answers of all local sites go out as one
    `OfferAnswers` on `cnc.site.<agent_id>.answers` (one message per process and round; the
    scheduler takes each answer only for a site whose registration names that agent). Where each
    agent speaks with its own site's NATS identity on its own connection, each answer goes out on
    its own site's subject."""

    _desks: dict[int, OfferDesk] = {}

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.agents: dict[str, SiteAgent] = {}
        self.sub = None
        self._sub_bus: Bus | None = None
        self.agent_id = bus.identity or f"agents-{uuid.uuid4().hex[:12]}"
        """This process's id on the bus (the token of its `answers` subject; never a site id): its
        agent host identity when it has one (the scheduler checks the sites' registrations name it)."""

    @classmethod
    def of(cls, bus: Bus) -> OfferDesk:
        desk = cls._desks.get(id(bus))
        if desk is None or desk.bus is not bus:
            desk = cls._desks[id(bus)] = cls(bus)
        return desk

    async def add(self, agent: SiteAgent) -> None:
        self.agents[agent.site_id] = agent
        if self.sub is None:
            await self._subscribe(agent)

    async def _subscribe(self, agent: SiteAgent) -> None:
        self._sub_bus = agent.bus
        self.sub = await agent.bus.subscribe(subjects.SCHEDULER_OFFER, self.on_round,
                                             consumer=f"{agent.consumer}-offers")

    async def remove(self, agent: SiteAgent) -> None:
        if self.agents.get(agent.site_id) is agent:
            del self.agents[agent.site_id]
        if self.sub is not None and (not self.agents or self._sub_bus is agent.bus):
            await self._sub_bus.unsubscribe(self.sub)
            self.sub = None
            if self.agents:  # the subscription was on the removed agent's own connection
                await self._subscribe(next(iter(self.agents.values())))
        if not self.agents:
            self._desks.pop(id(self.bus), None)

    async def on_round(self, event: Event) -> None:
        rnd: spb.OfferRound = event.payload
        if rnd.HasField("deadline") and time.time() > rnd.deadline.ToNanoseconds() / 1e9:
            self.bus.counters["offer_rounds_expired"] += 1  # shed load: the scheduler no longer listens
            return
        agents = list(self.agents.values())
        started = time.perf_counter()
        try:
            await self._answer(rnd, agents)
        finally:
            if agents:
                metrics.AGENT_ANSWER.labels(agents[0].policy.name).observe(time.perf_counter() - started)

    async def _answer(self, rnd: spb.OfferRound, agents: list[SiteAgent]) -> None:
        if len(agents) == 1 or len({id(a.bus) for a in agents}) > 1:  # each site on its own connection
            answers = answer_round(agents, rnd)
            trace_answers(answers)
            for agent, answer in answers:
                await agent.bus.publish(subjects.SITE_ANSWER, answer, site=agent.site_id, span=False)
        elif agents:
            batch = site_pb.OfferAnswers(round_id=rnd.round_id, agent_id=self.agent_id)
            trace_answers(answer_round(agents, rnd, batch))  # each answer written straight into the batch
            await self.bus.publish(subjects.SITE_ANSWERS, batch, agent=self.agent_id, span=False)


def trace_answers(answers: list[tuple[SiteAgent, site_pb.OfferAnswer]]) -> None:
    """One `answer <site>` span per answering site in the round's trace, when spans are recorded
    (sites are decided together, so each span covers the round's decision, not one site's share)."""
    if not telemetry.recording():
        return
    for agent, answer in answers:
        accepted = [p.workload_id for p in answer.proposals if p.units]
        with telemetry.span("cncbrain.agent", f"answer {agent.site_id}", attributes={
                "cnc.site": agent.site_id, "cnc.policy": agent.policy.name, "cnc.offers": len(answer.proposals),
                "cnc.accepted": accepted}):
            pass


def answer_round(agents: list[SiteAgent], rnd: spb.OfferRound,
                 into: site_pb.OfferAnswers | None = None) -> list[tuple[SiteAgent, site_pb.OfferAnswer]]:
    """Every agent's answer to a round. Agents whose policies share a `batch_key` (the learned
    policy from one file) are decided together by the policy class's `answer_sites`, within the
    round's deadline; the others one by one. `into`: the answers are built inside that batch."""
    groups: dict[object, list[SiteAgent]] = {}
    for agent in agents:
        groups.setdefault(getattr(agent.policy, "batch_key", None) or id(agent), []).append(agent)
    out = []
    deadline = rnd.deadline.ToNanoseconds() / 1e9 if rnd.HasField("deadline") else None
    for members in groups.values():
        if not hasattr(members[0].policy, "answer_sites"):
            out.extend((a, a.answer_round(rnd, into)) for a in members)
            continue
        members[0].learn_specs(rnd)
        inputs = [(a.policy, a.site, a.executor.last_telemetry(), a.executor.available()) for a in members]
        decisions = type(members[0].policy).answer_sites(inputs, rnd.offers, deadline)
        out.extend((a, a.answer_from(rnd, d, into)) for a, d in zip(members, decisions, strict=True))
    return out


class SiteAgent:
    def __init__(self, bus: Bus, site_id: str, executor, policy: SitePolicy | None = None,
                 heartbeat_s: float = 1.0, agent_id: str | None = None, desk: OfferDesk | None = None) -> None:
        self.bus = bus
        self.desk = desk or OfferDesk.of(bus)
        """Where this agent's offer rounds come from (shared by the agents of one process)."""
        self.site_id = site_id
        self.executor = executor
        self.policy = policy or SitePolicy()
        self.heartbeat_s = heartbeat_s
        self.agent_id = agent_id or f"agent-{site_id}-{uuid.uuid4().hex[:6]}"
        self.site: common.Site | None = None
        self.applied: dict[str, int] = {}
        self.counters = bus.counters
        # this site's labelled metric children, looked up once (a lookup per offer round costs more)
        self._accepted = metrics.AGENT_OFFERS.labels(site_id, "accept")
        self._declined = metrics.AGENT_OFFERS.labels(site_id, "decline")
        self._applied = {True: metrics.AGENT_APPLIED.labels(site_id, "ok"), False: metrics.AGENT_APPLIED.labels(site_id, "error")}
        self._tasks: list[asyncio.Task[None]] = []
        self._hb_seq = 0
        self._reports = 0

    @property
    def consumer(self) -> str:
        return f"agent-{self.site_id}"

    async def start(self) -> SiteAgent:
        self.site = await self.executor.inventory()
        if self.site.site_id != self.site_id:
            raise ValueError(f"executor reports site {self.site.site_id!r}, agent is for {self.site_id!r}")
        await self.register()
        if self.executor.fresh:
            # An executor without state is told its site's placements again: the latest of each
            # workload first (an older generation applied on the way would start and stop work for
            # nothing), then the stream from its start, where every older one is stale. It starts
            # watching its site after that, knowing what should run there.
            await self.bus.delete_durable(subjects.SCHEDULER_PLACEMENT, self.consumer)
            await self.catch_up()
        await self.executor.start(self.on_telemetry, self.report)
        await self.desk.add(self)
        await self.bus.subscribe(subjects.PERCEPTION_SNAPSHOT, self.on_snapshot, consumer=f"{self.consumer}-snapshot")
        await self.bus.subscribe(subjects.SCHEDULER_PLACEMENT, self.on_placement, consumer=self.consumer,
                                 durable=True, site=self.site_id)
        self._tasks.append(aio.background(self._heartbeat(), f"heartbeat-{self.site_id}"))
        log.info("agent %s up for site %s (%s executor, %s policy)", self.agent_id, self.site_id,
                 self.executor.kind, self.policy.name)
        return self

    async def stop(self) -> None:
        await self.desk.remove(self)
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.executor.stop()

    async def _heartbeat(self) -> None:
        while True:
            try:
                if self.executor.available():
                    self._hb_seq += 1
                    hb = site_pb.Heartbeat(site_id=self.site_id, agent_id=self.agent_id, sequence=self._hb_seq)
                    hb.sent_at.GetCurrentTime()
                    await self.bus.publish(subjects.SITE_HEARTBEAT, hb, site=self.site_id)
                    if self.executor.kind == "memory":
                        await self.on_telemetry(self.executor.last_telemetry())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat of %s failed", self.site_id)
            await asyncio.sleep(self.heartbeat_s)

    async def register(self) -> None:
        await self.bus.publish(subjects.SITE_REGISTERED, site_pb.SiteRegistered(
            site=self.site, agent_id=self.agent_id, executor=self.executor.kind), site=self.site_id)

    async def catch_up(self) -> None:
        latest: dict[str, Event] = {}
        for event in await self.bus.events_since(subjects.SCHEDULER_PLACEMENT, 0.0, consumer=f"{self.consumer}-catchup",
                                                 site=self.site_id):
            p = event.payload.placement
            if p.generation >= latest.get(p.workload_id, event).payload.placement.generation:
                latest[p.workload_id] = event
        for event in latest.values():
            await self.on_placement(event)
        if latest:
            log.info("agent %s: caught up with %d workloads' placements", self.site_id, len(latest))

    async def on_telemetry(self, telemetry: site_pb.SiteTelemetry) -> None:
        if telemetry.available:  # a failed site reports nothing
            await self.bus.publish(subjects.SITE_TELEMETRY, telemetry, site=self.site_id)
            await self._follow_inventory(telemetry)

    async def _follow_inventory(self, telemetry: site_pb.SiteTelemetry) -> None:
        """Register the site again when its GPUs in service changed (nodes down, drained, back)."""
        assert self.site is not None
        now = {g.gpu_type: g.count for g in telemetry.gpu_pools}
        if not now or now == {g.gpu_type: g.count for g in self.site.gpu_pools}:
            return
        site = common.Site()
        site.CopyFrom(self.site)
        known = {g.gpu_type for g in site.gpu_pools}
        for g in site.gpu_pools:
            g.count = now.get(g.gpu_type, 0)
        site.gpu_pools.extend(common.GpuPool(gpu_type=g.gpu_type, count=g.count, hbm_gb=g.hbm_gb,
                                             peak_tflops=g.peak_tflops, price_usd_per_hour=g.price_usd_per_hour)
                              for g in telemetry.gpu_pools if g.gpu_type not in known)
        log.warning("site %s: GPUs in service now %s (were %s); registering again", self.site_id,
                    ", ".join(f"{g.gpu_type} {g.count}" for g in site.gpu_pools),
                    ", ".join(f"{g.gpu_type} {g.count}" for g in self.site.gpu_pools))
        self.site = site
        await self.register()

    async def report(self, p: common.Placement, ok: bool, error: str, failed: bool = False) -> None:
        """What the executor learned about a placement after applying it."""
        self._reports += 1
        self.counters["placements_reported_late"] += 1
        report = site_pb.PlacementApplied(placement=p, ok=ok, error=error, failed=failed)
        report.applied_at.GetCurrentTime()
        await self.bus.publish(subjects.SITE_APPLIED, report, site=self.site_id,
                               event_id=f"{p.workload_id}/{p.generation}/{self.site_id}/{self.agent_id}-{self._reports}")

    def learn_specs(self, rnd: spb.OfferRound) -> None:
        book = getattr(self.policy, "book", None)
        if book is not None:  # a learned policy models the offered workloads from their specs
            for offer in rnd.offers:
                if offer.workload_id not in book.specs and (which := offer.WhichOneof("spec")):
                    book.learn(offer.workload_id, getattr(offer, which))

    def answer_round(self, rnd: spb.OfferRound, into: site_pb.OfferAnswers | None = None) -> site_pb.OfferAnswer:
        """This site's answer to every offer of a round (units 0 declines)."""
        assert self.site is not None
        self.learn_specs(rnd)
        decisions = self.policy.answer_round(rnd.offers, self.site, self.executor.last_telemetry(),
                                             self.executor.available())
        return self.answer_from(rnd, decisions, into)

    def answer_from(self, rnd: spb.OfferRound, decisions: list[tuple[int, str, float, str]],
                    into: site_pb.OfferAnswers | None = None) -> site_pb.OfferAnswer:
        """The `OfferAnswer` message of this site's (units, gpu_type, cost, reason) per offer (added
        to the batch `into` when given, instead of built on its own and copied there)."""
        if into is not None:
            answer = into.answers.add(round_id=rnd.round_id, site_id=self.site_id)
        else:
            answer = site_pb.OfferAnswer(round_id=rnd.round_id, site_id=self.site_id)
        add = answer.proposals.add
        accepted = 0
        for offer, (units, gpu_type, cost, reason) in zip(rnd.offers, decisions, strict=True):
            add(site_id=self.site_id, kind=site_pb.PROPOSAL_KIND_ACCEPT_OFFER, offer_id=offer.offer_id,
                workload_id=offer.workload_id, units=units, gpu_type=gpu_type, cost=cost, reason=reason)
            accepted += units > 0
        self.counters["offers_answered"] += len(rnd.offers)
        if accepted:
            self._accepted.inc(accepted)
        if len(rnd.offers) > accepted:
            self._declined.inc(len(rnd.offers) - accepted)
        return answer

    async def on_snapshot(self, event: Event) -> None:
        assert self.site is not None
        await self.policy.observe(self.bus, event.payload, self.site)
        for wish in self.policy.scale(event.payload, self.site, self.executor.last_telemetry(), time.monotonic()):
            await self.bus.publish(subjects.SITE_PROPOSAL, site_pb.Proposal(
                proposal_id=uuid.uuid4().hex[:16], site_id=self.site_id, kind=site_pb.PROPOSAL_KIND_SCALE,
                workload_id=wish.workload_id, units=wish.replicas, gpu_type=wish.gpu_type, reason=wish.reason,
                context=wish.context), site=self.site_id)

    async def on_placement(self, event: Event) -> None:
        msg: spb.PlacementCommitted = event.payload
        p = msg.placement
        if p.site_id != self.site_id:
            raise ValueError(f"placement for {p.site_id} on {event.subject}")
        if p.generation <= self.applied.get(p.workload_id, 0):
            self.counters["placements_stale"] += 1
            return
        with telemetry.span("cncbrain.agent", f"apply {self.site_id}", attributes={
                "cnc.site": self.site_id, "cnc.workload_id": p.workload_id, "cnc.generation": p.generation,
                "cnc.executor": self.executor.kind}):
            ok, error = await self.executor.apply(msg)
        self.applied[p.workload_id] = p.generation
        self.counters["placements_applied" if ok else "placements_failed"] += 1
        self._applied[bool(ok)].inc()
        report = site_pb.PlacementApplied(placement=p, ok=ok, error=error)
        report.applied_at.GetCurrentTime()
        await self.bus.publish(subjects.SITE_APPLIED, report, event_id=f"{p.workload_id}/{p.generation}/{self.site_id}",
                               site=self.site_id)
