"""Waits on progress, not on wall time: the one way mesh tests wait for something the mesh is working towards.

The machine running the suite is shared (2 cores, many processes) and its speed moves 1.6x between days, so a fixed
deadline ("delivered within 30 s") fails a slow run that was getting there. These waits fail when the observed
quantity stops moving instead: every change of it (one more email delivered, a state moving on) starts a new stall
window of ``stall_s``; a generous overall ``cap_s`` still ends a wait whose quantity keeps changing without ever
getting done. A failure names what was last seen.

``wait_for_progress`` polls a synchronous observation; ``wait_for_progress_async`` an awaitable one. The clock and
the pause between looks are parameters so that the rule itself is tested on a fake clock (tests/test_progress.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

CAP_FACTOR = 10.0
"""Without an explicit ``cap_s``, a wait may go on for this many stall windows while it keeps progressing."""


def _same(value: Any) -> Hashable:
    return repr(value)  # protobuf messages and lists compare fine but are not hashable; their text is


@dataclass
class _Watch(Generic[T]):
    """The rule shared by the sync and async waits: when the quantity last moved, and whether to give up."""

    what: str
    stall_s: float
    cap_s: float
    progress: Callable[[T], Hashable]
    describe: Callable[[T], str]
    started: float
    moved_at: float = 0.0
    changes: int = 0
    _key: Hashable = None
    _seen: bool = False

    def __post_init__(self) -> None:
        if self.stall_s <= 0 or self.cap_s < self.stall_s:
            raise ValueError(f"need 0 < stall_s <= cap_s, got stall_s={self.stall_s}, cap_s={self.cap_s}")
        self.moved_at = self.started

    def give_up(self, value: T, now: float) -> AssertionError | None:
        """Note an observation that is not done yet (a progress key unlike the previous one is movement); the
        failure to raise when there was none for a stall window or the cap is reached, else None."""
        key = self.progress(value)
        if not self._seen or key != self._key:
            self.changes += self._seen
            self._seen, self._key, self.moved_at = True, key, now
        if now - self.moved_at > self.stall_s:
            return AssertionError(f"{self.what}: no progress for {self.stall_s:g}s ({self.changes} change(s) in "
                                  f"{now - self.started:.1f}s); last seen: {self.describe(value)}")
        if now - self.started > self.cap_s:
            return AssertionError(f"{self.what}: not done after {self.cap_s:g}s although still progressing "
                                  f"({self.changes} change(s)); last seen: {self.describe(value)}")
        return None


def wait_for_progress(observe: Callable[[], T], done: Callable[[T], bool], *, what: str, stall_s: float,
                      cap_s: float | None = None, every_s: float = 0.1,
                      progress: Callable[[T], Hashable] = _same, describe: Callable[[T], str] = repr,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll ``observe()`` every ``every_s`` until ``done(value)``; return that value.

    Args:
        observe: reads the quantity (a count, a state, a list); its exceptions propagate.
        done: whether an observed value is what the test waits for.
        what: names the wait in the failure ("40 emails delivered").
        stall_s: fail when the observation has not changed for this long.
        cap_s: fail after this long in all even while it keeps changing (default ``CAP_FACTOR * stall_s``).
        every_s: the pause between two observations.
        progress: what of a value counts as movement (default: the whole value; e.g. ``len`` for a growing list
            whose items change in place).
        describe: how the last value is shown in a failure.
        clock: seconds, monotonic (a fake one in the helper's own tests).
        sleep: pauses between observations.

    Raises:
        AssertionError: naming ``what``, why it gave up and the last value seen.
    """
    watch: _Watch[T] = _Watch(what, stall_s, cap_s if cap_s is not None else CAP_FACTOR * stall_s, progress,
                              describe, clock())
    while True:
        value = observe()
        if done(value):
            return value
        if (failure := watch.give_up(value, clock())) is not None:
            raise failure
        sleep(every_s)


async def wait_for_progress_async(observe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, what: str,
                                  stall_s: float, cap_s: float | None = None, every_s: float = 0.1,
                                  progress: Callable[[T], Hashable] = _same, describe: Callable[[T], str] = repr,
                                  clock: Callable[[], float] = time.monotonic,
                                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """:func:`wait_for_progress` for an awaitable observation (same arguments, same rule)."""
    watch: _Watch[T] = _Watch(what, stall_s, cap_s if cap_s is not None else CAP_FACTOR * stall_s, progress,
                              describe, clock())
    while True:
        value = await observe()
        if done(value):
            return value
        if (failure := watch.give_up(value, clock())) is not None:
            raise failure
        await sleep(every_s)
