"""`cncbrain status` counts each GPU once: in use or free at a site that is up, down at one that is not."""

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb
from cncbrain.commands.status import gpu_counts


def site(site_id: str, state: int, count: int, used: int) -> ppb.SiteStatus:
    return ppb.SiteStatus(site=common.Site(site_id=site_id), state=state,
                          gpu_pools=[common.GpuPool(gpu_type="H100", count=count, used=used)])


def test_a_down_sites_gpus_count_as_down_only_and_an_overfull_site_as_full():
    gpus, down = gpu_counts([
        site("a", common.SITE_STATE_UP, 8, 3),
        site("b", common.SITE_STATE_DOWN, 8, 5),  # its last telemetry still showed 5 in use
        site("c", common.SITE_STATE_UP, 4, 6),  # reports more in use than it has
    ])
    assert gpus == {"H100": {"count": 20, "used": 7, "free": 5, "down": 8}}
    assert down == ["b"]
    g = gpus["H100"]
    assert g["count"] == g["used"] + g["free"] + g["down"]
