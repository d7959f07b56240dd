"""The lanes' activation budget: a hard cap, and no lane waits for ever."""

import random
import threading
import time

import pytest

from seal.lane_budget import ActivationBudget


def budget_with(needs: dict[int, int], held: dict[int, int], capacity: int = 10) -> ActivationBudget:
    """A budget in a given state: `needs` the lanes in their forward, in queue order."""
    budget = ActivationBudget(1.0, capacity, layers=1)
    budget.needs, budget.held = dict(needs), dict(held)
    return budget


def test_the_first_lane_takes_what_the_others_leave_and_a_later_one_only_what_the_first_will_not_need():
    start = budget_with({0: 6, 1: 6}, {})
    assert start.may_take(0, 6)
    assert start.may_take(1, 4) and not start.may_take(1, 5)  # 6 stays free for lane 0
    partway = budget_with({0: 2, 1: 6}, {0: 4, 1: 3})
    assert partway.may_take(0, 2)  # 4 + 3 + 2 <= 10
    assert partway.may_take(1, 1) and not partway.may_take(1, 2)  # lane 0 still needs 2


def test_a_lane_behind_one_in_its_backward_takes_what_that_one_gives_back():
    budget = budget_with({1: 4}, {0: 6, 1: 4})  # lane 0 holds 6 in its backward; lane 1 leads the queue
    assert not budget.may_take(1, 1)
    budget.give_back(0, 3)
    assert budget.may_take(1, 3) and not budget.may_take(1, 4)


def test_a_pass_larger_than_the_budget_runs_once_nothing_else_is_held():
    assert budget_with({0: 20}, {}).may_take(0, 15)
    assert budget_with({0: 5}, {0: 15}).may_take(0, 5)
    assert not budget_with({0: 20}, {1: 2}).may_take(0, 15)  # lane 1's backward first
    assert not budget_with({0: 20, 1: 1}, {}).may_take(1, 1)  # behind it, nothing is left


@pytest.mark.parametrize("seed", [0, 1])
def test_lanes_in_threads_never_hold_more_than_the_budget_and_all_finish(seed):
    """Three lanes run passes of random lengths through 4 layers, forward then backward, sleeping at random
    between layers; the peak they hold together stays within the budget, and none is stuck."""
    layers, capacity = 4, 4 * 12
    budget = ActivationBudget(1.0, 12, layers)
    done, holding = [], set()  # holding: how many lanes held memory at once, seen after a take

    def lane(index: int) -> None:
        rng = random.Random(seed * 10 + index)
        with budget.lane(index):
            for _ in range(15):
                tokens = rng.randint(1, 12)
                with budget.pass_(tokens):
                    for _ in range(layers):
                        assert budget.take(tokens) == index
                        holding.add(sum(1 for held in list(budget.held.values()) if held))
                        time.sleep(rng.random() * 1e-3)
                    budget.backward_begins()
                    for _ in range(rng.randint(0, layers)):  # a failed pass gives back nothing itself
                        budget.give_back(index, tokens)
                        time.sleep(rng.random() * 1e-3)
        done.append(index)

    threads = [threading.Thread(target=lane, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(done) == [0, 1, 2]
    assert budget.peak <= capacity and max(holding) >= 2  # the lanes overlapped, within the cap
    assert not any(budget.held.values()) and not budget.needs


def test_outside_a_lane_or_a_pass_nothing_is_counted():
    budget = ActivationBudget(2.5, 2, layers=2)
    assert budget.take(5) is None
    with budget.lane(0):
        assert budget.take(5) is None  # no pass
        with budget.pass_(1):
            assert budget.take(1) == 0
        assert budget.held == {0: 0} and budget.peak == 1


def test_a_pass_longer_than_the_unit_makes_the_unit_for_the_rest():
    """A row longer than pack_length is a pass of its own: the budget grows to that many passes of it."""
    budget = ActivationBudget(1.5, 4, layers=2)
    assert budget.capacity == 12
    with budget.lane(0), budget.pass_(10):
        assert budget.capacity == 30 and budget.needs == {0: 20}
    with budget.lane(0), budget.pass_(3):
        assert budget.capacity == 30
