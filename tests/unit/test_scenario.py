"""Scenario files: built-ins load by name; every kind of mistake names the file and the field."""

import pytest
import yaml

from cncbrain.errors import ScenarioError
from cncbrain.scenario import builtin_scenarios, load_scenario
from cncbrain.twin.sim import Twin


def _write(tmp_path, data, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _base():
    return yaml.safe_load(builtin_scenarios()["abilene"].read_text())


def test_builtins_load_by_name():
    assert {"abilene", "geant"} <= set(builtin_scenarios())
    sc = load_scenario("abilene")
    assert sc.name == "abilene" and len(sc.inference) == 2 and sc.failures


def test_unknown_key_is_named(tmp_path):
    data = _base()
    data["inference"][0]["replicas"] = 3
    p = _write(tmp_path, data)
    with pytest.raises(ScenarioError) as err:
        load_scenario(p)
    msg = str(err.value)
    assert str(p) in msg and "inference.0.replicas" in msg and "unknown key" in msg


def test_wrong_type_is_named(tmp_path):
    data = _base()
    data["tick_s"] = "fast"
    with pytest.raises(ScenarioError, match=r"tick_s: .*number"):
        load_scenario(_write(tmp_path, data))


def test_missing_required_key(tmp_path):
    data = _base()
    del data["topology"]
    with pytest.raises(ScenarioError, match="topology: required key is missing"):
        load_scenario(_write(tmp_path, data))


def test_unknown_gpu_model_and_trace(tmp_path):
    data = _base()
    data["sites"]["default"] = {"B300": 8}
    data["inference"][1]["trace"] = "tweets"
    with pytest.raises(ScenarioError) as err:
        load_scenario(_write(tmp_path, data))
    msg = str(err.value)
    assert "sites.default" in msg and "B300" in msg
    assert "inference.1.trace" in msg and "tweets" in msg


def test_unknown_site_in_overrides_or_failures(tmp_path):
    data = _base()
    data["failures"] = [{"site": "Atlantis", "at_s": 10, "duration_s": 10}]
    sc = load_scenario(_write(tmp_path, data))
    with pytest.raises(ScenarioError, match="failures.0.site: unknown site 'Atlantis'"):
        Twin(sc)


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ScenarioError, match="expected a mapping"):
        load_scenario(_write(tmp_path, "- a\n- b\n"))


def test_unknown_name_lists_builtins():
    with pytest.raises(ScenarioError, match="built-in: abilene"):
        load_scenario("no-such-scenario")


def test_min_above_max_replicas(tmp_path):
    data = _base()
    data["inference"][0]["min_replicas"] = 9
    data["inference"][0]["max_replicas"] = 3
    with pytest.raises(ScenarioError, match="min_replicas"):
        load_scenario(_write(tmp_path, data))
