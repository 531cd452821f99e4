"""Rate-limited logging: tracking problems are reported, but never flood the product's logs."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

from ._locks import ForkSafeLock

__all__ = ('RateLimitedLog', 'logger', 'reset_rate_limits')

logger = logging.getLogger('pai_usage')
logger.addHandler(logging.NullHandler())


@dataclass(eq=False)
class RateLimitedLog:
    """Logs each kind of message at most once per `interval` seconds, counting what it held back."""

    interval: float = 60.0
    """Minimum seconds between two messages of the same key."""
    _last: dict[str, float] = field(default_factory=dict[str, float], init=False, repr=False)
    _suppressed: dict[str, int] = field(default_factory=dict[str, int], init=False, repr=False)
    _lock: ForkSafeLock = field(default_factory=ForkSafeLock, init=False, repr=False)

    def __post_init__(self) -> None:
        _instances.add(self)

    def reset(self) -> None:
        """Forget what was logged, so that every kind of message is logged again."""
        with self._lock:
            self._last.clear()
            self._suppressed.clear()

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg` unless a message with the same `key` was logged less than `interval` seconds ago.

        Returns whether the message was emitted.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg = f'{msg} ({suppressed} similar messages suppressed)'
        logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log a rate-limited warning."""
        return self.log(logging.WARNING, key, msg, *args, exc_info=exc_info)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log a rate-limited error."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)


_instances: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def reset_rate_limits() -> None:
    """Reset every rate-limited log (used by `pai_usage.testing` per test, so a test sees its own messages)."""
    for log in list(_instances):
        log.reset()
