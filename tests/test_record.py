"""`UsageRecord` validation: every kind of bad input is a clear error, never a silently wrong row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

import pytest
from dirty_equals import IsStr
from pydantic import ValidationError

from pai_usage import UsageRecord, UsageTracker
from pai_usage.record import MAX_COST_USD, MAX_METADATA_BYTES, MAX_TOKENS, MAX_UNITS, normalize_label
from tests._helpers import token_usage_rows


class _NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


class _FailingZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        raise RuntimeError('no zone data')


@pytest.mark.parametrize(
    ('fields', 'field_name', 'message'),
    [
        pytest.param({'input_tokens': -1}, 'input_tokens', 'greater than or equal to 0', id='negative-tokens'),
        pytest.param(
            {'output_tokens': MAX_TOKENS + 1},
            'output_tokens',
            f'less than or equal to {MAX_TOKENS}',
            id='absurd-tokens',
        ),
        pytest.param({'reasoning_tokens': True}, 'reasoning_tokens', 'valid integer', id='bool-tokens'),
        pytest.param({'cache_read_tokens': '10'}, 'cache_read_tokens', 'valid integer', id='str-tokens'),
        pytest.param({'input_tokens': 1.0}, 'input_tokens', 'valid integer', id='float-tokens'),
        pytest.param({'details': {'x': -5}}, 'details.x', 'greater than or equal to 0', id='negative-detail'),
        pytest.param({'cost_usd': Decimal('NaN')}, 'cost_usd', 'finite number', id='nan-cost'),
        pytest.param({'cost_usd': float('nan')}, 'cost_usd', 'finite number', id='nan-float-cost'),
        pytest.param({'cost_usd': Decimal('Infinity')}, 'cost_usd', 'finite number', id='infinite-cost'),
        pytest.param({'cost_usd': Decimal('-0.01')}, 'cost_usd', 'greater than or equal to 0', id='negative-cost'),
        pytest.param({'cost_usd': MAX_COST_USD + 1}, 'cost_usd', 'less than or equal to 1000000', id='absurd-cost'),
        pytest.param({'units': Decimal(-1)}, 'units', 'greater than or equal to 0', id='negative-units'),
        pytest.param({'units': MAX_UNITS * 2}, 'units', 'less than or equal to', id='absurd-units'),
        pytest.param({'created_at': datetime(2026, 1, 1)}, 'created_at', 'timezone-aware', id='naive-datetime'),
        pytest.param(
            {'created_at': datetime(2026, 1, 1, tzinfo=_NoOffset())}, 'created_at', 'timezone-aware', id='no-offset'
        ),
        pytest.param(
            {'created_at': datetime(2026, 1, 1, tzinfo=_FailingZone())},
            'created_at',
            'time zone that fails',
            id='bad-tz',
        ),
        pytest.param(
            {'created_at': datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))},
            'created_at',
            'out of range',
            id='overflowing-datetime',
        ),
        pytest.param({'created_at': datetime(1, 1, 1, tzinfo=UTC)}, 'created_at', 'out of range', id='year-1'),
        pytest.param({'source': 'batch'}, 'source', "'agent' or 'direct'", id='bad-source'),
        pytest.param({'status': 'maybe'}, 'status', "'ok', 'error' or 'refused'", id='bad-status'),
        pytest.param({'pricing_status': 'free'}, 'pricing_status', "'priced', 'unpriced' or 'override'", id='bad-ps'),
        pytest.param({'prompt': 'hello'}, 'prompt', 'Extra inputs are not permitted', id='unknown-field'),
    ],
)
def test_invalid_records_are_rejected_clearly(fields: dict[str, Any], field_name: str, message: str):
    with pytest.raises(ValidationError) as exc_info:
        UsageRecord(**fields)
    [error] = exc_info.value.errors()
    assert '.'.join(str(part) for part in error['loc']) == field_name
    assert message in str(exc_info.value)


@pytest.mark.parametrize('tokens', [0, 1, MAX_TOKENS])
def test_token_bounds_are_inclusive(tokens: int):
    assert UsageRecord(input_tokens=tokens).input_tokens == tokens


def test_created_at_is_converted_to_utc():
    record = UsageRecord(created_at=datetime(2026, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))))
    assert record.created_at == datetime(2026, 2, 28, 23, 30, tzinfo=UTC)
    assert record.created_at.utcoffset() == timedelta(0)


def test_defaults():
    record = UsageRecord()
    assert record.created_at.tzinfo is UTC
    assert (record.operation, record.source, record.status) == ('request', 'direct', 'ok')
    assert record.cost_usd is None
    assert record.pricing_status is None
    assert record.metadata == {}


def test_total_tokens_counts_each_bucket_once():
    record = UsageRecord(
        input_tokens=1,
        cache_read_tokens=2,
        cache_write_tokens=4,
        input_audio_tokens=8,
        output_tokens=16,
        reasoning_tokens=32,
        output_audio_tokens=64,
        output_image_tokens=128,
        details={'cache_write_1h_tokens': 4},  # refines cache_write_tokens, adds nothing
    )
    assert record.total_tokens == 255


def test_metadata_at_the_limit_is_accepted():
    overhead = len('{"blob": ""}')
    record = UsageRecord(metadata={'blob': 'x' * (MAX_METADATA_BYTES - overhead)})
    assert len(record.metadata['blob']) == MAX_METADATA_BYTES - overhead


@pytest.mark.parametrize(
    'fields',
    [
        pytest.param({'input_tokens': -1}, id='negative'),
        pytest.param({'output_tokens': 'many'}, id='str'),
        pytest.param({'created_at': datetime(2026, 1, 1)}, id='naive'),
        pytest.param({'created_at': datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))}, id='overflow'),
    ],
)
def test_tracker_counts_invalid_records_and_never_raises(tracker: UsageTracker, fields: dict[str, Any]):
    tracker.track(model='gpt-4o', provider='openai', **fields)  # must not raise
    tracker.track(model='gpt-4o', provider='openai', input_tokens=1)
    assert tracker.flush()
    stats = tracker.stats()
    assert (stats.invalid, stats.written) == (1, 1)


class _Unprintable:
    """An id object whose `str()` fails (and its `repr()`): a label still, never the row's end."""

    def __str__(self) -> str:
        raise RuntimeError('no text')

    __repr__ = __str__


@pytest.mark.parametrize(
    ('field_name', 'value', 'expected'),
    [
        pytest.param('user_id', '   ', None, id='whitespace-id'),
        pytest.param('organization_id', '', None, id='empty-id'),
        pytest.param('organization_id', 'org\x00-1', 'org-1', id='nul'),
        pytest.param('model', 'm' * 300, normalize_label('m' * 300), id='long-label'),
        pytest.param('request_id', 'r' * 300, normalize_label('r' * 300), id='long-request-id'),
        pytest.param('operation', '  ', 'request', id='blank-operation'),
        pytest.param('user_id', _Unprintable(), '<unprintable _Unprintable>', id='str-raises'),
    ],
)
def test_labels_are_normalised_never_rejected(field_name: str, value: object, expected: str | None):
    record = UsageRecord(input_tokens=5, cost_usd=Decimal('0.1'), **{field_name: value})
    assert getattr(record, field_name) == expected
    assert (record.input_tokens, record.cost_usd) == (5, Decimal('0.1'))


_cycle: dict[str, Any] = {}
_cycle['self'] = _cycle


@pytest.mark.parametrize(
    ('metadata', 'expected'),
    [
        pytest.param({'a': 1, 'b': [1, 'x']}, {'a': 1, 'b': [1, 'x']}, id='plain'),
        pytest.param(
            {'when': datetime(2026, 1, 1, tzinfo=UTC)}, {'when': '2026-01-01 00:00:00+00:00'}, id='default-str'
        ),
        pytest.param({(1, 2): 'tuple key', 3: 'int key'}, {'(1, 2)': 'tuple key', '3': 'int key'}, id='keys'),
        pytest.param({'c': _cycle}, {'c': {'self': '<cycle>'}}, id='cycle'),
        pytest.param({'n': 10**5000}, {'n': f'<int of {(10**5000).bit_length()} bits>'}, id='huge-int'),
        pytest.param({'r': float('nan')}, {'r': 'nan'}, id='nan'),
        pytest.param({'t\x00': 'a\x00b'}, {'t': 'ab'}, id='nul'),
        pytest.param(
            {'blob': 'x' * MAX_METADATA_BYTES},
            {'_pai_usage_metadata': IsStr(regex=f'metadata dropped: .* more than the {MAX_METADATA_BYTES} allowed')},
            id='oversized',
        ),
        pytest.param(
            ['not', 'a', 'dict'], {'_pai_usage_metadata': 'metadata dropped: a list, not a mapping'}, id='list'
        ),
    ],
)
def test_metadata_is_made_json_safe_never_rejected(metadata: Any, expected: dict[str, Any]):
    record = UsageRecord(input_tokens=7, metadata=metadata)
    assert record.metadata == expected
    assert record.input_tokens == 7
    json.dumps(record.metadata, allow_nan=False)  # storable as JSON on every backend


def test_deep_metadata_is_capped():
    """Nesting beyond what JSON encoders can recurse into is cut at a depth cap instead of failing the row."""
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node['d'] = {}
        node = node['d']
    assert '<too deep>' in json.dumps(UsageRecord(metadata=deep).metadata)


def test_bad_labels_and_metadata_keep_the_billing_row(tracker: UsageTracker):
    """A billing row is never rejected for its labels or metadata: tokens and cost reach the ledger."""
    tracker.track(
        provider='openai',
        model='gpt-4o',
        input_tokens=10,
        cost_usd='0.5',
        user_id=_Unprintable(),
        organization_id='o' * 400 + '\x00',
        metadata={'when': object(), 'n': 10**5000},
    )
    assert tracker.flush()
    stats = tracker.stats()
    assert (stats.invalid, stats.written) == (0, 1)
    (row,) = token_usage_rows(tracker.engine)
    assert (row['user_id'], row['organization_id']) == ('<unprintable _Unprintable>', normalize_label('o' * 400))
    assert (row['input_tokens'], row['cost_usd']) == (10, Decimal('0.5'))
