"""Brute-force protection shared by SFTP and FTPS: failed logins are slowed, then banned.

Counted per client address; a ban covers both protocols, since they share credentials.
The defaults are SFTPGo's: 15 failures within 30 minutes ban the address for 30 minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("meterdrop.guard")


@dataclass
class GuardPolicy:
    max_failures: int = 15  # failed logins within ``window`` before a ban
    window: float = 1800.0
    ban_seconds: float = 1800.0
    delay_per_failure: float = 0.5  # answer a failed login this much later per recent failure
    max_delay: float = 4.0


@dataclass
class Guard:
    policy: GuardPolicy = field(default_factory=GuardPolicy)
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _banned_until: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def is_banned(self, address: str) -> bool:
        with self._lock:
            until = self._banned_until.get(address)
            if until is None:
                return False
            if self.clock() >= until:
                del self._banned_until[address]
                return False
            return True

    def failed(self, address: str) -> float:
        """Record a failed login; return how long to wait before answering it."""
        now = self.clock()
        with self._lock:
            recent = self._failures[address]
            recent.append(now)
            while recent and now - recent[0] > self.policy.window:
                recent.popleft()
            if len(recent) >= self.policy.max_failures:
                self._banned_until[address] = now + self.policy.ban_seconds
                recent.clear()
                log.warning("banned %s for %.0f s after %d failed logins within %.0f s", address,
                            self.policy.ban_seconds, self.policy.max_failures, self.policy.window)  # fmt: skip
            return min(self.policy.delay_per_failure * len(recent), self.policy.max_delay)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
