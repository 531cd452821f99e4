"""Locks a fork does not leave held: a forked child never hangs on a lock another thread held."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import pytest

from pai_usage import _locks, _warnings, capability
from pai_usage._locks import late_forks, sqlite_gate, sqlite_gate_paused
from pai_usage._log import RateLimitedLog
from pai_usage.budgets import _enforce
from pai_usage.gemini import _calls


def _child_exit_code(check: Callable[[], bool], timeout: float = 10.0) -> int:
    """Fork; the child exits 0 if `check()` is true there. Returns its exit code, -9 if it hung past `timeout`."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: it must never return into pytest
        code = 1
        try:
            code = 0 if check() else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(done[1])


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='POSIX fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # fork() with threads: the case under test
def test_a_fork_while_another_thread_holds_our_locks_does_not_hang_the_child() -> None:
    log = RateLimitedLog()
    # The module-wide ones too: capability runs, budget enforcers, the Gemini SDK watch.
    locks = [log._lock, _warnings._lock, capability._shared_lock, _enforce._enforcers_lock, _calls._lock]  # pyright: ignore[reportPrivateUsage]
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            held.set()
            release.wait(10)

    def child() -> bool:  # the holder thread does not exist here
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            log.warning('k', 'from the child')
            _warnings.warn_once('fork-test', 'from the child', _warnings.UnpricedModelWarning)
            for lock in locks:
                with lock:
                    pass
        return True

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    code = _child_exit_code(child)
    release.set()
    holder.join()
    assert code == 0, 'the child hung on a lock held at the fork'


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='POSIX fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('repeat', range(3))
def test_a_fork_waits_for_a_thread_inside_sqlite_to_leave(repeat: int) -> None:
    inside, left = threading.Event(), threading.Event()
    late = late_forks()

    def work() -> None:
        with sqlite_gate('sqlite'):
            inside.set()
            time.sleep(0.2)  # SQLite's mutexes are held somewhere in here
            left.set()

    thread = threading.Thread(target=work)
    thread.start()
    assert inside.wait(5)
    assert _child_exit_code(left.is_set) == 0, 'the fork did not wait for the thread to leave SQLite'
    thread.join()
    assert late_forks() == late


@contextmanager
def _paused_sqlite() -> Generator[None]:
    with sqlite_gate('sqlite'), sqlite_gate_paused():  # a retry's backoff: the gate is let go meanwhile
        yield


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='POSIX fork')
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize(
    'gate',
    [
        pytest.param(_paused_sqlite, id='sqlite-sleeping'),
        # libpq holds no process-wide lock: a stalled server must not stall a fork.
        pytest.param(lambda: sqlite_gate('postgresql'), id='postgresql'),
    ],
)
def test_a_fork_does_not_wait_for_a_sleep_or_another_database(
    gate: Callable[[], AbstractContextManager[None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_locks, 'FORK_WAIT', 1.0)
    inside, forked = threading.Event(), threading.Event()
    late = late_forks()

    def work() -> None:
        with gate():
            inside.set()
            forked.wait(10)

    thread = threading.Thread(target=work)
    thread.start()
    assert inside.wait(5)
    assert _child_exit_code(lambda: True) == 0
    forked.set()
    thread.join()
    assert late_forks() == late, 'the fork waited for a thread that held no SQLite lock'
