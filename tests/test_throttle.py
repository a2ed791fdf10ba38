"""The retrieval throttle: time windows, studies per hour, backoff, association slots.

A fake clock whose ``sleep`` advances it, so hours of policy run in microseconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time

import pytest

from cohortflow.pipelines.retrieve.errors import OutsideWindowError, RetrieveConfigError
from cohortflow.pipelines.retrieve.throttle import RetrievePolicy, Throttle, Window

WEDNESDAY_NOON = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> dt.datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += dt.timedelta(seconds=seconds)


def _throttle(clock: Clock, **policy: object) -> Throttle:
    return Throttle(RetrievePolicy(**policy), now=clock, sleep=clock.sleep)  # type: ignore[arg-type]


def test_window_parsing_and_overnight_spans() -> None:
    nights = Window.parse("Mon-Fri 19:00-07:00")
    assert nights.days == frozenset(range(5))
    assert nights.contains(dt.datetime(2026, 11, 25, 23, 0))  # Wednesday night
    assert nights.contains(dt.datetime(2026, 11, 26, 6, 59))  # ... until Thursday 07:00
    assert not nights.contains(dt.datetime(2026, 11, 25, 12, 0))
    assert nights.contains(dt.datetime(2026, 11, 28, 6, 0))  # Friday's night runs into Saturday
    assert not nights.contains(dt.datetime(2026, 11, 28, 20, 0))  # Saturday evening is not in
    assert nights.next_start(dt.datetime(2026, 11, 25, 12, 0)) == dt.datetime(2026, 11, 25, 19, 0)
    weekend = Window.parse("sat,sun")
    assert weekend.contains(dt.datetime(2026, 11, 29, 23, 59))
    assert weekend.next_start(dt.datetime(2026, 11, 25, 12, 0)) == dt.datetime(2026, 11, 28, 0, 0)
    assert Window.parse("Fri-Mon").days == frozenset({4, 5, 6, 0})
    assert Window.parse("mon-sun 00:00-24:00").contains(dt.datetime(2026, 11, 25, 23, 59, 59))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("weekdays", "expected days"),
        ("Mon-Fry 19:00-07:00", "unknown day"),
        ("Mon 25:00-07:00", "not a time of day"),
        ("Mon 07:00-07:00", "starts when it ends"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(spec: str, message: str) -> None:
    with pytest.raises(RetrieveConfigError, match=message):
        Window.parse(spec)


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"max_associations": 0}, "max_associations"),
        ({"studies_per_hour": 0}, "studies_per_hour"),
        ({"outside_window": "later"}, "outside_window"),
        ({"retries": -1}, "retries"),
    ],
)
def test_bad_policies_are_refused(policy: dict[str, object], message: str) -> None:
    with pytest.raises(RetrieveConfigError, match=message):
        RetrievePolicy(**policy)  # type: ignore[arg-type]


def test_outside_a_window_the_run_waits_for_it_or_stops() -> None:
    clock = Clock(WEDNESDAY_NOON)
    waiting = _throttle(clock, windows=(Window.parse("Mon-Fri 19:00-07:00"),))
    waiting.before_study()
    assert clock.now == dt.datetime(2026, 11, 25, 19, 0, tzinfo=dt.UTC)
    assert max(clock.slept) <= 600  # re-checks at least every ten minutes
    assert waiting.waited_seconds == pytest.approx(7 * 3600)
    stopping = _throttle(
        Clock(WEDNESDAY_NOON), windows=(Window.parse("Sat-Sun"),), outside_window="stop"
    )
    with pytest.raises(OutsideWindowError, match="Sat 2026-11-28 00:00"):
        stopping.before_study()


def test_studies_per_hour_are_spaced_evenly() -> None:
    clock = Clock(WEDNESDAY_NOON)
    throttle = _throttle(clock, studies_per_hour=12)
    starts = []
    for _ in range(4):
        throttle.before_study()
        starts.append(clock.now)
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(starts)}
    assert gaps == {300.0}


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetrievePolicy(backoff_seconds=5, backoff_max_seconds=30)
    assert [policy.backoff(n) for n in range(1, 6)] == [5, 10, 20, 30, 30]


def test_association_slots_are_never_exceeded() -> None:
    throttle = Throttle(RetrievePolicy(max_associations=2))
    inside = []
    lock = threading.Lock()

    def work() -> None:
        with throttle.association():
            with lock:
                inside.append(throttle.active)
            time.sleep(0.01)

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(inside) <= 2 and throttle.peak == 2 and throttle.opened == 12
    assert throttle.active == 0
