from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest

from pai_usage import UsageRecord, UsageTracker
from pai_usage.export import (
    EXPORT_COLUMNS,
    FOCUS_COLUMNS,
    export_rows,
    format_daily_costs,
    write_csv,
    write_jsonl,
)
from pai_usage.summary import query_summary

START = datetime(2026, 6, 1, tzinfo=UTC)
END = datetime(2026, 6, 4, tzinfo=UTC)

RECORDS = [
    UsageRecord(created_at=START - timedelta(microseconds=1), organization_id='acme', cost_usd=Decimal(100)),
    UsageRecord(
        created_at=START + timedelta(days=2, hours=5),
        organization_id='acme',
        user_id='u1',
        provider='openai',
        model='gpt-4o',
        input_tokens=1000,
        cache_read_tokens=200,
        output_tokens=50,
        cost_usd=Decimal('0.000000000123'),
        metadata={'ticket': 'T-1', 'nested': {'a': 1}},
    ),
    UsageRecord(
        created_at=START,
        organization_id='acme',
        provider='google-vertex',
        model='imagen-4',
        operation='generate_image',
        units=Decimal(4),
        unit_type='image',
        cost_usd=Decimal('0.16'),
    ),
    UsageRecord(created_at=START + timedelta(hours=1), organization_id='globex', cost_usd=Decimal(7)),
    UsageRecord(created_at=END - timedelta(microseconds=1), organization_id='acme', input_tokens=3),  # unpriced
    UsageRecord(created_at=END, organization_id='acme', cost_usd=Decimal(100)),
]
IN_RANGE = sorted((r for r in RECORDS if START <= r.created_at < END), key=lambda r: r.created_at)


@pytest.fixture
def seeded(tracker: UsageTracker) -> UsageTracker:
    for record in RECORDS:
        tracker.track(record)
    assert tracker.flush()
    return tracker


def test_export_rows(seeded: UsageTracker) -> None:
    rows = list(export_rows(seeded.engine, START, END, batch_size=2))
    assert [row['id'] for row in rows] == [r.id for r in IN_RANGE]  # oldest first, ends excluded
    assert all(set(row) == set(EXPORT_COLUMNS) for row in rows)
    by_id = {row['id']: row for row in rows}
    text = by_id[RECORDS[1].id]
    assert text['cost_usd'] == Decimal('0.000000000123')
    assert text['created_at'] == RECORDS[1].created_at and text['created_at'].tzinfo is not None
    assert text['metadata'] == {'ticket': 'T-1', 'nested': {'a': 1}}
    assert by_id[RECORDS[2].id]['units'] == Decimal(4)

    acme = list(export_rows(seeded.engine, START, END, organization_id='acme'))
    assert {row['organization_id'] for row in acme} == {'acme'} and len(acme) == len(IN_RANGE) - 1
    [only] = export_rows(seeded.engine, START, END, user_id='u1')
    assert only['id'] == RECORDS[1].id
    with pytest.raises(ValueError, match='timezone-aware'):
        list(export_rows(seeded.engine, START.replace(tzinfo=None), END))


def test_csv(seeded: UsageTracker) -> None:
    out = io.StringIO()
    seen: list[int] = []
    count = write_csv(export_rows(seeded.engine, START, END), out, progress=seen.append, progress_every=2)
    assert count == len(IN_RANGE)
    assert seen == list(range(2, count + 1, 2))
    out.seek(0)
    reader = csv.DictReader(out)
    assert tuple(reader.fieldnames or ()) == EXPORT_COLUMNS
    parsed = {UUID(row['id']): row for row in reader}
    text = parsed[RECORDS[1].id]
    assert Decimal(text['cost_usd']) == RECORDS[1].cost_usd
    assert 'E' not in text['cost_usd']  # plain notation, for spreadsheets
    assert datetime.fromisoformat(text['created_at']) == RECORDS[1].created_at
    assert json.loads(text['metadata']) == RECORDS[1].metadata
    assert parsed[RECORDS[4].id]['cost_usd'] == ''  # unknown, not zero


def test_focus_csv_and_jsonl(seeded: UsageTracker) -> None:
    out = io.StringIO()
    write_csv(export_rows(seeded.engine, START, END), out, focus=True)
    out.seek(0)
    reader = csv.DictReader(out)
    assert tuple(reader.fieldnames or ()) == FOCUS_COLUMNS
    rows = {UUID(row['x_EventId']): row for row in reader}
    text, image = rows[RECORDS[1].id], rows[RECORDS[2].id]
    assert (text['BilledCost'], text['BillingCurrency'], text['ProviderName'], text['SubAccountId']) == (
        '0.000000000123',
        'USD',
        'openai',
        'acme',
    )
    assert (text['ConsumedQuantity'], text['ConsumedUnit']) == (str(1000 + 200 + 50), 'Tokens')
    assert (image['ConsumedQuantity'], image['ConsumedUnit']) == ('4', 'image')
    assert text['x_CacheReadTokens'] == '200'

    out = io.StringIO()
    assert write_jsonl(export_rows(seeded.engine, START, END), out) == len(IN_RANGE)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [UUID(line['id']) for line in lines] == [r.id for r in IN_RANGE]
    assert lines[-1]['cost_usd'] is None
    assert [Decimal(line['cost_usd']) for line in lines if line['cost_usd']] == [
        r.cost_usd for r in IN_RANGE if r.cost_usd is not None
    ]

    out = io.StringIO()
    write_jsonl(export_rows(seeded.engine, START, END, user_id='u1'), out, focus=True)
    [line] = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line['EffectiveCost'] == '0.000000000123' and line['x_Model'] == 'gpt-4o'


def test_daily_cost_chart(seeded: UsageTracker) -> None:
    summary = query_summary(seeded.engine, START, END, group_by=('day', 'organization'))
    lines = format_daily_costs(summary, width=20).splitlines()
    # June 1: 0.16 + 7 (two organizations, added up); June 2: nothing; June 3: ~0.
    assert [line[:10] for line in lines] == ['2026-06-01', '2026-06-02', '2026-06-03']
    assert lines[0].count('█') == 20 and lines[0].endswith('$7.1600')
    assert '█' not in lines[1] and lines[1].endswith('$0.0000')
    assert '█' not in lines[2]
    with pytest.raises(ValueError, match="grouped by 'day'"):
        format_daily_costs(query_summary(seeded.engine, START, END, group_by=('model',)))


def test_daily_cost_chart_partial_bars(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url) as tracker:
        for day, cost in [(0, '8'), (1, '4'), (2, '1')]:
            tracker.track(created_at=START + timedelta(days=day), cost_usd=Decimal(cost))
        assert tracker.flush()
    summary = query_summary(tracker.engine, START, END, group_by=('day',))
    tracker.engine.dispose()
    lines = format_daily_costs(summary, width=8).splitlines()
    assert [line.count('█') for line in lines] == [8, 4, 1]  # proportional to cost
    assert lines[1].endswith('$4.0000')
