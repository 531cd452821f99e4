"""The `token_usage` table: exact round trips and idempotent inserts, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, select

from pai_usage import TokenUsage, UsageRecord, UsageTracker
from pai_usage.table import TOKEN_USAGE, DashedUUID, ExactDecimal, UTCDateTime, cost_sum, exact_sum
from tests._helpers import token_usage_rows


@pytest.fixture
def full_record() -> UsageRecord:
    """A record with every column set, and values that lose precision on a careless backend."""
    return UsageRecord(
        id=UUID('12345678-1234-5678-1234-567812345678'),
        # 23:59:59.999999 in UTC-05:00: stored as the next day in UTC, microseconds intact.
        created_at=datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-5))),
        organization_id='org-ü',
        user_id='user-1',
        provider='google-gla',
        model='gemini-2.5-flash-image',
        operation='generate_image',
        source='direct',
        run_id='run-1',
        parent_run_id='run-0',
        agent_name='ad_creator',
        request_id='resp_abc',
        input_tokens=1_000_000_000,
        cache_read_tokens=2,
        cache_write_tokens=3,
        input_audio_tokens=4,
        output_tokens=5,
        reasoning_tokens=6,
        output_audio_tokens=7,
        output_image_tokens=1290,
        details={'cache_write_1h_tokens': 3, 'tool_use_prompt_tokens': 11},
        units=Decimal('2.500001'),
        unit_type='image',
        cost_usd=Decimal('999999.123456789012'),  # 6 integer and 12 decimal digits
        price_source='config',
        pricing_status='override',
        duration_ms=1234,
        status='error',
        metadata={'campaign': 'spring', 'nested': {'list': [1, 2.5, None, True], 'text': 'naïve "quoted"'}},
    )


def test_record_round_trips_exactly(tracker: UsageTracker, full_record: UsageRecord):
    tracker.track(full_record)
    assert tracker.flush()

    [row] = token_usage_rows(tracker.engine)
    assert row == full_record.model_dump()
    # The points that matter, spelled out: exact decimals, aware UTC time, JSON intact.
    assert row['cost_usd'] == Decimal('999999.123456789012')
    assert row['units'] == Decimal('2.500001')
    assert row['created_at'] == datetime(2026, 2, 1, 4, 59, 59, 999_999, tzinfo=UTC)
    assert row['created_at'].tzinfo is not None
    assert row['metadata']['nested']['list'] == [1, 2.5, None, True]


def test_orm_read_matches_record(tracker: UsageTracker, full_record: UsageRecord):
    tracker.track(full_record)
    assert tracker.flush()
    with Session(tracker.engine) as session:
        stored = session.exec(select(TokenUsage)).one()
    assert stored.id == full_record.id
    assert stored.cost_usd == full_record.cost_usd
    assert stored.created_at == full_record.created_at
    assert stored.metadata_ == full_record.metadata
    assert stored.details == full_record.details


def test_same_record_twice_is_one_row(tracker: UsageTracker):
    record = UsageRecord(model='gpt-4o', provider='openai', input_tokens=10, cost_usd=Decimal('0.01'))
    tracker.track(record)
    tracker.track(record)  # in the same batch
    assert tracker.flush()
    tracker.track(record)  # and in a later one
    tracker.track(record.model_dump())  # also as raw fields
    assert tracker.flush()

    rows = token_usage_rows(tracker.engine)
    assert [row['id'] for row in rows] == [record.id]
    assert tracker.stats().invalid == 0


def test_null_cost_stays_null(tracker: UsageTracker):
    tracker.track(model='no-such-model-xyz', provider='nobody', input_tokens=5)
    assert tracker.flush()
    [row] = token_usage_rows(tracker.engine)
    assert row['cost_usd'] is None
    assert row['pricing_status'] == 'unpriced'


@pytest.mark.parametrize(
    ('value', 'stored_sqlite', 'read_back'),
    [
        (Decimal('0.0000000000005'), '0.000000000000', Decimal(0)),  # half-even: 0.5 pico-dollars rounds to 0
        (Decimal('-0.0000000000005'), '0.000000000000', Decimal(0)),  # never `-0`
        (Decimal('0.0000000000015'), '0.000000000002', Decimal('0.000000000002')),
        (Decimal('1.000000000001'), '1.000000000001', Decimal('1.000000000001')),
        (Decimal(7), '7.000000000000', Decimal(7)),
        (Decimal('1E+5'), '100000.000000000000', Decimal(100_000)),
        (Decimal('-0.25'), '-0.250000000000', Decimal('-0.25')),
    ],
)
def test_exact_decimal_is_fixed_decimal_text_on_sqlite(value: Decimal, stored_sqlite: str, read_back: Decimal):
    column_type = ExactDecimal(24, 12)
    dialect = sqlite.dialect()
    stored = column_type.process_bind_param(value, dialect)
    assert stored == stored_sqlite
    assert column_type.process_result_value(stored, dialect) == read_back
    assert column_type.process_bind_param(value, postgresql.dialect()) == read_back


def test_sqlite_raw_table_reads_like_postgresql(sqlite_url: str, full_record: UsageRecord):
    # What a user sees with `sqlite3 pai_usage.db 'SELECT ... FROM token_usage'`: no pico-dollars, no bare hex.
    with UsageTracker(sqlite_url) as tracker:
        tracker.track(full_record)
        assert tracker.flush()
    tracker.engine.dispose()
    with closing(sqlite3.connect(sqlite_url.removeprefix('sqlite:///'))) as conn:
        row = conn.execute('SELECT id, created_at, cost_usd, units, typeof(cost_usd) FROM token_usage').fetchone()
    assert row == (
        '12345678-1234-5678-1234-567812345678',
        '2026-02-01 04:59:59.999999+00:00',
        '999999.123456789012',
        '2.500001',
        'text',
    )
    assert datetime.fromisoformat(row[1]) == full_record.created_at
    assert str(full_record.id) == row[0]


def _cost_records(costs: list[Decimal | None]) -> list[UsageRecord]:
    return [UsageRecord(model='gpt-4o', provider='openai', organization_id='acme', cost_usd=c) for c in costs]


# Values whose float sum is wrong in the 12th decimal: only an exact sum gets them right.
EXACT_COSTS = [Decimal('0.1'), Decimal('0.2'), Decimal('0.000000000001'), None, Decimal('123456.789012345678')] * 40


def test_exact_sum_matches_the_decimal_sum(tracker: UsageTracker):
    for record in _cost_records(EXACT_COSTS):
        tracker.track(record)
    assert tracker.flush()
    expected = sum(
        (ExactDecimal(24, 12).process_bind_param(c, postgresql.dialect()) or 0 for c in EXACT_COSTS), Decimal(0)
    )
    with tracker.engine.connect() as conn:
        total, units = conn.execute(sa.select(cost_sum(), exact_sum(TOKEN_USAGE.c.units))).one()
        assert conn.execute(sa.select(cost_sum()).where(TOKEN_USAGE.c.organization_id == 'nobody')).scalar() is None
    assert isinstance(total, Decimal)
    assert total == expected
    assert units is None  # no row has units: like sum(), NULL


def test_exact_sum_refuses_other_columns():
    with pytest.raises(TypeError, match='ExactDecimal'):
        exact_sum(TOKEN_USAGE.c.input_tokens)  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize('bad', ['0.5', 0.5, 5, '0.5000000000000', '00.500000000000', '1e-3'])
def test_sqlite_refuses_costs_an_exact_sum_would_misread(sqlite_url: str, bad: object):
    # A raw-SQL writer storing a float or a short decimal would silently break exact sums: the CHECK refuses it.
    with UsageTracker(sqlite_url) as tracker:
        tracker.track(_cost_records([Decimal('0.5')])[0])
        assert tracker.flush()
    tracker.engine.dispose()
    with closing(sqlite3.connect(sqlite_url.removeprefix('sqlite:///'))) as conn:
        with pytest.raises(sqlite3.IntegrityError, match='CHECK constraint failed'):
            conn.execute('UPDATE token_usage SET cost_usd = ?', (bad,))
        conn.execute('UPDATE token_usage SET cost_usd = ?', ('-0.500000000000',))  # the canonical form is fine


def test_utc_datetime_rejects_naive():
    with pytest.raises(ValueError, match='naive datetimes are ambiguous'):
        UTCDateTime().process_bind_param(datetime(2026, 1, 1), sqlite.dialect())


def test_utc_datetime_reads_naive_sqlite_text_as_utc():
    value = UTCDateTime().process_result_value(datetime(2026, 1, 1, 12), sqlite.dialect())
    assert value == datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_ids_are_generated_per_record():
    assert UsageRecord().id != UsageRecord().id
    assert isinstance(UsageRecord(id=uuid4()).id, UUID)


def test_dashed_uuid_on_both_backends():
    value = UUID('12345678-1234-5678-1234-567812345678')
    column_type = DashedUUID()
    assert column_type.process_bind_param(value, sqlite.dialect()) == '12345678-1234-5678-1234-567812345678'
    assert column_type.process_bind_param(str(value), sqlite.dialect()) == '12345678-1234-5678-1234-567812345678'
    assert column_type.process_result_value('12345678-1234-5678-1234-567812345678', sqlite.dialect()) == value
    assert column_type.process_bind_param(value, postgresql.dialect()) == value


def test_a_float_sum_of_costs_is_refused_on_sqlite(tracker: UsageTracker):
    # `sum(cost_usd)` of SQLite's text is a float: reading it as a Decimal would look exact and not be.
    for record in _cost_records([Decimal('0.1'), Decimal('0.2')]):
        tracker.track(record)
    assert tracker.flush()
    query = sa.select(sa.func.sum(TOKEN_USAGE.c.cost_usd))
    with tracker.engine.connect() as conn:
        if tracker.engine.dialect.name == 'sqlite':
            with pytest.raises(TypeError, match=r'exact_sum\(column\)'):
                conn.execute(query).scalar()
        else:
            assert conn.execute(query).scalar() == Decimal('0.3')
        assert conn.execute(sa.select(cost_sum())).scalar() == Decimal('0.3')
