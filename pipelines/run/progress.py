"""How far a run is: studies done per stage, the rate and the time left.

Pure bookkeeping: the flow tells it which stage finished a study; it says where the run stands,
as a fraction (a Prefect progress artifact) and as one line for a person (stderr). Counts only:
no study, patient or file is named.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class RunProgress:
    """``total`` studies, each taken through ``stages`` in order."""

    total: int
    stages: Sequence[str]
    clock: Callable[[], float] = time.monotonic
    done: dict[str, int] = field(init=False)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.done = dict.fromkeys(self.stages, 0)
        self.started = self.clock()

    def finished(self, stage: str) -> None:
        """One study has come through ``stage`` (failed or not: it is done with it)."""
        self.done[stage] += 1

    @property
    def fraction(self) -> float:
        """Of all the run's study-stages, the share done (1.0 for a run of no study)."""
        steps = self.total * len(self.stages)
        return 1.0 if steps == 0 else sum(self.done.values()) / steps

    def seconds_left(self) -> float | None:
        """At the pace so far; None before anything is done."""
        fraction = self.fraction
        if fraction <= 0.0:
            return None
        elapsed = self.clock() - self.started
        return elapsed * (1.0 - fraction) / fraction

    def studies_per_hour(self) -> float | None:
        """Studies through every stage per hour so far; None before the first one."""
        complete = self.done[self.stages[-1]]
        elapsed = self.clock() - self.started
        return None if complete == 0 or elapsed <= 0 else complete * 3600.0 / elapsed

    def line(self) -> str:
        """``anonymize 8/8 · deface 6/8 · ... · 14 studies/h · about 3 min left``."""
        parts = [f"{stage} {self.done[stage]}/{self.total}" for stage in self.stages]
        rate = self.studies_per_hour()
        if rate is not None:
            parts.append(f"{rate:.0f} studies/h" if rate >= 10 else f"{rate:.1f} studies/h")
        left = self.seconds_left()
        if left is not None and self.fraction < 1.0:
            parts.append(f"about {_duration(left)} left")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
