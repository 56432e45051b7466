"""Supervision: a child that ends is restarted (at once, then after growing pauses), its dependents
with it; one that keeps crashing, or cannot listen on its port, stops the supervisor with a message."""

import subprocess
import sys
import time

import pytest

from cncbrain.supervise import EXIT_PORT_IN_USE, GaveUp, Supervisor


def python(code):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def poll_until(sup, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.poll()
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met")


def test_a_killed_child_is_restarted_and_its_dependents_with_it():
    lines = []
    sup = Supervisor(say=lines.append)
    sup.add("emulator", python("import time; time.sleep(60)"), dependents=("agents",))
    sup.add("agents", python("import time; time.sleep(60)"))
    sup.start_all()
    try:
        first, agents = sup.children["emulator"].proc.pid, sup.children["agents"].proc.pid
        sup.children["emulator"].proc.kill()
        poll_until(sup, lambda: all(c.proc is not None and c.proc.pid not in (first, agents)
                                    for c in sup.children.values()))
        assert lines[0] == "emulator ended (signal SIGKILL); restarting it (1 of 5 allowed within 60 s)"
        assert "restarting agents too (it depends on emulator)" in lines
        assert sup.children["emulator"].restarts == 1 and sup.children["agents"].restarts == 1
    finally:
        sup.stop([])


def test_a_child_that_keeps_crashing_stops_the_supervisor_with_its_name_and_log(tmp_path):
    lines = []
    log = tmp_path / "perception.log"

    def start():
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-c", "import sys; print('cannot reach NATS'); sys.exit(3)"],
                                    stdout=out)

    sup = Supervisor(max_crashes=3, window_s=120, say=lines.append)
    sup.add("perception", start, log)
    sup.start_all()
    with pytest.raises(GaveUp, match="perception ended 3 times within 120 s \\(last: exit status 3\\)") as err:
        poll_until(sup, lambda: False)
    assert "cannot reach NATS" in str(err.value)  # its last log lines
    assert lines[0] == ("perception ended (exit status 3: cannot reach NATS); restarting it "
                        "(1 of 3 allowed within 120 s)")
    assert lines[1].startswith("perception started again (pid ")
    assert lines[2] == ("perception ended (exit status 3: cannot reach NATS); restarting it in 0.25 s "
                        "(2 of 3 allowed within 120 s)")


def test_a_child_that_cannot_listen_is_not_restarted():
    sup = Supervisor()
    sup.add("governance", python(f"import sys; sys.exit({EXIT_PORT_IN_USE})"))
    sup.start_all()
    with pytest.raises(GaveUp, match="governance cannot listen on its port"):
        poll_until(sup, lambda: False)
    assert sup.children["governance"].restarts == 0
