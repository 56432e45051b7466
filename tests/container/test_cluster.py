"""deploy/docker-compose.yml + docker-compose.cluster.yml for real: three JetStream nodes with the
brain's streams and KV buckets in 3 replicas, routes between them over TLS with both sides'
certificates checked (a plain route is refused). One node is stopped while deployments keep
coming: the brain keeps accepting them, none that it accepted is lost, no site is marked down for
it (perception takes the agents' silence during their failover for the bus), and the node rejoins
and catches up. The scheduler and governance run as active-standby pairs behind one address: the
active scheduler's container killed for good (`podman kill`: no restart), the standby takes over
by the lease's timeout; the active governance's process killed (its container restarts it), one of
the two serves again; deployments sent meanwhile (retried with their request ids, as the CLI does)
are each accepted once and placed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from agents.executor_emulated import slug
from cnc.scheduler.v1 import scheduler_pb2 as spb
from cnc.scheduler.v1 import scheduler_pb2_grpc
from cncbrain.scenario import load_scenario

from support.brain_client import (
    PlacementWatch,
    connect,
    deploy,
    monitor,
    scheduler_channel,
    wait_state,
)
from support.compose_stack import Stack, podman, why_no_cluster

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

PLACED = {spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING}
# The node every service names as its server: losing it forces them all to fail over.
VICTIM = "nats"


async def brain_streams(servers: list[str], kit) -> list:
    nc = await connect(servers, kit)
    try:
        infos = await nc.jetstream().streams_info()
    finally:
        await nc.close()
    return [s for s in infos if s.config.name.startswith(("CNC_", "KV_cnc-"))]


async def wait_until(check, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await check()
            if result:
                return result
        except Exception as exc:  # a node still starting answers with errors
            last = exc
        else:
            last = None
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f} s (last error: {last!r})")
        await asyncio.sleep(0.5)


class SiteStates:
    """Every site state change perception publishes, from now on."""

    def __init__(self) -> None:
        self.down: list[str] = []
        self._nc = None

    async def start(self, servers: list[str], kit) -> SiteStates:
        from cnc.common.v1 import common_pb2 as common
        from cnc.perception.v1 import perception_pb2 as ppb

        self._nc = await connect(servers, kit)

        async def on_msg(msg) -> None:
            change = ppb.SiteStateChanged.FromString(msg.data)
            if change.state == common.SITE_STATE_DOWN:
                self.down.append(f"{change.site_id}: {change.reason}")

        await self._nc.subscribe("cnc.perception.site_state.>", cb=on_msg)
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


PLAIN_ROUTE = """
import json, socket
s = socket.create_connection(("nats-2", 6222), timeout=30)
s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"stranger"}\\r\\nPING\\r\\n')
answer = b""
try:
    while chunk := s.recv(4096):
        answer += chunk
except OSError:
    pass
print(json.dumps({"answer": answer.decode(errors="replace")}))
"""


def check_route_tls(stack: Stack) -> None:
    """Every node's routes are TLS with verification; a route without TLS, tried from inside the
    compose network against nats-2's route port, is closed without a word (the node waits for a
    TLS handshake first, and times it out)."""
    for node in (1, 2, 3):
        cluster = monitor(stack.monitor(node), "/varz")["cluster"]
        assert cluster.get("tls_required") and cluster.get("tls_verify"), (node, cluster)
    tried = json.loads(stack.exec("nats", "python3", "-c", PLAIN_ROUTE))
    assert tried["answer"] == "", tried  # no INFO, no PONG: nothing in the clear
    assert "TLS route handshake error" in stack.logs("nats-2"), "nats-2 did not log the refused plain route"


async def active_instance(servers: list[str], kit, role: str) -> str:
    """The instance holding `role`'s lease (`cncbrain.lease`: bucket cnc-lease-ROLE, key active)."""
    nc = await connect(servers, kit)
    try:
        entry = await (await nc.jetstream().key_value(f"cnc-lease-{role}")).get("active")
        return json.loads(entry.value)["instance"]
    finally:
        await nc.close()


async def fail_over(stack: Stack, kit, stub, watch, role: str, how: str) -> list[str]:
    """Kill `role`'s active instance (`how`: `podman kill`, no restart; or SIGKILL of its process,
    restarted by its policy) during a stream of deployments; all are accepted and placed."""
    killed = await active_instance(stack.nats_urls, kit, role)
    assert killed in (f"{role}-1", f"{role}-2"), killed
    started = time.monotonic()
    if how == "podman kill":
        podman("kill", stack.container(killed))
    else:
        os.kill(int(podman("inspect", "--format", "{{.State.Pid}}", stack.container(killed))), signal.SIGKILL)
    names = [f"{role}-failover-{i}" for i in range(4)]
    accepted = [await deploy(stub, name, retry_s=60) for name in names]
    await watch.wait_for(set(accepted), timeout_s=60)
    now = await active_instance(stack.nats_urls, kit, role)
    print(f"{role}: {killed} killed ({how}); {now} active, 4 deployments accepted and placed in "
          f"{time.monotonic() - started:.1f} s")
    if how == "podman kill":
        assert now != killed, f"the standby of {role} did not take over"
    listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest(), timeout=10)).workloads
    mine = [w.inference_service.name for w in listed if w.inference_service.name in names]
    assert sorted(mine) == sorted(names), f"lost or duplicated: {mine}"
    return accepted


async def test_cluster_survives_node_loss(image, log_dir, tmp_path):
    if reason := why_no_cluster():
        pytest.skip(reason)
    stack = Stack(image, clustered=True, log_dir=log_dir)
    watch = PlacementWatch()
    try:
        started = time.monotonic()
        stack.up()
        stack.wait_healthy()
        print(f"{stack.project}: 3-node cluster stack up and healthy in {time.monotonic() - started:.1f} s")
        for node in (1, 2, 3):
            meta = monitor(stack.monitor(node), "/jsz")["meta_cluster"]
            assert meta["cluster_size"] == 3, meta
        check_route_tls(stack)
        kit = stack.operator_kit(tmp_path / "operator")

        async def created():
            streams = await brain_streams(stack.nats_urls, kit)
            names = {s.config.name for s in streams}
            return streams if names >= {"CNC_WORKLOADS", "CNC_PLACEMENTS", "KV_cnc-workloads"} else None

        streams = await wait_until(created, "the brain's streams", 30)
        replicas = {s.config.name: s.config.num_replicas for s in streams}
        assert replicas == dict.fromkeys(replicas, 3), (
            f"streams not in 3 replicas: {replicas} (cncbrain.bus must create them with CNC_NATS_REPLICAS)"
        )

        await watch.start(stack.nats_urls, kit)
        accepted: list[str] = []
        async with scheduler_channel(stack.scheduler, stack.operator_token()) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            # Deploys retry as the CLI does (the same request id, while UNAVAILABLE): what a client
            # sees is then a delay at most; what the brain answered on the way is printed.
            retried: list[str] = []
            for i in range(3):
                accepted.append(await deploy(stub, f"before-{i}", retried=retried))

            site_states = await SiteStates().start(stack.nats_urls, kit)
            stack.stop(VICTIM)
            down_at = time.monotonic()
            during = []
            for i in range(8):
                # While streams elect new leaders a call may take longer; it must not fail.
                during.append(await deploy(stub, f"during-{i}", timeout_s=30, retried=retried))
            # Not only accepted: placed by the agents over the two remaining nodes.
            await watch.wait_for(set(during), timeout_s=60)
            accepted += during
            print(f"8 deployments accepted and placed in {time.monotonic() - down_at:.1f} s with {VICTIM} down")

            stack.start(VICTIM)
            await wait_until(lambda: asyncio.to_thread(stack.healthy, VICTIM), f"{VICTIM} healthy again", 90)
            for i in range(3):
                accepted.append(await deploy(stub, f"after-{i}", retried=retried))
            print(f"answers retried while {VICTIM} was away and back: {len(retried)}"
                  + "".join(f"\n    {r}" for r in retried[:10]))

            await watch.wait_for(set(accepted), timeout_s=120)
            listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest(), timeout=10)).workloads
            assert set(accepted) <= {w.workload_id for w in listed}
            names = [w.inference_service.name for w in listed if w.workload_id in set(accepted)]
            assert len(names) == len(set(names)) == len(accepted), f"duplicated: {sorted(names)}"
            for workload_id in accepted:
                await wait_state(stub, workload_id, PLACED)
            # Only a NATS node died: no site was taken for down (perception waits out a mass silence).
            # The scenario's own outages are real ones (abilene fails Chicago 1500 s into its
            # emulated time, 50 s after the emulator started at ×30): a slow run reaches them.
            await site_states.close()
            scheduled = {slug(f.site) for f in load_scenario("abilene").failures}
            down = [d for d in site_states.down if d.split(":")[0] not in scheduled]
            assert not down, f"sites marked down while only a NATS node was away: {down}"

            # The single-writer services' pairs: one address, whichever instance is active.
            accepted += await fail_over(stack, kit, stub, watch, "scheduler", "podman kill")
            accepted += await fail_over(stack, kit, stub, watch, "governance", "SIGKILL")


        # Rejoined: routes to both peers, and every replica of the brain's streams current again.
        routez = monitor(stack.monitor(1), "/routez")
        assert routez["num_routes"] >= 2, routez

        async def all_current():
            streams = await brain_streams(stack.nats_urls, kit)
            return all(
                s.cluster and len(s.cluster.replicas or []) == 2 and all(r.current for r in s.cluster.replicas)
                for s in streams
            )

        await wait_until(all_current, "all stream replicas current", 60)
    except BaseException:
        print(f"stack logs: {log_dir}")
        raise
    finally:
        await watch.close()
        stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}
