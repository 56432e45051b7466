#!/usr/bin/env python3
"""Health checks of the brain's containers (the HEALTHCHECK commands of deploy/docker-compose.yml).
Installed in the image as `cnc-healthcheck`; exit 0 when healthy, 1 with the reason on stderr.

    cnc-healthcheck grpc HOST:PORT   the process's standard gRPC health service answers SERVING
    cnc-healthcheck emulator         the emulator answers an inventory request for every site of
                                     $CNC_SCENARIO (over NATS at $CNC_NATS_URL, as the emulator's
                                     own identity when $CNC_SECRETS_DIR holds it, over TLS with
                                     $CNC_NATS_TLS_CA)
    cnc-healthcheck sites            perception ($CNC_PERCEPTION_ADDR) lists every site of
                                     $CNC_SCENARIO as up: the site agents registered and beat
                                     (with the token of $CNC_TOKEN / $CNC_TOKEN_FILE, if any)
    cnc-healthcheck snapshot ID      the same from perception's next snapshot, heard over NATS as
                                     the identity ID (the site agents' own): no API token needed

The same words a user would check with `cncbrain sites`; nothing here is only for containers.
"""

from __future__ import annotations

import asyncio
import os
import sys

TIMEOUT_S = 3.0


def scenario_sites() -> list[str]:
    from agents.executor_emulated import site_ids_of
    from cncbrain.scenario import load_scenario

    return site_ids_of(load_scenario(os.environ.get("CNC_SCENARIO", "abilene")))


async def check_grpc(target: str) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


async def check_emulator() -> str | None:
    from cnc.site.v1 import events_pb2 as site_pb
    from cncbrain.bus import Bus, subjects

    bus = await Bus.connect(os.environ.get("CNC_NATS_URL", "nats://nats:4222"), "healthcheck",
                            ensure=False, timeout_s=TIMEOUT_S, identity="emulator")
    try:
        for sid in scenario_sites():
            await bus.request(subjects.EMULATOR_INVENTORY, site_pb.EmulatorInventoryRequest(site_id=sid),
                              site_pb.EmulatorInventoryResponse, timeout_s=TIMEOUT_S, site=sid)
    finally:
        await bus.close()
    return None


async def check_sites() -> str | None:
    import grpc

    from cnc.common.v1 import common_pb2 as common
    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc
    from cncbrain.auth import load_token, token_interceptors

    target = os.environ.get("CNC_PERCEPTION_ADDR", "perception:50061")
    interceptors = token_interceptors(load_token(required=False))  # perception may check tokens
    async with grpc.aio.insecure_channel(target, interceptors=interceptors) as channel:
        stub = perception_pb2_grpc.PerceptionServiceStub(channel)
        listed = (await stub.ListSites(ppb.ListSitesRequest(), timeout=TIMEOUT_S)).sites
    up = {s.site.site_id for s in listed if s.state == common.SITE_STATE_UP}
    missing = sorted(set(scenario_sites()) - up)
    return f"sites not up: {', '.join(missing)}" if missing else None


async def check_snapshot(identity: str) -> str | None:
    from cnc.common.v1 import common_pb2 as common
    from cncbrain.bus import Bus, subjects

    bus = await Bus.connect(os.environ.get("CNC_NATS_URL", "nats://nats:4222"), "healthcheck",
                            ensure=False, timeout_s=TIMEOUT_S, identity=identity)
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on(event) -> None:
        if not got.done():
            got.set_result(event.payload)

    try:
        await bus.subscribe(subjects.PERCEPTION_SNAPSHOT, on, consumer="healthcheck")
        snap = await asyncio.wait_for(got, 2 * TIMEOUT_S)  # perception sends one every tick (1 s)
    finally:
        await bus.close()
    up = {s.site.site_id for s in snap.sites if s.state == common.SITE_STATE_UP}
    missing = sorted(set(scenario_sites()) - up)
    return f"sites not up: {', '.join(missing)}" if missing else None


def main(argv: list[str]) -> int:
    checks = {
        "grpc": lambda: check_grpc(argv[1]),
        "emulator": check_emulator,
        "sites": check_sites,
        "snapshot": lambda: check_snapshot(argv[1]),
    }
    if not argv or argv[0] not in checks or (argv[0] in ("grpc", "snapshot") and len(argv) != 2):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        problem = asyncio.run(asyncio.wait_for(checks[argv[0]](), timeout=3 * TIMEOUT_S))
    except Exception as exc:  # any failure to get an answer is "unhealthy", with its reason
        code, details = getattr(exc, "code", None), getattr(exc, "details", None)
        if callable(code) and callable(details):  # a gRPC error: its status says it all
            problem = f"{code().name}: {details()}"
        else:
            problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
