"""The progress rule of tests/progress.py, on a fake clock: a wait fails when its quantity stops moving for a stall
window, keeps going for as long as it moves (however slowly), and gives up at its cap; failures name the last
value seen."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.progress import wait_for_progress, wait_for_progress_async


class FakeClock:
    """Time that moves only when a wait sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.now += seconds


def counter(values: Callable[[float], int], clock: FakeClock) -> Callable[[], int]:
    """An observation whose value is a function of the fake time."""
    return lambda: values(clock.now)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_quantity_that_stops_moving_fails_after_one_stall_window(clock: FakeClock) -> None:
    observe = counter(lambda t: min(int(t), 3), clock)  # one more each second, then stuck at 3

    with pytest.raises(AssertionError, match=r"3 delivered: no progress for 5s .*last seen: 3"):
        wait_for_progress(observe, lambda n: n >= 10, what="3 delivered", stall_s=5, clock=clock, sleep=clock.sleep)
    assert 3 + 5 < clock.now <= 3 + 5 + 0.2  # stuck since t=3: gave up one stall window later, not at the cap


def test_slow_but_steady_progress_succeeds_long_after_the_stall_window(clock: FakeClock) -> None:
    observe = counter(lambda t: int(t // 4), clock)  # one more every 4 s: 100 s in all for 25

    assert wait_for_progress(observe, lambda n: n >= 25, what="25 delivered", stall_s=5, cap_s=600, clock=clock,
                             sleep=clock.sleep) == 25
    assert clock.now >= 100


def test_a_quantity_that_never_moves_fails_after_one_stall_window(clock: FakeClock) -> None:
    with pytest.raises(AssertionError, match=r"the campaign completed: no progress for 2s \(0 change\(s\)"):
        wait_for_progress(lambda: "RUNNING", lambda s: s == "COMPLETED", what="the campaign completed", stall_s=2,
                          clock=clock, sleep=clock.sleep)


def test_a_quantity_that_keeps_changing_without_getting_done_fails_at_the_cap(clock: FakeClock) -> None:
    flipping = counter(lambda t: int(t) % 2, clock)

    with pytest.raises(AssertionError, match=r"settled: not done after 30s although still progressing"):
        wait_for_progress(flipping, lambda n: n == 2, what="settled", stall_s=3, cap_s=30, clock=clock,
                          sleep=clock.sleep)
    assert 30 < clock.now <= 30.2


def test_the_cap_defaults_to_ten_stall_windows(clock: FakeClock) -> None:
    with pytest.raises(AssertionError, match=r"not done after 20s"):
        wait_for_progress(counter(int, clock), lambda n: n < 0, what="never", stall_s=2, clock=clock,
                          sleep=clock.sleep)


def test_the_progress_key_decides_what_counts_as_movement(clock: FakeClock) -> None:
    # The same two items, rewritten in place: the items change, their number does not.
    observe = counter(lambda t: int(t), clock)

    with pytest.raises(AssertionError, match="no progress for 3s"):
        wait_for_progress(lambda: [observe(), observe()], lambda items: len(items) > 2, what="a third item",
                          stall_s=3, progress=len, clock=clock, sleep=clock.sleep)


def test_the_failure_shows_the_last_value_as_described(clock: FakeClock) -> None:
    with pytest.raises(AssertionError, match=r"last seen: 2 of 5 sent$"):
        wait_for_progress(lambda: 2, lambda n: n == 5, what="5 sent", stall_s=1, describe=lambda n: f"{n} of 5 sent",
                          clock=clock, sleep=clock.sleep)


def test_a_value_done_at_the_first_look_returns_without_sleeping(clock: FakeClock) -> None:
    assert wait_for_progress(lambda: "ok", lambda v: v == "ok", what="ok", stall_s=1, clock=clock,
                             sleep=clock.sleep) == "ok"
    assert clock.now == 0


def test_a_stall_window_longer_than_the_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="stall_s <= cap_s"):
        wait_for_progress(lambda: 0, lambda n: True, what="x", stall_s=10, cap_s=5)


async def test_the_async_wait_follows_the_same_rule(clock: FakeClock) -> None:
    steps: Iterator[int] = iter([0, 1, 1, 2, 3, 3, 3, 4])

    async def slow() -> int:
        return next(steps)

    assert await wait_for_progress_async(slow, lambda n: n == 4, what="four", stall_s=0.35, clock=clock,
                                         sleep=clock.asleep) == 4

    stuck: Iterator[int] = iter([0, 1, 1, 1, 1, 1])

    async def stalls() -> int:
        return next(stuck)

    with pytest.raises(AssertionError, match=r"four: no progress for 0.35s .*last seen: 1"):
        await wait_for_progress_async(stalls, lambda n: n == 4, what="four", stall_s=0.35, clock=clock,
                                      sleep=clock.asleep)
