"""Wide-area networks from Topology Zoo GraphML (or from sites and links given inline): one site per node, link latency from great-circle
distance (5 µs per km of fibre) plus a per-hop constant, link bandwidth from the GraphML speed where
given, shortest-path (by latency) routing between every pair of sites.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

log = logging.getLogger(__name__)

FIBRE_S_PER_KM = 5e-6
"""Light in fibre: about 5 µs per km (refractive index ≈ 1.47)."""
EARTH_RADIUS_KM = 6371.0


@dataclass
class Network:
    """Pairwise paths between the sites of a topology (site order = `names`)."""

    names: list[str]
    lat: np.ndarray
    lon: np.ndarray
    country: list[str]
    latency_s: np.ndarray
    """One-way latency of the shortest path, [S, S]."""
    bandwidth_gbps: np.ndarray
    """Bottleneck bandwidth along that path, [S, S] (inf on the diagonal)."""
    hops: np.ndarray
    links: list[tuple[int, int, float, float]]
    """Physical links: (a, b, one-way latency s, bandwidth Gb/s)."""

    @property
    def size(self) -> int:
        return len(self.names)


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


_OC = re.compile(r"OC-?(\d+)", re.IGNORECASE)


def link_speed_gbps(attrs: dict, default_gbps: float) -> float:
    """GraphML link speed: `LinkSpeedRaw` (bit/s), `LinkSpeed`+`LinkSpeedUnits`, or a SONET
    `OC-n` label (n × 51.84 Mb/s); else the scenario default."""
    raw = attrs.get("LinkSpeedRaw")
    if raw:
        try:
            return float(raw) / 1e9
        except (TypeError, ValueError):
            pass
    if attrs.get("LinkSpeed"):
        unit = {"G": 1.0, "M": 1e-3, "K": 1e-6, "T": 1e3}.get(str(attrs.get("LinkSpeedUnits", "G")).upper(), 1.0)
        try:
            return float(attrs["LinkSpeed"]) * unit
        except ValueError:
            pass
    for key in ("LinkType", "LinkLabel"):
        m = _OC.search(str(attrs.get(key, "")))
        if m:
            return int(m.group(1)) * 51.84e-3
    return default_gbps


def load_graphml(path: str | Path, default_bandwidth_gbps: float = 10.0, per_hop_s: float = 0.5e-3) -> Network:
    """Read a Topology Zoo GraphML file into a `Network`.

    Nodes without coordinates are placed at the mean position of their located neighbours (with a
    warning); a node with no located neighbour is dropped (with a warning). Parallel edges of a
    multigraph collapse to the fastest one. Disconnected parts are kept reachable only within
    themselves (infinite latency between parts), never a crash.
    """
    path = Path(path)
    g = nx.read_graphml(path)
    g = nx.Graph(g) if g.is_multigraph() else g
    pos: dict[str, tuple[float, float]] = {}
    for n, d in g.nodes(data=True):
        if d.get("Latitude") is not None and d.get("Longitude") is not None:
            pos[n] = (float(d["Latitude"]), float(d["Longitude"]))
    missing = [n for n in g.nodes if n not in pos]
    for _ in range(3):  # neighbours of neighbours may be placed in a later pass
        for n in list(missing):
            located = [pos[m] for m in g.neighbors(n) if m in pos]
            if located:
                pos[n] = (float(np.mean([p[0] for p in located])), float(np.mean([p[1] for p in located])))
                log.warning("%s: node %s (%s) has no coordinates; placed at its neighbours' mean",
                            path.name, n, g.nodes[n].get("label", "?"))
                missing.remove(n)
    for n in missing:
        log.warning("%s: node %s (%s) has no coordinates and no located neighbour; dropped",
                    path.name, n, g.nodes[n].get("label", "?"))
        g.remove_node(n)
    nodes = sorted(g.nodes, key=lambda n: int(n) if str(n).isdigit() else str(n))
    idx = {n: i for i, n in enumerate(nodes)}
    names: list[str] = []
    seen: dict[str, int] = {}
    for n in nodes:
        label = str(g.nodes[n].get("label") or n)
        seen[label] = seen.get(label, 0) + 1
        names.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    lat = np.array([pos[n][0] for n in nodes])
    lon = np.array([pos[n][1] for n in nodes])
    country = [str(g.nodes[n].get("Country", "")) for n in nodes]
    edges = [(idx[a], idx[b], link_speed_gbps(d, default_bandwidth_gbps)) for a, b, d in g.edges(data=True)]
    return build_network(names, lat, lon, country, edges, per_hop_s)


def build_network(names: list[str], lat: np.ndarray, lon: np.ndarray, country: list[str],
                  edges: list[tuple[int, int, float]], per_hop_s: float = 0.5e-3) -> Network:
    """A `Network` from sites (names, coordinates, countries) and links (site index, site index,
    bandwidth Gb/s): link latency from great-circle distance plus `per_hop_s`; parallel links keep
    the fastest; shortest paths by latency, each pair's bandwidth the path's bottleneck."""
    lat, lon = np.asarray(lat, dtype=float), np.asarray(lon, dtype=float)
    links = []
    wg: nx.Graph[int] = nx.Graph()
    wg.add_nodes_from(range(len(names)))
    for i, j, bw in edges:
        if i == j:
            continue
        lat_s = great_circle_km(lat[i], lon[i], lat[j], lon[j]) * FIBRE_S_PER_KM + per_hop_s
        if wg.has_edge(i, j) and wg[i][j]["bw"] >= bw:
            continue
        wg.add_edge(i, j, lat=lat_s, bw=bw)
    for i, j, d in wg.edges(data=True):
        links.append((i, j, d["lat"], d["bw"]))

    s = len(names)
    latency = np.full((s, s), np.inf)
    bandwidth = np.zeros((s, s))
    hops = np.zeros((s, s), dtype=int)
    elat = {(i, j): d["lat"] for i, j, d in wg.edges(data=True)}
    ebw = {(i, j): d["bw"] for i, j, d in wg.edges(data=True)}
    elat.update({(j, i): v for (i, j), v in list(elat.items())})
    ebw.update({(j, i): v for (i, j), v in list(ebw.items())})
    for src, paths in nx.all_pairs_dijkstra_path(wg, weight="lat"):
        # a source's shortest paths form a tree: each path is its predecessor's plus one link, so
        # the sums and minima along it extend the predecessor's (the same additions, in order)
        lat_row, bw_row, hop_row = latency[src], bandwidth[src], hops[src]
        lat_row[src], bw_row[src] = 0.0, np.inf
        for dst, p in sorted(paths.items(), key=lambda item: len(item[1])):
            if dst == src:
                continue
            pred = p[-2]
            if pred == src:
                lat_row[dst] = 0 + elat[src, dst]
                bw_row[dst] = ebw[src, dst]
            else:
                lat_row[dst] = lat_row[pred] + elat[pred, dst]
                bw_row[dst] = min(bw_row[pred], ebw[pred, dst])
            hop_row[dst] = len(p) - 1
    return Network(list(names), lat, lon, list(country), latency, bandwidth, hops, links)
