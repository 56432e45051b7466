"""Failure detection that a bus failover does not fool: one silent site goes DOWN after the
heartbeat timeout; most of the pool silent at once (a NATS node failing over, perception's own
connection) is waited out first; perception's reconnection gives every site a fresh timeout."""

from cnc.common.v1 import common_pb2 as common
from services.perception.domain import DOWN, UP, PoolPicture


def pool(n=4):
    p = PoolPicture(heartbeat_timeout_s=3.0, hold_s=9.0)
    for i in range(n):
        p.register(common.Site(site_id=f"s{i}"), now=0.0)
    return p


def states(p):
    return {sid: e.state for sid, e in p.sites.items()}


def test_one_silent_site_goes_down_after_the_timeout():
    p = pool()
    for t in (1.0, 2.0, 3.0, 4.0):
        for sid in ("s1", "s2", "s3"):
            p.heartbeat(sid, t)
    assert [c.site_id for c in p.check(4.0)] == ["s0"]
    assert states(p)["s0"] == DOWN and states(p)["s1"] == UP


def test_the_whole_pool_silent_at_once_is_waited_out_then_believed():
    p = pool()
    assert p.check(4.0) == [] and p.holding  # every site silent: the bus, most likely
    assert p.check(12.0) == []
    for sid in p.sites:  # they were only unheard: heartbeats resume within the hold
        p.heartbeat(sid, 12.5)
    assert p.check(13.0) == [] and not p.holding
    assert set(states(p).values()) == {UP}
    # silent again, and this time for longer than the hold: they are down
    assert p.check(16.0) == []
    assert len(p.check(25.1)) == 4 and set(states(p).values()) == {DOWN}


def test_perception_reconnecting_gives_every_site_a_fresh_timeout():
    p = pool()
    p.bus_back(10.0)
    assert p.check(12.0) == [] and not p.holding
