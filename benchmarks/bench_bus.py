"""What one hop over the bus costs: round trips through a real nats-server between two processes
(this one and an echo process), three ways, back to back and with an idle gap before each:

- `raw`    the NATS text protocol over an asyncio socket (no client library): the server and the kernel
- `nats-py` plain nats-py publish / subscribe callback (what the client library adds)
- `bus`    `cncbrain.bus.Bus`: protobuf events with headers (type, id, traceparent, sent-at),
           decode, idempotency, consumer span (what the brain's bus layer adds)

A deploy crosses the bus four times in sequence (offer, answer, commit, placement), each way after
the process has waited for something else, so the "gap" column is the one that matters for
`bench_live latency`.

    python -m benchmarks.bench_bus [--n 300] [--gap-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cncbrain import aio, telemetry
from cncbrain.natsserver import NatsServer

MODES = ("raw", "nats-py", "bus")


async def _raw_connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    await r.readline()  # INFO
    w.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
    while (await r.readline()) != b"PONG\r\n":
        pass
    return r, w


async def _raw_read_msg(r: asyncio.StreamReader) -> None:
    while True:
        line = await r.readline()
        if line.startswith(b"MSG"):
            await r.readexactly(int(line.split()[-1]) + 2)
            return


async def _echo(mode: str, url: str) -> None:
    """Answer every message on `ping` with one on `pong`, the `mode` way."""
    if mode == "raw":
        r, w = await _raw_connect(url)
        w.write(b"SUB ping 1\r\n")
        while True:
            await _raw_read_msg(r)
            w.write(b"PUB pong 1\r\ny\r\n")
    elif mode == "nats-py":
        import nats

        nc = await nats.connect(url)

        async def cb(_msg) -> None:
            await nc.publish("pong", b"y")

        await nc.subscribe("ping", cb=cb)
    else:
        from cnc.site.v1 import events_pb2 as site_pb
        from cncbrain.bus import Bus, subjects

        bus = await Bus.connect(url, "bench-echo", ensure=False)

        async def on(_event) -> None:
            await bus.publish(subjects.SITE_ANSWERS, site_pb.OfferAnswers(round_id="r"), agent="echo", span=False)

        await bus.subscribe(subjects.SCHEDULER_OFFER, on, consumer="bench-echo")
    await asyncio.Event().wait()


async def _round_trips(mode: str, url: str, n: int, gap_s: float) -> list[float]:
    out: list[float] = []
    if mode == "raw":
        r, w = await _raw_connect(url)
        w.write(b"SUB pong 1\r\nPING\r\n")
        while (await r.readline()) != b"PONG\r\n":
            pass
        for _ in range(n):
            t = time.perf_counter()
            w.write(b"PUB ping 1\r\nx\r\n")
            await _raw_read_msg(r)
            out.append(time.perf_counter() - t)
            await asyncio.sleep(gap_s)
        w.close()
        return out
    loop = asyncio.get_running_loop()
    box: dict[str, asyncio.Future[None]] = {}
    if mode == "nats-py":
        import nats

        nc = await nats.connect(url)

        async def on_pong(_msg) -> None:
            box["f"].done() or box["f"].set_result(None)

        await nc.subscribe("pong", cb=on_pong)
        await nc.flush()
        for _ in range(n):
            box["f"] = loop.create_future()
            t = time.perf_counter()
            await nc.publish("ping", b"x")
            await box["f"]
            out.append(time.perf_counter() - t)
            await asyncio.sleep(gap_s)
        await nc.close()
        return out
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cncbrain.bus import Bus, subjects

    bus = await Bus.connect(url, "bench", ensure=False)

    async def on_answers(_event) -> None:
        box["f"].done() or box["f"].set_result(None)

    await bus.subscribe(subjects.SITE_ANSWERS, on_answers, consumer="bench-answers")
    for i in range(n):
        box["f"] = loop.create_future()
        t = time.perf_counter()
        await bus.publish(subjects.SCHEDULER_OFFER, spb.OfferRound(round_id=f"r{i}"), span=False)
        await box["f"]
        out.append(time.perf_counter() - t)
        await asyncio.sleep(gap_s)
    await bus.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--echo", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)  # the echo process
    a = ap.parse_args(argv)
    telemetry.setup("bench-bus", log_level="WARNING")  # as every process of the brain (no exporter)
    if a.echo:
        aio.run(_echo(*a.echo))
        return
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServer(Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        try:
            print(f"round trip through nats-server between two processes, p50 over {a.n} "
                  f"({aio.loop_name()} loop, nats-server from {nats.origin}):")
            for mode in MODES:
                echo = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_bus", "--echo", mode, nats.url])
                try:
                    time.sleep(1.5)
                    cells = []
                    for gap in (0.0, a.gap_ms / 1e3):
                        rt = aio.run(_round_trips(mode, nats.url, a.n + 20, gap))[20:]
                        cells.append(f"{statistics.median(rt) * 1e3:.3f} ms "
                                     + ("back to back" if gap == 0 else f"after {a.gap_ms:g} ms idle"))
                    print(f"  {mode:8s} {cells[0]:>28s}   {cells[1]:>28s}", flush=True)
                finally:
                    echo.terminate()
                    echo.wait(10)
        finally:
            nats.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
