"""Topology Zoo networks: latency from great-circle distance, link speeds, routing, and nodes
without coordinates."""

import logging

import numpy as np
import pytest

from cncbrain.scenario import load_scenario
from cncbrain.twin.topology import FIBRE_S_PER_KM, great_circle_km, link_speed_gbps, load_graphml


def _builtin(name):
    return load_scenario(name).graphml_path()


def test_abilene_has_11_sites_and_symmetric_shortest_paths():
    net = load_graphml(_builtin("abilene"), 10.0, 0.5e-3)
    assert net.size == 11 and "New York" in net.names
    assert np.allclose(net.latency_s, net.latency_s.T)
    assert np.all(np.diag(net.latency_s) == 0)
    off = ~np.eye(11, dtype=bool)
    assert np.all(net.latency_s[off] > 0) and np.all(np.isfinite(net.latency_s))
    ny, la = net.names.index("New York"), net.names.index("Los Angeles")
    direct_km = great_circle_km(net.lat[ny], net.lon[ny], net.lat[la], net.lon[la])
    # a routed path is never shorter than the great circle, and coast to coast is tens of ms
    assert net.latency_s[ny, la] >= direct_km * FIBRE_S_PER_KM
    assert 0.015 < net.latency_s[ny, la] < 0.05
    # Abilene links are OC-192: 192 × 51.84 Mb/s
    assert net.bandwidth_gbps[ny, la] == pytest.approx(192 * 0.05184)


def test_geant_link_speeds_come_from_graphml():
    net = load_graphml(_builtin("geant"), 1.0, 0.5e-3)
    assert net.size == 34
    speeds = {round(b, 3) for _, _, _, b in net.links}
    assert 10.0 in speeds and len(speeds) > 1  # several tiers, none defaulted to 1 Gb/s everywhere


def test_link_speed_parsing():
    assert link_speed_gbps({"LinkSpeedRaw": 2.5e9}, 10) == 2.5
    assert link_speed_gbps({"LinkSpeed": "155", "LinkSpeedUnits": "M"}, 10) == pytest.approx(0.155)
    assert link_speed_gbps({"LinkType": "OC-48"}, 10) == pytest.approx(48 * 0.05184)
    assert link_speed_gbps({}, 7.0) == 7.0


GRAPHML = """<?xml version="1.0" encoding="utf-8"?>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
  <key attr.name="Latitude" attr.type="double" for="node" id="d1"/>
  <key attr.name="Longitude" attr.type="double" for="node" id="d2"/>
  <key attr.name="label" attr.type="string" for="node" id="d3"/>
  <graph edgedefault="undirected">
    <node id="0"><data key="d1">48.85</data><data key="d2">2.35</data><data key="d3">Paris</data></node>
    <node id="1"><data key="d1">52.52</data><data key="d2">13.40</data><data key="d3">Berlin</data></node>
    <node id="2"><data key="d3">Nowhere</data></node>
    <node id="3"><data key="d3">Island</data></node>
    <edge source="0" target="1"/>
    <edge source="1" target="2"/>
  </graph>
</graphml>
"""


def test_nodes_without_coordinates_are_placed_or_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "tiny.graphml"
    path.write_text(GRAPHML)
    with caplog.at_level(logging.WARNING):
        net = load_graphml(path, 10.0, 0.5e-3)
    assert net.names == ["Paris", "Berlin", "Nowhere"]  # Island had no coordinates and no neighbour
    assert net.lat[2] == pytest.approx(52.52)  # placed at its only located neighbour
    text = caplog.text
    assert "Nowhere" in text and "placed" in text
    assert "Island" in text and "dropped" in text


def test_cogent_with_missing_coordinates_loads():
    from importlib import resources

    path = resources.files("cncbrain") / "data" / "topologyzoo" / "Cogentco.graphml"
    net = load_graphml(str(path), 10.0, 0.5e-3)
    assert 186 <= net.size <= 197
    assert not np.isnan(net.lat).any()
