from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from pai_usage import UsageRecord, UsageTracker
from pai_usage.migrate import applied_migrations, available_migrations
from pai_usage.rollup import rebuild_rollup, rollup_available, rollup_disabled, rollup_summary, verify_rollup
from pai_usage.summary import GroupBy, query_summary

pytestmark = pytest.mark.postgres

JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)


def records(n: int, seed: int = 7) -> list[UsageRecord]:
    rng = random.Random(seed)
    moments = [
        JAN,
        FEB - timedelta(microseconds=1),  # last instant of January
        FEB,
        datetime(2026, 1, 15, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 1, 16, tzinfo=UTC),
    ]
    out: list[UsageRecord] = []
    for i in range(n):
        created_at = moments[i] if i < len(moments) else JAN + timedelta(seconds=rng.randrange(59 * 86400))
        out.append(
            UsageRecord(
                created_at=created_at,
                organization_id=rng.choice(['acme', 'globex', 'initech', None]),
                user_id=rng.choice(['u1', 'u2', 'u3', None]),
                provider=rng.choice(['openai', 'google-gla', None]),
                model=rng.choice(['gpt-4o', 'gemini-2.5-pro', None]),
                operation=rng.choice(['request', 'generate_image']),
                source=rng.choice(['agent', 'direct']),
                status=rng.choice(['ok', 'ok', 'error']),
                input_tokens=rng.randrange(5000),
                cache_read_tokens=rng.randrange(100),
                output_tokens=rng.randrange(500),
                reasoning_tokens=rng.randrange(50),
                output_image_tokens=rng.choice([0, 1290]),
                cost_usd=rng.choice([None, Decimal(rng.randrange(10**9)).scaleb(-12), Decimal('0.000000000001')]),
                pricing_status=rng.choice(['priced', 'override']),
            )
        )
    return out


@pytest.fixture
def pg_tracker(pg_schema_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(pg_schema_url, flush_interval=0.005) as tracker:
        yield tracker
    tracker.engine.dispose()


def track_all(tracker: UsageTracker, items: list[UsageRecord]) -> None:
    for record in items:
        tracker.track(record)
    assert tracker.flush()
    assert tracker.stats().written == tracker.stats().enqueued


GROUPINGS: list[tuple[GroupBy, ...]] = [
    (),
    ('model',),
    ('organization', 'model'),
    ('day',),
    ('month', 'provider'),
    ('operation', 'source', 'day'),
    ('organization', 'provider', 'model', 'operation', 'source', 'day', 'month'),
]


def test_rollup_equals_raw(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(600))
    assert verify_rollup(pg_tracker.engine) == []

    checked = 0
    for start, end in [(JAN, FEB), (JAN, MAR), (datetime(2026, 1, 16, tzinfo=UTC), FEB), (FEB, MAR)]:
        for group_by in GROUPINGS:
            for filters in [
                {},
                {'organization_id': 'acme'},
                {'organization_id': 'globex'},
                {'organization_id': 'nobody'},
            ]:
                fast = rollup_summary(pg_tracker.engine, start, end, group_by=group_by, **filters)
                with rollup_disabled():
                    raw = query_summary(pg_tracker.engine, start, end, group_by=group_by, **filters)
                assert fast is not None
                assert fast == raw, (start, end, group_by, filters)
                checked += bool(raw.rows)
    assert checked > 50  # the comparisons are not all between empty summaries

    # The rollup keeps no users: anything by user is left to the raw table.
    assert rollup_summary(pg_tracker.engine, JAN, FEB, user_id='u1') is None
    assert rollup_summary(pg_tracker.engine, JAN, FEB, group_by=('organization', 'user')) is None

    january = rollup_summary(pg_tracker.engine, JAN, FEB, group_by=())
    assert january is not None
    in_january = [r for r in records(600) if JAN <= r.created_at < FEB]
    assert january.totals.events == len(in_january)
    assert january.totals.cost_usd == sum((r.cost_usd or Decimal(0) for r in in_january), Decimal(0))
    assert january.totals.output_image_tokens == sum(r.output_image_tokens for r in in_january)


def test_duplicate_ids_count_once(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(20))
    # What the writer does on a replay: insert again, ignoring ids already there. Only new rows may count.
    with pg_tracker.engine.begin() as conn:
        conn.exec_driver_sql(
            'INSERT INTO token_usage SELECT * FROM token_usage UNION ALL SELECT * FROM token_usage '
            'ON CONFLICT (id) DO NOTHING'
        )
    summary = rollup_summary(pg_tracker.engine, JAN, MAR, group_by=())
    assert summary is not None and summary.totals.events == 20
    assert verify_rollup(pg_tracker.engine) == []


def test_updates_deletes_and_truncate_stay_exact(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(200))
    with pg_tracker.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE token_usage SET cost_usd = NULL, pricing_status = 'unpriced' WHERE model IS NULL")
        conn.exec_driver_sql("UPDATE token_usage SET organization_id = 'acme' WHERE organization_id = 'globex'")
        conn.exec_driver_sql("DELETE FROM token_usage WHERE organization_id = 'initech'")
    assert verify_rollup(pg_tracker.engine) == []
    fast = rollup_summary(pg_tracker.engine, JAN, MAR, group_by=('organization',))
    assert fast is not None
    assert [row.group['organization'] for row in fast.rows] == ['acme', None]  # no empty leftover groups

    with pg_tracker.engine.begin() as conn:
        conn.exec_driver_sql('TRUNCATE token_usage')
        assert conn.exec_driver_sql('SELECT count(*) FROM token_usage_daily').scalar() == 0


def test_concurrent_writers_stay_exact(pg_schema_url: str) -> None:
    # Two trackers write into the same groups at the same time: the upserts must neither lose nor deadlock.
    trackers = [UsageTracker(pg_schema_url, flush_interval=0.001, batch_size=50) for _ in range(2)]
    track_all(trackers[0], [])  # migrate once up front
    trackers[0].track(records(1)[0])
    assert trackers[0].flush()
    same_group = {'organization_id': 'acme', 'user_id': 'u1', 'model': 'gpt-4o', 'provider': 'openai'}

    def write(tracker: UsageTracker) -> None:
        for _ in range(1000):
            tracker.track(created_at=JAN + timedelta(hours=1), cost_usd=Decimal('0.001'), **same_group)
        assert tracker.flush(30)

    threads = [threading.Thread(target=write, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for tracker in trackers:
        tracker.close()
        tracker.engine.dispose()

    engine = sa.create_engine(pg_schema_url)
    assert verify_rollup(engine) == []
    fast = rollup_summary(engine, JAN, FEB, organization_id='acme', group_by=('model',))
    assert fast is not None
    [row] = [r for r in fast.rows if r.group['model'] == 'gpt-4o']
    assert row.totals.events >= 2000
    engine.dispose()


def test_falls_back_when_it_cannot_be_exact(pg_tracker: UsageTracker, sqlite_url: str) -> None:
    track_all(pg_tracker, records(50))
    engine = pg_tracker.engine
    assert rollup_summary(engine, JAN, FEB) is not None
    assert rollup_summary(engine, JAN + timedelta(hours=1), FEB) is None  # not whole days
    assert rollup_summary(engine, JAN, FEB - timedelta(microseconds=1)) is None
    assert rollup_summary(engine, FEB, JAN) is None
    with rollup_disabled():
        assert rollup_summary(engine, JAN, FEB) is None

    with engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE token_usage DISABLE TRIGGER pai_usage_rollup_insert')
    assert rollup_summary(engine, JAN, FEB) is None  # writes would bypass the rollup
    with engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE token_usage ENABLE TRIGGER pai_usage_rollup_insert')
        assert rollup_available(conn)

    with UsageTracker(sqlite_url) as lite:
        lite.track(records(1)[0])
        assert lite.flush()
    assert rollup_summary(lite.engine, JAN, FEB) is None
    lite.engine.dispose()


def test_rebuild_after_bulk_load_without_triggers(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(100))
    with pg_tracker.engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = 'replica'")  # how bulk loaders skip triggers
        conn.exec_driver_sql(
            'INSERT INTO token_usage SELECT gen_random_uuid(), created_at, organization_id, user_id, provider, model,'
            ' operation, source, run_id, parent_run_id, agent_name, request_id, input_tokens, cache_read_tokens,'
            ' cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens, output_audio_tokens,'
            ' output_image_tokens, details, units, unit_type, cost_usd, price_source, pricing_status, duration_ms,'
            ' status, metadata FROM token_usage'
        )
    mismatches = verify_rollup(pg_tracker.engine)
    assert mismatches and all(m.raw and m.rollup and m.raw['events'] == 2 * m.rollup['events'] for m in mismatches)

    rows = rebuild_rollup(pg_tracker.engine)
    assert 0 < rows <= 100
    assert verify_rollup(pg_tracker.engine) == []


def test_migration_versions_stay_aligned() -> None:
    pg = [m.version for m in available_migrations('postgresql')]
    lite = [m.version for m in available_migrations('sqlite')]
    assert pg == lite
    assert '0002' in pg


def test_sqlite_applies_the_empty_migration(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url) as lite:
        lite.track(records(1)[0])
        assert lite.flush()
    assert '0002' in applied_migrations(lite.engine)  # later migrations (0004 budgets) may follow
    lite.engine.dispose()
