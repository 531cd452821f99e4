"""Helpers for the delivery fault tests (`tests/test_faults_*.py`, issue 9).

They look at delivery only from outside: what `track()` accepted, what `flush()`/`close()` answered, and which
ids are in `token_usage`, read straight from the server (never through a proxy, never through pai-usage).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pai_usage import UsageTracker

__all__ = (
    'COST',
    'FAST',
    'ROOT',
    'Producer',
    'assert_exactly_once',
    'billing',
    'open_tracker',
    'spawn',
    'table_ids',
    'track_all',
    'wait_for_rows',
    'wait_until',
)

ROOT = Path(__file__).resolve().parent.parent

FAST: dict[str, Any] = {'flush_interval': 0.01, 'spill_after': 0.1, 'retry_interval': 0.02, 'max_retry_interval': 0.2}
"""Quick retries and spills, for the scenarios that are about data rather than about the default timings."""

COST = Decimal('0.00045')
"""The cost every `billing()` record carries: given by the caller, so the ledger must keep it as is."""


def billing(i: int = 0, **fields: Any) -> dict[str, Any]:
    """A good billing record (tokens and a cost), with its own id, as raw fields for `track()`."""
    return {
        'id': uuid.uuid4(),
        'provider': 'openai',
        'model': 'gpt-4o',
        'organization_id': f'org-{i % 7}',
        'user_id': f'user-{i % 11}',
        'input_tokens': 100 + i % 13,
        'output_tokens': 20,
        'cost_usd': COST,
        **fields,
    }


def table_ids(url: str) -> Counter[str]:
    """How many rows each id has in `token_usage` (empty if the table was never created)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table('token_usage'):
                return Counter()
            return Counter(
                {str(i): n for i, n in conn.execute(sa.text('SELECT id, count(*) FROM token_usage GROUP BY id'))}
            )
    finally:
        engine.dispose()


def assert_exactly_once(url: str, expected: Iterable[object], *, may_have: Iterable[object] = ()) -> None:
    """Every expected id is in the table once: 0 lost, 0 duplicated, nothing else but `may_have`."""
    want = {str(i) for i in expected}
    allowed = want | {str(i) for i in may_have}
    present = table_ids(url)
    lost = want - present.keys()
    duplicated = {i: n for i, n in present.items() if n > 1}
    unexpected = present.keys() - allowed
    assert (len(lost), len(duplicated), len(unexpected)) == (0, 0, 0), (
        f'{len(lost)} of {len(want)} lost, {len(duplicated)} duplicated, {len(unexpected)} unexpected rows'
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = 'condition') -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(0.05)


def wait_for_rows(url: str, ids: Iterable[object], *, timeout: float = 60.0, settle: float = 10.0, what: str) -> None:
    """Wait until every id in `ids` is in the table; give up early once the table stops gaining any of them.

    A replay that lost records never completes, so waiting the whole timeout would only make a failure slow.
    """
    want = {str(i) for i in ids}
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while True:
        found = len(want & table_ids(url).keys())
        if found == len(want):
            return
        now = time.monotonic()
        if found != seen:
            seen, since = found, now
        if now > deadline or now - since > settle:
            raise AssertionError(f'{what}: {len(want) - found} of {len(want)} records still not in the table')
        time.sleep(0.1)


def track_all(tracker: UsageTracker, records: Iterable[dict[str, Any]]) -> list[BaseException]:
    """Track each record; return what `track()` raised into the caller (it must raise nothing)."""
    raised: list[BaseException] = []
    for record in records:
        try:
            tracker.track(record)
        except BaseException as exc:
            raised.append(exc)
    return raised


@contextmanager
def open_tracker(url: str, **options: Any) -> Iterator[UsageTracker]:
    """A tracker closed (briefly, if the test has not) and disposed of at the end, whatever happens."""
    tracker = UsageTracker(url, **options)
    try:
        yield tracker
    finally:
        tracker.close(timeout=5)
        tracker.engine.dispose()


class Producer(threading.Thread):
    """Tracks billing records steadily (about `rate` a second) until stopped, keeping the ids it tracked.

    An id is appended only after its `track()` returned, so `ids[:k]` read at any time were all accepted.
    """

    def __init__(self, tracker: UsageTracker, *, rate: int = 2000, burst: int = 20) -> None:
        super().__init__(name='fault-producer', daemon=True)
        self.tracker = tracker
        self.pause = burst / rate
        self.burst = burst
        self.ids: list[str] = []
        self.raised: list[BaseException] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            for _ in range(self.burst):
                record = billing(i)
                i += 1
                try:
                    self.tracker.track(record)
                except BaseException as exc:
                    self.raised.append(exc)
                    continue
                self.ids.append(str(record['id']))
            self._stop_event.wait(self.pause)

    def accepted(self) -> int:
        """How many records were accepted so far (a prefix of `ids`)."""
        return len(self.ids)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), 'track() blocked the producer'


def spawn(code: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Run `code` in a child interpreter of this worktree's Python, its output going to `log`."""
    with log.open('wb') as out:
        return subprocess.Popen(
            [sys.executable, '-c', code, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, 'PYTHONPATH': str(ROOT)},
            cwd=ROOT,
        )
