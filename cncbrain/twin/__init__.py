"""The digital twin of a CNC pool: cost model (`costmodel`), networks (`topology`), workload traces
(`traces`), the scenario schema (`scenario`), the pool of a scenario (`pool`), the policy interface
(`view`) and the simulator (`sim.Twin`). Names are imported lazily, so that a module that needs only
the cost model (the services) does not load the simulator."""

from importlib import import_module

_EXPORTS = {
    "Twin": "cncbrain.twin.sim",
    "TickReport": "cncbrain.twin.sim",
    "Actions": "cncbrain.twin.view",
    "JobOffer": "cncbrain.twin.view",
    "PoolView": "cncbrain.twin.view",
    "ServiceInfo": "cncbrain.twin.view",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
