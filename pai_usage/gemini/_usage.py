"""Gemini `usage_metadata` to the ledger's non-overlapping token buckets.

Gemini reports overlapping counts: `prompt_token_count` includes `cached_content_token_count`, the
per-modality details break the prompt, cache and candidates counts down again, and thinking tokens
(`thoughts_token_count`) are billed as output but are *not* part of `candidates_token_count`. Adding
them up naively double counts cached input and drops or double counts reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.genai import types

from ..usage import TokenCounts

__all__ = ('merge_usage_metadata', 'modality_tokens', 'price_values', 'token_counts')


def modality_tokens(details: Sequence[types.ModalityTokenCount] | None, modality: str) -> int:
    """Tokens of one modality (`'IMAGE'`, `'AUDIO'`, ...) in a per-modality breakdown."""
    total = 0
    for detail in details or ():
        name = detail.modality.value if detail.modality is not None else 'MODALITY_UNSPECIFIED'
        if name == modality:
            total += detail.token_count or 0
    return total


# Modality breakdowns by genai-prices usage key, as its own Google extractor maps them (DOCUMENT is billed as image).
_MODALITY_KEYS = {'TEXT': 'text', 'AUDIO': 'audio', 'IMAGE': 'image', 'DOCUMENT': 'image', 'VIDEO': 'video'}


def price_values(usage: types.GenerateContentResponseUsageMetadata) -> dict[str, int]:
    """`usage_metadata` as genai-prices usage values: the totals and every modality breakdown, inclusive.

    The same keys genai-prices' Google extractor reads from the REST body (prompt, cache, candidates and
    tool-use details by modality, thoughts as reasoning output), so that pricing here equals genai-prices'.
    """
    values: dict[str, int] = {}

    def add(key: str, count: int | None) -> None:
        if count:
            values[key] = values.get(key, 0) + count

    add('input_tokens', usage.prompt_token_count)
    add('input_tokens', usage.tool_use_prompt_token_count)
    add('input_tool_tokens', usage.tool_use_prompt_token_count)
    add('cache_read_tokens', usage.cached_content_token_count)
    add('output_tokens', usage.candidates_token_count)
    add('output_tokens', usage.thoughts_token_count)
    add('output_reasoning_tokens', usage.thoughts_token_count)
    for details, template in (
        (usage.prompt_tokens_details, 'input_{}_tokens'),
        (usage.cache_tokens_details, 'cache_{}_read_tokens'),
        (usage.candidates_tokens_details, 'output_{}_tokens'),
        (usage.tool_use_prompt_tokens_details, 'input_{}_tokens'),
        (usage.tool_use_prompt_tokens_details, 'input_{}_tool_tokens'),
    ):
        for detail in details or ():
            name = detail.modality.value if detail.modality is not None else None
            modality = _MODALITY_KEYS.get(name or '')
            if modality is not None:
                add(template.format(modality), detail.token_count)
    return values


def token_counts(usage: types.GenerateContentResponseUsageMetadata | None) -> TokenCounts | None:
    """Split one response's usage into buckets, or None when the response carried no usage (or no count in it).

    - input: `prompt_token_count` (which includes cached tokens) plus `tool_use_prompt_token_count`,
      minus the cached tokens, which go to `cache_read_tokens`; audio input goes to `input_audio_tokens`.
    - output: `candidates_token_count` plus `thoughts_token_count`; thoughts go to `reasoning_tokens`, image and
      audio candidates (from `candidates_tokens_details`) to `output_image_tokens` / `output_audio_tokens`, the
      rest (text, video) to `output_tokens`.
    - every modality breakdown (text, image, audio, video of prompt, cache, candidates and tool use) is kept in
      `details` under genai-prices' names (`input_image_tokens`, `cache_video_read_tokens`, `output_video_tokens`,
      ...), so that a model pricing a modality separately is priced right.
    """
    if usage is None or not any(
        getattr(usage, name) is not None
        for name in type(usage).model_fields
        if name.endswith(('_count', '_details')) and name != 'total_token_count'
    ):
        # `usageMetadata: {}` says no more than a missing one, and a total alone cannot be split into input and
        # output (priced differently): not a priced zero either way.
        return None
    return TokenCounts.from_price_values(price_values(usage))


def merge_usage_metadata(
    previous: types.GenerateContentResponseUsageMetadata | None,
    current: types.GenerateContentResponseUsageMetadata | None,
) -> types.GenerateContentResponseUsageMetadata | None:
    """The usage of a stream so far: the latest chunk's running totals, never a sum of chunks.

    A field an earlier chunk reported but the latest one leaves out (some gateways send
    `cached_content_token_count` only once) keeps its earlier value.
    """
    if current is None:
        return previous
    if previous is None:
        return current
    missing = {
        name: value
        for name in type(current).model_fields
        if getattr(current, name) is None and (value := getattr(previous, name)) is not None
    }
    return current.model_copy(update=missing) if missing else current
