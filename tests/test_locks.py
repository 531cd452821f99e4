"""Locks a fork does not leave held: a forked child never hangs on a lock another thread held."""

from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import ExitStack

import pytest

from pai_usage import _warnings, capability
from pai_usage._log import RateLimitedLog
from pai_usage.budgets import _enforce
from pai_usage.gemini import _calls


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

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: the holder thread does not exist here; it must never return into pytest
        code = 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                log.warning('k', 'from the child')
                _warnings.warn_once('fork-test', 'from the child', _warnings.UnpricedModelWarning)
                for lock in locks:
                    with lock:
                        pass
            code = 0
        finally:
            os._exit(code)
    release.set()
    holder.join()
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if done == (0, 0):
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, 'the child hung on a lock held at the fork'
