"""Site agents played by a test: they answer the scheduler's offers on the bus as told."""

from __future__ import annotations

from cnc.site.v1 import events_pb2 as site_pb
from cncbrain.bus import subjects


class FakeAgents:
    """Answers every offer from each site with `units[site]` at `cost[site]`."""

    def __init__(self, bus, units, cost):
        self.bus, self.units, self.cost = bus, units, cost
        self.offers = []

    async def start(self):
        await self.bus.subscribe(subjects.SCHEDULER_OFFER, self.on_offer, consumer="fake-agents")

    async def on_offer(self, ev):
        self.offers.extend(ev.payload.offers)
        for sid in self.units:
            answer = site_pb.OfferAnswer(round_id=ev.payload.round_id, site_id=sid)
            for offer in ev.payload.offers:
                answer.proposals.add(
                    proposal_id=f"{offer.offer_id}-{sid}", site_id=sid, kind=site_pb.PROPOSAL_KIND_ACCEPT_OFFER,
                    offer_id=offer.offer_id, workload_id=offer.workload_id,
                    units=min(self.units[sid], offer.units), gpu_type="H100", cost=self.cost[sid])
            await self.bus.publish(subjects.SITE_ANSWER, answer, site=sid)
