"""The optional monthly partitioning of `token_usage` (PostgreSQL): no row lost, rollup and summaries exact."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from pai_usage import UsageRecord, UsageTracker
from pai_usage.migrate import migrate
from pai_usage.partitions import apply_partitioning, ensure_month_partitions, is_partitioned, partitioning_sql
from pai_usage.rollup import (
    ROLLUP_TRIGGERS,
    rebuild_rollup,
    rollup_available,
    rollup_disabled,
    rollup_summary,
    verify_rollup,
)
from pai_usage.summary import GroupBy
from pai_usage.tenancy import enable_row_level_security, tenant_scope

pytestmark = pytest.mark.postgres

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
APR = datetime(2025, 4, 1, tzinfo=UTC)
JUNE_2024 = datetime(2024, 6, 10, 12, tzinfo=UTC)  # a month that gets no partition of its own


def records(n: int, seed: int = 11) -> list[UsageRecord]:
    """`n` records over January to March 2025, including each month's first and last instants."""
    rng = random.Random(seed)
    edges = [
        JAN,
        FEB - timedelta(microseconds=1),
        FEB,
        MAR - timedelta(microseconds=1),
        MAR,
        APR - timedelta(seconds=1),
    ]
    out: list[UsageRecord] = []
    for i in range(n):
        created_at = edges[i] if i < len(edges) else JAN + timedelta(seconds=rng.randrange(89 * 86400))
        out.append(
            UsageRecord(
                created_at=created_at,
                organization_id=rng.choice(['acme', 'globex', None]),
                user_id=rng.choice(['u1', 'u2', None]),
                provider='openai',
                model=rng.choice(['gpt-4o', 'gpt-4o-mini']),
                operation='request',
                source=rng.choice(['agent', 'direct']),
                status=rng.choice(['ok', 'ok', 'error']),
                input_tokens=rng.randrange(5000),
                output_tokens=rng.randrange(500),
                cost_usd=rng.choice([None, Decimal(rng.randrange(10**9)).scaleb(-12)]),
                pricing_status='priced',
            )
        )
    return out


@pytest.fixture
def pg_tracker(pg_schema_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(pg_schema_url, flush_interval=0.005, spill_after=30) as tracker:
        yield tracker
    tracker.engine.dispose()


def track_all(tracker: UsageTracker, items: list[UsageRecord]) -> None:
    for record in items:
        tracker.track(record)
    assert tracker.flush(timeout=10)


def all_rows(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql('SELECT * FROM token_usage ORDER BY id')]


def scalar(engine: sa.Engine, sql: str, params: dict[str, Any] | None = None) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params or {}).scalar()


def scalar_rows(engine: sa.Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


def partition_of(engine: sa.Engine) -> dict[uuid.UUID, str]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql('SELECT id, tableoid::regclass::text FROM token_usage').all())  # pyright: ignore[reportUnknownArgumentType]


def expected_partition(created_at: datetime) -> str:
    return f'token_usage_{created_at.astimezone(UTC):%Y_%m}'


def index_columns(engine: sa.Engine) -> dict[str, str]:
    """The parent's indexes: name -> definition without the table's name (partitioned or not)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT c.relname, regexp_replace(pg_get_indexdef(i.indexrelid), ' ON (ONLY )?\\S+ ', ' ON t ') "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'token_usage'::regclass"
        ).all()
    return {str(name): str(definition) for name, definition in rows}


def assert_summaries_match_raw(tracker: UsageTracker) -> None:
    assert verify_rollup(tracker.engine) == []
    assert rollup_summary(tracker.engine, JAN, APR, group_by=()) is not None  # the rollup can answer
    for group_by in [(), ('organization', 'model'), ('day',)]:
        group: tuple[GroupBy, ...] = group_by  # pyright: ignore[reportAssignmentType]
        fast = tracker.get_usage_summary(JAN, APR, group_by=group)
        with rollup_disabled():
            raw = tracker.get_usage_summary(JAN, APR, group_by=group)
        assert fast == raw, group_by
    with tracker.engine.connect() as conn:
        events, cost = conn.exec_driver_sql(
            'SELECT count(*), coalesce(sum(cost_usd), 0) FROM token_usage '
            "WHERE created_at >= '2025-01-01Z' AND created_at < '2025-04-01Z'"
        ).one()
    totals = tracker.get_usage_summary(JAN, APR, group_by=()).totals
    assert (totals.events, totals.cost_usd) == (events, cost)
    current = tracker.get_current_month_usage('acme', now=datetime(2025, 2, 14, tzinfo=UTC)).totals
    assert current.events == scalar(
        tracker.engine,
        "SELECT count(*) FROM token_usage WHERE organization_id = 'acme' "
        "AND created_at >= '2025-02-01Z' AND created_at < '2025-03-01Z'",
    )


def test_partitioning_keeps_every_row_and_the_rollup(pg_tracker: UsageTracker) -> None:
    engine = pg_tracker.engine
    before_records = records(300)
    track_all(pg_tracker, before_records)
    before = all_rows(engine)
    indexes_before = index_columns(engine)
    assert len(before) == 300 and not is_partitioned(engine)
    cost_before = sum((r.cost_usd or Decimal(0) for r in before_records), Decimal(0))

    assert apply_partitioning(engine) is True
    assert is_partitioned(engine)

    # Every row survived, column for column.
    assert all_rows(engine) == before
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 300
    assert scalar(engine, 'SELECT sum(cost_usd) FROM token_usage') == cost_before
    # Each row sits in its UTC month's partition (edges included).
    where = partition_of(engine)
    assert where == {r.id: expected_partition(r.created_at) for r in before_records}
    # Same indexes, now partitioned; the primary key includes the partition key.
    indexes_after = index_columns(engine)
    assert (
        indexes_after.pop('token_usage_pkey')
        == 'CREATE UNIQUE INDEX token_usage_pkey ON t USING btree (id, created_at)'
    )
    indexes_before.pop('token_usage_pkey')
    assert indexes_after == indexes_before
    partitioned_indexes = (
        "SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace AND relkind = 'I'"
    )
    assert scalar(engine, partitioned_indexes) == 5  # the primary key and the 4 indexes of migration 0001
    # The rollup's triggers are back on the new parent, so summaries read the rollup.
    with engine.connect() as conn:
        assert rollup_available(conn)
        triggers = conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'token_usage'::regclass AND NOT tgisinternal ORDER BY 1"
        ).scalars()
        assert sorted(triggers) == sorted(ROLLUP_TRIGGERS)
    assert_summaries_match_raw(pg_tracker)

    # Writes after partitioning go through the tracker's binary COPY and keep the rollup exact.
    after_records = records(60, seed=12)
    orphan = before_records[0].model_copy(update={'id': uuid.uuid4(), 'created_at': JUNE_2024})
    track_all(pg_tracker, [*after_records, orphan])
    where = partition_of(engine)
    assert where[orphan.id] == 'token_usage_default'
    assert all(where[r.id] == expected_partition(r.created_at) for r in after_records)
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 361
    assert_summaries_match_raw(pg_tracker)
    assert verify_rollup(engine, datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC)) == []

    # Applying it again changes nothing, whichever way.
    current = all_rows(engine)
    assert apply_partitioning(engine) is False
    with engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(partitioning_sql())
    assert all_rows(engine) == current
    assert verify_rollup(engine) == []


def test_ensure_month_partitions_is_idempotent_and_adopts_default_rows(pg_tracker: UsageTracker) -> None:
    engine = pg_tracker.engine
    track_all(pg_tracker, records(40))
    apply_partitioning(engine)

    assert ensure_month_partitions(engine, months_ahead=3, now=datetime(2025, 2, 14, tzinfo=UTC)) == [
        'token_usage_2025_04',
        'token_usage_2025_05',
    ]
    assert ensure_month_partitions(engine, months_ahead=3, now=datetime(2025, 2, 14, tzinfo=UTC)) == []
    assert ensure_month_partitions(engine, now=datetime(2025, 2, 14, tzinfo=UTC)) == []  # default: 3 ahead
    assert ensure_month_partitions(engine) == []  # the current month and the next 3 exist since the migration

    # A row for a month without a partition waits in DEFAULT; creating the month moves it, rollup untouched.
    orphan = records(1)[0].model_copy(update={'id': uuid.uuid4(), 'created_at': JUNE_2024})
    track_all(pg_tracker, [orphan])
    assert partition_of(engine)[orphan.id] == 'token_usage_default'
    assert ensure_month_partitions(engine, months_ahead=0, now=JUNE_2024) == ['token_usage_2024_06']
    assert partition_of(engine)[orphan.id] == 'token_usage_2024_06'
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 41
    assert scalar(engine, 'SELECT count(*) FROM ONLY token_usage_default') == 0
    assert verify_rollup(engine) == []
    # The adopted partition has the parent's indexes attached (no duplicates).
    assert scalar(engine, "SELECT count(*) FROM pg_indexes WHERE tablename = 'token_usage_2024_06'") == 5

    # An update moving a row across months, deletes and truncate keep the rollup exact on the parent.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE token_usage SET created_at = created_at + interval '1 month' WHERE created_at < '2025-02-01Z'"
        )
        conn.exec_driver_sql("DELETE FROM token_usage WHERE organization_id = 'globex'")
    assert verify_rollup(engine) == []
    assert scalar(engine, 'SELECT count(*) FROM token_usage_2025_01') == 0
    with engine.begin() as conn:
        conn.exec_driver_sql('TRUNCATE token_usage')
    assert scalar(engine, 'SELECT count(*) FROM token_usage_daily') == 0
    assert scalar(engine, 'SELECT count(*) FROM token_usage_monthly') == 0

    with pytest.raises(ValueError, match='months_ahead'):
        ensure_month_partitions(engine, months_ahead=-1)


def test_writes_during_the_conversion_are_kept(pg_tracker: UsageTracker) -> None:
    # Writers block on the ACCESS EXCLUSIVE lock; once it is released they write into the new table.
    engine = pg_tracker.engine
    track_all(pg_tracker, records(100))
    stream = records(400, seed=13)
    stop = threading.Event()

    def keep_tracking() -> None:
        for record in stream:
            pg_tracker.track(record)
            if stop.wait(0.002):
                break

    writer = threading.Thread(target=keep_tracking)
    writer.start()
    try:
        time.sleep(0.1)
        assert apply_partitioning(engine) is True
    finally:
        writer.join(timeout=10)
    assert pg_tracker.flush(timeout=10)
    assert pg_tracker.stats().failed_writes == 0
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 500
    assert verify_rollup(engine) == []


def test_dropping_a_month_keeps_the_rollup_exact_as_documented(pg_tracker: UsageTracker) -> None:
    # Retention by dropping a partition fires no DELETE trigger: the docs say to delete the month's rollup rows
    # in the same transaction, or to call `rebuild_rollup` afterwards.
    engine = pg_tracker.engine
    track_all(pg_tracker, records(50))
    apply_partitioning(engine)
    january = scalar(engine, 'SELECT count(*) FROM token_usage_2025_01')
    february = scalar(engine, 'SELECT count(*) FROM token_usage_2025_02')
    assert january > 0 and february > 0
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP TABLE token_usage_2025_01')
        conn.exec_driver_sql("DELETE FROM token_usage_daily WHERE day >= '2025-01-01' AND day < '2025-02-01'")
        conn.exec_driver_sql("DELETE FROM token_usage_monthly WHERE month = '2025-01-01'")
    assert verify_rollup(engine) == []
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP TABLE token_usage_2025_02')
    assert verify_rollup(engine) != []
    rebuild_rollup(engine)
    assert verify_rollup(engine) == []
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 50 - january - february
    assert migrate(engine) == []  # the regular migrations still see themselves as applied


def test_duplicates_are_ignored_with_the_composite_key(pg_tracker: UsageTracker) -> None:
    engine = pg_tracker.engine
    track_all(pg_tracker, records(20))
    apply_partitioning(engine)
    # What a replay does, in SQL: only new (id, created_at) pairs count, in the table and in the rollup.
    with engine.begin() as conn:
        conn.exec_driver_sql(
            'INSERT INTO token_usage SELECT * FROM token_usage UNION ALL SELECT * FROM token_usage '
            'ON CONFLICT DO NOTHING'
        )
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 20
    assert verify_rollup(engine) == []


def test_a_disabled_trigger_stays_disabled(pg_tracker: UsageTracker) -> None:
    # Someone bulk-loading with the rollup off must not find it silently back on, and stale.
    engine = pg_tracker.engine
    track_all(pg_tracker, records(5))
    with engine.begin() as conn:
        conn.exec_driver_sql('ALTER TABLE token_usage DISABLE TRIGGER pai_usage_rollup_insert')
    apply_partitioning(engine)
    with engine.connect() as conn:
        assert not rollup_available(conn)
    enabled = scalar(
        engine,
        "SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'token_usage'::regclass AND tgname = :name",
        {'name': 'pai_usage_rollup_insert'},
    )
    assert enabled == 'D'


def test_tracking_a_record_twice_after_partitioning_keeps_one_row(pg_tracker: UsageTracker) -> None:
    # The writer's fallback insert says `ON CONFLICT DO NOTHING` without a conflict target: `ON CONFLICT (id)`
    # would match no unique key once the primary key is (id, created_at).
    engine = pg_tracker.engine
    track_all(pg_tracker, records(10))
    apply_partitioning(engine)
    again = records(1, seed=99)[0]
    track_all(pg_tracker, [again])
    failed_before = pg_tracker.stats().failed_writes
    pg_tracker.track(again)  # COPY hits the primary key; the fallback must skip the row
    assert pg_tracker.flush(timeout=3)
    assert scalar(engine, 'SELECT count(*) FROM token_usage WHERE id = :id', {'id': again.id}) == 1
    assert pg_tracker.stats().failed_writes == failed_before
    assert scalar(engine, 'SELECT count(*) FROM token_usage') == 11
    assert verify_rollup(engine) == []


def test_owner_grants_and_row_level_security_carry_over(pg_tracker: UsageTracker) -> None:
    # Applied by a superuser to a table the app's role owns, as migrations often are.
    engine = pg_tracker.engine
    track_all(pg_tracker, records(30))
    enable_row_level_security(engine)
    suffix = uuid.uuid4().hex[:10]
    owner, tenant = f'pai_owner_{suffix}', f'pai_tenant_{suffix}'
    with engine.begin() as conn:
        schema = conn.exec_driver_sql('SELECT current_schema()').scalar()
        conn.exec_driver_sql(f'CREATE ROLE {owner}')
        conn.exec_driver_sql(f'CREATE ROLE {tenant}')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA {schema} TO {owner}, {tenant}')
        conn.exec_driver_sql(f'ALTER TABLE token_usage OWNER TO {owner}')
        conn.exec_driver_sql(f'GRANT SELECT ON token_usage TO {tenant}')
    try:
        apply_partitioning(engine)
        ensure_month_partitions(engine, months_ahead=0, now=JUNE_2024)
        owners = {
            str(name): str(role)
            for name, role in scalar_rows(
                engine,
                "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = 'token_usage'::regclass "
                "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'token_usage'::regclass)",
            )
        }
        assert set(owners.values()) == {owner}
        assert {'token_usage', 'token_usage_default', 'token_usage_2025_01', 'token_usage_2024_06'} <= set(owners)

        acme = scalar(engine, "SELECT count(*) FROM token_usage WHERE organization_id = 'acme'")
        assert acme > 0
        with engine.begin() as conn:
            conn.exec_driver_sql(f'SET LOCAL ROLE {tenant}')
            tenant_scope(conn, 'acme')
            assert conn.exec_driver_sql('SELECT count(*) FROM token_usage').scalar() == acme
            assert (
                conn.exec_driver_sql("SELECT count(*) FROM token_usage WHERE organization_id <> 'acme'").scalar() == 0
            )
        with engine.begin() as conn:
            conn.exec_driver_sql(f'SET LOCAL ROLE {tenant}')
            assert conn.exec_driver_sql('SELECT count(*) FROM token_usage').scalar() == 0  # no setting: nothing
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'REASSIGN OWNED BY {owner} TO current_user')
            for role in (owner, tenant):
                conn.exec_driver_sql(f'DROP OWNED BY {role}')
                conn.exec_driver_sql(f'DROP ROLE {role}')


def test_needs_postgresql(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with pytest.raises(ValueError, match='PostgreSQL'):
        apply_partitioning(engine)
    with pytest.raises(ValueError, match='PostgreSQL'):
        ensure_month_partitions(engine)
    assert not is_partitioned(engine)
    engine.dispose()
