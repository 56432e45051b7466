"""The `emulated` executor: the sites of a scenario emulated by the digital twin in accelerated
wall-clock time, and the executor a site agent uses to drive its site there.

`EmulatorHost` (run by `cncbrain emulate`) owns one `Twin` of the scenario *without* its scripted
workloads (the live brain brings its own: tenants deploy and submit through the scheduler). Every
`tick_s / speed` wall seconds it steps the twin and publishes each site's state on
`cnc.emulator.state.<site>`. It answers `cnc.emulator.inventory.<site>` and applies placements sent
to `cnc.emulator.apply.<site>`; the scenario's failures happen at their emulated times and
`cnc.emulator.fail.<site>` injects more. Services replay the Azure traces as their live demand.

Site ids are the twin's site names made subject-safe ("New York" → `new-york`).

What runs at each site survives a restart of the emulator (a crash, `kill -9`): with a `state_file`
it writes the placement it holds for each workload at each site there (every committed placement
it applied, replaced atomically before it answers the apply), and a new `EmulatorHost` on the same
file applies them again before it answers anyone — the sites keep their replicas and gangs, as real
sites would when the process watching them dies, and the site agents go on without noticing (an
apply sent while it was away is retried by `EmulatedExecutor` until it answers). Emulated time, a
training job's progress and the scenario's scripted failures start again from zero.

`EmulatedExecutor` is the agent's side: inventory and apply by request/reply, telemetry from the
state subject of its site.
A workload's template (what a real site would run) is ignored: the twin models the workload from
its spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import numpy as np

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.site.v1 import events_pb2 as site_pb
from cncbrain import aio, metrics
from cncbrain.bus import Bus, Event, subjects
from cncbrain.twin import Twin, costmodel
from cncbrain.twin.scenario import InferenceSpec, Scenario, TrainingSpec
from cncbrain.twin.sim import JobState
from cncbrain.twin.traces import JobSpec, load_azure

log = logging.getLogger(__name__)
TRACE_WINDOW_S = 3600.0
"""Emulated seconds of a service's requests replayed at a time (not its whole horizon)."""
MAX_TRACE_COPIES = 4
"""A service's demand is at most this many superposed copies of its trace; beyond, each simulated
request stands for several (`request_weight`)."""
MAX_REQUEST_WEIGHT = 1000
APPLY_TIMEOUT_S = 3.0
"""An apply the emulator does not answer within this is asked again (it restarted meanwhile)."""
APPLY_WAIT_S = 25.0
"""How long a site agent keeps asking an absent emulator to apply (under the placement consumer's
30 s acknowledgement wait, so the stream does not deliver the placement a second time meanwhile)."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64] or "site"


def site_ids_of(scenario: Scenario) -> list[str]:
    """Subject-safe site ids of a scenario, without building a twin."""
    from cncbrain.twin.pool import load_network

    return [slug(n) for n in load_network(scenario).names]


def site_inventories(scenario: Scenario, seed: int = 0) -> dict[str, dict[str, int]]:
    """Site id -> GPUs by type, as the emulator of `seed` will report them (what `up` enrolls)."""
    from cncbrain.twin.pool import build_pool
    from cncbrain.twin.sim import pool_rng

    pool = build_pool(scenario, pool_rng(seed))
    return {slug(name): {t: int(n) for t, n in zip(pool.gpu_types, pool.inventory[i], strict=True) if n > 0}
            for i, name in enumerate(pool.net.names)}


def twin_model(name: str, params_b: float) -> str:
    """The twin's model for a tenant's model: by name when the twin knows it, else nearest size."""
    key = name.lower()
    if key in costmodel.MODELS:
        return key
    return min(costmodel.MODELS.values(), key=lambda m: abs(np.log(m.params_b / max(params_b, 0.1)))).name


@dataclass
class _Gang:
    """Per-site shares of one training job's generation, collected until every shard is named."""

    generation: int
    sites: dict[str, list[int]] = field(default_factory=dict)


def write_placements(path: Path, placements: list[spb.PlacementCommitted]) -> None:
    """Every placement, length-prefixed, to `path` (replaced atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for msg in placements:
            data = msg.SerializeToString()
            f.write(struct.pack(">I", len(data)) + data)
    os.replace(tmp, path)


def read_placements(path: Path) -> list[spb.PlacementCommitted]:
    """The placements `write_placements` wrote (none when there is no file); a cut-off or garbled
    record ends the reading with a warning."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out, at = [], 0
    while at < len(data):
        try:
            (size,) = struct.unpack_from(">I", data, at)
            if at + 4 + size > len(data):
                raise ValueError("record cut off")
            out.append(spb.PlacementCommitted.FromString(data[at + 4:at + 4 + size]))
        except Exception as exc:
            log.warning("emulator state %s: unreadable from byte %d (%s); restoring the %d placements before it",
                        path, at, exc, len(out))
            break
        at += 4 + size
    return out


class EmulatorHost:
    def __init__(self, bus: Bus, scenario: Scenario, *, seed: int = 0, speed: float = 30.0,
                 horizon_s: float = 24 * 3600.0, keep_failures: bool = True, state_file: Path | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        live = scenario.model_copy(update={
            "inference": [],
            "training": TrainingSpec(trace="none", jobs=[]),
            "failures": scenario.failures if keep_failures else [],
        })
        self.bus = bus
        # runs for ever: no per-tick history, each trace replayed an hour at a time
        self.twin = Twin(live, seed=seed, duration_s=horizon_s, keep_history=False, trace_window_s=TRACE_WINDOW_S)
        self.speed = speed
        self.names = list(self.twin.site_ids)
        self.ids = [slug(n) for n in self.names]
        self.index = {sid: i for i, sid in enumerate(self.ids)}
        self.gangs: dict[str, _Gang] = {}
        self.job_sites: dict[str, set[str]] = {}
        self.job_generation: dict[str, int] = {}
        """Generation of each placed job's gang."""
        self.service_sites: dict[str, dict[str, int]] = {}
        self.report = None
        self._task: asyncio.Task[None] | None = None
        self.state_file = Path(state_file) if state_file else None
        """Where what runs at each site is kept across restarts (None: nowhere)."""
        self.held: dict[tuple[str, str], spb.PlacementCommitted] = {}
        """(site id, workload id) → the placement applied there last, while it holds GPUs."""

    @property
    def tick_s(self) -> float:
        return self.twin.tick_s

    # --- NATS ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.restore()  # before answering anyone: an agent's apply must find the sites as they were
        await self.bus.subscribe(subjects.EMULATOR_INVENTORY, self.on_inventory, consumer="emulator-inventory")
        await self.bus.subscribe(subjects.EMULATOR_APPLY, self.on_apply, consumer="emulator-apply")
        await self.bus.subscribe(subjects.EMULATOR_FAIL, self.on_fail, consumer="emulator-fail")
        self._task = aio.background(self._run(), "emulator")
        log.info("emulating %d sites of %s at %.0f× (tick %.0f s every %.2f s wall)",
                 len(self.ids), self.twin.scenario.name, self.speed, self.tick_s, self.tick_s / self.speed)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        wall = self.tick_s / self.speed
        while not self.twin.done():
            started = time.monotonic()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("emulator tick failed")
            await asyncio.sleep(max(0.0, wall - (time.monotonic() - started)))
        log.warning("emulated horizon of %.0f s reached; sites keep their last state", self.twin.duration_s)

    async def step(self) -> None:
        self.report = self.twin.step()
        self._export()
        await asyncio.gather(*[
            self.bus.publish(subjects.EMULATOR_STATE, self.site_state(sid), site=sid) for sid in self.ids
        ])

    def _export(self) -> None:
        t = self.twin
        metrics.EMULATOR_SIM_TIME.set(t.time_s)
        metrics.EMULATOR_SPEED.set(self.speed)
        used = t.used_gpus()
        metrics.replace_gauge(metrics.EMULATOR_GPUS_USED, {
            (sid, gpu.name): float(used[s, g]) for s, sid in enumerate(self.ids)
            for g, gpu in enumerate(t.gpus) if t.total[s, g] > 0})

    def _site_index(self, event: Event) -> int:
        sid = event.params["site"]
        if sid not in self.index:
            raise KeyError(f"no emulated site {sid!r}")
        return self.index[sid]

    async def on_inventory(self, event: Event) -> site_pb.EmulatorInventoryResponse:
        return site_pb.EmulatorInventoryResponse(site=self.site(self._site_index(event)), tick_s=self.tick_s)

    async def on_fail(self, event: Event) -> None:
        s = self._site_index(event)
        self.twin.fail_site(self.names[s], event.payload.duration_s)
        log.warning("site %s failed for %.0f emulated s (injected)", self.ids[s], event.payload.duration_s)

    async def on_apply(self, event: Event) -> site_pb.PlacementApplied:
        msg: spb.PlacementCommitted = event.payload
        ok, error = self.apply(self._site_index(event), msg)
        self.keep(event.params["site"], msg)  # on disk before the answer: a restart finds it
        out = site_pb.PlacementApplied(placement=msg.placement, ok=ok, error=error)
        out.applied_at.GetCurrentTime()
        return out

    # --- surviving a restart ------------------------------------------------------------------------
    def keep(self, sid: str, msg: spb.PlacementCommitted) -> None:
        """Remember what `msg` left at site `sid` and write the state file."""
        p = msg.placement
        key = (sid, p.workload_id)
        if p.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE:
            held = self.service_sites.get(p.workload_id, {}).get(sid, 0) > 0
        else:
            held = bool(p.shard_indices) and (p.workload_id in self.twin.job_index or p.workload_id in self.gangs)
        if held:
            self.held[key] = msg
        elif self.held.pop(key, None) is None:
            return  # nothing was kept for it, nothing changed
        if self.state_file is not None:
            write_placements(self.state_file, list(self.held.values()))

    def restore(self) -> None:
        """Apply the placements of the state file again (what ran at each site before a restart)."""
        if self.state_file is None:
            return
        kept = read_placements(self.state_file)
        restored = 0
        for msg in sorted(kept, key=lambda m: (m.placement.kind, m.placement.generation)):
            sid = msg.placement.site_id
            if sid not in self.index:
                log.warning("emulator state: placement of %s at %s, which is not emulated; dropped",
                            msg.placement.workload_id, sid)
                continue
            ok, error = self.apply(self.index[sid], msg)
            if not ok:
                log.warning("emulator state: %s at %s not restored: %s", msg.placement.workload_id, sid, error)
            self.keep(sid, msg)
            restored += ok
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_placements(self.state_file, list(self.held.values()))
        if kept:
            log.warning("restored %d of %d placements held at the emulated sites before a restart (%s)",
                        restored, len(kept), self.state_file)

    # --- the site model -------------------------------------------------------------------------
    def site(self, s: int) -> common.Site:
        t = self.twin
        net = t.pool.net
        site = common.Site(site_id=self.ids[s], name=self.names[s], region=t.pool.region[s],
                           latitude=float(net.lat[s]), longitude=float(net.lon[s]),
                           ingress_weight=float(t.pool.population[s]))
        for g, gpu in enumerate(t.gpus):
            if t.total[s, g] > 0:
                site.gpu_pools.append(common.GpuPool(
                    gpu_type=gpu.name, count=int(t.total[s, g]), hbm_gb=gpu.mem_gb,
                    peak_tflops=gpu.tflops, price_usd_per_hour=gpu.price_hr))
        for j, peer in enumerate(self.ids):
            if j != s:
                bw = float(t.bandwidth[s, j])
                site.links.append(common.Link(peer_site_id=peer, latency_ms=float(t.latency[s, j]) * 1e3,
                                              bandwidth_gbps=bw if np.isfinite(bw) else 0.0))
        return site

    def site_state(self, sid: str) -> site_pb.SiteTelemetry:
        t, s, rep = self.twin, self.index[sid], self.report
        up = bool(t.site_up()[s])
        used = t.used_gpus()
        state = site_pb.SiteTelemetry(site_id=sid, sim_time_s=t.time_s, available=up)
        state.observed_at.GetCurrentTime()
        for g, gpu in enumerate(t.gpus):
            if t.total[s, g] > 0:
                state.gpu_pools.append(common.GpuPool(gpu_type=gpu.name, count=int(t.total[s, g]),
                                                      used=int(used[s, g]), hbm_gb=gpu.mem_gb))
        total = int(t.total[s].sum())
        state.gpu_utilization = float(used[s].sum()) / total if total else 0.0
        reps = t.replicas_by_type().sum(axis=2) if t.K else np.zeros((t.S, 0))
        dt = t.tick_s
        for name, k in t.service_index.items():
            svc = t.services[k]
            if not svc.active:
                continue
            demand = float(rep.demand_rps[s, k]) if rep is not None and k < rep.demand_rps.shape[1] else 0.0
            n = int(reps[s, k])
            if n == 0 and demand == 0:
                continue
            served = float(rep.served_rps[s, k]) * dt if rep is not None and k < rep.served_rps.shape[1] else 0.0
            # The twin resolves SLO attainment per service and tick, not per serving site.
            share = float(rep.met_slo[k] / rep.requests[k]) if rep is not None and k < len(rep.requests) and rep.requests[k] else 1.0
            state.services.append(site_pb.ServiceLoad(
                workload_id=name, replicas=n, request_rate_rps=demand, slo_attainment=share,
                requests=served, requests_ok=served * share,
                utilization=float(rep.load[s, k]) if rep is not None and k < rep.load.shape[1] else 0.0))
        for jid, sites in self.job_sites.items():
            if sid not in sites:
                continue
            job = t.jobs[t.job_index[jid]]
            shards = sum(1 for site_i, _ in job.placement if site_i == s)
            state.jobs.append(site_pb.JobProgress(workload_id=jid, shards_running=shards,
                                                  progress=job.progress / job.spec.tokens, finished=job.state == JobState.DONE))
        return state

    def apply(self, s: int, msg: spb.PlacementCommitted) -> tuple[bool, str]:
        p = msg.placement
        try:
            if p.kind == common.WORKLOAD_KIND_INFERENCE_SERVICE:
                return self._apply_service(s, msg)
            return self._apply_job(s, msg)
        except (KeyError, ValueError) as exc:
            return False, str(exc)

    def _apply_service(self, s: int, msg: spb.PlacementCommitted) -> tuple[bool, str]:
        p, spec, t = msg.placement, msg.inference_service, self.twin
        wid = p.workload_id
        k = t.service_index.get(wid)
        if k is None or not t.services[k].active:
            if p.replicas == 0:
                return True, ""
            trace = spec.trace or "conv"
            base = load_azure(trace)
            base_rps = len(base.t) / base.length_s
            rate_scale = spec.expected_rate_rps / base_rps if spec.expected_rate_rps > 0 else 1.0
            # A high rate is emulated by weighting sampled requests, not by generating each one:
            # memory and CPU stay bounded whatever rate a tenant asked for.
            weight = min(MAX_REQUEST_WEIGHT, max(1, math.ceil(rate_scale / MAX_TRACE_COPIES)))
            ingress: str | dict[str, float] = "population"
            if spec.ingress_site_id:
                if spec.ingress_site_id not in self.index:
                    raise KeyError(f"ingress site {spec.ingress_site_id!r} is not emulated")
                ingress = {self.names[self.index[spec.ingress_site_id]]: 1.0}
            t.add_service(InferenceSpec(
                name=wid, model=twin_model(spec.model, spec.params_b), trace=trace, rate_scale=rate_scale,
                ingress=ingress, slo={"ttft_s": spec.slo.ttft_ms / 1e3, "tpot_s": spec.slo.tpot_ms / 1e3},
                min_replicas=0, max_replicas=max(spec.max_replicas, 1), request_weight=weight))
        sites = self.service_sites.setdefault(wid, {})
        got = t.set_replicas(wid, self.names[s], p.replicas)
        sites[self.ids[s]] = got
        if not any(sites.values()):
            t.remove_service(wid)  # every site at zero: cancelled, its demand stops
            self.service_sites.pop(wid, None)
        if got != p.replicas:
            return False, f"only {got} of {p.replicas} replicas fit at {self.ids[s]}"
        return True, ""

    def _apply_job(self, s: int, msg: spb.PlacementCommitted) -> tuple[bool, str]:
        p, spec, t = msg.placement, msg.training_job, self.twin
        wid, sid = p.workload_id, self.ids[s]
        if not p.shard_indices:  # cancelled or completed: stop it wherever it runs, then forget it
            if wid in t.job_index:
                t.cancel_job(wid)
            sites = self.job_sites.get(wid, set())
            sites.discard(sid)
            self.gangs.pop(wid, None)
            if not sites:  # the last of its sites: the twin keeps nothing of it
                self.job_sites.pop(wid, None)
                self.job_generation.pop(wid, None)
                t.forget_job(wid)
            return True, ""
        if self.job_generation.get(wid, -1) >= p.generation and sid in self.job_sites.get(wid, ()):
            return True, ""  # its gang runs already (an apply asked again while the first answer was slow)
        if wid not in t.job_index:
            m = costmodel.model(twin_model(spec.model, spec.params_b))
            ref = costmodel.gpu("A100-80GB")
            rate = costmodel.shard_tokens_per_s(m, ref, spec.gpus_per_shard) * spec.shards
            t.submit_job(JobSpec(wid, t.time_s, m.name, spec.shards, spec.gpus_per_shard, spec.tokens,
                                 float(2**20 if m.params_b < 10 else 2**22), spec.tokens / rate, 600.0,
                                 spec.tenant or "default"))
        gang = self.gangs.get(wid)
        if gang is None or gang.generation < p.generation:
            gang = self.gangs[wid] = _Gang(p.generation)
        gang.sites[sid] = list(p.shard_indices)
        named = sorted(i for shards in gang.sites.values() for i in shards)
        if named != list(range(spec.shards)):
            return True, ""  # waiting for the other sites of the gang
        plan = [""] * spec.shards
        for site_id, shards in gang.sites.items():
            for i in shards:
                plan[i] = self.names[self.index[site_id]]
        if not t.place_job(wid, plan):
            return False, f"gang of {spec.shards}×{spec.gpus_per_shard} GPUs does not fit the emulated sites"
        self.job_sites[wid] = set(gang.sites)
        self.job_generation[wid] = p.generation
        del self.gangs[wid]
        return True, ""


class EmulatedExecutor:
    """A site agent's view of its emulated site."""

    kind = "emulated"

    def __init__(self, bus: Bus, site_id: str) -> None:
        self.bus = bus
        self.site_id = site_id
        self.fresh = True  # the emulator keeps no state across its restarts either
        self._last: site_pb.SiteTelemetry | None = None
        self.tick_s = 0.0

    async def start(self, on_telemetry, on_report=None) -> None:
        async def on_state(event: Event) -> None:
            self._last = event.payload
            await on_telemetry(event.payload)

        await self.bus.subscribe(subjects.EMULATOR_STATE, on_state, consumer=f"agent-{self.site_id}-state",
                                 site=self.site_id)

    async def inventory(self, timeout_s: float = 60.0) -> common.Site:
        """The site as the emulator has it; waits for the emulator (starting beside the agents, or
        restarting), saying so every few seconds."""
        deadline = time.monotonic() + timeout_s
        said = time.monotonic()
        while True:
            try:
                resp = await self.bus.request(subjects.EMULATOR_INVENTORY,
                                              site_pb.EmulatorInventoryRequest(site_id=self.site_id),
                                              site_pb.EmulatorInventoryResponse, timeout_s=1.0, site=self.site_id)
                self.tick_s = resp.tick_s
                return resp.site
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                if time.monotonic() - said > 5.0:
                    log.warning("site %s: the emulator does not answer yet (%r); still waiting", self.site_id, exc)
                    said = time.monotonic()
                await asyncio.sleep(0.2)

    async def apply(self, placement: spb.PlacementCommitted, wait_s: float = APPLY_WAIT_S) -> tuple[bool, str]:
        """Apply at the emulated site; while the emulator is away (restarting: nobody answers, or a
        request it took with it), ask again until it answers, for up to `wait_s`."""
        deadline = time.monotonic() + wait_s
        said = time.monotonic()
        while True:
            try:
                resp = await self.bus.request(subjects.EMULATOR_APPLY, placement, site_pb.PlacementApplied,
                                              timeout_s=APPLY_TIMEOUT_S, site=self.site_id)
                return resp.ok, resp.error
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                if time.monotonic() - said > 5.0:
                    log.warning("site %s: the emulator does not answer an apply; still asking", self.site_id)
                    said = time.monotonic()
                await asyncio.sleep(0.1)

    def available(self) -> bool:
        return self._last is None or self._last.available

    def last_telemetry(self) -> site_pb.SiteTelemetry | None:
        return self._last

    async def stop(self) -> None:
        return None
