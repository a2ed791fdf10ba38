"""Where a test run's time went: the file ``COHORTFLOW_TEST_TIMELINE`` names, summed per test
file (or per test with ``--tests``), largest processor time first.

    COHORTFLOW_TEST_TIMELINE=/tmp/timeline.tsv make test
    python scripts/test_timeline.py /tmp/timeline.tsv [--tests] [--top N]

Processor seconds are a worker's own and its reaped child processes' (tests/conftest.py); a
process a test does not reap (the Dask workers of a killed run) is not counted.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path


def summary(path: Path, per_test: bool) -> list[tuple[str, float, float, float]]:
    """(name, processor seconds own, of children, wall seconds) per test file or test."""
    own: dict[str, float] = defaultdict(float)
    children: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    for line in path.read_text(encoding="utf-8").splitlines():
        worker, first, second, phase, node = line.split("\t", 4)
        name = node if per_test else node.split("::")[0]
        if phase == "cpu":
            own[name] += float(first)
            children[name] += float(second)
        elif worker != "main":
            wall[name] += float(second) - float(first)
    names = set(own) | set(wall)
    rows = [(n, own[n], children[n], wall[n]) for n in names]
    return sorted(rows, key=lambda row: -(row[1] + row[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path)
    parser.add_argument("--tests", action="store_true", help="per test, not per file")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    rows = summary(args.timeline, args.tests)
    out = sys.stdout
    out.write(f"{'processor s':>12} {'own':>8} {'children':>9} {'wall s':>8}  test\n")
    mine, theirs, seconds = (sum(r[i] for r in rows) for i in (1, 2, 3))
    out.write(f"{mine + theirs:12.0f} {mine:8.0f} {theirs:9.0f} {seconds:8.0f}  (all)\n")
    for name, mine, theirs, seconds in rows[: args.top]:
        out.write(f"{mine + theirs:12.0f} {mine:8.0f} {theirs:9.0f} {seconds:8.0f}  {name}\n")


if __name__ == "__main__":
    main()
