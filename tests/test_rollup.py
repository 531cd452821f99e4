from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from pai_usage import UsageRecord, UsageTracker
from pai_usage.migrate import applied_migrations, available_migrations, migrate
from pai_usage.rollup import rebuild_rollup, rollup_available, rollup_disabled, rollup_summary, verify_rollup
from pai_usage.summary import GroupBy, query_summary
from pai_usage.tenancy import rls_sql
from tests.conftest import PG_SERVER_URL

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
    ('model', 'organization', 'month'),
    ('organization', 'provider', 'model'),
    ('day',),
    ('month', 'provider'),
    ('operation', 'source', 'day'),
    ('organization', 'provider', 'model', 'operation', 'source', 'day', 'month'),
]


def test_rollup_equals_raw(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(600))
    assert verify_rollup(pg_tracker.engine) == []

    checked = 0
    jan16, feb10 = datetime(2026, 1, 16, tzinfo=UTC), datetime(2026, 2, 10, tzinfo=UTC)
    # Whole months (monthly level), days only (daily level), and months with days before or after them (both).
    for start, end in [(JAN, FEB), (JAN, MAR), (jan16, FEB), (FEB, MAR), (jan16, MAR), (JAN, feb10), (jan16, feb10)]:
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
    assert checked > 80  # the comparisons are not all between empty summaries

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
        assert conn.exec_driver_sql('SELECT count(*) FROM token_usage_monthly').scalar() == 0


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
    assert 0 < rows <= 200  # both levels
    assert verify_rollup(pg_tracker.engine) == []


def test_migration_versions_stay_aligned() -> None:
    pg = [m.version for m in available_migrations('postgresql')]
    lite = [m.version for m in available_migrations('sqlite')]
    assert pg == lite
    assert {'0002', '0006'} <= set(pg)


def test_sqlite_applies_the_empty_migration(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url) as lite:
        lite.track(records(1)[0])
        assert lite.flush()
    assert {'0002', '0006'} <= set(applied_migrations(lite.engine))
    lite.engine.dispose()


def _tamper_monthly(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'UPDATE token_usage_monthly SET events = events + 1000 WHERE ctid = '
            "(SELECT ctid FROM token_usage_monthly WHERE month = '2026-01-01' LIMIT 1)"
        )


def test_whole_months_are_read_from_the_monthly_level(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(300))
    engine = pg_tracker.engine
    jan16 = datetime(2026, 1, 16, tzinfo=UTC)
    before = {rng: rollup_summary(engine, *rng, group_by=()) for rng in [(JAN, FEB), (JAN, MAR), (jan16, FEB)]}
    _tamper_monthly(engine)  # visible only to answers that read January from the monthly level
    after = {rng: rollup_summary(engine, *rng, group_by=()) for rng in before}
    events = {
        rng: (b.totals.events, a.totals.events)
        for rng, b, a in zip(before, before.values(), after.values(), strict=True)
        if a and b
    }
    assert events[JAN, FEB][1] == events[JAN, FEB][0] + 1000
    assert events[JAN, MAR][1] == events[JAN, MAR][0] + 1000
    assert events[jan16, FEB][1] == events[jan16, FEB][0]  # half a month: the daily level
    # Grouped by what the monthly level does not keep (day, operation, source): the daily level.
    for group_by in [('day',), ('operation',), ('organization', 'source')]:
        fast = rollup_summary(engine, JAN, FEB, group_by=group_by)
        with rollup_disabled():
            assert fast == query_summary(engine, JAN, FEB, group_by=group_by), group_by

    # verify_rollup checks both levels, and says which one is off.
    mismatches = verify_rollup(engine)
    assert mismatches and all('month' in m.key and m.key['month'] == JAN.date() for m in mismatches)
    assert verify_rollup(engine, jan16, FEB) == []  # no whole month in range: the daily level only
    rebuild_rollup(engine)
    assert verify_rollup(engine) == []


def test_groups_of_the_monthly_key_add_up_its_rows(pg_tracker: UsageTracker) -> None:
    # By organization and model, a summary reads the monthly level's own rows and adds up in Python the few that
    # share a group (a model under two providers): it must still equal the raw table's, at any row order.
    items = records(400, seed=11)
    track_all(pg_tracker, items)
    engine = pg_tracker.engine
    pairs = {(r.organization_id, r.model) for r in items if JAN <= r.created_at < FEB}
    triples = {(r.organization_id, r.provider, r.model) for r in items if JAN <= r.created_at < FEB}
    assert len(triples) > len(pairs)  # some groups are several rows of the monthly level
    groupings: list[tuple[GroupBy, ...]] = [
        ('organization', 'model'),
        ('model', 'organization'),
        ('organization', 'model', 'provider'),
    ]
    for group_by in groupings:
        for filters in [{}, {'organization_id': 'acme'}]:
            fast = rollup_summary(engine, JAN, FEB, group_by=group_by, **filters)
            with rollup_disabled():
                raw = query_summary(engine, JAN, FEB, group_by=group_by, **filters)
            assert fast == raw and raw.rows, (group_by, filters)
    summary = query_summary(engine, JAN, FEB, group_by=('organization', 'model'))
    assert len(summary.rows) == len(pairs)
    # Two whole months by month too: each (organization, model, month) group is again a few monthly rows.
    fast = rollup_summary(engine, JAN, MAR, group_by=('organization', 'model', 'month'))
    with rollup_disabled():
        assert fast == query_summary(engine, JAN, MAR, group_by=('organization', 'model', 'month'))


def test_reprice_updates_and_deletes_keep_both_levels_exact(pg_tracker: UsageTracker) -> None:
    track_all(pg_tracker, records(300))
    engine = pg_tracker.engine
    with engine.begin() as conn:
        monthly_rows = conn.exec_driver_sql('SELECT xmin::text, * FROM token_usage_monthly ORDER BY 2, 3, 4, 5').all()
        # An UPDATE that changes no sum (metadata, price source) rewrites no rollup row.
        conn.exec_driver_sql("""UPDATE token_usage SET metadata = '{"note": 1}', price_source = 'audit'""")
        assert conn.exec_driver_sql('SELECT xmin::text, * FROM token_usage_monthly ORDER BY 2, 3, 4, 5').all() == (
            monthly_rows
        )
    with engine.begin() as conn:
        # A reprice in place, a re-attribution across months and groups, unpricing, and deletes.
        conn.exec_driver_sql("UPDATE token_usage SET cost_usd = cost_usd * 3 + 0.000000000001 WHERE model = 'gpt-4o'")
        conn.exec_driver_sql(
            "UPDATE token_usage SET created_at = created_at + interval '20 days' WHERE source = 'agent'"
        )
        conn.exec_driver_sql("UPDATE token_usage SET cost_usd = NULL, status = 'error' WHERE provider IS NULL")
        conn.exec_driver_sql("DELETE FROM token_usage WHERE organization_id = 'initech'")
    assert verify_rollup(engine) == []
    for start, end in [(JAN, FEB), (FEB, MAR), (JAN, datetime(2026, 4, 1, tzinfo=UTC))]:
        for group_by in GROUPINGS:
            fast = rollup_summary(engine, start, end, group_by=group_by)
            with rollup_disabled():
                assert fast == query_summary(engine, start, end, group_by=group_by), (start, end, group_by)
    with engine.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT count(*) FROM token_usage_monthly WHERE organization_id = 'initech'").scalar()
            == 0
        )


@pytest.fixture
def role(pg_schema_url: str) -> Iterator[str]:
    name = f'pai_rollup_{uuid.uuid4().hex[:10]}'
    admin = sa.create_engine(PG_SERVER_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE {name} NOLOGIN NOSUPERUSER NOBYPASSRLS')
    try:
        yield name
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY {name}')
            conn.exec_driver_sql(f'DROP ROLE {name}')
        admin.dispose()


def test_0006_carries_over_grants_and_row_level_security(pg_schema_url: str, role: str, tmp_path: Path) -> None:
    # A ledger from before 0006 with row-level security on and a tenant role that reads and writes it.
    engine = sa.create_engine(pg_schema_url)
    (tmp_path / 'postgresql').mkdir()
    for migration in available_migrations('postgresql'):
        if migration.version < '0006':
            (tmp_path / 'postgresql' / migration.name).write_text(migration.sql)
    migrate(engine, root=tmp_path)
    with UsageTracker(engine, auto_migrate=False) as tracker:
        track_all(tracker, records(100))
    schema = pg_schema_url.rsplit('search_path%3D', 1)[-1]
    with engine.begin() as conn:
        for statement in rls_sql().split(';'):
            if 'token_usage_monthly' not in statement and statement.strip('\n -'):
                conn.exec_driver_sql('\n'.join(line for line in statement.splitlines() if not line.startswith('--')))
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA {schema} TO {role}')
        conn.exec_driver_sql(f'GRANT SELECT, INSERT ON token_usage TO {role}')
        conn.exec_driver_sql(f'GRANT SELECT ON token_usage_daily TO {role}, PUBLIC')

    assert [name[:4] for name in migrate(engine)] == [m.version for m in available_migrations('postgresql')][5:]
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'token_usage_monthly'::regclass"
        ).scalar()
        assert conn.exec_driver_sql(
            'SELECT bool_and(prosecdef) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace'
            " AND proname IN ('pai_usage_rollup_apply', 'pai_usage_rollup_truncate')"
        ).scalar()
        grants = conn.exec_driver_sql(
            "SELECT grantee FROM information_schema.role_table_grants WHERE table_name = 'token_usage_monthly'"
            " AND table_schema = current_schema() AND privilege_type = 'SELECT'"
        ).scalars()
        assert {role, 'PUBLIC'} <= set(grants)

    # The tenant reads its own organization from the monthly level, and its insert reaches both levels.
    tenant = sa.create_engine(pg_schema_url + quote(f' -crole={role} -cpai_usage.organization_id=acme'))
    with tenant.begin() as conn:
        conn.exec_driver_sql(
            'INSERT INTO token_usage (id, created_at, organization_id, operation, source, input_tokens,'
            ' cache_read_tokens, cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens,'
            ' output_audio_tokens, output_image_tokens, details, cost_usd, pricing_status, status, metadata)'
            " VALUES (gen_random_uuid(), '2026-01-10Z', 'acme', 'request', 'direct', 1, 0, 0, 0, 1, 0, 0, 0, '{}', 5,"
            " 'priced', 'ok', '{}')"
        )
    fast = rollup_summary(tenant, JAN, FEB, group_by=('organization',))
    with rollup_disabled():
        raw = query_summary(engine, JAN, FEB, organization_id='acme', group_by=('organization',))
    assert fast is not None and [row.group['organization'] for row in fast.rows] == ['acme']
    assert fast.totals == raw.totals
    assert verify_rollup(engine) == []
    tenant.dispose()
    engine.dispose()
