"""The protobuf messages the tests build again and again, with one set of defaults each."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cnc.common.v1 import common_pb2 as common
from cnc.perception.v1 import perception_pb2 as ppb

SLO = common.SloTargets(ttft_ms=500, tpot_ms=50)


def inference_spec(name: str = "chat", replicas: int = 2, **fields) -> common.InferenceServiceSpec:
    """A 7B service with a 500/50 ms SLO and `replicas` one-GPU replicas (min = max); `fields` set
    anything else or override these."""
    base: dict = dict(name=name, model="7b", params_b=7, slo=SLO, min_replicas=replicas, max_replicas=replicas,
                      gpus_per_replica=1)
    base.update(fields)
    return common.InferenceServiceSpec(**base)


def chat_spec(**fields) -> common.InferenceServiceSpec:
    """The scheduler tests' service: `chat`, llama-8b, 5 requests/s, 2 to 6 one-GPU replicas."""
    return inference_spec(**{"model": "llama-8b", "params_b": 8, "expected_rate_rps": 5, "min_replicas": 2,
                             "max_replicas": 6, **fields})


def site_status(site_id: str, count: int = 8, *, gpu_type: str = "H100", hbm_gb: float = 80.0, region: str = "",
                price: float = 0.0, up: bool = True) -> ppb.SiteStatus:
    """A site as perception reports it: one GPU pool of `count` `gpu_type`, up unless `up=False`."""
    pool = common.GpuPool(gpu_type=gpu_type, count=count, hbm_gb=hbm_gb, price_usd_per_hour=price)
    return ppb.SiteStatus(site=common.Site(site_id=site_id, region=region, gpu_pools=[pool]),
                          state=common.SITE_STATE_UP if up else common.SITE_STATE_DOWN)


def snapshot(sites: Mapping[str, int] | Iterable[ppb.SiteStatus], sequence: int = 1) -> ppb.Snapshot:
    """A perception snapshot of `sites`: site id → its H100s (`site_status`'s defaults), or statuses."""
    statuses = [site_status(s, n) for s, n in sites.items()] if isinstance(sites, Mapping) else list(sites)
    return ppb.Snapshot(sequence=sequence, sites=statuses)
