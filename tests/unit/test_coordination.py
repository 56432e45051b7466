"""The coordination of the sites' replica wishes (`cncbrain.coordination.admit`) and the learned
policy that goes through it in the twin (`marl`, `agents/policies/marl_v3.npz`): many sites wanting
to add the same service in one tick get only what the pool's uncovered demand calls for."""

import numpy as np
import pytest

from agents.catalog import make_policy
from agents.runtime import MarlPolicy, coordinated_copy, pool_of, shipped_policy_path
from cncbrain.coordination import Pool, admit
from cncbrain.scenario import load_scenario
from cncbrain.twin.sim import Twin


def pool(demand=70.0, capacity=50.0, replicas=5, starting=0, min_replicas=1) -> Pool:
    return Pool(np.array([demand]), np.array([capacity]), np.array([float(replicas)]), np.array([float(starting)]),
                np.array([float(min_replicas)]))


def col(*xs) -> np.ndarray:
    return np.array(xs, float)[:, None]


def test_adds_stop_once_the_deficit_is_covered_highest_priority_first():
    # demand 70 rps ÷ 0.7 = 100 wanted, 50 there: a deficit of 50 rps; ten sites want one 20-rps replica
    out = admit(np.ones((10, 1), np.int64), col(*range(10)), np.full((10, 1), 20.0), np.full((10, 1), 20.0), pool())
    assert out[:, 0].tolist() == [0] * 7 + [1] * 3  # 20 + 20 + 20 ≥ 50: the three most confident sites


def test_a_wish_of_several_replicas_is_cut_to_what_the_rest_of_the_deficit_needs():
    out = admit(col(5, 5).astype(np.int64), col(2, 1), col(20, 20), col(20, 20), pool())
    assert out[:, 0].tolist() == [3, 0]
    # a site where no replica fits (room 0) gets nothing, the next one the add
    assert admit(col(1, 1).astype(np.int64), col(2, 1), col(0, 30), col(0, 30), pool())[:, 0].tolist() == [0, 1]


def test_absurd_figures_grant_at_most_the_wishes_and_never_fail():
    wish = np.full((3, 1), 2, np.int64)
    for p in (pool(demand=np.inf), pool(demand=1e308, capacity=0.0), pool(demand=np.nan), pool(capacity=np.inf)):
        for rate in (1e-300, 20.0, np.inf):
            out = admit(wish, col(3, 2, 1), np.full((3, 1), rate), np.full((3, 1), rate), p)
            assert ((out >= 0) & (out <= wish)).all()
    assert admit(wish, col(3, 2, 1), np.full((3, 1), 1e-300), np.full((3, 1), 1.0), pool(demand=1e308))[:, 0].tolist() == [2, 2, 2]


def test_a_covered_pool_gets_no_add_unless_it_is_below_min_replicas():
    covered = pool(demand=7.0, capacity=50.0, replicas=2)
    assert not admit(np.ones((4, 1), np.int64), col(4, 3, 2, 1), np.full((4, 1), 20.0), np.full((4, 1), 20.0),
                     covered).any()
    short = pool(demand=7.0, capacity=50.0, replicas=2, min_replicas=4)
    assert admit(np.ones((4, 1), np.int64), col(4, 3, 2, 1), np.full((4, 1), 20.0), np.full((4, 1), 20.0),
                 short)[:, 0].tolist() == [1, 1, 0, 0]


def test_removals_wait_for_starting_replicas_and_for_no_add_and_keep_min_replicas():
    spare = pool(demand=7.0, capacity=100.0, replicas=5, min_replicas=3)
    wish = col(-1, -1, -1, -1).astype(np.int64)
    rate = np.full((4, 1), 20.0)
    assert admit(wish, col(4, 3, 2, 1), rate, rate, spare)[:, 0].tolist() == [-1, -1, 0, 0]  # 5 → 3, not below
    assert not admit(wish, col(4, 3, 2, 1), rate, rate, spare._replace(starting=np.array([1.0]))).any()
    # one site adds (below min_replicas) while the others want to remove: the add alone
    short = spare._replace(min_replicas=np.array([6.0]))
    mixed = col(1, -1, -1, -1).astype(np.int64)
    assert admit(mixed, col(1, 4, 3, 2), rate, rate, short)[:, 0].tolist() == [1, 0, 0, 0]
    # the optional cap and floor: one removal a tick, and none that leaves less than demand ÷ 0.7 × 1.1
    assert admit(wish, col(4, 3, 2, 1), rate, rate, spare, max_removals=1)[:, 0].tolist() == [-1, 0, 0, 0]
    tight = pool(demand=49.0, capacity=100.0, replicas=5)
    assert admit(wish, col(4, 3, 2, 1), rate, rate, tight, remove_margin=1.1)[:, 0].tolist() == [-1, 0, 0, 0]
    # not held: removals while a replica starts; free_uncovered: an uncovered service's removals all go
    starting = spare._replace(starting=np.array([1.0]))
    assert admit(wish, col(4, 3, 2, 1), rate, rate, starting, hold=False)[:, 0].tolist() == [-1, -1, 0, 0]
    short_of_demand = pool(demand=140.0, capacity=100.0, replicas=5, starting=1)
    assert admit(wish, col(4, 3, 2, 1), rate, rate, short_of_demand, free_uncovered=True)[:, 0].tolist() == [-1] * 4
    assert not admit(wish, col(4, 3, 2, 1), rate, rate, short_of_demand).any()


def test_services_are_coordinated_each_on_its_own():
    two = Pool(np.array([70.0, 7.0]), np.array([50.0, 50.0]), np.array([5.0, 5.0]), np.zeros(2), np.ones(2))
    wish = np.ones((3, 2), np.int64)
    out = admit(wish, np.array([[3, 1], [2, 2], [1, 3]], float), np.full((3, 2), 30.0), np.full((3, 2), 30.0), two)
    assert out.tolist() == [[1, 0], [1, 0], [0, 0]]


def over_the_deficit(view, delta) -> int:
    """Replicas added per service beyond what covers the pool's uncovered demand (the last replica
    that covers it counts as needed) or its min_replicas, the most over the services."""
    p = pool_of(view)
    room = view.capacity_per_replica()
    worst = 0
    for j in range(view.n_services):
        adds = np.maximum(delta[:, j], 0)
        if not adds.any():
            continue
        need = p.demand[j] / 0.7 - p.capacity[j]
        # replicas by their rates, largest first: those needed to cover `need`, then the rest are extra
        rates = np.sort(np.repeat(room[:, j], adds))[::-1]
        covered = np.searchsorted(np.cumsum(rates), need, side="left") + 1 if need > 0 else 0
        worst = max(worst, int(adds.sum()) - max(covered, int(p.min_replicas[j] - p.replicas[j])))
    return worst


def test_the_herd_of_att_is_bounded_by_the_deficit_in_the_twin():
    """att, tick 1: with marl_v2's weights every site adds a replica of the same service while the
    pool's demand calls for one (the herd); the shipped marl — the same weights, coordinated — adds
    only what the deficit calls for, on each of the first ticks."""
    scenario = load_scenario("att")
    herd = make_policy(f"marl:{shipped_policy_path().parent / 'marl_v2.npz'}")
    shipped = make_policy("marl")
    assert isinstance(shipped, MarlPolicy) and shipped.coordinated and not herd.coordinated
    twin = Twin(scenario, seed=0)
    worst_herd = worst_shipped = 0
    for _ in range(4):
        view = twin.view()
        worst_herd = max(worst_herd, over_the_deficit(view, herd.act(view).replica_delta))
        actions = shipped.act(view)
        worst_shipped = max(worst_shipped, over_the_deficit(view, actions.replica_delta))
        twin.step(actions)
    assert worst_herd >= 10  # the herd is there without the coordination
    assert worst_shipped == 0


def test_the_training_env_coordinates_when_asked():
    """`CncPoolEnv(coordinated=True)` (MAPPO under the coordination) grants what the twin's policy
    would: every site asking to add at att's first tick adds only what the deficit calls for."""
    from agents.cnc_pool_v0 import CncPoolEnv
    from agents.features import Choice

    added = {}
    for coordinated in (False, True):
        env = CncPoolEnv("att", seed=0, coordinated=coordinated)
        obs, _ = env.reset_arrays(0)
        env.step_arrays(Choice.keep(obs.n, obs.K))
        view = env.twin.view()
        before = view.replicas.sum()
        obs = env._obs
        rep = np.where(obs.m_rep[:, :, 2] > 0, 2, 1)
        env.step_arrays(Choice(rep, np.zeros((obs.n, 2), np.int64), np.zeros((obs.n, obs.K), np.int64)))
        added[coordinated] = int(env.twin.view().replicas.sum() - before)
        if coordinated:
            p = pool_of(view)
            room = view.capacity_per_replica()
            assert added[True] <= sum(int(np.ceil(max(p.demand[j] / 0.7 - p.capacity[j], 0) / room[room[:, j] > 0, j].min()))
                                      + max(int(p.min_replicas[j] - p.replicas[j]), 0) for j in range(view.n_services))
    assert added[False] > 3 * max(added[True], 1)


def test_a_coordinated_copy_keeps_the_weights_and_says_so(tmp_path):
    src = shipped_policy_path().parent / "marl_v2.npz"
    dst = coordinated_copy(src, tmp_path / "c.npz")
    a, b = MarlPolicy(src), MarlPolicy(dst)
    assert b.coordinated and not a.coordinated
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a.actor.svc, b.actor.svc, strict=True))
    with pytest.raises(ValueError, match="format-1"):
        coordinated_copy(shipped_policy_path().parent / "marl_v0.npz", tmp_path / "v0.npz")
