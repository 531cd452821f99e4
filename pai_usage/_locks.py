"""Locks a fork does not leave held.

`os.fork()` copies a lock in whatever state it is: one another thread held at that moment stays held in the
child, whose first use then hangs for good. These locks start afresh in a forked child.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType

__all__ = ('ForkSafeLock',)


class ForkSafeLock:
    """A `threading.Lock` for `with` blocks, replaced by a new one in a forked child."""

    __slots__ = ('__weakref__', '_lock')

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _after_fork() -> None:
    for lock in list(_locks):
        lock._lock = threading.Lock()  # pyright: ignore[reportPrivateUsage]


os.register_at_fork(after_in_child=_after_fork)
