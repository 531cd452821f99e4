"""`UsageTracker`'s contract: fire-and-forget tracking, stats, shutdown with a deadline, async use, fork safety."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest

import pai_usage.tracker as tracker_module
from pai_usage import TrackerStats, UnknownFieldWarning, UsageRecord, UsageTracker, configure, get_tracker
from pai_usage.migrate import migrate
from tests._helpers import token_usage_rows, watch_fork_gate, writes_held
from tests._pgproxy import pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL
from tests.test_writer import FAST, event, ids_in_table, rows, wait_until

pytestmark = pytest.mark.anyio


def test_track_flush_stats(tracker: UsageTracker) -> None:
    tracker.track(event(1))
    tracker.track({'provider': 'openai', 'model': 'gpt-4o', 'input_tokens': 1}, organization_id='org-9')
    tracker.track(UsageRecord(provider='openai', model='gpt-4o', output_tokens=2), user_id='u-1')
    tracker.track(provider='openai', model='gpt-4o', input_tokens=-1)
    assert tracker.flush()
    assert tracker.stats() == TrackerStats(
        enqueued=4, written=3, pending=0, invalid=1, failed_writes=0, dropped=0, unpriced=0, spilled=0, replayed=0
    )
    assert rows(str(tracker.engine.url.render_as_string(hide_password=False))) == (3, 3)


def test_track_never_raises(tracker: UsageTracker) -> None:
    tracker.track(['not', 'a', 'mapping'])  # pyright: ignore[reportArgumentType]
    with pytest.warns(UnknownFieldWarning, match='not_a_field'):
        tracker.track(UsageRecord(), not_a_field=1)  # the unknown field is dropped (and warned), the record kept
    assert tracker.flush()
    stats = tracker.stats()
    assert (stats.dropped, stats.invalid) == (0, 1), 'not a record: invalid input, not a lost record'
    assert stats.written == 1
    assert stats.pending == 0


_BASE = {'provider': 'openai', 'model': 'gpt-4o', 'input_tokens': 10, 'output_tokens': 5}
_NAIVE = datetime(2026, 12, 1, 12)


@pytest.mark.parametrize(
    ('changes', 'stored'),
    [
        pytest.param({'cost_usd': Decimal('NaN'), 'pricing_status': 'priced'}, None, id='nan-cost'),
        pytest.param({'cost_usd': Decimal(-5), 'pricing_status': 'priced'}, None, id='negative-cost'),
        pytest.param({'input_tokens': -1000}, None, id='negative-tokens'),
        pytest.param({'output_tokens': '5'}, None, id='text-tokens'),
        pytest.param({'created_at': _NAIVE}, None, id='naive-time'),
        pytest.param({'organization_id': 'ac\x00me'}, {'organization_id': 'acme'}, id='nul-in-label'),
        pytest.param({'user_id': 'u\ud800'}, {'user_id': 'u\ufffd'}, id='lone-surrogate'),
        pytest.param({'metadata': {'k': 'v\x00'}}, {'organization_id': 'acme'}, id='nul-in-metadata'),
    ],
)
@pytest.mark.parametrize('build', ['assigned', 'constructed'])
def test_a_record_instance_is_validated_like_its_fields(
    tracker: UsageTracker, changes: dict[str, Any], stored: dict[str, Any] | None, build: str
) -> None:
    """A `UsageRecord` whose fields were set after validation, or never validated, is not trusted as built."""
    if build == 'assigned':
        record = UsageRecord(**_BASE, organization_id='acme')
        for name, value in changes.items():
            setattr(record, name, value)
    else:
        record = UsageRecord.model_construct(**{**_BASE, 'organization_id': 'acme', **changes})
    neighbours = [event(i) for i in range(2)]
    tracker.track(neighbours[0])
    tracker.track(record)
    tracker.track(neighbours[1])
    assert tracker.flush()
    stats = tracker.stats()
    found = token_usage_rows(tracker.engine)
    assert {str(r['id']) for r in found} >= {str(e['id']) for e in neighbours}
    ours = [r for r in found if str(r['id']) == str(record.id)]
    if stored is None:
        assert (ours, stats.invalid) == ([], 1)  # rejected, as the same fields given to `track()` are
    else:
        assert stats.invalid == 0
        [row] = ours
        assert {k: row[k] for k in stored} == stored
        assert (
            row['cost_usd']
            == genai_prices.calc_price(
                genai_prices.Usage(input_tokens=10, output_tokens=5), 'gpt-4o', provider_id='openai'
            ).total_price
        )


async def test_async_context_manager(database_url: str, tmp_path: Path) -> None:
    async with UsageTracker(database_url, spill_dir=tmp_path, flush_interval=0.01) as tracker:
        for i in range(10):
            tracker.track(event(i))
        assert await tracker.aflush()
    assert await tracker.aclose()  # idempotent
    tracker.engine.dispose()
    assert rows(database_url) == (10, 10)


def test_track_after_close_is_spilled_and_replayed(sqlite_url: str, tmp_path: Path) -> None:
    """Late records (a thread still running at exit) go into one open spill file, replayed by the next start."""
    tracker = UsageTracker(sqlite_url, spill_dir=tmp_path, flush_interval=0.01)
    tracker.track(event())
    assert tracker.close()
    for i in range(100):
        tracker.track(event(i))
    assert tracker.stats().spilled == 100
    spill_dir = tracker.spill_dir
    assert spill_dir is not None
    assert len(list(spill_dir.glob('spill-*.jsonl'))) == 1, 'one file, not one per record'
    assert tracker.close() is False, 'the late records are only on disk'
    tracker.engine.dispose()
    with UsageTracker(sqlite_url, spill_dir=tmp_path) as again:
        assert again.flush()
        assert again.stats().replayed == 100
    again.engine.dispose()
    assert rows(sqlite_url) == (101, 101)


@pytest.mark.postgres
def test_close_deadline_spills_when_the_database_hangs(pg_schema_url: str, tmp_path: Path) -> None:
    """A stalled connection: `close()` returns at its deadline with everything spilled; the next start inserts it."""
    with pg_proxy(PG_SERVER_URL) as proxy:
        url = via_proxy(pg_schema_url, proxy)
        tracker = UsageTracker(url, spill_dir=tmp_path, batch_size=500, **FAST)
        tracker.track(event())
        assert tracker.flush(30)
        proxy.stall()
        for i in range(2000):
            tracker.track(event(i))
        started = time.monotonic()
        assert tracker.close(0.5) is False
        assert time.monotonic() - started < 3
        stats = tracker.stats()
        assert stats.spilled >= 1500, stats  # what was queued; the batch being written is saved too, uncounted
        assert stats.pending <= 500  # only the batch the stuck thread holds: spilled too, counted when it returns
        assert stats.dropped == 0
        proxy.restore()
        with UsageTracker(url, spill_dir=tmp_path, flush_interval=0.01) as again:
            assert again.flush(30)
        again.engine.dispose()
    assert rows(pg_schema_url) == (2001, 2001)


@pytest.mark.parametrize('repeat', range(5))
def test_fork_gives_the_child_its_own_writer(database_url: str, tmp_path: Path, repeat: int) -> None:
    tracker = UsageTracker(database_url, spill_dir=tmp_path, flush_interval=0.01)
    for i in range(100):
        tracker.track(event(i))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            assert tracker.stats().enqueued == 0
            for i in range(50):
                tracker.track(event(i))
            assert tracker.close(10)
            stats = tracker.stats()
            code = 0 if (stats.enqueued, stats.written, stats.dropped) == (50, 50, 0) else 2
        finally:
            os._exit(code)
    for i in range(100):
        tracker.track(event(i))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tracker.close(30)
    tracker.engine.dispose()
    assert tracker.stats().written == 200
    assert rows(database_url) == (250, 250)


def test_the_writer_is_inside_the_fork_gate_for_every_sqlite_call(sqlite_url: str, tmp_path: Path) -> None:
    tracker = UsageTracker(sqlite_url, spill_dir=tmp_path, flush_interval=0.01)
    outside = watch_fork_gate(tracker.engine)
    for i in range(300):
        tracker.track(event(i))
    assert tracker.flush(30)
    time.sleep(0.2)  # the writer's upkeep between batches (replay, rollups) too
    assert tracker.close(30)
    tracker.engine.dispose()
    assert tracker.stats().written == 300
    assert outside == []


def test_sigterm_handler_installed_once_from_main_thread(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    import signal
    import threading

    monkeypatch.setattr(tracker_module, '_sigterm_installed', False)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        t = threading.Thread(target=lambda: UsageTracker(sqlite_url).close())
        t.start()
        t.join()
        assert signal.getsignal(signal.SIGTERM) is previous  # not from another thread
        UsageTracker(sqlite_url, handle_sigterm=False).close()
        assert signal.getsignal(signal.SIGTERM) is previous  # opted out
        UsageTracker(sqlite_url).close()
        assert signal.getsignal(signal.SIGTERM) == tracker_module._on_sigterm  # pyright: ignore[reportPrivateUsage]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_configure_replaces_and_closes_the_default(sqlite_url: str, tmp_path: Path) -> None:
    first = configure(sqlite_url, spill_dir=tmp_path)
    assert get_tracker() is first
    second = configure(sqlite_url, spill_dir=tmp_path)
    try:
        assert get_tracker() is second
        first.track(event())
        assert first.stats().spilled == 1  # closed: tracked late, kept on disk, not lost
    finally:
        second.close()
        tracker_module._default = None  # pyright: ignore[reportPrivateUsage]


def test_queue_full_goes_to_disk_and_back(sqlite_url: str, tmp_path: Path) -> None:
    """A burst larger than `max_queue` spills from `track()` itself, and is put in once the writer catches up."""
    with UsageTracker(sqlite_url, spill_dir=tmp_path, max_queue=100, flush_interval=0.01) as tracker:
        for i in range(5000):
            tracker.track(event(i))
        assert tracker.flush(60)  # the writer has created the table and put the spilled burst in
        wait_until(lambda: rows(sqlite_url)[0] >= 5000, what='5000 rows')
    stats = tracker.stats()
    tracker.engine.dispose()
    assert stats.spilled > 0
    assert stats.replayed == stats.spilled
    assert stats.enqueued == 5000
    assert rows(sqlite_url) == (5000, 5000)


@pytest.mark.parametrize('max_queue', [200, None], ids=['small-queue', 'default-queue'])
def test_flush_answers_for_what_was_tracked_before_it_while_others_overflow(
    database_url: str, tmp_path: Path, max_queue: int | None
) -> None:
    """Producer threads keep spilling past `max_queue`: each flush waits for its own records, not for theirs."""
    options: dict[str, Any] = {} if max_queue is None else {'max_queue': max_queue}
    tracker = UsageTracker(database_url, spill_dir=tmp_path, **options)
    migrate(tracker.engine)
    tracked: list[list[str]] = [[] for _ in range(3)]
    # Bursts: three at once overflow the queue, even the default one (10,000), while the writer is held back.
    burst = 4000 if max_queue is not None else 8000

    def produce(ids: list[str]) -> None:
        for _ in range(3):
            for _ in range(burst):
                record = event(len(ids))
                tracker.track(record)
                ids.append(str(record['id']))
            time.sleep(0.3)

    threads = [threading.Thread(target=produce, args=(ids,)) for ids in tracked]
    answers: list[tuple[bool, int]] = []
    try:
        # Held until the queue overflows: a writer that drained the first burst in time left nothing spilled.
        with writes_held(database_url):
            for thread in threads:
                thread.start()
            wait_until(lambda: tracker.stats().spilled > 0, what='the queue to overflow')
        for _ in range(3):
            time.sleep(0.4)
            before = [ids[: len(ids)] for ids in tracked]
            answered = tracker.flush(60)
            present = ids_in_table(database_url)
            answers.append((answered, sum(i not in present for ids in before for i in ids)))
    finally:
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    assert tracker.close(60)
    tracker.engine.dispose()
    assert tracker.stats().spilled > 0
    assert answers == [(True, 0)] * 3
    assert rows(database_url) == (sum(map(len, tracked)),) * 2


def test_new_ids_are_unique_time_ordered_uuid7() -> None:
    ids = [tracker_module.new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert {u.version for u in parsed} == {7}
    assert {u.variant for u in parsed} == {uuid.RFC_4122}
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps), 'the millisecond prefix never goes back'
    assert abs(stamps[-1] / 1000 - time.time()) < 60


@pytest.mark.parametrize(
    ('a', 'b'),
    [
        ('postgresql://u@127.0.0.1:5432/db', 'postgresql://u@localhost/db'),
        ('postgresql://u@127.0.0.1/db', 'postgresql+psycopg://u:secret@127.0.0.1:5432/db?application_name=x'),
        ('postgresql://u@h/db?options=-csearch_path%3Ds1', 'postgresql://u@h/db?options=-c%20search_path%3Ds1'),
        # libpq's own parameters name the database, host and port over the URL's parts, as psycopg connects.
        ('postgresql://u@h:5432/db', 'postgresql://u@h/?dbname=db'),
        ('postgresql://u@h:5432/db', 'postgresql://u@/db?host=h&port=5432'),
        ('postgresql://u@h:5432/db', 'postgresql://u@other:6543/x?host=h&port=5432&dbname=db'),
        ('postgresql://db@h:5432/db', 'postgresql://x@h:5432?user=db'),  # no database: the user's
        # The server's spellings of one setting: `-c name=value`, `-cname=value`, `--name=value`, any case.
        ('postgresql://u@h/db?options=--search_path%3Ds1', 'postgresql://u@h/db?options=-c%20SEARCH-PATH%3Ds1'),
        ('postgresql://u@h/db?options=-csearch_path%3Ds1%2Cpublic', 'postgresql://u@h/db?options=--search_path%3DS1'),
    ],
)
def test_spill_dir_is_keyed_by_the_database_not_the_url_text(a: str, b: str, tmp_path: Path) -> None:
    first = UsageTracker(a, spill_dir=tmp_path, handle_sigterm=False)
    second = UsageTracker(b, spill_dir=tmp_path, handle_sigterm=False)
    others = [
        UsageTracker(url, spill_dir=tmp_path, handle_sigterm=False)
        for url in (
            a.replace('/db', '/other'),
            *(f'{a}{"&" if "?" in a else "?"}{query}' for query in ('dbname=other', 'host=elsewhere', 'port=6543')),
            # Another role (its own default search_path may pick another schema) or another schema.
            f'{a}{"&" if "?" in a else "?"}user=someone_else',
            f'{a}{"&" if "?" in a else "?"}options=--search_path%3Delsewhere',
        )
    ]
    try:
        assert first.spill_dir == second.spill_dir
        assert first.spill_dir not in {o.spill_dir for o in others}
    finally:
        for t in (first, second, *others):
            t.close()


@pytest.mark.postgres
@pytest.mark.parametrize('options', ['-c search_path={}', '--search_path={}'])
def test_pgoptions_names_the_schema_when_the_url_gives_no_options(
    options: str, pg_schema_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As libpq and psql read `$PGOPTIONS`: the records go to its schema, and spill where that schema's do."""
    schema = pg_schema_url.rsplit('search_path%3D', 1)[-1]
    monkeypatch.setenv('PGOPTIONS', options.format(schema))
    with UsageTracker(PG_SERVER_URL, spill_dir=tmp_path, handle_sigterm=False) as tracker:
        tracker.track(event())
        assert tracker.flush(timeout=30)
        with tracker.engine.connect() as conn:
            assert conn.exec_driver_sql('SELECT current_schema()').scalar() == schema
            assert conn.exec_driver_sql('SHOW statement_timeout').scalar() == '1min', 'our own options are kept'
        spill_dir = tracker.spill_dir
    assert len(ids_in_table(pg_schema_url)) == 1
    monkeypatch.delenv('PGOPTIONS')
    with UsageTracker(pg_schema_url, spill_dir=tmp_path, handle_sigterm=False) as by_url:
        assert by_url.spill_dir == spill_dir
    with UsageTracker(PG_SERVER_URL, spill_dir=tmp_path, handle_sigterm=False) as public:
        assert public.spill_dir != spill_dir
