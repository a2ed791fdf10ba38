"""Failed logins counted per client address (the accounts' own counts are in ``models.users``).

After ``free`` failures from one address, each further attempt from it waits 1 s, doubling with
every failure, at most ``max_delay`` seconds; a success clears the address. Kept in the
dashboard's memory (one process serves it), for at most ``capacity`` addresses: the oldest are
forgotten first, so a flood of addresses cannot grow it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class ClientThrottle:
    def __init__(self, free: int, max_delay: float, capacity: int = 10_000) -> None:
        self.free, self.max_delay, self.capacity = free, max_delay, capacity
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """Seconds ``client`` must still wait before its next attempt is checked."""
        with self._lock:
            _, until = self._seen.get(client, (0, 0.0))
        return max(0.0, until - time.monotonic())

    def failed(self, client: str) -> None:
        with self._lock:
            failures, _ = self._seen.pop(client, (0, 0.0))
            failures += 1
            beyond = failures - self.free
            delay = min(2.0 ** (beyond - 1), self.max_delay) if beyond > 0 else 0.0
            self._seen[client] = (failures, time.monotonic() + delay)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._seen.pop(client, None)
