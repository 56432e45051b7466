"""A small pool for the learned-policy tests: sites on a line, 5 ms apart (each has neighbours
nearer and farther), 16 H100 each."""

from cnc.common.v1 import common_pb2 as common


def line_site(ids: tuple[str, ...], i: int) -> common.Site:
    """Site `ids[i]` with its links to every other site of the line."""
    site = common.Site(site_id=ids[i], gpu_pools=[common.GpuPool(gpu_type="H100", count=16, hbm_gb=80)])
    for j, peer in enumerate(ids):
        if j != i:
            site.links.append(common.Link(peer_site_id=peer, latency_ms=5.0 * abs(i - j), bandwidth_gbps=100))
    return site
