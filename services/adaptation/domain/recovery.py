"""Failure recovery (pure): when a site goes down, where its replicas and shards go; when a site
that stays up loses GPUs (nodes down or drained), which of its units go where (`plan_shrink`).

Inputs are the committed placements of every workload, the sites that are up with their free GPUs
and latencies, and a policy check (governance's placement policy) that says whether a workload may
run at a site. The output is, per affected workload, its new absolute placement (site -> units)
and an action with the reason and, for training, the work lost since the last checkpoint.

- Inference replicas go to the nearest allowed sites (latency from the service's ingress site, or
  from the failed site), cheapest first among equals; a service keeps what it can get and the rest
  is reported as a shortfall to retry when capacity frees.
- Training shards are gang-placed: every displaced shard finds a place or none moves (the job waits
  and the plan is retried). Sites where the job already runs come first (no new WAN traffic), then
  the nearest to them. The whole job rolls back to its last checkpoint, since data-parallel shards
  step together; the progress since then is the lost work.
- Free capacity is consumed as the plan is built, so two workloads never get the same GPUs;
  inference comes first because its SLOs are lost by the second, a training job loses minutes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


class WorkloadKind(enum.StrEnum):
    TRAINING = "training"
    INFERENCE = "inference"


@dataclass(frozen=True, slots=True)
class SiteUnits:
    """What one workload runs at one site."""

    gpu_type: str
    replicas: int = 0
    shard_indices: tuple[int, ...] = ()

    @property
    def units(self) -> int:
        return self.replicas + len(self.shard_indices)


@dataclass(frozen=True, slots=True)
class WorkloadPlacement:
    workload_id: str
    kind: WorkloadKind
    tenant_id: str
    gpus_per_unit: int
    sites: Mapping[str, SiteUnits]
    allowed_gpu_types: frozenset[str] = frozenset()  # empty: any
    ingress_site_id: str = ""
    generation: int = 0


@dataclass(slots=True)
class SiteCapacity:
    site_id: str
    up: bool
    free_by_type: dict[str, int]
    price_by_type: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # to other sites


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A training job's progress (0..1) now and at its last checkpoint."""

    progress: float
    checkpoint_progress: float
    tokens: float = 0.0  # the job's total tokens, to state the loss in tokens


class ActionKind(enum.StrEnum):
    REPLACE_REPLICAS = "replace_replicas"
    RESUME_SHARDS = "resume_shards"
    WAIT_FOR_CAPACITY = "wait_for_capacity"


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    workload_id: str
    kind: ActionKind
    failed_site_id: str
    moved: Mapping[str, int]  # target site -> units moved there
    new_placement: Mapping[str, SiteUnits]  # the workload's whole placement after the move
    reason: str
    shortfall: int = 0  # units that found no place
    lost_progress: float = 0.0  # training only: share of the job redone
    lost_tokens: float = 0.0


PolicyCheck = Callable[[WorkloadPlacement, str, str], bool]  # (workload, site, gpu type) -> allowed


def _latency(sites: Mapping[str, SiteCapacity], a: str, b: str) -> float:
    if a == b:
        return 0.0
    for x, y in ((a, b), (b, a)):
        s = sites.get(x)
        if s is not None and y in s.latency_ms:
            return s.latency_ms[y]
    return float("inf")


def _candidates(
    w: WorkloadPlacement, failed: str, sites: Mapping[str, SiteCapacity], allowed: PolicyCheck
) -> list[tuple[str, str]]:
    """(site, GPU type) pairs this workload may use, with at least one unit of room."""
    out = []
    for s in sites.values():
        if not s.up or s.site_id == failed:
            continue
        for gpu_type, free in s.free_by_type.items():
            if free < w.gpus_per_unit:
                continue
            if w.allowed_gpu_types and gpu_type not in w.allowed_gpu_types:
                continue
            if allowed(w, s.site_id, gpu_type):
                out.append((s.site_id, gpu_type))
    return out


def plan_recovery(
    failed_site_id: str,
    workloads: Iterable[WorkloadPlacement],
    sites: Mapping[str, SiteCapacity],
    allowed: PolicyCheck = lambda w, s, g: True,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    rooms: Mapping[str, Mapping[str, int]] | None = None,
) -> list[RecoveryAction]:
    """Re-place every unit that ran at `failed_site_id`. `sites` is mutated: free GPUs are taken.

    rooms: per workload, GPUs by type its new placement may hold in all (its tenant's quota less
    what other workloads hold); a type not named is unbounded.
    """
    checkpoints = checkpoints or {}
    rooms = rooms or {}
    hit = [w for w in workloads if failed_site_id in w.sites and w.sites[failed_site_id].units > 0]
    hit.sort(key=lambda w: (w.kind is not WorkloadKind.INFERENCE, w.workload_id))
    actions = []
    for w in hit:
        if w.kind is WorkloadKind.INFERENCE:
            actions.append(_replace_replicas(w, failed_site_id, sites, allowed, _spare(w, failed_site_id,
                                                                                         rooms.get(w.workload_id))))
        else:
            actions.append(_resume_shards(w, failed_site_id, sites, allowed, checkpoints.get(w.workload_id),
                                          _spare(w, failed_site_id, rooms.get(w.workload_id))))
    return actions


def plan_shrink(
    site_id: str,
    over: Mapping[str, int],
    workloads: Iterable[WorkloadPlacement],
    sites: Mapping[str, SiteCapacity],
    allowed: PolicyCheck = lambda w, s, g: True,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    rooms: Mapping[str, Mapping[str, int]] | None = None,
    why: str = "",
) -> list[RecoveryAction]:
    """Move just enough units off `site_id`, which is up but holds `over[gpu_type]` GPUs more than
    it has now, to other sites. Replicas go first, one at a time (cheap to move); a training job's
    whole share of the site moves when replicas are not enough (its shards step together), the
    job with the smallest share first. `sites` is mutated as in `plan_recovery`."""
    checkpoints = checkpoints or {}
    rooms = rooms or {}
    left = {t: n for t, n in over.items() if n > 0}
    hit = [w for w in workloads if site_id in w.sites and w.sites[site_id].units > 0
           and w.sites[site_id].gpu_type in left]
    hit.sort(key=lambda w: (w.kind is not WorkloadKind.INFERENCE, w.sites[site_id].units * w.gpus_per_unit,
                            w.workload_id))
    why = why or f"site {site_id} lost GPUs"
    actions = []
    for w in hit:
        here = w.sites[site_id]
        need = left.get(here.gpu_type, 0)
        if need <= 0:
            continue
        spare = _spare(w, site_id, rooms.get(w.workload_id))
        if w.kind is WorkloadKind.INFERENCE:
            count = min(here.replicas, -(-need // w.gpus_per_unit))
            if here.gpu_type in spare:  # the replicas that stay hold their share of the room
                spare[here.gpu_type] -= (here.replicas - count) * w.gpus_per_unit
            act = _replace_replicas(w, site_id, sites, allowed, spare, count=count, why=why)
            moved = sum(act.moved.values())
        else:
            act = _resume_shards(w, site_id, sites, allowed, checkpoints.get(w.workload_id), spare, why=why)
            moved = sum(act.moved.values())
        left[here.gpu_type] = need - moved * w.gpus_per_unit
        actions.append(act)
    return actions


def _spare(w: WorkloadPlacement, leaving: str, room: Mapping[str, int] | None) -> dict[str, int]:
    """GPUs by type the moved units may take: the room less what the workload keeps elsewhere."""
    spare = dict(room or {})
    for site_id, u in w.sites.items():
        if site_id != leaving and u.gpu_type in spare:
            spare[u.gpu_type] -= u.units * w.gpus_per_unit
    return spare


def _fits(spare: Mapping[str, int], gpu_type: str, units: int, gpus_per_unit: int) -> int:
    if gpu_type not in spare:
        return units
    return max(0, min(units, spare[gpu_type] // gpus_per_unit))


def _place_units(w: WorkloadPlacement, need: int, cands: list[tuple[str, str]], new: dict[str, SiteUnits],
                 sites: Mapping[str, SiteCapacity], spare: dict[str, int], moved: dict[str, int]) -> int:
    """Put up to `need` units of `w` on the candidate (site, GPU type) pairs in order, as many as fit
    at each; updates `new`, the sites' free GPUs, `spare` and `moved` (units per site); returns the
    units that found no room."""
    for site_id, gpu_type in cands:
        if need == 0:
            break
        cur = new.get(site_id)
        if cur is not None and cur.gpu_type != gpu_type:
            continue  # one GPU type per workload per site, as placements are recorded
        take = min(need, _fits(spare, gpu_type, sites[site_id].free_by_type[gpu_type] // w.gpus_per_unit,
                               w.gpus_per_unit))
        if take <= 0:
            continue
        sites[site_id].free_by_type[gpu_type] -= take * w.gpus_per_unit
        if gpu_type in spare:
            spare[gpu_type] -= take * w.gpus_per_unit
        new[site_id] = SiteUnits(gpu_type, (cur.replicas if cur else 0) + take)
        moved[site_id] = moved.get(site_id, 0) + take
        need -= take
    return need


def _replace_replicas(
    w: WorkloadPlacement, failed: str, sites: Mapping[str, SiteCapacity], allowed: PolicyCheck,
    spare: dict[str, int] | None = None, count: int | None = None, why: str = "",
) -> RecoveryAction:
    """Move `count` replicas (default: all) off `failed`; `why` opens the reason."""
    spare = spare if spare is not None else {}
    here = w.sites[failed]
    lost = here.replicas if count is None else min(count, here.replicas)
    why = why or f"site {failed} is down"
    origin = w.ingress_site_id if w.ingress_site_id and w.ingress_site_id != failed else failed
    cands = _candidates(w, failed, sites, allowed)
    cands.sort(key=lambda c: (_latency(sites, origin, c[0]), sites[c[0]].price_by_type.get(c[1], 0.0), c))
    new = {s: u for s, u in w.sites.items() if s != failed}
    moved: dict[str, int] = {}
    need = _place_units(w, lost, cands, new, sites, spare, moved)
    if lost - need < here.replicas:  # what stays at the site
        new[failed] = SiteUnits(here.gpu_type, here.replicas - (lost - need))
    if not moved:
        return RecoveryAction(w.workload_id, ActionKind.WAIT_FOR_CAPACITY, failed, {}, dict(w.sites),
                              f"{why}; no allowed site has room for its {lost} replica(s)",
                              shortfall=lost)
    where = ", ".join(f"{n} to {s}" for s, n in sorted(moved.items()))
    reason = f"{why}; re-placed {lost - need} of {lost} replica(s): {where}"
    if need:
        reason += f"; {need} still wait for capacity"
    return RecoveryAction(w.workload_id, ActionKind.REPLACE_REPLICAS, failed, moved, new, reason, shortfall=need)


def _resume_shards(
    w: WorkloadPlacement, failed: str, sites: Mapping[str, SiteCapacity], allowed: PolicyCheck,
    ckpt: Checkpoint | None, spare: dict[str, int] | None = None, why: str = "",
) -> RecoveryAction:
    spare = spare if spare is not None else {}
    why = why or f"site {failed} is down"
    shards = list(w.sites[failed].shard_indices)
    home = [s for s in w.sites if s != failed]
    cands = _candidates(w, failed, sites, allowed)

    def distance(site_id: str) -> float:
        if site_id in home:
            return -1.0
        anchors = home or [failed]
        return min(_latency(sites, a, site_id) for a in anchors)

    cands.sort(key=lambda c: (distance(c[0]), sites[c[0]].price_by_type.get(c[1], 0.0), c))
    # Gang: plan on a copy and commit the copy only when every shard found a place.
    free = {(s, g): sites[s].free_by_type[g] for s, g in cands}
    new = {s: u for s, u in w.sites.items() if s != failed}
    moved: dict[str, int] = {}
    todo = list(shards)
    for site_id, gpu_type in cands:
        if not todo:
            break
        cur = new.get(site_id)
        if cur is not None and cur.gpu_type != gpu_type:
            continue
        room = _fits(spare, gpu_type, free[(site_id, gpu_type)] // w.gpus_per_unit, w.gpus_per_unit)
        take, todo = todo[:room], todo[room:]
        if not take:
            continue
        free[(site_id, gpu_type)] -= len(take) * w.gpus_per_unit
        if gpu_type in spare:
            spare[gpu_type] -= len(take) * w.gpus_per_unit
        prev = cur.shard_indices if cur else ()
        new[site_id] = SiteUnits(gpu_type, 0, tuple(sorted((*prev, *take))))
        moved[site_id] = len(take)
    lost_p = max(0.0, ckpt.progress - ckpt.checkpoint_progress) if ckpt else 0.0
    lost_t = lost_p * ckpt.tokens if ckpt else 0.0
    if todo:
        return RecoveryAction(
            w.workload_id, ActionKind.WAIT_FOR_CAPACITY, failed, {}, dict(w.sites),
            f"{why}; {len(shards)} shard(s) need {len(shards) * w.gpus_per_unit} GPUs and only "
            f"{len(shards) - len(todo)} shard(s) fit in allowed sites; the job waits (gang placement)",
            shortfall=len(todo), lost_progress=lost_p, lost_tokens=lost_t)
    for (site_id, gpu_type), left in free.items():
        sites[site_id].free_by_type[gpu_type] = left
    where = ", ".join(f"{n} to {s}" for s, n in sorted(moved.items()))
    ck = f" from the checkpoint at {ckpt.checkpoint_progress:.1%} (lost {lost_p:.1%} of the job)" if ckpt else ""
    return RecoveryAction(
        w.workload_id, ActionKind.RESUME_SHARDS, failed, moved, new,
        f"{why}; resumed {len(shards)} shard(s){ck}: {where}",
        lost_progress=lost_p, lost_tokens=lost_t)


@dataclass
class CheckpointTracker:
    """Where each training job last checkpointed, from the progress seen in telemetry.

    Jobs are assumed to checkpoint every `interval_s` of (emulated) time, the usual periodic
    checkpointing; a real executor that reports checkpoints would call `checkpointed` instead.
    """

    interval_s: float = 600.0
    _last: dict[str, tuple[float, float]] = field(default_factory=dict)  # job -> (time, progress at ckpt)
    _now: dict[str, float] = field(default_factory=dict)  # job -> progress

    def observe(self, workload_id: str, time_s: float, progress: float) -> None:
        self._now[workload_id] = progress
        last = self._last.get(workload_id)
        if last is None or time_s - last[0] >= self.interval_s:
            self._last[workload_id] = (time_s, progress)

    def checkpointed(self, workload_id: str, time_s: float, progress: float) -> None:
        self._last[workload_id] = (time_s, progress)
        self._now[workload_id] = max(self._now.get(workload_id, 0.0), progress)

    def get(self, workload_id: str, tokens: float = 0.0) -> Checkpoint | None:
        if workload_id not in self._now:
            return None
        return Checkpoint(self._now[workload_id], self._last[workload_id][1], tokens)

    def forget(self, workload_id: str) -> None:
        self._last.pop(workload_id, None)
        self._now.pop(workload_id, None)


def plan_scale(
    w: WorkloadPlacement,
    target_replicas: int,
    sites: Mapping[str, SiteCapacity],
    allowed: PolicyCheck = lambda w, s, g: True,
    room: Mapping[str, int] | None = None,
) -> tuple[dict[str, SiteUnits], int]:
    """A service's new placement with `target_replicas` replicas in all, and the replicas that found
    no room. Growth goes to the nearest allowed sites with room (the service's own sites first);
    shrinking removes replicas from the farthest, then dearest, sites first. `sites` is mutated."""
    new = {s: u for s, u in w.sites.items() if u.replicas > 0}
    have = sum(u.replicas for u in new.values())
    origin = w.ingress_site_id or (min(new) if new else "")
    if target_replicas > have:
        need = target_replicas - have
        spare = _spare(w, "", room)
        cands = _candidates(w, "", sites, allowed)
        cands.sort(key=lambda c: (c[0] not in new, _latency(sites, origin, c[0]) if origin else 0.0,
                                  sites[c[0]].price_by_type.get(c[1], 0.0), c))
        need = _place_units(w, need, cands, new, sites, spare, {})
        return new, need
    drop = have - target_replicas
    order = sorted(new, key=lambda s: (-(_latency(sites, origin, s) if origin else 0.0),
                                       -(sites[s].price_by_type.get(new[s].gpu_type, 0.0) if s in sites else 0.0), s))
    for site_id in order:
        if drop == 0:
            break
        cur = new[site_id]
        take = min(drop, cur.replicas)
        new[site_id] = SiteUnits(cur.gpu_type, cur.replicas - take)
        if site_id in sites:
            sites[site_id].free_by_type[cur.gpu_type] = sites[site_id].free_by_type.get(cur.gpu_type, 0) + take * w.gpus_per_unit
        drop -= take
    return {s: u for s, u in new.items() if u.replicas > 0}, 0
