"""Locks a fork does not leave held.

`os.fork()` copies a lock in whatever state it is: one another thread held at that moment stays held in the
child, whose first use then hangs for good. These locks start afresh in a forked child, and `sqlite_gate` makes
a fork wait for our threads to leave SQLite, whose own C mutexes no child can reset.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType

__all__ = ('ForkSafeLock', 'late_forks', 'sqlite_gate', 'sqlite_gate_paused')

FORK_WAIT = 10.0
"""At most this long (s) a fork waits for our threads to leave SQLite; then it goes ahead (and logs)."""


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


class _SqliteGate:
    """Held, shared, by our threads while they are inside SQLite; `os.fork()` waits until none is.

    SQLite takes process-wide C mutexes (its allocator's, its table of file locks) in nearly every call. A fork
    while another thread held one leaves it held in the child, whose first `sqlite3.connect` then hangs for good
    (seen: 1 fork in 10 while the parent's writer was writing a batch). A fork that would wait past `FORK_WAIT`
    goes ahead: a child at risk, rather than a parent stuck behind a database that never answers.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holders = 0
        self._local = threading.local()
        self._forking = self._late = False
        self.late_forks = 0

    @contextmanager
    def held(self) -> Generator[None]:
        self._enter()
        try:
            yield
        finally:
            self._leave()

    @contextmanager
    def paused(self) -> Generator[None]:
        """Let go for a while (a sleep between retries), if this thread holds the gate."""
        depth = getattr(self._local, 'depth', 0)
        if not depth:
            yield
            return
        self._leave(depth)
        try:
            yield
        finally:
            self._enter(depth)

    def _enter(self, depth: int = 1) -> None:
        with self._cond:
            while self._forking:  # a fork waits for the holders to leave: none may come in meanwhile
                self._cond.wait()
            self._holders += depth
        self._local.depth = getattr(self._local, 'depth', 0) + depth

    def _leave(self, depth: int = 1) -> None:
        self._local.depth -= depth
        with self._cond:
            self._holders -= depth
            if not self._holders:
                self._cond.notify_all()

    def before_fork(self) -> None:
        own = getattr(self._local, 'depth', 0)  # a fork from a thread inside the gate waits for the others only
        self._cond.acquire()  # held across the fork
        self._forking = True
        if not self._cond.wait_for(lambda: self._holders <= own, timeout=FORK_WAIT):
            self.late_forks += 1
            self._late = True

    def after_fork_in_parent(self) -> None:
        late, self._late = self._late, False
        self._forking = False
        self._cond.notify_all()
        self._cond.release()
        if late:
            # Not rate-limited: forks are few, and `_log` builds on these locks.
            logging.getLogger('pai_usage').warning(
                'pai-usage: forked after waiting %gs for a thread inside SQLite; the child may hang in SQLite',
                FORK_WAIT,
            )

    def after_fork_in_child(self) -> None:
        # The other holders were threads of the parent: none of them runs here.
        self._cond = threading.Condition(threading.Lock())
        self._holders = getattr(self._local, 'depth', 0)
        self._forking = self._late = False


_gate = _SqliteGate()
os.register_at_fork(
    before=_gate.before_fork, after_in_parent=_gate.after_fork_in_parent, after_in_child=_gate.after_fork_in_child
)


def sqlite_gate(dialect: str) -> AbstractContextManager[None]:
    """A context to hold while a background thread works in the database, for a fork to wait on (SQLite only).

    Other databases' drivers hold no process-wide lock a fork could strand, and a stalled server must not
    stall a fork.
    """
    return _gate.held() if dialect == 'sqlite' else nullcontext()


def sqlite_gate_paused() -> AbstractContextManager[None]:
    """Let go of `sqlite_gate` while this thread sleeps, so that a fork need not wait out the sleep."""
    return _gate.paused()


def late_forks() -> int:
    """Forks that went ahead while one of our threads was still inside SQLite (after `FORK_WAIT`)."""
    return _gate.late_forks
