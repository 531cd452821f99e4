"""`TokenCounts`: inclusive provider counts in, non-overlapping buckets out, and back for pricing."""

from __future__ import annotations

from typing import Any

import genai_prices
import pytest

from pai_usage.usage import TOKEN_BUCKETS, TokenCounts, price_values


def test_from_inclusive_splits_into_non_overlapping_buckets():
    counts = TokenCounts.from_inclusive(
        input_tokens=10_000,  # includes 3000 cache reads, 500 cache writes, 200 audio
        cache_read_tokens=3_000,
        cache_write_tokens=500,
        input_audio_tokens=200,
        output_tokens=1_000,  # includes 300 reasoning, 100 audio, 50 image
        reasoning_tokens=300,
        output_audio_tokens=100,
        output_image_tokens=50,
    )
    assert counts == TokenCounts(
        input_tokens=6_300,
        cache_read_tokens=3_000,
        cache_write_tokens=500,
        input_audio_tokens=200,
        output_tokens=550,
        reasoning_tokens=300,
        output_audio_tokens=100,
        output_image_tokens=50,
    )
    assert counts.total_input_tokens == 10_000
    assert counts.total_output_tokens == 1_000
    assert counts.total_tokens == 11_000


def test_cached_audio_is_not_counted_twice():
    counts = TokenCounts.from_inclusive(
        input_tokens=1_000, cache_read_tokens=400, input_audio_tokens=300, cache_audio_read_tokens=100
    )
    # 100 of the 300 audio tokens were cache reads, already inside the 400.
    assert (counts.input_tokens, counts.cache_read_tokens, counts.input_audio_tokens) == (400, 400, 200)
    assert counts.total_input_tokens == 1_000
    assert counts.details == {'cache_audio_read_tokens': 100}


@pytest.mark.parametrize(
    ('inclusive', 'adjusted'),
    [
        ({'input_tokens': 100, 'cache_read_tokens': 150}, {'adjusted_input_tokens': 50}),
        ({'output_tokens': 10, 'reasoning_tokens': 25}, {'adjusted_output_tokens': 15}),
    ],
)
def test_inconsistent_counts_never_make_negative_buckets(inclusive: dict[str, int], adjusted: dict[str, int]):
    counts = TokenCounts.from_inclusive(**inclusive)
    assert all(getattr(counts, name) >= 0 for name in TOKEN_BUCKETS)
    assert counts.details == adjusted


@pytest.mark.parametrize(
    'inclusive',
    [
        {'input_tokens': 10_000, 'cache_read_tokens': 4_000, 'output_tokens': 500},
        {'input_tokens': 2_000, 'cache_write_tokens': 1_000, 'output_tokens': 800, 'reasoning_tokens': 300},
        {'input_tokens': 500, 'input_audio_tokens': 200, 'output_tokens': 300, 'output_audio_tokens': 100},
        {'input_tokens': 40, 'output_tokens': 1_400, 'output_image_tokens': 1_290},
    ],
)
def test_to_price_usage_restores_the_inclusive_counts(inclusive: dict[str, int]):
    usage = TokenCounts.from_inclusive(**inclusive).to_price_usage()
    for name, value in inclusive.items():
        key = 'output_reasoning_tokens' if name == 'reasoning_tokens' else name
        assert getattr(usage, key) == value, name
    assert isinstance(usage, genai_prices.Usage)


def test_details_refinements_reach_genai_prices():
    counts = TokenCounts(input_tokens=100, cache_write_tokens=1_000, details={'cache_write_1h_tokens': 600})
    usage = counts.to_price_usage()
    assert (usage.input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1_100, 1_000, 600)


def test_columns_round_trip():
    counts = TokenCounts(input_tokens=1, output_tokens=2, reasoning_tokens=3, details={'extra': 4})
    columns: dict[str, Any] = counts.as_columns()
    assert set(columns) == {*TOKEN_BUCKETS, 'details'}
    assert TokenCounts.from_columns(columns) == counts
    assert TokenCounts.from_columns({'input_tokens': None}) == TokenCounts()


def test_addition_sums_buckets_and_details():
    a = TokenCounts(input_tokens=1, cache_read_tokens=2, details={'x': 1})
    b = TokenCounts(input_tokens=10, output_tokens=5, details={'x': 2, 'y': 3})
    assert a + b == TokenCounts(input_tokens=11, cache_read_tokens=2, output_tokens=5, details={'x': 3, 'y': 3})


@pytest.mark.parametrize(
    'values',
    [
        {'input_tokens': 3_100, 'input_text_tokens': 100, 'input_image_tokens': 1_000, 'input_video_tokens': 2_000,
         'output_tokens': 300},
        {'input_tokens': 1_700, 'cache_read_tokens': 200, 'input_image_tokens': 1_000, 'cache_image_read_tokens': 50,
         'output_tokens': 600, 'output_image_tokens': 500},
        {'input_tokens': 1_000, 'output_tokens': 5_000, 'output_reasoning_tokens': 3_000,
         'output_citation_tokens': 1_500, 'web_searches': 4},
        {'input_tokens': 5_400, 'cache_read_tokens': 3_000, 'input_audio_tokens': 3_000,
         'cache_audio_read_tokens': 2_000, 'input_tool_tokens': 400, 'output_tokens': 700,
         'output_reasoning_tokens': 600},
    ],
)  # fmt: skip
def test_genai_prices_values_round_trip_through_the_buckets(values: dict[str, int]):
    counts = TokenCounts.from_price_values(values)
    assert price_values(counts) == values
    # Each token once: the buckets add up to genai-prices' input and output totals.
    assert counts.total_input_tokens == values['input_tokens']
    assert counts.total_output_tokens == values['output_tokens']


def test_provider_details_under_other_names_are_not_priced_twice():
    # pydantic-ai keeps a provider's raw counts in `details`; only genai-prices' own keys are billable ones.
    counts = TokenCounts(input_tokens=100, output_tokens=10, details={'input_tokens': 100, 'reasoning_tokens': 5})
    assert price_values(counts) == {'input_tokens': 100, 'output_tokens': 10}


def test_web_search_requests_are_priced_as_web_searches_unless_reported():
    assert price_values(TokenCounts(input_tokens=1, details={'web_search_requests': 2}))['web_searches'] == 2
    both = TokenCounts(input_tokens=1, details={'web_search_requests': 5, 'web_searches': 1})
    assert price_values(both)['web_searches'] == 1  # Google: billed searches, not the query count
