"""One process makes a derived cache file, the others wait and read it.

The workers of a run start together, and each needs the same files: the head model and what is
derived from it (defacing's labels, the volumetry atlas). Without a lock every worker made its
own copy of the derived files, at the same time, on the same cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def building(path: Path) -> Iterator[None]:
    """Held while this process makes ``path`` (check again inside: another may have made it
    meanwhile). Where no lock can be made (a read-only cache), each process makes its own."""
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()
