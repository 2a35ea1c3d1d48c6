"""How many wrong secrets one address may try: the console's sign-in and DICOM user identity.

A guesser is slowed where it guesses, not everyone: after ``MAX_FAILURES``
failed tries as one name from one address, or ``PEER_FAILURES`` for any names
from it, within ``FAILURE_WINDOW`` seconds, that address waits for that name
(or for all) until the oldest try leaves the window. A guesser on a shared
address (a NAT, a Citrix farm) thus locks out only the names it tried, and
only from there. A try counts before its (slow) check and is forgiven when it
succeeds, so that concurrent guesses cannot all slip under the limit; a
refused try costs no check at all (a password hash is the costly part).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

#: Failed tries as one name from one address within ``FAILURE_WINDOW`` seconds before
#: that address must wait to try that name again ...
MAX_FAILURES = 5
#: ... and for any names from one address.
PEER_FAILURES = 20
FAILURE_WINDOW = 300.0
#: Keys remembered at most (a flood from many addresses forgets the oldest).
MAX_TRACKED = 4096

Key = tuple[str, str | None]


class FailureLimit:
    """The failed tries of the last ``FAILURE_WINDOW`` seconds, by (address, name) and by
    address (thread-safe: DIMSE associations each have a thread)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tries: dict[Key, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(peer: str, name: str) -> list[tuple[Key, int]]:
        return [((peer, name[:64]), MAX_FAILURES), ((peer, None), PEER_FAILURES)]

    def waiting(self, peer: str, name: str) -> float:
        """Seconds before ``peer`` may try ``name`` again (0: now)."""
        now, waits = self.clock(), []
        with self._lock:
            for key, most in self._keys(peer, name):
                tries = self._tries.get(key)
                while tries and now - tries[0] > FAILURE_WINDOW:
                    tries.popleft()
                if tries and len(tries) >= most:
                    waits.append(FAILURE_WINDOW - (now - tries[0]))
        return max(waits, default=0.0)

    def count(self, peer: str, name: str) -> list[Key]:
        """Count a try before it is checked; its keys, for :meth:`forgive`."""
        keys = self._keys(peer, name)
        with self._lock:
            for key, most in keys:
                if len(self._tries) >= MAX_TRACKED and key not in self._tries:
                    self._tries.pop(next(iter(self._tries)))
                self._tries.setdefault(key, deque(maxlen=most)).append(self.clock())
        return [key for key, _ in keys]

    def forgive(self, keys: list[Key]) -> None:
        """The try counted under ``keys`` succeeded."""
        with self._lock:
            for key in keys:
                tries = self._tries.get(key)
                if tries:
                    tries.pop()
