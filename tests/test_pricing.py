"""Pricing: stored costs equal genai-prices per request, our table covers units and overrides, unknown is NULL."""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import genai_prices
import pytest
import sqlalchemy as sa
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import (
    PriceTable,
    TokenPrice,
    UnitPrice,
    UsageRecord,
    UsageTracker,
    price_fields,
    pricing,
    set_price_table,
)
from pai_usage.capability import TrackUsage
from pai_usage.pricing import (
    GENAI_PRICES_SOURCE,
    PRICES_ENV_VAR,
    effective_price,
    get_price_table,
    price_context,
    price_usage,
    response_price_context,
    stored_price_context,
)
from pai_usage.table import TOKEN_USAGE
from pai_usage.usage import TokenCounts, price_values

WHEN = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _track_and_read(tracker: UsageTracker, **fields: Any) -> dict[str, Any]:
    record = UsageRecord(created_at=fields.pop('created_at', WHEN), **fields)
    tracker.track(record)
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        row = conn.execute(sa.select(TOKEN_USAGE).where(TOKEN_USAGE.c.id == record.id)).mappings().one()
    return dict(row)


def _buckets(inclusive: dict[str, int]) -> dict[str, int]:
    """The ledger's buckets for inclusive counts, worked out by hand (not by `TokenCounts`)."""
    cache = inclusive.get('cache_read_tokens', 0) + inclusive.get('cache_write_tokens', 0)
    return {
        'input_tokens': inclusive['input_tokens'] - cache,
        'cache_read_tokens': inclusive.get('cache_read_tokens', 0),
        'cache_write_tokens': inclusive.get('cache_write_tokens', 0),
        'output_tokens': inclusive['output_tokens'] - inclusive.get('reasoning_tokens', 0),
        'reasoning_tokens': inclusive.get('reasoning_tokens', 0),
    }


# Inclusive counts, as providers and genai-prices count them (input includes cache, output includes reasoning).
PARITY_CASES = [
    pytest.param('gpt-4o', 'openai', {'input_tokens': 12_000, 'cache_read_tokens': 4_000, 'output_tokens': 800}),
    pytest.param(
        'claude-sonnet-4',
        'anthropic',
        {
            'input_tokens': 20_000,
            'cache_read_tokens': 8_000,
            'cache_write_tokens': 2_000,
            'output_tokens': 1_500,
            'reasoning_tokens': 500,
        },
    ),
    pytest.param(
        'gemini-2.5-pro', 'google-gla', {'input_tokens': 150_000, 'output_tokens': 2_000}, id='gemini-2.5-pro-low'
    ),
    pytest.param(
        'gemini-2.5-pro',
        'google-gla',
        {'input_tokens': 250_000, 'cache_read_tokens': 50_000, 'output_tokens': 3_000, 'reasoning_tokens': 1_000},
        id='gemini-2.5-pro-high',
    ),
    pytest.param(
        'gemini-2.0-flash', 'google-gla', {'input_tokens': 10_000, 'cache_read_tokens': 4_000, 'output_tokens': 500}
    ),
]


@pytest.mark.parametrize(('model', 'provider', 'inclusive'), PARITY_CASES)
def test_stored_cost_equals_genai_prices(tracker: UsageTracker, model: str, provider: str, inclusive: dict[str, int]):
    usage = genai_prices.Usage(**{k: v for k, v in inclusive.items() if k != 'reasoning_tokens'})
    expected = genai_prices.calc_price(usage, model, provider_id=provider, genai_request_timestamp=WHEN).total_price
    assert expected > 0

    row = _track_and_read(tracker, model=model, provider=provider, **_buckets(inclusive))

    assert row['cost_usd'] == expected
    assert row['pricing_status'] == 'priced'
    assert row['price_source'] == f'genai-prices {genai_prices.__version__}'


def test_gemini_25_pro_tiers_differ():
    def per_input_token(input_tokens: int) -> Decimal:
        usage = genai_prices.Usage(input_tokens=input_tokens)
        return genai_prices.calc_price(usage, 'gemini-2.5-pro', provider_id='google-gla').total_price / input_tokens

    # The parity cases above straddle the 200k tier: make sure they really hit two prices.
    assert per_input_token(250_000) > per_input_token(150_000)


def test_historic_price_follows_the_request_timestamp(tracker: UsageTracker):
    # genai-prices knows an o3 price cut on 2025-06-10.
    before, after = datetime(2025, 6, 1, tzinfo=UTC), datetime(2025, 7, 1, tzinfo=UTC)
    usage = genai_prices.Usage(input_tokens=100_000, output_tokens=10_000)
    expected = {
        when: genai_prices.calc_price(usage, 'o3', provider_id='openai', genai_request_timestamp=when).total_price
        for when in (before, after)
    }
    assert expected[before] != expected[after]

    for when in (before, after):
        row = _track_and_read(
            tracker, model='o3', provider='openai', input_tokens=100_000, output_tokens=10_000, created_at=when
        )
        assert row['cost_usd'] == expected[when]


def test_unknown_model_is_unpriced_not_zero(tracker: UsageTracker, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger='pai_usage')
    model = f'no-such-model-{uuid4().hex[:8]}'  # a new name: the warning is rate-limited per model
    row = _track_and_read(tracker, model=model, provider='acme-ai', input_tokens=1_000, output_tokens=10)
    _track_and_read(tracker, model='gpt-4o', provider='openai', input_tokens=1_000, organization_id='o')

    assert row['cost_usd'] is None
    assert row['pricing_status'] == 'unpriced'
    assert row['price_source'] == f'unpriced: no genai-prices price for acme-ai/{model}'
    assert tracker.stats().unpriced == 1
    summary = tracker.get_usage_summary(datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert summary.totals.unpriced_events == 1
    assert summary.totals.events == 2
    [unknown] = [r for r in summary.rows if r.group['model'] == model]
    assert (unknown.totals.unpriced_events, unknown.totals.cost_usd) == (1, 0)
    assert summary.totals.cost_usd == _track_cost_of_gpt_4o_1000_input()
    assert any(model in message for message in caplog.messages)


def _track_cost_of_gpt_4o_1000_input() -> Decimal:
    usage = genai_prices.Usage(input_tokens=1_000)
    return genai_prices.calc_price(usage, 'gpt-4o', provider_id='openai', genai_request_timestamp=WHEN).total_price


def test_unpriced_warning_is_rate_limited(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger='pai_usage')
    for _ in range(5):
        priced = price_usage(provider='acme-ai', model='rate-limited-model', tokens=TokenCounts(input_tokens=1))
        assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')
    assert sum('rate-limited-model' in message for message in caplog.messages) == 1


PRICE_TOML = """
[[tokens]]
model = "gpt-4o"
provider = "openai"
input_mtok = 2
output_mtok = 8
cache_read_mtok = 0.5

[[units]]
model = "imagen-*"
provider = "google*"
unit_type = "image"
usd_per_unit = 0.04

[[units]]
model = "veo-*"
provider = "google*"
unit_type = "video_second"
usd_per_unit = "0.4"

[[units]]
model = "*"
provider = "elevenlabs"
unit_type = "character"
usd_per_unit = 0.00018
"""


def _price_json() -> str:
    import tomllib

    return json.dumps(tomllib.loads(PRICE_TOML))


@pytest.fixture(params=['toml-file', 'json-file', 'env-var'])
def configured_prices(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prices of `PRICE_TOML`, loaded from a file in code or named by `$PAI_USAGE_PRICES`."""
    if request.param == 'json-file':
        path = tmp_path / 'prices.json'
        path.write_text(_price_json())
        set_price_table(PriceTable.from_file(path))
    else:
        path = tmp_path / 'prices.toml'
        path.write_text(PRICE_TOML)
        if request.param == 'toml-file':
            set_price_table(PriceTable.from_file(path))
        else:
            monkeypatch.setenv(PRICES_ENV_VAR, str(path))
            set_price_table(None)


# Expected costs from the prices set in PRICE_TOML above, worked out here.
CONFIGURED_CASES = [
    pytest.param(
        {
            'model': 'gpt-4o',
            'provider': 'openai',
            'input_tokens': 8_000,
            'cache_read_tokens': 4_000,
            'output_tokens': 800,
        },
        (8_000 * Decimal(2) + 4_000 * Decimal('0.5') + 800 * Decimal(8)) / 1_000_000,
        'config: tokens openai/gpt-4o',
        id='token-override',
    ),
    pytest.param(
        {'model': 'imagen-4.0-generate-001', 'provider': 'google-vertex', 'units': Decimal(3), 'unit_type': 'image'},
        3 * Decimal('0.04'),
        'config: units google*/imagen-*',
        id='imagen-image',
    ),
    pytest.param(
        {
            'model': 'veo-3.0-generate-001',
            'provider': 'google-vertex',
            'units': Decimal(16),
            'unit_type': 'video_second',
        },
        16 * Decimal('0.4'),
        'config: units google*/veo-*',
        id='veo-second',
    ),
    pytest.param(
        {'model': 'eleven_multilingual_v2', 'provider': 'elevenlabs', 'units': Decimal(1234), 'unit_type': 'character'},
        1234 * Decimal('0.00018'),
        'config: units elevenlabs/*',
        id='elevenlabs-character',
    ),
]


@pytest.mark.usefixtures('configured_prices')
@pytest.mark.parametrize(('fields', 'expected', 'source'), CONFIGURED_CASES)
def test_configured_prices(tracker: UsageTracker, fields: dict[str, Any], expected: Decimal, source: str):
    row = _track_and_read(tracker, **fields)
    assert row['cost_usd'] == expected
    assert (row['pricing_status'], row['price_source']) == ('override', source)


# The shipped list prices: one entry per current model and unit, each saying where its figure came from.
@pytest.mark.parametrize(
    ('provider', 'model', 'unit_type'),
    [
        ('google-vertex', 'imagen-3.0-generate-002', 'image'),
        ('google-vertex', 'imagen-3.0-fast-generate-001', 'image'),
        ('google-gla', 'imagen-4.0-generate-001', 'image'),
        ('google-gla', 'imagen-4.0-fast-generate-001', 'image'),
        ('google-gla', 'imagen-4.0-ultra-generate-001', 'image'),
        ('google-gla', 'veo-2.0-generate-001', 'video_second'),
        ('google-vertex', 'veo-2.0-generate-001', 'video_second'),
        ('google-gla', 'veo-3.0-generate-001', 'video_second'),
        ('google-gla', 'veo-3.0-generate-001', 'video_second_audio'),
        ('google-vertex', 'veo-3.0-fast-generate-001', 'video_second'),
        ('google-vertex', 'veo-3.0-fast-generate-001', 'video_second_audio'),
        ('elevenlabs', 'eleven_v3', 'character'),
        ('elevenlabs', 'eleven_multilingual_v2', 'character'),
        ('elevenlabs', 'eleven_flash_v2_5', 'character'),
        ('elevenlabs', 'eleven_turbo_v2_5', 'character'),
    ],
)
def test_shipped_unit_prices(tracker: UsageTracker, provider: str, model: str, unit_type: str):
    entry = PriceTable().unit_price(provider, model, unit_type)
    assert entry is not None and entry.as_of and entry.source
    assert entry.usd_per_unit > 0
    row = _track_and_read(tracker, model=model, provider=provider, units=7, unit_type=unit_type)
    assert row['cost_usd'] == 7 * entry.usd_per_unit
    assert (row['pricing_status'], row['price_source']) == ('override', f'config: units {entry.provider}/{entry.model}')


def test_fast_models_cost_less_than_standard_and_ultra():
    table = PriceTable()

    def usd(model: str, unit_type: str = 'image') -> Decimal:
        entry = table.unit_price('google-gla', model, unit_type)
        assert entry is not None
        return entry.usd_per_unit

    assert usd('imagen-4.0-fast-generate-001') < usd('imagen-4.0-generate-001') < usd('imagen-4.0-ultra-generate-001')
    assert usd('veo-3.0-fast-generate-001', 'video_second') < usd('veo-3.0-generate-001', 'video_second')
    assert usd('veo-3.0-generate-001', 'video_second') < usd('veo-3.0-generate-001', 'video_second_audio')


@pytest.mark.parametrize(
    ('provider', 'model', 'unit_type'),
    [
        ('google-vertex', 'imagen-5.0-generate-001', 'image'),  # no entry: never a flat default
        ('google-gla', 'veo-9.0-generate-001', 'video_second'),
        ('elevenlabs', 'eleven_future_v9', 'character'),
        ('google-gla', 'veo-2.0-generate-001', 'video_second_audio'),  # Veo 2 has no audio price
    ],
)
def test_models_without_an_entry_are_unpriced(tracker: UsageTracker, provider: str, model: str, unit_type: str):
    row = _track_and_read(tracker, model=model, provider=provider, units=3, unit_type=unit_type)
    assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced')
    assert row['price_source'] == f'unpriced: no price for {unit_type} of {provider}/{model}'


@pytest.mark.parametrize(
    ('units', 'unit_type', 'why'),
    [
        pytest.param(2, 'image', None, id='no-price-for-the-unit'),
        pytest.param(5, None, 'unpriced: units without a unit_type', id='units-of-nothing'),
    ],
)
def test_units_without_a_price_are_unpriced(tracker: UsageTracker, units: int, unit_type: str | None, why: str | None):
    row = _track_and_read(tracker, model='dall-e-3', provider='openai', units=units, unit_type=unit_type)
    assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced')
    if why is not None:
        assert row['price_source'] == why


@pytest.mark.parametrize(
    'usage',
    [
        pytest.param({'input_tokens': 100, 'cache_read_tokens': 200, 'output_tokens': 10}, id='cache-over-input'),
        pytest.param(
            {'input_tokens': 100, 'output_tokens': 10, 'output_reasoning_tokens': 50}, id='reasoning-over-output'
        ),
        pytest.param(
            {'input_tokens': 3_000, 'input_audio_tokens': 2_000, 'cache_read_tokens': 2_000}, id='cached-audio'
        ),
        pytest.param({'input_tokens': 10, 'cache_write_tokens': 40, 'output_tokens': 5}, id='cache-write-over-input'),
        pytest.param(
            {'input_tokens': 3_000, 'cache_audio_read_tokens': 500, 'output_tokens': 5}, id='cached-audio-no-cache-read'
        ),
    ],
)
@pytest.mark.parametrize('model', ['gpt-4o', 'claude-sonnet-4', 'gemini-2.5-pro'])
def test_inconsistent_counts_are_priced_as_genai_prices_prices_them(usage: dict[str, int], model: str):
    """A part larger than its whole: the same price genai-prices gives the counts as reported, or unpriced."""
    try:
        expected: Decimal | None = genai_prices.calc_price(genai_prices.Usage(**usage), model).total_price
    except ValueError:
        expected = None
    tokens = TokenCounts.from_price_values(usage)
    priced = price_usage(provider=None, model=model, tokens=tokens)
    assert priced.cost_usd == expected
    assert priced.pricing_status == ('unpriced' if expected is None else 'priced')


def test_token_override_beats_genai_prices():
    table = PriceTable(
        tokens=(TokenPrice('gemini-2.0-*', provider='google*', input_mtok=Decimal(1), output_mtok=Decimal(3)),)
    )
    priced = price_usage(
        provider='google-gla',
        model='gemini-2.0-flash',
        tokens=TokenCounts(input_tokens=1_000, output_tokens=100, reasoning_tokens=100),
        table=table,
    )
    assert priced.cost_usd == (1_000 * 1 + 200 * 3) / Decimal(1_000_000)
    assert (priced.pricing_status, priced.price_source) == ('override', 'config: tokens google*/gemini-2.0-*')


def test_first_matching_unit_price_wins():
    table = PriceTable(
        units=(
            UnitPrice('imagen-4*', 'image', Decimal('0.06'), provider='google*'),
            UnitPrice('imagen-*', 'image', Decimal('0.02'), provider='google*'),
        )
    )
    assert table.unit_price('google-vertex', 'imagen-4.0-ultra', 'image') == table.units[0]
    assert table.unit_price('google-vertex', 'imagen-3.0', 'image') == table.units[1]
    assert table.unit_price('openai', 'imagen-3.0', 'image') is None


def test_absurd_computed_cost_is_unpriced(caplog: pytest.LogCaptureFixture):
    table = PriceTable(units=(UnitPrice('veo-*', 'video_second', Decimal(1000)),))
    priced = price_usage(
        provider='google-vertex',
        model='veo-3',
        tokens=TokenCounts(),
        units=Decimal(10_000),
        unit_type='video_second',
        table=table,
    )
    assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')


@pytest.mark.parametrize(
    ('name', 'content', 'message'),
    [
        ('prices.toml', '[[tokens]\nmodel = "x"', 'bad price file'),
        ('prices.json', '{"units": [', 'bad price file'),
        ('prices.json', '[1, 2]', 'expected a table'),
        ('prices.toml', 'currency = "EUR"', 'unknown price table keys'),
        ('prices.toml', 'units = "imagen"', '`units` must be an array of tables'),
        ('prices.toml', 'units = [1]', r'bad entry `units\[0\]`'),
        ('prices.toml', '[[tokens]]\nmodel = "x"\ninput_mtok = -1', 'input_mtok must be a non-negative number'),
        ('prices.toml', '[[tokens]]\nmodel = "x"\ninput_mtok = "cheap"', r'bad entry `tokens\[0\]`'),
        ('prices.toml', '[[tokens]]\nmodel = "x"\ninput_mtok = true', 'expected a number'),
        ('prices.toml', '[[tokens]]\nmodel = "x"\nprice = 1', "unexpected keyword argument 'price'"),
        ('prices.toml', '[[units]]\nmodel = "x"\nunit_type = "image"', 'missing 1 required positional argument'),
        ('prices.toml', '[[units]]\nmodel = 5\nunit_type = "image"\nusd_per_unit = 1', 'model must be a string'),
    ],
)
def test_bad_price_file_is_a_clear_value_error(tmp_path: Path, name: str, content: str, message: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as exc_info:
        PriceTable.from_file(path)
    assert str(path) in str(exc_info.value)


def test_missing_price_file_is_a_clear_value_error(tmp_path: Path):
    with pytest.raises(ValueError, match=r'cannot read price file .*nope\.toml'):
        PriceTable.from_file(tmp_path / 'nope.toml')


def test_bad_price_file_in_env_leaves_usage_unpriced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    path = tmp_path / 'prices.toml'
    path.write_text('[[tokens]\n')
    monkeypatch.setenv(PRICES_ENV_VAR, str(path))
    set_price_table(None)
    with pytest.raises(ValueError, match='bad price file'):
        get_price_table()
    priced = price_usage(provider='openai', model='gpt-4o', tokens=TokenCounts(input_tokens=10))
    assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')
    assert any('bad price file' in message for message in caplog.messages)


def test_effective_price_of_a_gemini_model_has_no_foreign_unit_prices():
    price = effective_price('gemini-2.5-pro', 'google-gla', at=WHEN)
    assert price.source == 'genai-prices'
    assert price.price_source == GENAI_PRICES_SOURCE
    assert price.unit_prices == {}  # not ElevenLabs' per-character price

    def per_mtok(input_tokens: int) -> Decimal:
        usage = genai_prices.Usage(input_tokens=input_tokens)
        calc = genai_prices.calc_price(usage, 'gemini-2.5-pro', provider_id='google-gla', genai_request_timestamp=WHEN)
        return calc.total_price * 1_000_000 / input_tokens

    assert price.token_prices['input_mtok'] == per_mtok(100_000)
    assert price.token_tiers['input_mtok'] == ((200_000, per_mtok(1_000_000)),)
    assert effective_price('gemini-2.5-pro').unit_prices == {}


@pytest.mark.parametrize(
    ('model', 'provider', 'unit_types'),
    [
        ('imagen-3.0-generate-002', 'google-vertex', ['image']),
        ('imagen-3.0-generate-002', None, ['image']),
        ('veo-3.0-generate-001', 'google-gla', ['video_second', 'video_second_audio']),
        ('eleven_multilingual_v2', 'elevenlabs', ['character']),
    ],
)
def test_effective_unit_prices_match_the_provider(model: str, provider: str | None, unit_types: list[str]):
    price = effective_price(model, provider)
    table = PriceTable()
    expected: dict[str, Decimal] = {}
    for unit_type in unit_types:
        entry = table.unit_price(provider or 'google-vertex', model, unit_type)
        assert entry is not None
        expected[unit_type] = entry.usd_per_unit
    assert price.unit_prices == expected
    assert (price.source, price.price_source) == ('config', 'config')


def test_effective_price_shows_overrides_and_unknowns():
    table = PriceTable(tokens=(TokenPrice('gpt-4o', input_mtok=Decimal(2), output_mtok=Decimal(8)),))
    price = effective_price('gpt-4o', 'openai', table=table)
    assert (price.source, price.token_prices) == ('config', {'input_mtok': Decimal(2), 'output_mtok': Decimal(8)})
    unknown = effective_price('no-such-model-7b')
    assert (unknown.source, unknown.token_prices, unknown.unit_prices) == ('none', {}, {})


def test_model_lookups_are_cached_misses_included(monkeypatch: pytest.MonkeyPatch):
    snapshot = genai_prices.data_snapshot.get_snapshot()
    calls: list[tuple[Any, ...]] = []
    original = snapshot.find_provider_model

    def counting(*args: Any) -> Any:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(snapshot, 'find_provider_model', counting)
    tokens = TokenCounts(input_tokens=1_000, output_tokens=100)
    unknown = f'no-such-model-{uuid4().hex[:8]}'
    for _ in range(3):
        priced = price_usage(provider='acme-ai', model=unknown, tokens=tokens)
        assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')
    assert len(calls) == 1  # under the provider given, and never again

    # A provider id genai-prices does not know is never priced as another provider (issue 13, case 1).
    reseller = f'reseller-{uuid4().hex[:8]}'
    with pytest.raises(LookupError):
        genai_prices.calc_price(genai_prices.Usage(input_tokens=1_000), 'claude-sonnet-4', provider_id=reseller)
    calls.clear()
    for _ in range(3):
        priced = price_usage(provider=reseller, model='claude-sonnet-4', tokens=tokens, timestamp=WHEN)
        assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')
    assert len(calls) == 1


def test_new_price_data_is_looked_up_again():
    tokens = TokenCounts(input_tokens=1_000)
    assert price_usage(provider='openai', model='gpt-4o', tokens=tokens).pricing_status == 'priced'
    genai_prices.data_snapshot.set_custom_snapshot(
        genai_prices.data_snapshot.DataSnapshot(providers=[], from_auto_update=False)
    )
    try:
        assert price_usage(provider='openai', model='gpt-4o', tokens=tokens).pricing_status == 'unpriced'
    finally:
        genai_prices.data_snapshot.set_custom_snapshot(None)
    assert price_usage(provider='openai', model='gpt-4o', tokens=tokens).pricing_status == 'priced'


# --- genai-prices' own test data (issue 13, items 3 and 8) --------------------------------------------------------

VECTORS_FILE = Path(__file__).parent / 'data' / 'genai_prices_vectors.json'
VECTOR_WHEN = datetime(2026, 11, 15, 12, tzinfo=UTC)
"""When vectors without a timestamp of their own are priced (fixed, so that the results do not move)."""


@dataclass(frozen=True)
class Vector:
    model: str
    provider: str | None
    usage: dict[str, int]
    when: datetime


def _vectors() -> list[Vector]:
    vectors: list[Vector] = []
    for entry in json.loads(VECTORS_FILE.read_text()):
        if entry.get('price_context') or not all(type(v) is int for v in entry['usage'].values()):
            continue
        when = datetime.fromisoformat(entry['timestamp']) if 'timestamp' in entry else VECTOR_WHEN
        vectors.extend(Vector(entry['model'], p, entry['usage'], when) for p in entry['providers'])
    return vectors


VECTORS = _vectors()
VECTOR_PROVIDERS = sorted({v.provider or '' for v in VECTORS})


def reference_price(vector: Vector) -> Decimal | None:
    """genai-prices' own price for the vector, or None where it gives none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # genai-prices' own warnings about its data are not ours to fail on
            usage = genai_prices.Usage(**vector.usage)
            return genai_prices.calc_price(
                usage, vector.model, provider_id=vector.provider, genai_request_timestamp=vector.when
            ).total_price
    except (LookupError, ValueError):
        return None


def test_the_vendored_vectors_are_genai_prices_own():
    assert VECTORS_FILE.stat().st_size < 2_000_000
    assert len(VECTORS) > 10_000
    priced = [v for v in VECTORS if reference_price(v) is not None]
    # Both outcomes are covered: priced vectors, and vectors for a provider genai-prices has no price under.
    assert 2_000 < len(priced) < len(VECTORS) - 5_000


@pytest.mark.parametrize('provider', VECTOR_PROVIDERS)
def test_our_price_equals_genai_prices_on_its_test_data(provider: str):
    table = PriceTable()
    cases = [v for v in VECTORS if (v.provider or '') == provider]
    mismatches: list[tuple[Vector, Decimal | None, Decimal | None]] = []
    for vector in cases:
        expected = reference_price(vector)
        priced = price_usage(
            provider=vector.provider,
            model=vector.model,
            tokens=TokenCounts.from_price_values(vector.usage),
            timestamp=vector.when,
            table=table,
        )
        assert (priced.cost_usd is None) == (priced.pricing_status == 'unpriced')
        if priced.cost_usd != expected:
            mismatches.append((vector, expected, priced.cost_usd))
    assert mismatches == []


def test_the_compiled_prices_equal_genai_prices_without_falling_back():
    """The fast path itself (not its fallback) gives genai-prices' exact result on its test data."""
    compiled_rows = 0
    for vector in VECTORS:
        expected = reference_price(vector)
        found = pricing._find_model(vector.provider, vector.model)  # pyright: ignore[reportPrivateUsage]
        if expected is None or found is None:
            continue
        compiled = pricing._compiled(found, vector.when, None)  # pyright: ignore[reportPrivateUsage]
        values = price_values(TokenCounts.from_price_values(vector.usage))
        if not compiled.exact:
            continue
        total = pricing._fast_total(compiled, values)  # pyright: ignore[reportPrivateUsage]
        if total is not None:
            compiled_rows += 1
            assert total == expected, vector
    assert compiled_rows > 2_000  # nearly every priced vector, not a handful


@pytest.mark.parametrize(
    ('zone', 'naive'),
    # Each a naive time whose local reading falls on the other UTC day.
    [('Pacific/Kiritimati', datetime(2026, 7, 30, 5)), ('America/New_York', datetime(2026, 7, 29, 22))],
)
def test_a_naive_timestamp_is_utc_to_the_price_cache_too(
    monkeypatch: pytest.MonkeyPatch, zone: str, naive: datetime
) -> None:
    """A naive time is UTC, as genai-prices reads it, whatever the process's zone: its price is filed under its
    UTC day, not under the local day, where a later row of that other day would find it (probe: $0.032 stored
    for a row genai-prices prices at $0.16, at UTC+14)."""
    monkeypatch.setenv('TZ', zone)
    time.tzset()
    monkeypatch.setattr(pricing, '_compiled_prices', {})
    try:
        usage = {'input_tokens': 100_000, 'output_tokens': 10_000}
        # gpt-5.6-luna's price changes on 2026-07-30 (UTC).
        others = [datetime(2026, 7, 29, 12, tzinfo=UTC), datetime(2026, 7, 30, 12, tzinfo=UTC)]

        def reference(when: datetime) -> Decimal:
            return genai_prices.calc_price(
                genai_prices.Usage(**usage), 'gpt-5.6-luna', provider_id='openai', genai_request_timestamp=when
            ).total_price

        assert reference(others[0]) != reference(others[1]), 'the price must change between the two days'
        columns = TokenCounts.from_price_values(usage).as_columns()
        for when in (naive, *others):
            fields = {'provider': 'openai', 'model': 'gpt-5.6-luna', 'created_at': when, **columns}
            assert price_fields(fields).cost_usd == reference(when), when
    finally:
        monkeypatch.undo()
        time.tzset()


_USAGE_KEYS = (
    'input_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'input_audio_tokens',
    'cache_audio_read_tokens',
    'output_tokens',
    'output_reasoning_tokens',
    'output_audio_tokens',
    'output_image_tokens',
)


def test_the_shared_plans_price_each_row_as_genai_prices_does():
    """Rows of one set of keys share a decomposition plan: for any counts it gives the row-by-row result."""
    rng = random.Random(12)
    models = {(v.provider, v.model): v.when for v in VECTORS if reference_price(v) is not None}
    checked = 0
    for (provider, model), when in sorted(models.items(), key=str)[:: max(len(models) // 60, 1)]:
        found = pricing._find_model(provider, model)  # pyright: ignore[reportPrivateUsage]
        assert found is not None
        compiled = pricing._compiled(found, when, None)  # pyright: ignore[reportPrivateUsage]
        for _ in range(40):
            keys = rng.sample(_USAGE_KEYS, rng.randint(1, 5))
            values = {k: rng.choice((0, 1, 7, 1000, 250_000, 10**9)) for k in keys}
            total = pricing._fast_total(compiled, values)  # pyright: ignore[reportPrivateUsage]
            assert total == pricing._fast_total_each(compiled, values), (model, values)  # pyright: ignore[reportPrivateUsage]
            if total is not None:
                checked += 1
                provider_, info = found
                usage = genai_prices.Usage(**values)
                assert total == info.calc_price(usage, provider_, genai_request_timestamp=when).total_price
    assert checked > 500


def _replayed_vectors() -> list[Vector]:
    """One vector per provider, model and outcome: a few hundred rows that cover what the data holds."""
    seen: set[tuple[str | None, str, bool, frozenset[str]]] = set()
    chosen: list[Vector] = []
    for vector in VECTORS:
        key = (vector.provider, vector.model, reference_price(vector) is None, frozenset(vector.usage))
        if key not in seen and len(chosen) < 600:
            seen.add(key)
            chosen.append(vector)
    return chosen


def test_genai_prices_vectors_through_track(tracker: UsageTracker):
    vectors = _replayed_vectors()
    ids: list[tuple[Vector, Any]] = []
    for vector in vectors:
        record = UsageRecord(
            created_at=vector.when,
            provider=vector.provider,
            model=vector.model,
            **TokenCounts.from_price_values(vector.usage).as_columns(),
        )
        tracker.track(record)
        ids.append((vector, record.id))
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        stored = {row['id']: row for row in conn.execute(sa.select(TOKEN_USAGE)).mappings()}
    priced = 0
    for vector, row_id in ids:
        row = stored[row_id]
        expected = reference_price(vector)
        if expected is None:
            assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced'), vector
            assert row['price_source'].startswith('unpriced: ')
        else:
            priced += 1
            assert row['cost_usd'] == expected.quantize(Decimal('1e-12')), vector
            assert row['pricing_status'] == 'priced'
    assert priced > 100


# --- the cases of issue 13 ----------------------------------------------------------------------------------------


def _calc(
    model: str, provider: str, *, context: dict[str, str] | None = None, when: datetime = WHEN, **usage: Any
) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider, genai_request_timestamp=when, price_context=context
    ).total_price


def test_a_gateway_is_unpriced_unless_mapped(tracker: UsageTracker, tmp_path: Path):
    fields = {'model': 'gpt-4o', 'provider': 'my-gateway', 'input_tokens': 10_000, 'output_tokens': 500}
    row = _track_and_read(tracker, **fields)
    assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced')
    assert row['price_source'] == 'unpriced: no genai-prices price for my-gateway/gpt-4o'

    path = tmp_path / 'prices.toml'
    path.write_text('[provider_aliases]\n"my-gateway" = "openai"\n')
    set_price_table(PriceTable.from_file(path))
    row = _track_and_read(tracker, **fields)
    assert row['cost_usd'] == _calc('gpt-4o', 'openai', input_tokens=10_000, output_tokens=500)
    assert (row['pricing_status'], row['price_source'], row['provider']) == (
        'priced',
        GENAI_PRICES_SOURCE,
        'my-gateway',
    )


@pytest.mark.parametrize(
    ('fields', 'model', 'provider', 'usage'),
    [
        pytest.param(
            {'input_tokens': 1_000, 'output_tokens': 2_000, 'reasoning_tokens': 3_000,
             'details': {'output_citation_tokens': 1_500, 'web_searches': 4}},
            'sonar-deep-research', 'perplexity',
            {'input_tokens': 1_000, 'output_tokens': 5_000, 'output_reasoning_tokens': 3_000,
             'output_citation_tokens': 1_500, 'web_searches': 4},
            id='reasoning-citations-searches',
        ),
        pytest.param(
            {'input_tokens': 300, 'output_tokens': 70, 'details': {'web_search_requests': 2}},
            'claude-3-7-sonnet-latest', 'anthropic',
            {'input_tokens': 300, 'output_tokens': 70, 'web_searches': 2},
            id='web-search-requests',
        ),
        pytest.param(
            {'input_tokens': 1_500, 'cache_read_tokens': 200, 'output_tokens': 100, 'output_image_tokens': 500,
             'details': {'input_image_tokens': 1_000, 'cache_image_read_tokens': 50}},
            'gpt-image-1.5', 'openai',
            {'input_tokens': 1_700, 'cache_read_tokens': 200, 'input_image_tokens': 1_000,
             'cache_image_read_tokens': 50, 'output_tokens': 600, 'output_image_tokens': 500},
            id='image-input',
        ),
    ],
)  # fmt: skip
def test_billed_usage_without_a_column_is_priced(
    tracker: UsageTracker, fields: dict[str, Any], model: str, provider: str, usage: dict[str, int]
):
    row = _track_and_read(tracker, model=model, provider=provider, **fields)
    expected = _calc(model, provider, **usage)
    without_details = _calc(model, provider, **{k: v for k, v in usage.items() if k in TOKEN_COLUMN_KEYS})
    assert expected != without_details  # the extra quantities are billed: dropping them would show
    assert (row['cost_usd'], row['pricing_status']) == (expected, 'priced')


TOKEN_COLUMN_KEYS = {'input_tokens', 'cache_read_tokens', 'output_tokens', 'output_image_tokens'}


@pytest.mark.parametrize('tier', ['priority', 'flex', 'batch'])
def test_track_prices_the_service_tier(tracker: UsageTracker, tier: str):
    model = 'gpt-4o' if tier != 'flex' else 'o3'
    when = VECTOR_WHEN  # genai-prices has tier prices for these models from 2026-10 on
    tracker.track(
        model=model, provider='openai', input_tokens=10_000, output_tokens=1_000, created_at=when, service_tier=tier
    )
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        row = conn.execute(sa.select(TOKEN_USAGE)).mappings().one()
    context = {'processing': 'batch'} if tier == 'batch' else {'service_tier': tier}
    expected = _calc(model, 'openai', context=context, when=when, input_tokens=10_000, output_tokens=1_000)
    assert expected != _calc(model, 'openai', when=when, input_tokens=10_000, output_tokens=1_000)
    assert (row['service_tier'], row['cost_usd']) == (tier, expected)


@pytest.mark.parametrize(
    ('provider', 'model', 'usage', 'missing'),
    [
        ('openai', 'text-embedding-3-small', {'input_tokens': 1_000, 'output_tokens': 100}, 'output_tokens'),
        ('mistral', 'mistral-ocr-latest', {'input_tokens': 1_000, 'output_tokens': 100}, 'input_tokens'),
    ],
)
def test_a_quantity_genai_prices_counts_as_free_leaves_the_row_unpriced(
    provider: str, model: str, usage: dict[str, int], missing: str
):
    """The one place we part from `calc_price`: it prices what it has no price for at 0, a partial bill."""
    assert genai_prices.calc_price(genai_prices.Usage(**usage), model, provider_id=provider).total_price is not None
    priced = price_usage(provider=provider, model=model, tokens=TokenCounts.from_price_values(usage))
    assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')
    assert priced.price_source == f'unpriced: no price for {missing} of {provider}/{model}'


def test_tokens_with_unpriced_units_are_unpriced_not_partly_priced(tracker: UsageTracker):
    row = _track_and_read(
        tracker, model='gpt-4o', provider='openai', input_tokens=100, output_tokens=10, units=2, unit_type='image'
    )
    assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced')
    assert row['price_source'] == 'unpriced: no price for image of openai/gpt-4o'


@pytest.mark.parametrize(
    ('model', 'unit_type', 'units', 'usage'),
    [
        ('tts-1', 'character', Decimal(1_000), {'input_characters': 1_000}),
        ('tts-1-hd', 'input_characters', Decimal(2_345), {'input_characters': 2_345}),
        ('whisper-1', 'audio_second', Decimal('92.5'), {'audio_seconds': Decimal('92.5')}),
    ],
)
def test_units_genai_prices_prices_go_to_it_first(
    tracker: UsageTracker, model: str, unit_type: str, units: Decimal, usage: dict[str, Any]
):
    row = _track_and_read(tracker, model=model, provider='openai', units=units, unit_type=unit_type)
    assert row['cost_usd'] == _calc(model, 'openai', **usage).quantize(Decimal('1e-12'))
    assert (row['pricing_status'], row['price_source']) == ('priced', GENAI_PRICES_SOURCE)


@pytest.mark.anyio
async def test_process_wide_override_prices_direct_and_agent_rows(tracker: UsageTracker):
    set_price_table(
        PriceTable(tokens=(TokenPrice('gpt-4o', provider='openai', input_mtok=Decimal(1), output_mtok=Decimal(2)),))
    )
    usage = {'input_tokens': 4_000, 'output_tokens': 300}

    def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(**usage))

    agent = Agent(FunctionModel(fn, model_name='gpt-4o'), capabilities=[TrackUsage(tracker)])
    result = await agent.run('q')
    assert result.usage.cost is not None  # pydantic-ai priced it at genai-prices' price...
    tracker.track(model='gpt-4o', provider='openai', created_at=WHEN, **usage)
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        rows = list(conn.execute(sa.select(TOKEN_USAGE)).mappings())
    assert {r['source'] for r in rows} == {'agent', 'direct'}
    for row in rows:  # ...and our table wins on both kinds of row
        assert row['cost_usd'] == (4_000 * 1 + 300 * 2) / Decimal(1_000_000)
        assert (row['pricing_status'], row['price_source']) == ('override', 'config: tokens openai/gpt-4o')


@pytest.mark.anyio
async def test_agent_web_search_requests_are_billed(tracker: UsageTracker):
    usage = RequestUsage(input_tokens=300, output_tokens=70, details={'web_search_requests': 2})

    def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')], provider_name='anthropic', usage=usage)

    agent = Agent(FunctionModel(fn, model_name='claude-3-7-sonnet-latest'), capabilities=[TrackUsage(tracker)])
    await agent.run('q')
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        row = conn.execute(sa.select(TOKEN_USAGE)).mappings().one()
    expected = _calc('claude-3-7-sonnet-latest', 'anthropic', input_tokens=300, output_tokens=70, web_searches=2)
    assert (row['cost_usd'], row['pricing_status'], row['price_source']) == (expected, 'priced', GENAI_PRICES_SOURCE)


def test_price_fields_prices_as_the_writer_does(tracker: UsageTracker):
    fields = {'model': 'gpt-4o', 'provider': 'openai', 'input_tokens': 1_234, 'output_tokens': 56, 'created_at': WHEN}
    priced = price_fields(fields)
    row = _track_and_read(tracker, **fields)
    assert (priced.cost_usd, priced.pricing_status, priced.price_source) == (
        row['cost_usd'],
        row['pricing_status'],
        row['price_source'],
    )
    given = price_fields({**fields, 'cost_usd': Decimal('0.5'), 'price_source': 'invoice'})
    assert (given.cost_usd, given.pricing_status, given.price_source) == (Decimal('0.5'), 'priced', 'invoice')


@pytest.mark.parametrize('bad', [{'input_tokens': 'lots'}, {'units': 'three', 'unit_type': 'image'}])
def test_price_fields_never_raises(bad: dict[str, Any]):
    priced = price_fields({'model': 'gpt-4o', 'provider': 'openai', **bad})
    assert (priced.cost_usd, priced.pricing_status) == (None, 'unpriced')


AFTER_TIERS = datetime(2026, 11, 15, 12, tzinfo=UTC)
"""From 2026-10-12 genai-prices prices gpt-4o's priority tier higher than its standard one."""


@pytest.mark.parametrize(
    'labels',
    [
        pytest.param({'provider': 'openai', 'model': ' gpt-4o '}, id='spaces'),
        pytest.param({'provider': 'openai', 'model': 'gpt-4o\x00'}, id='nul'),
        pytest.param(
            {'provider': 'openai', 'model': 'gpt-4o', 'service_tier': ' priority\n', 'created_at': AFTER_TIERS},
            id='tier',
        ),
        pytest.param(
            {'provider': 'openai', 'model': 'tts-1', 'input_tokens': 0, 'output_tokens': 0, 'units': Decimal(1_000)}
            | {'unit_type': ' character '},
            id='unit-type',
        ),
        pytest.param({'provider': 'my-gateway ', 'model': 'gpt-4o', 'cost_usd': Decimal('0.5')}, id='gateway'),
    ],
)
def test_price_fields_reads_a_raw_mapping_as_the_writer_stores_it(tracker: UsageTracker, labels: dict[str, Any]):
    """A raw `track()` mapping is priced with its labels as the ledger will hold them, not as typed."""
    set_price_table(PriceTable(provider_aliases={'my-gateway': 'openai'}))
    raw = {'id': uuid4(), 'created_at': WHEN, 'input_tokens': 1_234, 'output_tokens': 56, **labels}
    priced = price_fields(raw)
    tracker.track(raw)
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        row = conn.execute(sa.select(TOKEN_USAGE).where(TOKEN_USAGE.c.id == raw['id'])).mappings().one()
    assert row['pricing_status'] != 'unpriced'
    assert (priced.cost_usd, priced.pricing_status, priced.price_source) == (
        row['cost_usd'],
        row['pricing_status'],
        row['price_source'],
    )


@pytest.mark.parametrize(
    ('details', 'tier', 'kept'),
    [
        (None, None, None),
        ({'finish_reason': 'stop', 'downstream_provider': 'Mistral'}, None, None),
        ({'speed': 'fast', 'finish_reason': 'end_turn'}, None, {'speed': 'fast'}),
        ({'route': 'mistral/eu', 'cost': 0.08}, None, {'route': 'mistral/eu'}),
        ({'service_tier': 'priority'}, 'priority', None),
        ({'service_tier': 'standard'}, 'standard', None),
        ({'processing': 'batch'}, 'batch', None),
        ({'processing': 'batch', 'service_tier': 'flex'}, 'batch', {'service_tier': 'flex'}),
        # Only strings can select a price (pydantic-ai's decision model puts a dict under `route`).
        ({'route': {'label': 'eu'}, 'speed': 1}, None, None),
    ],
)
def test_response_price_context_keeps_what_sets_the_price(
    details: dict[str, Any] | None, tier: str | None, kept: dict[str, str] | None
):
    assert response_price_context(details, tier) == kept


@pytest.mark.parametrize(
    ('metadata', 'context'),
    [
        (None, None),
        ({}, None),
        ({'price_context': 'fast'}, None),
        ({'price_context': {'speed': 'fast', 'n': 1, 2: 'x'}}, {'speed': 'fast'}),
        ({'price_context': {}}, None),
    ],
)
def test_stored_price_context_reads_only_string_values(metadata: Any, context: dict[str, str] | None):
    assert stored_price_context(metadata) == context


def test_the_service_tier_column_wins_over_the_stored_context():
    extra = {'service_tier': 'flex', 'speed': 'fast'}
    assert price_context('priority', extra) == {'service_tier': 'priority', 'speed': 'fast'}
    assert price_context('batch', extra) == {'service_tier': 'flex', 'speed': 'fast', 'processing': 'batch'}
    assert price_context(None, extra) == extra
    assert price_context('standard', None) is None
