"""`cncbrain up`, the client commands and `cncbrain demo` as a user runs them (subprocesses)."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cncbrain.commands.up import DEFAULT_BACKGROUND_NICE
from cncbrain.natsserver import free_port

from support.cli import cli, command

pytestmark = pytest.mark.integration


def wait_placed(address, wid, timeout=20.0, token=None):
    import asyncio

    import grpc

    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cncbrain.auth import token_interceptors

    async def poll():
        # `up` runs with auth on: the caller passes the operator token it wrote to the state folder.
        async with grpc.aio.insecure_channel(address, interceptors=token_interceptors(token)) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                w = (await stub.GetWorkload(spb.GetWorkloadRequest(workload_id=wid))).workload
                if w.state in (spb.WORKLOAD_STATE_PLACED, spb.WORKLOAD_STATE_RUNNING):
                    return True
                await asyncio.sleep(0.2)
        return False

    return asyncio.run(poll())


class Output:
    """A process's output lines, read by a thread (so the pipe never fills)."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self.proc = proc
        threading.Thread(target=lambda: [self.lines.append(x) for x in proc.stdout], daemon=True).start()

    def wait_for(self, text, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in x for x in self.lines):
                return True
            if self.proc.poll() is not None and not any(text in x for x in self.lines):
                time.sleep(0.2)
                return any(text in x for x in self.lines)
            time.sleep(0.05)
        return False

    def __str__(self):
        return "".join(self.lines)


def start_up(tmp_path, *extra):
    """`cncbrain up` with every port 0: each service binds a free port and reports it, so tests
    running beside each other (or another brain) never collide."""
    env = {**os.environ, "CNC_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([*command("up"), *(f"--{n}-port=0" for n in ("nats", "perception", "scheduler",
                                                                         "adaptation", "governance")),
                             "--state-dir", str(tmp_path / "state"), "--speed", "60", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: teardown reaches every child
    out = Output(proc)
    assert out.wait_for("Ctrl-C stops everything", 120), str(out)
    assert "healthy in" in str(out), str(out)
    endpoints = json.loads((tmp_path / "state" / "endpoints.json").read_text())
    return proc, env, endpoints, out


def stop_up(proc):
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def up(tmp_path):
    started = start_up(tmp_path)
    yield started
    stop_up(started[0])  # a failed test must not leave nats-server, services or agents behind


def test_up_serves_the_client_commands_and_stops_cleanly_on_sigterm(up):
    proc, env, endpoints, out = up
    text = str(out)
    assert endpoints["scheduler"] in text and "11 site agents registered" in text
    # each process's metrics endpoint, NATS monitoring, the web page and how the CLI finds the token
    for process in ("governance", "perception", "scheduler", "adaptation", "emulator", "agents"):
        assert re.search(rf"metrics     http://127\.0\.0\.1:\d+/metrics  \({process}\)", text), text
    assert re.search(r"NATS monitoring  http://127\.0\.0\.1:\d+/varz", text), text
    assert re.search(r"web page    http://127\.0\.0\.1:\d+/#token=tok_", text), text
    assert "(the CLI picks it up;" in text  # its state folder is $CNC_STATE_DIR
    # adaptation yields the CPU to the deploy path; the rest (the emulated sites apply placements) keep the default
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    nice = {Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[2].decode(): os.getpriority(os.PRIO_PROCESS, int(c))
            for c in children if Path(f"/proc/{c}/cmdline").read_bytes().count(b"\0") > 2}
    assert nice["services.adaptation"] == DEFAULT_BACKGROUND_NICE == 10, nice
    assert nice["services.scheduler"] == nice["services.perception"] == nice["cncbrain.commands.agent"] == 0, nice
    assert nice["cncbrain.commands.emulate"] == 0, nice
    sites = cli("sites", "--json", env=env)
    assert sites.returncode == 0, sites.stderr
    assert sites.stdout.count('"site_id"') == 11  # snake_case keys, as the protos name fields
    dep = cli("deploy", "--name", "chat", "--model", "7b", "--min-replicas", "2", env=env)
    assert dep.returncode == 0, dep.stderr
    wid = dep.stdout.split()[0]
    state = Path(env["CNC_STATE_DIR"])
    token = (state / "operator.token").read_text().strip()
    # the state folder (tokens, keys, the NATS store, logs) is its owner's alone
    assert state.stat().st_mode & 0o777 == 0o700 and (state / "operator.token").stat().st_mode & 0o077 == 0
    assert wait_placed(endpoints["scheduler"], wid, token=token)
    shown = cli("workloads", wid, env=env)
    assert '"replicas"' in shown.stdout and '"WORKLOAD_STATE_' in shown.stdout, shown.stdout
    bad = cli("deploy", "--name", "bad name", "--model", "7b", env=env)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "service.name" in bad.stderr
    # the workload template: carried as given, checked by the scheduler, NAME=VALUE split by the CLI
    sub = cli("submit", "--name", "ft", "--model", "1b", "--shards", "1", "--gpus-per-shard", "1", "--command",
              "python3", "--arg=-c", "--arg", "print(1)", "--env", "A=x=y", env=env)
    assert sub.returncode == 0, sub.stderr
    shown = cli("workloads", sub.stdout.split()[0], env=env)
    assert '"command": "python3"' in shown.stdout and '"-c"' in shown.stdout and '"value": "x=y"' in shown.stdout
    bad = cli("deploy", "--name", "t", "--model", "7b", "--command", "x", "--env", "CNC_SITE_ID=forged", env=env)
    assert bad.returncode == 1 and "service.template.env[0].name" in bad.stderr, bad.stderr
    bad = cli("deploy", "--name", "t", "--model", "7b", "--command", "x", "--env", "NOVALUE", env=env)
    assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr, bad.stderr
    # the workload's own events (rescales by the agents or adaptation may come first) until CANCELLED
    watcher = subprocess.Popen([*command("watch"), f"cnc.scheduler.workload.{wid}", "--json"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.5)  # the watcher subscribes before the event it waits for
        assert cli("cancel", wid, env=env).returncode == 0
        # a reader thread: select() on a buffered pipe misses lines already read into its buffer
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in watcher.stdout], daemon=True).start()
        seen, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            seen.append(line)
            if '"WORKLOAD_EVENT_KIND_CANCELLED"' in line:
                break
        assert any('"WORKLOAD_EVENT_KIND_CANCELLED"' in x for x in seen), "".join(seen)[-2000:]
    finally:
        watcher.kill()
        watcher.wait()
    # every process did all of the above within its NATS permissions (cncbrain.bus.permissions)
    nats_log = (Path(env["CNC_STATE_DIR"]) / "logs" / "nats.log").read_text()
    assert "Violation" not in nats_log, [x for x in nats_log.splitlines() if "Violation" in x][:5]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0 and out.wait_for("stopped.", 5)


def pids_of(parent, module):
    """`parent`'s children running `python -m module` (or the binary `module`)."""
    found = []
    for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        argv = Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")
        if module.encode() in argv[:3] or argv[0].endswith(module.encode()):
            found.append(int(c))
    return found


def pid_of(parent, module):
    """The pid of `parent`'s child running `python -m module` that is not a waiting spare (a spare
    has no socket open: no connection, no port)."""
    for pid in pids_of(parent, module):
        if any(os.readlink(fd).startswith("socket:") for fd in Path(f"/proc/{pid}/fd").iterdir()):
            return pid
    raise AssertionError(f"no child runs {module}")


def snapshot(endpoints, token):
    import asyncio

    import grpc

    from cnc.perception.v1 import perception_pb2 as ppb
    from cnc.perception.v1 import perception_pb2_grpc
    from cncbrain.auth import token_interceptors

    async def get():
        async with grpc.aio.insecure_channel(endpoints["perception"], interceptors=token_interceptors(token)) as ch:
            return (await perception_pb2_grpc.PerceptionServiceStub(ch).GetSnapshot(
                ppb.GetSnapshotRequest(), timeout=5)).snapshot

    return asyncio.run(get())


def replicas_after_a_restart(endpoints, token, sim_time_before, timeout=60.0):
    """Each service's replicas pool-wide, as the sites report them once every site's telemetry comes
    from an emulator restarted after `sim_time_before` (its emulated time starts again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = snapshot(endpoints, token)
        if snap.sim_time_s < sim_time_before:
            return {s.workload_id: s.replicas for s in snap.services}
        time.sleep(0.2)
    raise AssertionError(f"no telemetry from a restarted emulator within {timeout:.0f} s")


def dead_endpoints(state, timeout=30.0):
    """The addresses endpoints.json and prometheus.yml name that do not answer, once `timeout` has
    passed without all of them answering ([] as soon as they all do): `up` writes both again when a
    restarted process reports another port."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        ep = json.loads((state / "endpoints.json").read_text())
        targets = re.findall(r"targets: \['([^']+)'\]", (state / "prometheus.yml").read_text())
        urls = [*ep["metrics"].values(), f"{ep['nats_monitor']}/varz", ep["web"],
                *(f"http://{t}/metrics" for t in targets)]
        tcp = [ep[s] for s in ("perception", "scheduler", "adaptation", "governance")]
        tcp.append(ep["nats"].removeprefix("nats://"))
        dead = []
        for url in urls:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    pass
            except OSError:
                dead.append(url)
        for address in tcp:
            host, port = address.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except OSError:
                dead.append(address)
        if not dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.5)


def test_up_restarts_what_is_killed_and_serves_again(up):
    proc, env, endpoints, out = up
    token = (Path(env["CNC_STATE_DIR"]) / "operator.token").read_text().strip()
    deployed = {}
    for module, name in (("services.scheduler", "scheduler"), ("nats-server", "nats"),
                         ("cncbrain.commands.emulate", "emulator"), ("services.governance", "governance"),
                         ("cncbrain.commands.agent", "agents")):
        agents = pid_of(proc.pid, "cncbrain.commands.agent")
        sim_time = snapshot(endpoints, token).sim_time_s
        if name == "agents":  # the agents have a warm spare, which takes over
            deadline = time.monotonic() + 60
            while len(pids_of(proc.pid, module)) < 2:
                assert time.monotonic() < deadline, "no spare of the agents"
                time.sleep(0.2)
            spare = (set(pids_of(proc.pid, module)) - {agents}).pop()
        os.kill(pid_of(proc.pid, module), signal.SIGKILL)
        assert out.wait_for(f"{name} ended (signal SIGKILL); restarting it", 10), str(out)
        assert out.wait_for(f"agents: its spare took over (pid {spare})" if name == "agents"
                            else f"{name} started again", 20), str(out)
        if name == "emulator":
            # its sites come back as they were: what ran before runs on, and the agents go on
            replicas = replicas_after_a_restart(endpoints, token, sim_time)
            assert all(replicas.get(wid, 0) >= 1 for wid in deployed.values()), (replicas, deployed)
            assert pid_of(proc.pid, "cncbrain.commands.agent") == agents and "restarting agents" not in str(out)
        # the CLI retries (with its request id) while the brain comes back; then the deploy is placed
        dep = cli("deploy", "--name", f"after-{name}", "--model", "7b", env=env, timeout=90)
        assert dep.returncode == 0, (name, dep.stderr, str(out)[-3000:])
        deployed[name] = dep.stdout.split()[0]
        assert wait_placed(endpoints["scheduler"], deployed[name], timeout=60, token=token), name
        # what the files of the state folder name (client commands, Prometheus) is alive again
        assert dead_endpoints(Path(env["CNC_STATE_DIR"])) == [], name
    assert proc.poll() is None  # up kept running throughout

    # `up` itself killed with SIGKILL: it cannot stop its children, the kernel ends them
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(children) >= 7, children
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while (alive := [c for c in children if alive_pid(c)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, [Path(f"/proc/{c}/cmdline").read_bytes() for c in alive]
    # its endpoints.json is left behind; a client command says so instead of only "no brain answers"
    res = cli("workloads", env=env)
    assert res.returncode == 1 and f"is left from a `cncbrain up` (pid {proc.pid})" in res.stderr, res.stderr


def alive_pid(pid):
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_up_refuses_a_port_in_use_with_a_clear_message(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "CNC_STATE_DIR": str(tmp_path / "s")}
        res = cli("up", "--nats-port", str(port), "--perception-port", str(free_port()),
                  "--scheduler-port", str(free_port()), "--state-dir", str(tmp_path / "s"), env=env, full=True)
    assert res.returncode == 1
    assert f"nats {port}" in res.stderr and "in use" in res.stderr


def test_client_commands_say_when_no_brain_runs(tmp_path):
    env = {**os.environ, "CNC_STATE_DIR": str(tmp_path), "CNC_SCHEDULER_ADDR": f"127.0.0.1:{free_port()}"}
    res = cli("workloads", env=env)
    assert res.returncode == 1 and "cncbrain up" in res.stderr


@pytest.mark.smoke
def test_demo_runs_end_to_end_and_reports(tmp_path):
    env = {**os.environ, "CNC_STATE_DIR": str(tmp_path)}
    res = cli("demo", "--duration", "8", "--state-dir", str(tmp_path / "demo"), env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "closing report" in res.stdout and "SLO attainment: all services" in res.stdout
    assert "placements committed" in res.stdout


def test_up_refuses_a_background_nice_out_of_range(tmp_path):
    res = cli("up", "--state-dir", str(tmp_path / "state"), "--background-nice", "25",
              env={**os.environ, "CNC_STATE_DIR": str(tmp_path / "state")})
    assert res.returncode == 2 and "background nice 25: must be 0..19" in (res.stdout + res.stderr)


def test_bad_settings_of_the_loop_and_the_background_priority_get_a_clear_error(tmp_path):
    env = {**os.environ, "CNC_STATE_DIR": str(tmp_path / "state")}
    res = cli("up", "--state-dir", str(tmp_path / "state"), env={**env, "CNC_BACKGROUND_NICE": "abc"})
    assert res.returncode == 2 and "CNC_BACKGROUND_NICE: 'abc' is not a whole number 0..19" in res.stdout + res.stderr
    res = cli("sites", env={**env, "CNC_EVENT_LOOP": "bogus"})
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "CNC_EVENT_LOOP: 'bogus' is not one of uvloop, asyncio" in out
    assert "never awaited" not in out


def deploy_stream(endpoints, token, n, kill_at, kill):
    """`n` deploys one after another, each with its request id and retried as the CLI does;
    `kill()` runs before deploy number `kill_at`. Returns (accepted ids, every workload listed)."""
    import asyncio

    import grpc

    from cnc.common.v1 import common_pb2 as common
    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cncbrain.auth import token_interceptors
    from cncbrain.commands._live import call_retrying

    async def run():
        async with grpc.aio.insecure_channel(endpoints["scheduler"], interceptors=token_interceptors(token)) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            accepted = {}
            for i in range(n):
                if i == kill_at:
                    kill()
                spec = common.InferenceServiceSpec(name=f"s{i}", model="7b", params_b=7, min_replicas=1,
                                                   max_replicas=2, gpus_per_replica=1,
                                                   slo=common.SloTargets(ttft_ms=1000, tpot_ms=100))
                request = spb.DeployInferenceServiceRequest(service=spec, request_id=f"stream-{i}")
                w = (await call_retrying(lambda r=request: stub.DeployInferenceService(r, timeout=10), "deploy",
                                         window_s=60)).workload
                accepted[w.workload_id] = f"s{i}"
            listed = (await stub.ListWorkloads(spb.ListWorkloadsRequest(), timeout=10)).workloads
            return accepted, list(listed)

    return asyncio.run(run())


def test_with_standby_a_killed_active_scheduler_is_replaced_by_its_standby_losing_nothing(tmp_path):
    proc, env, endpoints, out = start_up(tmp_path, "--standby")
    try:
        logs = Path(env["CNC_STATE_DIR"]) / "logs"
        active = "scheduler" if "scheduler scheduler: active" in (logs / "scheduler.log").read_text() else "scheduler-2"
        standby = "scheduler-2" if active == "scheduler" else "scheduler"
        token = (Path(env["CNC_STATE_DIR"]) / "operator.token").read_text().strip()

        def kill():
            pid = int(next(c for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                           if f"CNC_SCHEDULER_INSTANCE={active}".encode() in Path(f"/proc/{c}/environ").read_bytes()))
            os.kill(pid, signal.SIGKILL)

        accepted, listed = deploy_stream(endpoints, token, 20, 6, kill)
        assert len(accepted) == 20
        mine = [w for w in listed if w.workload_id in accepted]
        assert len(mine) == 20 and len({w.inference_service.name for w in listed}) == len(listed)  # none lost, none twice
        # up reaped the active, so it freed the lease: the standby took it at once, not after the TTL
        assert out.wait_for(f"scheduler: freed the lease {active} held when it ended", 5), str(out)
        assert f"scheduler {standby}: active (the lease was free)" in (logs / f"{standby}.log").read_text()
        assert out.wait_for(f"{active} ended (signal SIGKILL); restarting it in 4 s", 5), str(out)
        assert out.wait_for(f"{active} started again", 15), str(out)
    finally:
        stop_up(proc)


def test_after_nats_dies_mid_deploy_every_accepted_workload_runs_or_failed_saying_why(up):
    """kill -9 of nats-server while deploys stream in: the CLI's way (request ids, retries) loses
    none, and reconciliation leaves none placed with nothing running."""
    import asyncio

    import grpc

    from cnc.scheduler.v1 import scheduler_pb2 as spb
    from cnc.scheduler.v1 import scheduler_pb2_grpc
    from cncbrain.auth import token_interceptors

    proc, env, endpoints, out = up
    token = (Path(env["CNC_STATE_DIR"]) / "operator.token").read_text().strip()
    accepted, listed = deploy_stream(endpoints, token, 24, 8,
                                     lambda: os.kill(pid_of(proc.pid, "nats-server"), signal.SIGKILL))
    assert len(accepted) == 24 and {w.workload_id for w in listed} >= set(accepted)  # none lost
    assert len({w.inference_service.name for w in listed}) == len(listed)  # none twice

    async def settled():
        settled = (spb.WORKLOAD_STATE_RUNNING, spb.WORKLOAD_STATE_FAILED)
        async with grpc.aio.insecure_channel(endpoints["scheduler"], interceptors=token_interceptors(token)) as ch:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
            deadline = time.monotonic() + 120
            while True:
                ws = {w.workload_id: w for w in (await stub.ListWorkloads(spb.ListWorkloadsRequest(), timeout=10)).workloads
                      if w.workload_id in accepted}
                if all(w.state in settled for w in ws.values()) or time.monotonic() > deadline:
                    return ws
                await asyncio.sleep(0.5)

    mine = asyncio.run(settled())
    stuck = {wid: (spb.WorkloadState.Name(w.state), w.message) for wid, w in mine.items()
             if w.state not in (spb.WORKLOAD_STATE_RUNNING, spb.WORKLOAD_STATE_FAILED)}
    assert not stuck, (stuck, str(out)[-2000:])
    assert all(w.message for w in mine.values() if w.state == spb.WORKLOAD_STATE_FAILED)


def test_two_ups_started_at_the_same_moment_do_not_collide(tmp_path):
    """Bind, then report: every port of both brains is bound by its service and reported, so two
    brains started together (two test runs, two users) each get their own."""
    import threading

    started: dict[str, tuple] = {}

    def run(name):
        started[name] = start_up(tmp_path / name)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    try:
        assert set(started) == {"a", "b"}
        ports = [{k: v for k, v in ep.items() if k in ("nats", "perception", "scheduler", "adaptation", "governance")}
                 for _, _, ep, _ in started.values()]
        assert not set(ports[0].values()) & set(ports[1].values()), ports
        for _, env, _, _ in started.values():
            res = cli("workloads", env=env)
            assert res.returncode == 0, res.stderr
    finally:
        for proc, *_ in started.values():
            stop_up(proc)


def test_up_with_nats_tls_serves_only_tls_and_admits_a_site_enrolled_while_it_runs(tmp_path):
    """`up --nats-tls`: every process connects over TLS (the brain comes up and places work); a
    plain client is refused; `sites enroll --key-out` into the running brain has its NATS server
    admit the new key at once, and the new site's agent (its own process, its own key) connects
    over TLS and counts with its enrolled terms — no restart of `up`."""
    from support.nats_probe import plain_exchange

    proc, env, endpoints, out = start_up(tmp_path, "--nats-tls")
    try:
        ca = endpoints["nats_tls_ca"]
        assert f"TLS, CA {ca}" in str(out)
        host, port = endpoints["nats"].removeprefix("nats://").split(":")
        info, answer = plain_exchange(host, int(port))
        assert info["tls_required"] and b"PONG" not in answer
        dep = cli("deploy", "--name", "chat", "--model", "7b", env=env)
        assert dep.returncode == 0, dep.stderr
        token = (Path(env["CNC_STATE_DIR"]) / "operator.token").read_text().strip()
        assert wait_placed(endpoints["scheduler"], dep.stdout.split()[0], token=token)
        watched = cli("watch", "--count", "1", "cnc.site.>", env=env, timeout=30)  # the CLI finds the CA itself
        assert watched.returncode == 0 and "cnc.site." in watched.stdout, watched.stderr

        site_dir = tmp_path / "edge-site"
        enrolled = cli("sites", "enroll", "edge", "--gpus", "H100=8@3.5", "--region", "us-east",
                       "--key-out", str(site_dir / "nats" / "site-edge.nk"), env=env)
        assert enrolled.returncode == 0, enrolled.stderr
        assert "admits the key now" in enrolled.stdout, enrolled.stdout
        assert out.wait_for("configuration reloaded", 5), str(out)
        agent_env = {**os.environ, "CNC_SECRETS_DIR": str(site_dir), "CNC_NATS_TLS_CA": ca}
        agent = subprocess.Popen([*command("agent"), "--site", "edge", "--executor", "memory", "--gpus", "H100:16",
                                  "--nats-url", endpoints["nats"], "--policy", "greedy"],
                                 env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline, edge = time.monotonic() + 30, None
            while edge is None and time.monotonic() < deadline and agent.poll() is None:
                listed = json.loads(cli("sites", "--json", env=env).stdout)
                edge = next((s for s in listed if s["site"]["site_id"] == "edge"), None)
                time.sleep(0.5)
            assert edge is not None, agent.stdout.read() if agent.poll() is not None else "edge never counted"
            assert [(p["gpu_type"], p["count"], p["price_usd_per_hour"]) for p in edge["site"]["gpu_pools"]] == [
                ("H100", 8, 3.5)]  # its enrolled terms, not the 16 it reports
        finally:
            agent.terminate()
            agent.wait(timeout=20)
        nats_log = (Path(env["CNC_STATE_DIR"]) / "logs" / "nats.log").read_text()
        assert "Violation" not in nats_log, [x for x in nats_log.splitlines() if "Violation" in x][:5]
    finally:
        stop_up(proc)
