"""The writer's batch shortcuts give exactly what the model and `price_fields` give, or step aside for them."""

from __future__ import annotations

import json
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from pai_usage import PriceTable, TokenPrice, UsageRecord, UsageTracker, price_fields
from pai_usage._validate import _Plain, fields_many, record_from_fields  # pyright: ignore[reportPrivateUsage]
from pai_usage.pricing import _plain_values, price_fields_many  # pyright: ignore[reportPrivateUsage]
from pai_usage.record import MAX_METADATA_BYTES, json_text
from pai_usage.tracker import new_id
from pai_usage.usage import TokenCounts, price_values
from tests._helpers import token_usage_rows
from tests.test_pricing import VECTORS, reference_price

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _plain_record(i: int = 0, **fields: Any) -> dict[str, Any]:
    models = (('openai', 'gpt-4o'), ('anthropic', 'claude-sonnet-4'), ('google-gla', 'gemini-2.5-pro'))
    provider, model = models[i % 3]
    record: dict[str, Any] = {
        'id': new_id(),
        'created_at': NOW + timedelta(seconds=i),
        'organization_id': f'org-{i % 7}',
        'user_id': f'user-{i}',
        'provider': provider,
        'model': model,
        'source': 'agent',
        'run_id': f'run-{i // 2}',
        'input_tokens': 1000 + i,
        'cache_read_tokens': 100,
        'output_tokens': 50 + i,
        'duration_ms': 850,
        'metadata': {'feature': 'chat', 'n': i},
    }
    record.update(fields)
    return record


class _Str(str):
    pass


_cycle: dict[str, Any] = {}
_cycle['self'] = _cycle
POISON: dict[str, list[Any]] = {
    'organization_id': [' x', 'x ', '', '\x00a', 'é', 'a' * 256, 'a' * 255, 5, None, '\u2028x', 'a\tb', _Str('s')],
    'operation': [None, '', ' r', 'agent_run', 'a' * 300],
    'service_tier': ['flex', 'a' * 33, 'a' * 32, ' batch', None],
    'price_source': ['x' * 101, 'x' * 100, None, 'pydantic-ai'],
    'source': ['agent', 'batch', None, _Str('agent')],
    'status': ['ok', 'error', 'maybe'],
    'pricing_status': [None, 'priced', 'free'],
    'input_tokens': [0, -1, True, 1.0, '3', 10**9, 10**9 + 1, 10**30],
    'details': [{}, {'x': 1}, {' x': 1}, {'x': -1}, {1: 2}, {'x': True}, None, {'': 3}],
    'units': [None, Decimal(1), Decimal('NaN'), 5, '2', 1.5, Decimal(-1)],
    'unit_type': [None, 'image', ' image'],
    'cost_usd': [None, '0.0031', ' 1_0 ', 'abc', 'NaN', Decimal('NaN'), Decimal('-0'), Decimal('-1'), 1.5, 10**7, 3],
    'duration_ms': [None, 0, -1, 86_400_001, 1.0, True, '5', 2.5],
    'metadata': [
        {},
        {' a': 1},
        {'a': '\x00'},
        {'\x00': 1},
        {'a': float('nan')},
        {'a': 10**5000},
        {1: 2},
        None,
        [],
        {'a': {'b': datetime.now()}},
        {'a': 'x' * MAX_METADATA_BYTES},
        {'a': {1: 2}},
        {'é': 1},
        _cycle,
    ],
    'created_at': [
        datetime(2026, 1, 1),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-5))),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        '2026-01-01T00:00:00Z',
        datetime(2999, 12, 31, 23, 59, tzinfo=UTC),
        datetime(3000, 1, 1, tzinfo=UTC),
        datetime(1900, 1, 1, tzinfo=UTC),
    ],
    'id': [uuid.uuid4(), str(uuid.uuid4()), 'g' * 32, uuid.uuid4().hex.upper(), '0x' + '0' * 30, 5],
}


def _check_against_the_model(items: list[Any]) -> int:
    """Assert that every record the shortcut vouches for is the model's own; returns how many it took."""
    before = [dict(i) if isinstance(i, dict) else i for i in items]  # pyright: ignore[reportUnknownArgumentType]
    out = fields_many(items)
    assert items == before  # the caller's dicts are never changed
    taken = 0
    for item, values in zip(items, out, strict=True):
        if values is None:
            continue
        taken += 1
        model = UsageRecord.model_validate(item)  # raises if the shortcut took what the model refuses
        assert values == model.__dict__
        assert list(values) == list(model.__dict__)
        assert [type(v) for v in values.values()] == [type(v) for v in model.__dict__.values()]
        record = record_from_fields(values, set(item))
        assert record == model
        assert record.model_fields_set == model.model_fields_set
        assert record.model_dump(mode='json') == model.model_dump(mode='json')
        assert values['metadata'] is not item.get('metadata')
        assert values['details'] is not item.get('details')
    return taken


def test_the_plain_schema_has_the_models_fields():
    assert list(_Plain.__annotations__) == list(UsageRecord.model_fields)


def test_plain_records_take_the_shortcut():
    items = [_plain_record(i) for i in range(300)]
    assert _check_against_the_model(items) == 300


@pytest.mark.parametrize(('name', 'value'), [(n, v) for n, values in POISON.items() for v in values])
def test_each_odd_value_is_the_models_or_left_to_it(name: str, value: Any):
    items = [_plain_record(i) for i in range(5)]
    items[2] = {**items[2], name: value}
    limit = sys.get_int_max_str_digits()
    assert _check_against_the_model(items) >= 4  # the plain records around it keep the shortcut
    assert sys.get_int_max_str_digits() == limit


def test_random_mixtures_match_the_model():
    rnd = random.Random(12)
    items: list[Any] = []
    for i in range(600):
        record = _plain_record(i)
        for _ in range(rnd.randint(0, 3)):
            name = rnd.choice(list(POISON))
            record[name] = rnd.choice(POISON[name])
        if rnd.random() < 0.03:
            record['prompt'] = 'hello'
        if rnd.random() < 0.03:
            del record['id']
        items.append(record)
    items += [1, None, UsageRecord()]
    taken = _check_against_the_model(items)
    assert 100 < taken < 600


def test_json_text_is_the_strict_encoders():
    strict = json.JSONEncoder(allow_nan=False)
    for value in ({}, {'a': [1, 2.5, None, True, 'é\u2028']}, {'k': {'n': {'m': []}}}, [1], 'text'):
        assert json_text(value) == strict.encode(value)
    with pytest.raises(ValueError):
        json_text({'a': float('nan')})
    with pytest.raises(ValueError):
        json_text(_cycle)
    with pytest.raises(TypeError):
        json_text({'a': object()})
    assert json_text({'a': 1}) == '{"a": 1}'  # a failed call leaves nothing behind for the next one


# --- pricing a chunk ----------------------------------------------------------------------------------------------


def _priced_alone(rows: list[dict[str, Any]], table: PriceTable | None = None) -> list[Any]:
    return [price_fields(r, table) for r in rows]


def test_price_fields_many_gives_genai_prices_own_results():
    vectors = VECTORS[::5]
    rows: list[dict[str, Any]] = []
    expected: list[Decimal | None] = []
    for vector in vectors:
        try:
            record = UsageRecord(
                created_at=vector.when,
                provider=vector.provider,
                model=vector.model,
                **TokenCounts.from_price_values(vector.usage).as_columns(),
            )
        except ValidationError:
            continue
        rows.append(record.__dict__)
        expected.append(reference_price(vector))
    priced = price_fields_many(rows)
    assert [p.cost_usd for p in priced] == expected
    assert priced == [price_fields(row) for row in rows]
    assert sum(e is not None for e in expected) > 300


@pytest.mark.parametrize(
    'fields',
    [
        pytest.param({}, id='self-priced'),
        pytest.param({'cost_usd': Decimal('0.5')}, id='caller-priced'),
        pytest.param({'cost_usd': Decimal('0.5'), 'pricing_status': 'priced'}, id='caller-priced-status'),
        pytest.param({'service_tier': 'flex'}, id='tier'),
        pytest.param({'service_tier': 'batch'}, id='batch'),
        pytest.param({'units': Decimal(3), 'unit_type': 'image', 'model': 'imagen-4.0-fast-generate-001'}, id='units'),
        pytest.param({'details': {'cache_write_1h_tokens': 5}, 'cache_write_tokens': 10}, id='details'),
        pytest.param(
            {'price_source': 'pydantic-ai', 'pricing_status': 'priced', 'cost_usd': Decimal(1), 'details': {'x': 1}},
            id='pydantic-ai',
        ),
        pytest.param({'model': 'no-such-model'}, id='unknown-model'),
        pytest.param({'provider': 'my-gateway'}, id='gateway'),
        pytest.param({'model': None}, id='no-model'),
        pytest.param({'input_tokens': 10**9, 'output_tokens': 10**9, 'model': 'claude-opus-4-5'}, id='absurd'),
        pytest.param({'created_at': datetime(2024, 3, 1, tzinfo=UTC)}, id='historic'),
        pytest.param({'created_at': '2026-01-01'}, id='not-a-datetime'),
        pytest.param({'input_tokens': '12'}, id='str-tokens'),
        pytest.param({'input_audio_tokens': 40, 'model': 'gpt-4o-audio-preview'}, id='audio'),
        pytest.param(
            {'provider': 'anthropic', 'model': 'claude-opus-4-8', 'metadata': {'price_context': {'speed': 'fast'}}},
            id='price-context',
        ),
        pytest.param(
            {'provider': 'anthropic', 'model': 'claude-opus-4-8', 'metadata': {'price_context': {'speed': ['fast']}}},
            id='price-context-not-a-string',
        ),
        pytest.param({'provider': ' openai', 'model': 'gpt-4o ', 'service_tier': ' flex'}, id='raw-labels'),
        pytest.param({'model': ' claude-sonnet-4 ', 'cost_usd': Decimal('0.5')}, id='raw-labels-caller-priced'),
        pytest.param({'model': ['gpt-4o']}, id='odd-label'),
    ],
)
@pytest.mark.parametrize(
    'table',
    [
        pytest.param(None, id='default-table'),
        pytest.param(
            PriceTable(
                tokens=(TokenPrice('claude-*', input_mtok=Decimal(1), output_mtok=Decimal(2)),),
                provider_aliases={'my-gateway': 'openai'},
            ),
            id='override-table',
        ),
    ],
)
def test_price_fields_many_equals_price_fields(fields: dict[str, Any], table: PriceTable | None):
    rows = [UsageRecord.model_construct(**_plain_record(i, id=uuid.uuid4())).__dict__ | fields for i in range(9)]
    assert price_fields_many(rows, table) == _priced_alone(rows, table)


def test_plain_values_equal_price_values():
    rnd = random.Random(3)
    names = ('input_tokens', 'cache_read_tokens', 'cache_write_tokens', 'input_audio_tokens')
    names += ('output_tokens', 'reasoning_tokens', 'output_audio_tokens', 'output_image_tokens')
    for _ in range(2000):
        row = {name: rnd.choice((0, 0, 1, rnd.randint(0, 10**6))) for name in names}
        expected = price_values(TokenCounts.from_columns(row))
        values = _plain_values(row)
        assert values == expected
        assert values is not None and list(values) == list(expected)
    assert _plain_values({'input_tokens': 1}) is None  # not a validated row: `price_fields` decides
    assert _plain_values(dict.fromkeys(names, 1.0)) is None


# --- through the writer -----------------------------------------------------------------------------------------


def test_a_chunk_of_plain_and_poison_records_is_stored_as_the_model_stores_it(tracker: UsageTracker):
    plain = [_plain_record(i) for i in range(40)]
    odd = [
        _plain_record(100, organization_id='  padded  '),
        _plain_record(101, metadata={'a': '\x00b'}),
        _plain_record(102, metadata=_cycle),
        _plain_record(103, input_tokens=-1),
        _plain_record(104, created_at=datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))),
        _plain_record(105, cost_usd=' 0.5 '),
        _plain_record(106, user_id='é' * 300),
    ]
    items = plain[:20] + odd + plain[20:]
    expected: dict[uuid.UUID, UsageRecord] = {}
    for item in items:
        try:
            record = UsageRecord.model_validate(item)
        except ValidationError:
            continue
        expected[record.id] = record
    for item in items:
        tracker.track(item)
    assert tracker.flush()
    stats = tracker.stats()
    assert stats.invalid == 2  # the negative count and the overflowing date
    rows = {row['id']: row for row in token_usage_rows(tracker.engine)}
    assert set(rows) == set(expected)
    for record_id, record in expected.items():
        row = rows[record_id]
        priced = price_fields(record.__dict__)
        assert row['cost_usd'] == (priced.cost_usd.quantize(Decimal('1e-12')) if priced.cost_usd else None)
        assert row['pricing_status'] == priced.pricing_status
        for name in ('organization_id', 'user_id', 'model', 'run_id', 'metadata', 'input_tokens', 'created_at'):
            assert row[name] == getattr(record, name), name
