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

__all__ = ('TOKEN_BUCKETS', 'TokenCounts')

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

# `details` keys that refine a bucket (never add to it) and that genai-prices knows how to price.
_PRICED_DETAILS = ('cache_write_1h_tokens', 'cache_audio_read_tokens')


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

    def to_price_usage(self) -> PriceUsage:
        """The inclusive `genai_prices.Usage` that prices exactly these tokens."""
        values: dict[str, int] = {
            'input_tokens': self.total_input_tokens,
            'cache_read_tokens': self.cache_read_tokens,
            'cache_write_tokens': self.cache_write_tokens,
            'input_audio_tokens': self.input_audio_tokens + self.details.get('cache_audio_read_tokens', 0),
            'output_tokens': self.total_output_tokens,
            'output_audio_tokens': self.output_audio_tokens,
            'output_image_tokens': self.output_image_tokens,
        }
        for key in _PRICED_DETAILS:
            if self.details.get(key):
                values[key] = self.details[key]
        usage = {k: v for k, v in values.items() if v}
        if values['input_audio_tokens'] and self.cache_read_tokens:
            # Our buckets know exactly how much cached input was audio (0 unless noted); left out,
            # genai-prices would have to guess, and refuses to.
            usage['cache_audio_read_tokens'] = self.details.get('cache_audio_read_tokens', 0)
        return PriceUsage(**usage)

    def __add__(self, other: TokenCounts) -> TokenCounts:
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != 'details'}
        details = dict(self.details)
        for k, v in other.details.items():
            details[k] = details.get(k, 0) + v
        return TokenCounts(**summed, details=details)
