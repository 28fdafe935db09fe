"""Log lines that a peer can cause, at a bounded rate.

A flood of refused handshakes or broken frames must not become a flood of
log lines: each ``RateLimitedLog`` lets ``burst`` lines through at once and
``per_second`` after that, counts what it held back, and says so in one line
once the flood calms down (or a second later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, what: str, *, per_second: float = 20.0, burst: int = 50,
                 call_later: Callable[[float, Callable], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what  # "refusals", "protocol violations"...
        self.per_second = per_second
        self.burst = burst
        self.call_later = call_later
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.suppressed = 0
        self.since = 0.0
        self._flush_scheduled = False

    def warning(self, fmt: str, *args: Any) -> bool:
        """Log now if the rate allows; True when the line was written."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.flush()
            self.logger.warning(fmt, *args)
            return True
        if not self.suppressed:
            self.since = now
        self.suppressed += 1
        if self.call_later is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self.call_later(1.0, self._scheduled_flush)
        return False

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if self.suppressed:
            self.logger.warning("%d more %s in the last %.1f s were not logged one by one (counted in vhub.stats)",
                                self.suppressed, self.what, max(0.0, self.clock() - self.since))
            self.suppressed = 0
