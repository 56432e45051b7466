"""Governance figures (print only; compare run to run on the same machine):

1. ledger append: entries per second through the governance writer into JetStream, with many
   concurrent callers (batched) and with one caller at a time (one round trip each).
2. ledger verify: seconds to read back and verify 100,000 stored entries.
   start: governance's load at start with 100,000 entries — folded from the start, from its signed
   checkpoint, and from a checkpoint with 9,999 entries after it — and what writing a checkpoint
   costs.
3. auth + placement check on the deploy path: p50/p99 of a gRPC DeployInferenceService call on
   loopback to a minimal servicer, without and with the auth interceptor and the in-process
   placement-policy check (GovernanceGate.check of a 3-site placement); the difference is what
   governance adds. Also the in-process cost of the two checks alone.

    python -m benchmarks governance
    python -m benchmarks.bench_governance append|verify|start|auth
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from cnc.common.v1 import common_pb2 as common
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain import aio
from cncbrain.auth import AuthInterceptor, token_interceptors
from cncbrain.bus import Bus
from cncbrain.governance.gate import GovernanceGate, _TenantView
from cncbrain.governance.policy import Holding, Placement, PlacementPolicy, Quota
from cncbrain.grpcserver import start_grpc_server
from cncbrain.identity import Role, TokenDirectory, mint_token
from cncbrain.natsserver import NatsServer
from cncbrain.settings import ServiceSettings
from services.governance.checkpoint import encode as encode_checkpoint
from services.governance.domain.ledger import verify_chain
from services.governance.domain.state import Record
from services.governance.events import Governor
from services.governance.settings import Settings

N_APPEND = 20_000
N_SEQUENTIAL = 2_000
N_VERIFY = 100_000
N_CALLS = 5_000


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _with_nats(fn):
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        bus = await Bus.connect(server.url, "bench-governance")
        try:
            return await fn(bus, server.url)
        finally:
            await bus.close()
            server.stop()


async def _governor(bus: Bus, url: str) -> Governor:
    gov = Governor(bus, Settings(nats_url=url, grpc_port=0, verify_on_start=False, ledger_deny_delete=False))
    await gov.start()
    return gov


def _record(i: int) -> Record:
    return Record("placement.committed", f"w{i % 997}@site-{i % 11}", {
        "workload_id": f"w{i % 997}", "tenant_id": "bench", "unit_id": f"w{i % 997}@site-{i % 11}",
        "site_id": f"site-{i % 11}", "region": "eu", "gpu_type": "H100", "gpus": 4, "price_per_gpu_hour": 4.0,
        "at": 1.7e9 + i})


async def bench_append() -> None:
    async def run(bus: Bus, url: str) -> None:
        gov = await _governor(bus, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(gov.record([_record(i)], "bench") for i in range(N_APPEND)))
        dt = time.perf_counter() - t0
        print(f"ledger append, {N_APPEND} concurrent callers: {N_APPEND / dt:,.0f} entries/s ({dt:.2f} s)")
        lat = []
        t0 = time.perf_counter()
        for i in range(N_SEQUENTIAL):
            s = time.perf_counter()
            await gov.record([_record(i)], "bench")
            lat.append((time.perf_counter() - s) * 1e3)
        dt = time.perf_counter() - t0
        print(f"ledger append, one caller at a time: {N_SEQUENTIAL / dt:,.0f} entries/s, "
              f"latency p50 {pct(lat, 0.5):.2f} ms p99 {pct(lat, 0.99):.2f} ms")
        await gov.stop()

    await _with_nats(run)


async def bench_verify() -> None:
    async def run(bus: Bus, url: str) -> None:
        gov = await _governor(bus, url)
        t0 = time.perf_counter()
        for start in range(0, N_VERIFY, 10_000):
            await asyncio.gather(*(gov.record([_record(i)], "bench") for i in range(start, start + 10_000)))
        print(f"(filled {N_VERIFY} entries in {time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        entries = await gov.store.read_all()
        t_read = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = verify_chain(entries, await gov.store.read_head())
        t_check = time.perf_counter() - t1
        assert result.ok and result.entries_checked == N_VERIFY, result.issues[:3]
        print(f"ledger verify, {N_VERIFY} entries: {t_read + t_check:.2f} s "
              f"(read from JetStream {t_read:.2f} s, re-hash and check {t_check:.2f} s)")
        await gov.stop()

    await _with_nats(run)


async def bench_start() -> None:
    """Governance's start-up load (`Governor._load`, verification on as by default) of a ledger of
    N_VERIFY entries: without a checkpoint, from the checkpoint written at its end, and from one
    with CHECKPOINT_EVERY - 1 entries after it (the most a start reads past one)."""
    import logging
    import os

    from cncbrain.signing import ensure_signing_key

    every = Settings.model_fields["checkpoint_every"].default

    async def run(bus: Bus, url: str) -> None:
        with tempfile.TemporaryDirectory() as secrets:
            ensure_signing_key(Path(secrets))
            os.environ["CNC_SECRETS_DIR"] = secrets  # governance's signing key: checkpoints are signed

            def governor(checkpoint_every: int, on: Bus = bus) -> Governor:
                return Governor(on, Settings(nats_url=url, grpc_port=0, ledger_deny_delete=False,
                                              checkpoint_every=checkpoint_every))

            async def load(checkpoint_every: int) -> tuple[float, Governor]:
                gov = governor(checkpoint_every)
                await gov.store.ensure()
                t0 = time.perf_counter()
                await gov._load()
                return time.perf_counter() - t0, gov

            # writers on connections of their own: a stopped Governor leaves its durable consumers bound
            fill_bus = await Bus.connect(url, "bench-governance-fill")
            filler = governor(N_VERIFY, fill_bus)  # one checkpoint, when the ledger reaches N_VERIFY entries
            await filler.start()
            t0 = time.perf_counter()
            for start in range(0, N_VERIFY, 10_000):
                await asyncio.gather(*(filler.record([_record(i)], "bench") for i in range(start, start + 10_000)))
            print(f"(filled {N_VERIFY} entries in {time.perf_counter() - t0:.1f} s)")
            while filler._checkpointing is None or not filler._checkpointing.done():
                await asyncio.sleep(0.05)
            blob = await filler.store.read_checkpoint()
            assert blob and filler._checkpointed == N_VERIFY, filler._checkpointed
            head, seq = filler.head, filler.store.last_seq
            t0 = time.perf_counter()
            snapshot = filler.state.snapshot()
            t_snap = time.perf_counter() - t0
            t0 = time.perf_counter()
            encoded = encode_checkpoint(snapshot, head, seq, filler.signer, time.time())
            t_encode = time.perf_counter() - t0
            t0 = time.perf_counter()
            await filler.store.write_checkpoint(encoded)
            t_write = time.perf_counter() - t0
            print(f"checkpoint of the state at {N_VERIFY} entries ({len(filler.state.usage.allocations)} usage "
                  f"intervals): {len(encoded) / 1e6:.1f} MB; snapshot {t_snap:.2f} s (the writer waits for it), "
                  f"encode + sign {t_encode:.2f} s (a thread), store {t_write:.2f} s")
            await filler.stop()
            await fill_bus.close()
            logging.getLogger("services.governance.events").setLevel(logging.WARNING)
            full, a = await load(0)
            cp, b = await load(every)
            assert b.head == a.head and b.state.to_dict() == a.state.to_dict() and b._checkpointed == N_VERIFY
            print(f"governance start, {N_VERIFY} entries: folded from the start {full:.2f} s; "
                  f"from its checkpoint {cp:.2f} s")
            other = await Bus.connect(url, "bench-governance-extra")
            extra = governor(0, other)
            await extra.start()
            await asyncio.gather(*(extra.record([_record(i)], "bench") for i in range(N_VERIFY, N_VERIFY + every - 1)))
            await extra.stop()
            await other.close()
            full2, c = await load(0)
            cp2, d = await load(every)
            assert d.head == c.head and d.state.to_dict() == c.state.to_dict()
            print(f"governance start, {N_VERIFY + every - 1} entries: folded from the start {full2:.2f} s; "
                  f"from the checkpoint at {N_VERIFY} and {every - 1} entries after it {cp2:.2f} s")

    await _with_nats(run)


class _Deploy(scheduler_pb2_grpc.SchedulerServiceServicer):
    """The deploy call reduced to what governance adds to it: nothing, or the placement check."""

    def __init__(self, gate: GovernanceGate | None) -> None:
        self.gate = gate
        self.placements = [common.Placement(workload_id="svc", site_id=s, replicas=2, gpu_type="H100",
                                            gpus_per_unit=1) for s in ("ams", "fra", "par")]

    async def DeployInferenceService(self, request, context):
        if self.gate is not None:
            decision = self.gate.check("svc", request.service.tenant, self.placements)
            if not decision.ok:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, decision.message)
        return spb.DeployInferenceServiceResponse(workload=spb.Workload(workload_id="svc"))


def _gate() -> GovernanceGate:
    gate = GovernanceGate(bus=None, target=None)  # type: ignore[arg-type]
    view = _TenantView(quota=Quota({"H100": 512}, 1024, 10_000.0),
                       policy=PlacementPolicy(allowed_regions=frozenset({"eu"})), known=True)
    for w in range(50):  # a tenant already holding 50 workloads over 3 sites
        h = Holding(f"w{w}", {"H100": 2}, 8.0)
        for s in ("ams", "fra", "par"):
            h.placed[f"w{w}@{s}"] = Placement(f"w{w}", "acme", f"w{w}@{s}", s, "eu", "H100", 2, 4.0)
        view.holdings[f"w{w}"] = h
    gate.tenants["acme"] = view
    for s in ("ams", "fra", "par"):
        gate.sites[s] = ("eu", {"H100": 4.0})
    return gate


async def bench_auth() -> None:
    directory = TokenDirectory()
    token = ""
    for i in range(1000):
        t, rec = mint_token(Role.TENANT, "acme")
        directory.put(rec)
        if i == 500:
            token = t
    gate = _gate()
    interceptor = AuthInterceptor(directory)
    method = "/cnc.scheduler.v1.SchedulerService/DeployInferenceService"
    # In-process cost of the two checks.
    samples = []
    for _ in range(20_000):
        s = time.perf_counter()
        interceptor.authenticate(method, f"Bearer {token}")
        gate.check("svc", "acme", _Deploy(None).placements)
        samples.append((time.perf_counter() - s) * 1e6)
    print(f"in-process: token check + placement check p50 {pct(samples, 0.5):.1f} us, p99 {pct(samples, 0.99):.1f} us")

    async def serve(with_governance: bool):
        settings = ServiceSettings(grpc_port=0)
        servicer = _Deploy(gate if with_governance else None)
        return await start_grpc_server(
            settings, lambda srv: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, srv),
            ["cnc.scheduler.v1.SchedulerService"], interceptors=[interceptor] if with_governance else [])

    plain = await serve(False)
    guarded = await serve(True)
    request = spb.DeployInferenceServiceRequest(service=common.InferenceServiceSpec(name="chat", tenant="acme"))
    results: dict[str, list[float]] = {"without": [], "with": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}", interceptors=token_interceptors(token)) as c1, \
            grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}", interceptors=token_interceptors(token)) as c2:
        stubs = {"without": scheduler_pb2_grpc.SchedulerServiceStub(c1),
                 "with": scheduler_pb2_grpc.SchedulerServiceStub(c2)}
        for stub in stubs.values():  # warm up
            for _ in range(200):
                await stub.DeployInferenceService(request)
        # Alternate call by call, in random order, so machine noise lands on both sides alike.
        rng = random.Random(0)
        for _ in range(N_CALLS):
            names = list(stubs)
            rng.shuffle(names)
            for name in names:
                s = time.perf_counter()
                await stubs[name].DeployInferenceService(request)
                results[name].append((time.perf_counter() - s) * 1e3)
    await plain.stop(0)
    await guarded.stop(0)
    w, wo = results["with"], results["without"]
    print(f"deploy call over gRPC, {N_CALLS} each: without governance p50 {pct(wo, .5):.3f} ms p99 {pct(wo, .99):.3f} ms; "
          f"with auth + placement check p50 {pct(w, .5):.3f} ms p99 {pct(w, .99):.3f} ms")
    print(f"governance adds: p50 {pct(w, .5) - pct(wo, .5):+.3f} ms, p99 {pct(w, .99) - pct(wo, .99):+.3f} ms "
          f"(mean {statistics.mean(w) - statistics.mean(wo):+.3f} ms)")


BENCHES = {"append": bench_append, "verify": bench_verify, "start": bench_start, "auth": bench_auth}


def main(argv: list[str] | None = None) -> None:
    names = argv or list(BENCHES)
    for name in names:
        aio.run(BENCHES[name]())


if __name__ == "__main__":
    main(sys.argv[1:])
