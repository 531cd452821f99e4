"""Fault tests for the writer: outages, a hung database, killed and exiting processes, bad input, threads.

PostgreSQL outages are faked with a loopback proxy (`tests/_pgproxy.py`); the shared server is never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

import pai_usage._writer as writer_module
from pai_usage import UnknownFieldWarning, UsageRecord, UsageTracker
from pai_usage._journal import read_segment
from pai_usage.migrate import migrate
from pai_usage.table import TOKEN_USAGE
from pai_usage.tracker import create_engine
from tests._faults import FAST, wait_until
from tests._pgproxy import PgProxy, pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL

ROOT = Path(__file__).resolve().parent.parent


def event(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {
        'id': uuid.uuid4(),
        'provider': 'openai',
        'model': 'gpt-4o',
        'organization_id': f'org-{i % 7}',
        'input_tokens': 100 + i % 13,
        'output_tokens': 20,
        'cost_usd': '0.00045',
        **fields,
    }


def rows(url: str) -> tuple[int, int]:
    """(rows, distinct ids) in `token_usage`, read directly (never through a proxy)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            count, distinct = conn.execute(sa.text('SELECT count(*), count(DISTINCT id) FROM token_usage')).one()
    finally:
        engine.dispose()
    return count, distinct


def rows_or_zero(url: str) -> int:
    """Rows in `token_usage`, 0 while the table does not exist yet."""
    try:
        return rows(url)[0]
    except sa.exc.ProgrammingError:
        return 0


def ids_in_table(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {str(i) for (i,) in conn.execute(sa.text('SELECT id FROM token_usage'))}
    finally:
        engine.dispose()


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    with pg_proxy(PG_SERVER_URL) as p:
        yield p


def run_script(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.postgres
def test_outage_mid_stream(pg_schema_url: str, proxy: PgProxy, tmp_path: Path) -> None:
    """20k events, the database cut in the middle and back later: every event is in the table exactly once."""
    tracked: list[str] = []
    tracker = UsageTracker(via_proxy(pg_schema_url, proxy), spill_dir=tmp_path, **FAST)
    try:
        for i in range(10_000):
            e = event(i)
            tracked.append(str(e['id']))
            tracker.track(e)
        assert tracker.flush(30)
        proxy.cut()
        for i in range(10_000, 20_000):
            e = event(i)
            tracked.append(str(e['id']))
            tracker.track(e)
        # The outage is noticed and the backlog goes to disk, not to RAM.
        wait_until(lambda: tracker.stats().spilled > 0, what='spilling')
        assert tracker.stats().failed_writes > 0
        proxy.restore()
        wait_until(lambda: rows(pg_schema_url)[0] >= 20_000, timeout=60, what='all rows after the outage')
        assert tracker.close(30)
    finally:
        tracker.close(1)
        tracker.engine.dispose()
    assert rows(pg_schema_url) == (20_000, 20_000)
    assert ids_in_table(pg_schema_url) == set(tracked)
    stats = tracker.stats()
    assert stats.dropped == 0
    assert stats.pending == 0
    assert stats.replayed >= stats.spilled > 0
    assert not list(tmp_path.rglob('spill-*.jsonl')), 'replayed spill files are deleted'


@pytest.mark.postgres
def test_hung_database_does_not_slow_track(pg_schema_url: str, tmp_path: Path) -> None:
    """A table lock held for 5 s: `track()` stays in microseconds, and everything lands after the release."""
    tracker = UsageTracker(pg_schema_url, spill_dir=tmp_path, flush_interval=0.01)
    tracker.track(event())
    assert tracker.flush(30)  # table created, writer idle

    locker = sa.create_engine(pg_schema_url)
    latencies: list[float] = []
    with locker.connect() as conn:
        conn.exec_driver_sql('LOCK TABLE token_usage IN ACCESS EXCLUSIVE MODE')
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            e = event(len(latencies))
            t0 = time.perf_counter()
            tracker.track(e)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.001)
        # The writer is stuck behind the lock: nothing new got in.
        assert tracker.stats().written == 1
        conn.rollback()
    locker.dispose()

    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 1e-3, f'track() p50={p50 * 1e6:.1f} us, p99={p99 * 1e6:.1f} us while the database hung'
    assert tracker.flush(30)
    tracker.close()
    tracker.engine.dispose()
    assert rows(pg_schema_url) == (len(latencies) + 1, len(latencies) + 1)


KILLED_SCRIPT = """
import sys, time, uuid
from pai_usage import UsageTracker
url, spill_dir = sys.argv[1], sys.argv[2]
tracker = UsageTracker(url, spill_dir=spill_dir, flush_interval=0.01, spill_after=0, retry_interval=0.01,
                       max_retry_interval=0.05, max_queue=2000)
print(tracker.spill_dir, flush=True)
i = 0
while True:
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, output_tokens=1, cost_usd='0.01')
    i += 1
    if i % 100 == 0:
        time.sleep(0.001)
"""


def spilled_ids(spill_dir: Path) -> set[str]:
    ids: set[str] = set()
    for path in spill_dir.glob('*.jsonl'):
        if path.name.startswith('rejected-'):
            continue
        for line in path.read_bytes().splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue  # torn last line: that event never reached the file
            if 'id' in value:  # not the header line
                ids.add(value['id'])
    return ids


def journal_ids(spill_dir: Path) -> set[str]:
    ids: set[str] = set()
    for path in spill_dir.glob('*.bin'):
        ids.update(str(uuid.UUID(str(r['id']))) for r in read_segment(path) if isinstance(r, dict))
    return ids


@pytest.mark.postgres
@pytest.mark.parametrize('database', ['down', 'up'])
def test_process_killed_then_replayed(pg_schema_url: str, proxy: PgProxy, tmp_path: Path, database: str) -> None:
    """SIGKILL mid-stream: a new tracker on the same spill directory inserts every accepted event once.

    Accepted events are in the journal (or already in the table, or spilled): none dies with the process.
    """
    url = via_proxy(pg_schema_url, proxy)
    if database == 'down':
        proxy.cut()
    proc = subprocess.Popen(
        [sys.executable, '-c', KILLED_SCRIPT, url, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, 'PYTHONPATH': str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        spill_dir = Path(proc.stdout.readline().strip())
        if database == 'down':
            wait_until(lambda: len(spilled_ids(spill_dir)) >= 5_000, what='events in the spill file')
        else:
            wait_until(lambda: rows_or_zero(pg_schema_url) >= 5_000, what='events in the table')
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    before = ids_in_table(pg_schema_url) if database == 'up' else set[str]()
    expected = spilled_ids(spill_dir) | journal_ids(spill_dir) | before
    assert len(expected - before) > 0, 'the kill left accepted events that were not in the table yet'

    proxy.restore()
    with UsageTracker(url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        assert tracker.spill_dir == spill_dir
        assert tracker.flush(30)
        wait_until(lambda: rows(pg_schema_url)[0] >= len(expected), what='the replay')
        stats = tracker.stats()
    tracker.engine.dispose()
    assert stats.replayed >= len(expected - before)
    assert rows(pg_schema_url) == (len(expected), len(expected))
    assert ids_in_table(pg_schema_url) == expected
    assert not list(spill_dir.glob('*.jsonl')) and not list(spill_dir.glob('*.bin'))


# A listener that holds the writer up once keeps events queued when the script ends, without racing it.
SLOW_LISTENER = """
import threading, time
_slow_once = threading.Event()
def slow_listener(record):
    if not _slow_once.is_set():
        _slow_once.set()
        time.sleep(0.5)
"""

EXIT_SCRIPT = (
    SLOW_LISTENER
    + """
import sys, uuid
from pai_usage import UsageTracker
tracker = UsageTracker(sys.argv[1], spill_dir=sys.argv[2], batch_size=100, listeners=[slow_listener])
for i in range(5000):
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, output_tokens=1)
print(tracker.stats().pending > 0)
"""
)


def test_graceful_exit_writes_everything(database_url: str, tmp_path: Path) -> None:
    """The interpreter exits with events still queued: the exit hook writes them all."""
    result = run_script(EXIT_SCRIPT, database_url, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'True', 'events were still queued at exit'
    assert rows(database_url) == (5000, 5000)
    assert not list(tmp_path.rglob('spill-*.jsonl'))


SIGTERM_SCRIPT = (
    SLOW_LISTENER
    + """
import os, signal, sys, uuid
from pai_usage import UsageTracker
def previous(signum, frame):
    print('previous handler called', flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, previous)
tracker = UsageTracker(sys.argv[1], spill_dir=sys.argv[2], listeners=[slow_listener])
for i in range(3000):
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, output_tokens=1)
os.kill(os.getpid(), signal.SIGTERM)
"""
)


def test_sigterm_flushes_and_chains(sqlite_url: str, tmp_path: Path) -> None:
    result = run_script(SIGTERM_SCRIPT, sqlite_url, str(tmp_path))
    assert result.returncode == 3, result.stderr
    assert 'previous handler called' in result.stdout
    assert rows(sqlite_url) == (3000, 3000)


SIGTERM_DEFAULT_SCRIPT = (
    SLOW_LISTENER
    + """
import os, signal, sys, uuid
from pai_usage import UsageTracker
tracker = UsageTracker(
    sys.argv[1], spill_dir=sys.argv[2], listeners=[slow_listener], handle_sigterm=sys.argv[3] == 'on'
)
for i in range(2000):
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, output_tokens=1)
os.kill(os.getpid(), signal.SIGTERM)
"""
)


@pytest.mark.parametrize(('handle', 'expected'), [('on', 2000), ('off', None)])
def test_sigterm_default_action(sqlite_url: str, tmp_path: Path, handle: str, expected: int | None) -> None:
    """With the default SIGTERM action, the process still dies of SIGTERM, after flushing (unless opted out)."""
    result = run_script(SIGTERM_DEFAULT_SCRIPT, sqlite_url, str(tmp_path), handle)
    assert result.returncode == -signal.SIGTERM, result.stderr
    if expected is not None:
        assert rows(sqlite_url) == (expected, expected)
    else:
        # Opted out: killed before the writer was done (the table may not even exist yet).
        try:
            count = rows(sqlite_url)[0]
        except sa.exc.OperationalError:
            count = 0
        assert count < 2000


def test_bad_input_mixed_with_good(database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Bad records are counted, logged with the reason and kept aside; the good ones around them are written."""
    bad: list[dict[str, Any]] = [
        event(input_tokens=-5),
        event(output_tokens=math.nan),
        event(input_tokens='many', prompt='a secret prompt'),
        event(created_at='yesterday-ish'),
        event(cost_usd=float('inf')),
    ]
    good = [event(i) for i in range(300)]
    caplog.set_level(logging.ERROR, logger='pai_usage')
    with UsageTracker(database_url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        # The unknown `prompt` is dropped (names only, never its value) on the caller's thread, with a warning.
        with pytest.warns(UnknownFieldWarning, match='`prompt`'):
            for i, e in enumerate(good):
                tracker.track(e)
                if i % 50 == 0 and bad:
                    tracker.track(bad.pop())
        tracker.track(UsageRecord(provider='openai', model='gpt-4o', input_tokens=1))
        assert tracker.flush(30)
        stats = tracker.stats()
    tracker.engine.dispose()
    assert stats.invalid == 5
    assert stats.written == 301
    assert stats.pending == 0
    assert rows(database_url) == (301, 301)
    assert 'invalid usage record rejected' in caplog.text
    # One message per kind of problem (rate-limited), each naming the field and the reason.
    for field_name in ('input_tokens', 'output_tokens', 'created_at', 'cost_usd'):
        assert f'\n{field_name}\n' in caplog.text
    assert 'secret' not in caplog.text, 'input values are never logged'
    raw = b''.join(f.read_bytes() for f in tmp_path.rglob('rejected-*.jsonl'))
    assert b'secret' not in raw, 'fields a record does not have are never written to disk'
    rejected = [json.loads(line) for line in raw.splitlines()]
    assert len(rejected) == 5
    assert all(r['error'] for r in rejected)
    # Typed JSON, replayable once fixed: the record's own fields with their values.
    assert sorted(str(r['record']['input_tokens']) for r in rejected) == sorted(['-5', '100', 'many', '100', '100'])


def test_concurrent_threads_lose_nothing(database_url: str, tmp_path: Path) -> None:
    """8 threads x 10k events: every one in the table exactly once (some may go through the spill file)."""
    with UsageTracker(database_url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        start = threading.Barrier(8)

        def produce(n: int) -> None:
            start.wait()
            for i in range(10_000):
                tracker.track(provider='openai', model='gpt-4o', input_tokens=n * 10_000 + i, cost_usd='0.001')

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert tracker.stats().enqueued == 80_000
        wait_until(lambda: rows(database_url)[0] >= 80_000, timeout=60, what='80k rows')
        stats = tracker.stats()
    tracker.engine.dispose()
    assert rows(database_url) == (80_000, 80_000)
    assert stats.dropped == 0
    assert stats.invalid == 0
    assert stats.written + stats.spilled == 80_000


def test_spill_failure_is_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Database down and the spill directory unusable (like a full disk): held until `close()` gives up.

    Then `dropped` counts the loss, logged once.
    """
    blocker = tmp_path / 'not-a-dir'
    blocker.write_text('')
    caplog.set_level(logging.ERROR, logger='pai_usage')
    tracker = UsageTracker(
        f'sqlite:///{tmp_path}/missing/dir/usage.db', spill_dir=blocker / 'spill', handle_sigterm=False, **FAST
    )
    for i in range(1000):
        tracker.track(event(i))
    for _ in range(3):  # held, not lost, while the tracker runs
        assert tracker.flush(0.5) is False, 'records are neither written nor spilled'
        assert (tracker.stats().dropped, tracker.stats().pending) == (0, 1000)
    assert tracker.close(1) is False
    wait_until(lambda: tracker.stats().dropped == 1000, what='the loss, counted once close() gave up')
    stats = tracker.stats()
    assert stats.spilled == 0
    assert stats.pending == 0
    for _ in range(2):  # and still lost at every later call
        assert tracker.flush(1) is False
    lost = [r for r in caplog.records if 'LOST' in r.getMessage()]
    assert len(lost) == 1


def test_spill_disabled_drops_when_full(tmp_path: Path) -> None:
    """`spill=False` never touches the disk: what the queue cannot hold is dropped and counted."""
    tracker = UsageTracker(f'sqlite:///{tmp_path}/missing/usage.db', spill=False, max_queue=100, **FAST)
    for i in range(1000):
        tracker.track(event(i))
    assert tracker.spill_dir is None
    tracker.close(0.5)
    wait_until(lambda: tracker.stats().dropped == 1000, what='every record counted as dropped')
    stats = tracker.stats()
    assert stats.spilled == 0
    assert not list(tmp_path.iterdir())


def test_duplicate_ids_are_stored_once(database_url: str, tmp_path: Path) -> None:
    """A batch holding ids already in the table (a retry after a lost commit acknowledgement) inserts the rest."""
    first = [event(i) for i in range(50)]
    with UsageTracker(database_url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        for e in first:
            tracker.track(e)
        assert tracker.flush(30)
        for e in [*first[:20], *(event(i) for i in range(30))]:
            tracker.track(dict(e))
        assert tracker.flush(30)
        stats = tracker.stats()
    tracker.engine.dispose()
    assert rows(database_url) == (80, 80)
    assert (stats.failed_writes, stats.dropped, stats.spilled, stats.pending) == (0, 0, 0, 0)
    assert (stats.written, stats.duplicates) == (80, 20), 'duplicates are counted apart from written rows'


@pytest.mark.postgres
@pytest.mark.parametrize('replay', [False, True], ids=['queue', 'replay'])
def test_a_row_the_database_refuses_costs_only_itself(
    pg_schema_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, replay: bool
) -> None:
    """A data error (here, the application's own CHECK constraint) splits the batch: only that row is rejected."""
    good = [event(i) for i in range(200)]
    poison = event(user_id='refused-by-a-check')  # valid for pydantic, refused by the table
    caplog.set_level(logging.ERROR, logger='pai_usage')
    with UsageTracker(pg_schema_url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        tracker.track(event())
        assert tracker.flush(30)
        with tracker.engine.begin() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE token_usage ADD CONSTRAINT app_check CHECK (user_id <> 'refused-by-a-check')"
            )
        spill_dir = tracker.spill_dir
        assert spill_dir is not None
        if replay:
            # The same batch found in a spill file left by another process.
            (spill_dir / f'spill-otherhost-1-{uuid.uuid4().hex[:8]}.jsonl').write_bytes(
                b''.join(writer_module.encode(e) for e in [*good[:100], poison, *good[100:]])
            )
            tracker._writer._replay()  # pyright: ignore[reportPrivateUsage]
        else:
            for e in [*good[:100], poison, *good[100:]]:
                tracker.track(e)
        assert tracker.flush(30)
        stats = tracker.stats()
    tracker.engine.dispose()
    assert rows(pg_schema_url) == (201, 201)
    assert ids_in_table(pg_schema_url) >= {str(e['id']) for e in good}
    assert (stats.invalid, stats.failed_writes, stats.spilled, stats.quarantined) == (1, 0, 0, 0)
    (rejected,) = [json.loads(line) for f in tmp_path.rglob('rejected-*.jsonl') for line in f.read_text().splitlines()]
    assert rejected['error'].startswith('refused by the database')
    assert rejected['record']['id'] == str(poison['id'])
    assert 'refused by the database' in caplog.text
    assert not list(spill_dir.glob('spill-*.jsonl')) and not list(spill_dir.glob('replay-*'))


def _core_insert(conn: sa.Connection, records: list[UsageRecord]) -> None:
    """The reference: SQLAlchemy Core's insert, ignoring rows already present (any unique key on PostgreSQL)."""
    insert = postgresql.insert if conn.dialect.name == 'postgresql' else sqlite.insert
    conn.execute(insert(TOKEN_USAGE).on_conflict_do_nothing(), [dict(r.__dict__) for r in records])


def test_sqlite_rows_are_stored_as_core_stores_them(sqlite_url: str) -> None:
    """The writer's SQLite insert (raw `executemany`) stores exactly what a Core insert stores."""
    engine = create_engine(sqlite_url)
    migrate(engine)
    records = [
        UsageRecord(
            provider='openai',
            cost_usd=Decimal('0.1234567890125'),
            units=Decimal('1.5000005'),
            unit_type='image',
            pricing_status='priced',
            details={'cache_write_1h_tokens': 3},
            metadata={'feature': 'é', 'n': [1, None]},
        ),
        UsageRecord(pricing_status='unpriced', status='error'),
    ]
    try:
        with engine.begin() as conn:
            writer_module._insert_sqlite(conn, records)  # pyright: ignore[reportPrivateUsage]
            writer_module._insert_sqlite(conn, records)  # pyright: ignore[reportPrivateUsage]  # duplicates: ignored
            ours = conn.exec_driver_sql('SELECT * FROM token_usage ORDER BY id').all()
            conn.exec_driver_sql('DELETE FROM token_usage')
            _core_insert(conn, records)
            core = conn.exec_driver_sql('SELECT * FROM token_usage ORDER BY id').all()
    finally:
        engine.dispose()
    assert len(ours) == 2
    assert ours == core


@pytest.mark.postgres
def test_partitioned_table_ignores_duplicates(pg_schema_url: str) -> None:
    """With `token_usage` partitioned by month (primary key `(id, created_at)`), COPY, its duplicate fallback and
    replays still store each event once: the conflict clause names no target."""
    engine = create_engine(pg_schema_url)
    migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE token_usage RENAME TO token_usage_plain')
        conn.exec_driver_sql(
            'CREATE TABLE token_usage (LIKE token_usage_plain INCLUDING DEFAULTS, PRIMARY KEY (id, created_at)) '
            'PARTITION BY RANGE (created_at)'
        )
        conn.exec_driver_sql('CREATE TABLE token_usage_default PARTITION OF token_usage DEFAULT')
    writer = writer_module.Writer(engine, writer_module.WriterStats(), auto_migrate=False)
    first = [UsageRecord.model_validate({**event(i), 'pricing_status': 'priced'}) for i in range(10)]
    more = [UsageRecord.model_validate({**event(i), 'pricing_status': 'priced'}) for i in range(5)]
    try:
        writer._write(first)  # pyright: ignore[reportPrivateUsage]  # COPY straight into the table
        writer._write([*first[:4], *more])  # pyright: ignore[reportPrivateUsage]  # unique violation: staged
        writer._write(first, replay=True)  # pyright: ignore[reportPrivateUsage]  # staged, all present
        with engine.connect() as conn:
            count, distinct = conn.execute(sa.text('SELECT count(*), count(DISTINCT id) FROM token_usage')).one()
        with engine.begin() as conn:
            _core_insert(conn, first)  # Core: ignored too
    finally:
        engine.dispose()
    assert (count, distinct) == (15, 15)
