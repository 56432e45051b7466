"""`cncbrain eval`, `scenarios` and `bench twin` as a user runs them (a real subprocess)."""

import json
import subprocess
import sys

from cncbrain.evaluate import METRICS


def cnc(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cncbrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_eval_writes_table_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = cnc("eval", "--scenario", "abilene", "--policy", "greedy,kpa,oracle", "--seeds", "2", "--hours", "0.2",
            "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "greedy" in r.stdout and "slo_attainment" in r.stdout
    data = json.loads(out.read_text())
    assert data["scenario"] == "abilene"
    assert set(data["policies"]) == {"greedy", "kpa", "oracle"}
    for entry in data["policies"].values():
        assert set(entry) == {*METRICS, "per_seed"}
        assert [s["seed"] for s in entry["per_seed"]] == [0, 1]
    assert data["policies"]["oracle"]["score"] >= data["policies"]["kpa"]["score"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_eval_unknown_policy_fails_with_the_list():
    r = cnc("eval", "--policy", "greedy,telepathy", "--hours", "0.1", "--seeds", "1")
    assert r.returncode != 0
    assert "unknown policy 'telepathy'" in r.stderr and "least-loaded" in r.stderr


def test_eval_bad_scenario_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntopology: {graphml: Abilene.graphml}\ntick_s: -5\n")
    r = cnc("eval", "--scenario", str(bad), "--seeds", "1")
    assert r.returncode != 0
    assert str(bad) in r.stderr and "tick_s" in r.stderr


def test_scenarios_lists_the_builtins():
    r = cnc("scenarios")
    assert r.returncode == 0
    assert "abilene" in r.stdout and "geant" in r.stdout and ".yaml" in r.stdout


def test_bench_twin_prints_speed():
    r = cnc("bench", "twin", "--scenario", "abilene", "--hours", "0.1")
    assert r.returncode == 0, r.stderr
    assert "abilene" in r.stdout and "×" in r.stdout


def test_eval_suite_smoke_end_to_end(tmp_path):
    out, png = tmp_path / "deep" / "s.json", tmp_path / "deep" / "s.png"
    r = cnc("eval", "--suite", "smoke", "--policy", "greedy,least-loaded,oracle", "--workers", "2",
            "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "edge-9002" in r.stdout and "zoo-9000" in r.stdout and "best on" in r.stdout
    data = json.loads(out.read_text())
    assert data["suite"] == "smoke" and data["seeds"] == 1 and data["hours"] == 0.25
    assert set(data["policies"]) == {"greedy", "least-loaded", "oracle"}
    for name, entry in data["policies"].items():
        assert set(METRICS) <= set(entry) and set(entry["std"]) == set(METRICS)
        assert (entry["best_share"] is None) == (name == "oracle")
    assert sum(data["policies"][p]["best_share"] for p in ("greedy", "least-loaded")) >= 1.0
    assert [(s["family"], s["seed"]) for s in data["scenarios"]] == [("edge", 9002), ("zoo", 9000)]
    for s in data["scenarios"]:
        assert s["best_baseline"] in ("greedy", "least-loaded")
        assert s["policies"]["oracle"]["score"] >= s["policies"][s["best_baseline"]]["score"]
        assert [x["seed"] for x in s["policies"]["greedy"]["per_seed"]] == [s["seed"]]  # the scenario's own seed
    assert set(data["families"]) == {"edge", "zoo"}
    assert data["families"]["edge"]["policies"][data["scenarios"][0]["best_baseline"]]["gap_closed"] == 0.0
    assert png.read_bytes()[:4] == b"\x89PNG"

    # a new policy against the stored runs: only it runs, the table and JSON hold all of them
    both = tmp_path / "both.json"
    r = cnc("eval", "--suite", "smoke", "--policy", "kpa,greedy", "--workers", "1", "--with", str(out),
            "--json", str(both))
    assert r.returncode == 0, r.stderr
    merged = json.loads(both.read_text())
    assert list(merged["policies"]) == ["least-loaded", "oracle", "kpa", "greedy"]
    assert "4 episodes" in r.stdout  # kpa and greedy on two scenarios; the stored ones not again
    for old, new in zip(data["scenarios"], merged["scenarios"], strict=True):
        assert new["policies"]["oracle"]["score"] == old["policies"]["oracle"]["score"]
        assert new["policies"]["greedy"]["score"] == old["policies"]["greedy"]["score"]  # deterministic twin
    # a file of another suite, or another horizon, is refused with the field named
    r = cnc("eval", "--suite", "smoke", "--policy", "kpa", "--hours", "0.1", "--with", str(out))
    assert r.returncode == 2 and "hours" in r.stderr
    r = cnc("eval", "--scenario", "abilene", "--policy", "kpa", "--with", str(out))
    assert r.returncode == 2 and "--suite" in r.stderr


def test_scenarios_generate_and_errors(tmp_path):
    out = tmp_path / "a" / "e.yaml"
    r = cnc("scenarios", "generate", "--family", "edge", "--seed", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r2 = cnc("scenarios", "generate", "--family", "edge", "--seed", "3")
    assert r2.stdout == out.read_text() and "name: edge-3" in r2.stdout
    r = cnc("scenarios", "families")
    assert r.returncode == 0 and "continental" in r.stdout
    for args, listed in [(("scenarios", "generate", "--family", "nope", "--seed", "1"), "edge"),
                         (("scenarios", "generate", "--family", "edge", "--seed", "-4"), "2147483647"),
                         (("eval", "--suite", "nope"), "smoke"),
                         (("eval", "--scenario", "family:nope:1"), "edge")]:
        r = cnc(*args)
        assert r.returncode == 2 and listed in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
