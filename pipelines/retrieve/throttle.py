"""Throttling that protects the clinical PACS: associations, studies per hour, windows, backoff.

Policy is data (``RetrievePolicy``, from the settings); ``Throttle`` applies it. The clock and the
sleep function are parameters so the policy can be checked without waiting hours for a window.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cohortflow.pipelines.retrieve.errors import OutsideWindowError, RetrieveConfigError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?P<days>[a-z]{3}(?:-[a-z]{3})?(?:,[a-z]{3}(?:-[a-z]{3})?)*)"
    r"(?:\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2}))?\s*$",
    re.IGNORECASE,
)


def _clock(text: str, spec: str) -> dt.time:
    hours, minutes = (int(x) for x in text.split(":"))
    if hours == 24 and minutes == 0:
        return dt.time.max
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise RetrieveConfigError(f"time window {spec!r}: {text} is not a time of day")
    return dt.time(hours, minutes)


@dataclass(frozen=True)
class Window:
    """Days of the week (0 = Monday) and a local time range; a range past midnight
    (``19:00-07:00``) belongs to the day it starts on."""

    days: frozenset[int]
    start: dt.time = dt.time.min
    end: dt.time = dt.time.max
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Window:
        """``Mon-Fri 19:00-07:00``, ``Sat,Sun``, ``mon-sun 00:00-24:00``."""
        found = _WINDOW.match(spec)
        if not found:
            raise RetrieveConfigError(
                f"time window {spec!r}: expected days and an optional time range, "
                "e.g. 'Mon-Fri 19:00-07:00' or 'Sat-Sun'"
            )
        days: set[int] = set()
        for part in found["days"].lower().split(","):
            first, _, last = part.partition("-")
            if first not in DAYS or (last and last not in DAYS):
                raise RetrieveConfigError(f"time window {spec!r}: unknown day in {part!r}")
            a, b = DAYS.index(first), DAYS.index(last or first)
            days.update(d % 7 for d in range(a, b + 1 if b >= a else b + 8))
        start = _clock(found["start"], spec) if found["start"] else dt.time.min
        end = _clock(found["end"], spec) if found["end"] else dt.time.max
        if start == end:
            raise RetrieveConfigError(f"time window {spec!r}: it starts when it ends")
        return cls(frozenset(days), start, end, spec.strip())

    def _spans(self, around: dt.datetime) -> Iterator[tuple[dt.datetime, dt.datetime]]:
        """The window's occurrences starting from the day before ``around`` to a week later."""
        for offset in range(-1, 8):
            day = (around + dt.timedelta(days=offset)).date()
            if day.weekday() not in self.days:
                continue
            begin = dt.datetime.combine(day, self.start, around.tzinfo)
            finish = dt.datetime.combine(day, self.end, around.tzinfo)
            if self.end <= self.start:
                finish += dt.timedelta(days=1)
            yield begin, finish

    def contains(self, moment: dt.datetime) -> bool:
        return any(b <= moment < f for b, f in self._spans(moment))

    def next_start(self, moment: dt.datetime) -> dt.datetime | None:
        return min((b for b, _ in self._spans(moment) if b > moment), default=None)


@dataclass(frozen=True)
class RetrievePolicy:
    #: Associations cohortflow opens to the PACS at once (queries and retrievals).
    max_associations: int = 1
    #: Studies started per hour at most, evenly spaced (None: no limit).
    studies_per_hour: float | None = None
    #: When retrieval may run (none: any time), in the machine's local time.
    windows: tuple[Window, ...] = ()
    #: Outside a window: "wait" for the next one, or "stop" cleanly (rerun to resume).
    outside_window: str = "wait"
    #: Attempts after the first for a study that fails (refusal, timeout, incomplete series).
    retries: int = 3
    #: First pause after a failure; doubled each time, at most ``backoff_max_seconds``.
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_associations < 1:
            raise RetrieveConfigError("max_associations must be at least 1")
        if self.studies_per_hour is not None and self.studies_per_hour <= 0:
            raise RetrieveConfigError("studies_per_hour must be positive (or unset: no limit)")
        if self.outside_window not in ("wait", "stop"):
            raise RetrieveConfigError(
                f"outside_window must be 'wait' or 'stop', not {self.outside_window!r}"
            )
        if self.retries < 0 or self.backoff_seconds < 0:
            raise RetrieveConfigError("retries and backoff_seconds must not be negative")

    def backoff(self, attempt: int) -> float:
        """The pause before attempt ``attempt`` (1 = the first retry)."""
        return float(min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempt - 1)))


def _local_now() -> dt.datetime:
    return dt.datetime.now().astimezone()


@dataclass
class Throttle:
    """Applies a policy; shared by the threads of one retrieval run."""

    policy: RetrievePolicy
    now: Callable[[], dt.datetime] = _local_now
    sleep: Callable[[float], None] = time.sleep
    #: Associations open now and the most ever open at once (the PACS-side load we caused).
    active: int = 0
    peak: int = 0
    opened: int = 0
    waited_seconds: float = 0.0
    _slots: threading.BoundedSemaphore = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _next_start: dt.datetime | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = threading.BoundedSemaphore(self.policy.max_associations)

    @contextmanager
    def association(self) -> Iterator[None]:
        """Hold one of the allowed associations while the body talks to the PACS."""
        with self._slots:
            with self._lock:
                self.active += 1
                self.opened += 1
                self.peak = max(self.peak, self.active)
            try:
                yield
            finally:
                with self._lock:
                    self.active -= 1

    def in_window(self, moment: dt.datetime | None = None) -> bool:
        moment = moment or self.now()
        return not self.policy.windows or any(w.contains(moment) for w in self.policy.windows)

    def next_window(self, moment: dt.datetime) -> dt.datetime | None:
        starts = [s for w in self.policy.windows if (s := w.next_start(moment)) is not None]
        return min(starts, default=None)

    def before_study(self) -> None:
        """Wait until a study may start (window and rate), or raise OutsideWindowError."""
        while True:
            moment = self.now()
            if not self.in_window(moment):
                opens = self.next_window(moment)
                if self.policy.outside_window == "stop" or opens is None:
                    raise OutsideWindowError(opens)
                self._wait((opens - moment).total_seconds())
                continue
            with self._lock:
                if self._next_start is None or moment >= self._next_start:
                    if self.policy.studies_per_hour:
                        step = dt.timedelta(hours=1 / self.policy.studies_per_hour)
                        self._next_start = moment + step
                    return
                pause = (self._next_start - moment).total_seconds()
            self._wait(pause)

    def pause(self, seconds: float) -> None:
        """Back off after a failure."""
        self._wait(seconds)

    def _wait(self, seconds: float) -> None:
        seconds = max(0.0, min(seconds, 600.0))  # re-check at least every 10 minutes
        with self._lock:
            self.waited_seconds += seconds
        self.sleep(seconds)
