"""Token counts in the ledger's non-overlapping buckets, and the conversions to and from them.

Providers and pydantic-ai report *inclusive* counts: input tokens include cache reads and writes,
output tokens include reasoning, audio and image tokens. Adding such counts double-counts them, the
most common bug in usage tools. The ledger stores each token in exactly one bucket, so that
`sum(buckets)` is the true total, and rebuilds the inclusive form only to price it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any

from genai_prices import Usage as PriceUsage
from genai_prices.data_units import unit_data

__all__ = ('DETAIL_ALIASES', 'TOKEN_BUCKETS', 'USAGE_KEYS', 'TokenCounts', 'price_values')

TOKEN_BUCKETS = (
    'input_tokens',
    'cache_read_tokens',
    'cache_write_tokens',
    'input_audio_tokens',
    'output_tokens',
    'reasoning_tokens',
    'output_audio_tokens',
    'output_image_tokens',
)
"""The token columns of `token_usage`, each counting tokens no other bucket counts."""

USAGE_KEYS: frozenset[str] = frozenset(unit_data) - {'requests'}
"""genai-prices' usage keys: every billable quantity it can price (`details` keys by these names are priced)."""
_FROM_COLUMNS = frozenset(
    {
        'input_tokens',
        'cache_read_tokens',
        'cache_write_tokens',
        'input_audio_tokens',
        'output_tokens',
        'output_reasoning_tokens',
        'output_audio_tokens',
        'output_image_tokens',
    }
)
# genai-prices keys rebuilt from the bucket columns; a `details` entry of the same name (a provider's raw
# count, e.g. Anthropic's uncached `input_tokens` in pydantic-ai's details) is never priced on top.
DETAIL_ALIASES: dict[str, str] = {'web_search_requests': 'web_searches'}
"""pydantic-ai `details` names of billable quantities, by genai-prices key (used when that key is absent)."""


@dataclass(slots=True)
class TokenCounts:
    """Token usage of one request, each token in exactly one bucket."""

    _: KW_ONLY
    input_tokens: int = 0
    """Uncached input tokens that are not audio (text, images, tool-use prompts)."""
    cache_read_tokens: int = 0
    """Input tokens read from the provider's prompt cache, all modalities."""
    cache_write_tokens: int = 0
    """Input tokens written to the provider's prompt cache."""
    input_audio_tokens: int = 0
    """Uncached audio input tokens."""
    output_tokens: int = 0
    """Output text tokens, excluding reasoning, audio and image tokens."""
    reasoning_tokens: int = 0
    """Reasoning ("thinking") tokens, billed as output."""
    output_audio_tokens: int = 0
    """Audio output tokens."""
    output_image_tokens: int = 0
    """Image output tokens (e.g. gemini-2.5-flash-image)."""
    details: dict[str, int] = field(default_factory=dict[str, int])
    """Refinements that add no tokens: `cache_write_1h_tokens`, `cache_audio_read_tokens`, provider extras."""

    @property
    def total_input_tokens(self) -> int:
        """All input tokens, cached or not."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.input_audio_tokens

    @property
    def total_output_tokens(self) -> int:
        """All output tokens, reasoning, audio and image included."""
        return self.output_tokens + self.reasoning_tokens + self.output_audio_tokens + self.output_image_tokens

    @property
    def total_tokens(self) -> int:
        """Every token once."""
        return self.total_input_tokens + self.total_output_tokens

    def as_columns(self) -> dict[str, Any]:
        """The bucket columns and `details`, as `UsageRecord` fields."""
        columns: dict[str, Any] = {name: getattr(self, name) for name in TOKEN_BUCKETS}
        columns['details'] = dict(self.details)
        return columns

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> TokenCounts:
        """Read the buckets back from a record or row (missing or NULL buckets count as 0)."""
        details: Mapping[str, Any] = row.get('details') or {}
        return cls(
            **{name: int(row.get(name) or 0) for name in TOKEN_BUCKETS},
            details={str(k): int(v) for k, v in details.items()},
        )

    @classmethod
    def from_inclusive(
        cls,
        *,
        input_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        input_audio_tokens: int = 0,
        cache_audio_read_tokens: int = 0,
        output_tokens: int = 0,
        reasoning_tokens: int = 0,
        output_audio_tokens: int = 0,
        output_image_tokens: int = 0,
        details: Mapping[str, int] | None = None,
    ) -> TokenCounts:
        """Split inclusive counts (pydantic-ai / genai-prices convention) into buckets.

        `input_tokens` includes cache reads, cache writes and audio input; `input_audio_tokens` includes
        `cache_audio_read_tokens`; `output_tokens` includes reasoning, audio and image output.
        When a provider reports inconsistent counts (a part larger than its whole), the whole is raised
        to the sum of its parts rather than producing a negative bucket, and the adjustment is noted in
        `details` under `adjusted_input_tokens` / `adjusted_output_tokens`.
        """
        extra = {k: v for k, v in (details or {}).items() if v}
        uncached_audio = max(input_audio_tokens - cache_audio_read_tokens, 0)
        plain_input = input_tokens - cache_read_tokens - cache_write_tokens - uncached_audio
        if plain_input < 0:
            extra['adjusted_input_tokens'] = -plain_input
            plain_input = 0
        plain_output = output_tokens - reasoning_tokens - output_audio_tokens - output_image_tokens
        if plain_output < 0:
            extra['adjusted_output_tokens'] = -plain_output
            plain_output = 0
        if cache_audio_read_tokens:
            extra['cache_audio_read_tokens'] = cache_audio_read_tokens
        return cls(
            input_tokens=plain_input,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            input_audio_tokens=uncached_audio,
            output_tokens=plain_output,
            reasoning_tokens=reasoning_tokens,
            output_audio_tokens=output_audio_tokens,
            output_image_tokens=output_image_tokens,
            details=extra,
        )

    @classmethod
    def from_price_values(cls, values: Mapping[str, int]) -> TokenCounts:
        """Buckets for genai-prices usage values (inclusive, under its keys); its other keys go to `details`."""
        extra = {k: v for k, v in values.items() if k not in _FROM_COLUMNS and v}
        cache_audio = extra.pop('cache_audio_read_tokens', 0)
        counts = cls.from_inclusive(
            input_tokens=values.get('input_tokens', 0),
            cache_read_tokens=values.get('cache_read_tokens', 0),
            cache_write_tokens=values.get('cache_write_tokens', 0),
            input_audio_tokens=values.get('input_audio_tokens', 0),
            cache_audio_read_tokens=cache_audio,
            output_tokens=values.get('output_tokens', 0),
            reasoning_tokens=values.get('output_reasoning_tokens', 0),
            output_audio_tokens=values.get('output_audio_tokens', 0),
            output_image_tokens=values.get('output_image_tokens', 0),
            details=extra,
        )
        return counts

    def to_price_usage(self) -> PriceUsage:
        """The inclusive `genai_prices.Usage` that prices exactly these tokens (see `price_values`)."""
        return PriceUsage(**price_values(self))

    def __add__(self, other: TokenCounts) -> TokenCounts:
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != 'details'}
        details = dict(self.details)
        for k, v in other.details.items():
            details[k] = details.get(k, 0) + v
        return TokenCounts(**summed, details=details)


def price_values(tokens: TokenCounts) -> dict[str, Any]:
    """Every billable quantity of `tokens`, inclusive, under genai-prices' usage keys (zeros left out).

    The buckets give the totals (`input_tokens` includes cache and audio, `output_tokens` includes reasoning,
    audio and image); `details` entries named by a genai-prices key (modality breakdowns, cache TTLs, web
    searches, citation tokens, ...) are passed as they are, since they refine a total without adding to it.
    """
    values: dict[str, Any] = {}
    details = tokens.details
    cache_audio = details.get('cache_audio_read_tokens', 0)
    # A whole `from_inclusive` raised to the sum of its parts goes back to what the provider reported: genai-prices
    # then prices the counts as reported, or refuses them (unpriced), exactly as it does for the caller.
    for key, value in (
        ('input_tokens', tokens.total_input_tokens - details.get('adjusted_input_tokens', 0)),
        ('cache_read_tokens', tokens.cache_read_tokens),
        ('cache_write_tokens', tokens.cache_write_tokens),
        ('input_audio_tokens', tokens.input_audio_tokens + cache_audio),
        ('output_tokens', tokens.total_output_tokens - details.get('adjusted_output_tokens', 0)),
        ('output_reasoning_tokens', tokens.reasoning_tokens),
        ('output_audio_tokens', tokens.output_audio_tokens),
        ('output_image_tokens', tokens.output_image_tokens),
    ):
        if value:
            values[key] = value
    if details:
        for key, value in details.items():
            if value and key in USAGE_KEYS and key not in _FROM_COLUMNS:
                values[key] = value
        for alias, key in DETAIL_ALIASES.items():
            if key not in values and details.get(alias):
                values[key] = details[alias]
    if 'input_audio_tokens' in values and tokens.cache_read_tokens and 'cache_audio_read_tokens' not in values:
        # Our buckets know exactly how much cached input was audio (0 unless noted); left out,
        # genai-prices would have to guess, and refuses to.
        values['cache_audio_read_tokens'] = 0
    return values
