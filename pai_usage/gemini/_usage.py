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

__all__ = ('merge_usage_metadata', 'modality_tokens', 'token_counts')


def modality_tokens(details: Sequence[types.ModalityTokenCount] | None, modality: str) -> int:
    """Tokens of one modality (`'IMAGE'`, `'AUDIO'`, ...) in a per-modality breakdown."""
    total = 0
    for detail in details or ():
        name = detail.modality.value if detail.modality is not None else 'MODALITY_UNSPECIFIED'
        if name == modality:
            total += detail.token_count or 0
    return total


def token_counts(usage: types.GenerateContentResponseUsageMetadata | None) -> TokenCounts | None:
    """Split one response's usage into buckets, or None when the response carried no usage.

    - input: `prompt_token_count` (which includes cached tokens) plus `tool_use_prompt_token_count`,
      minus the cached tokens, which go to `cache_read_tokens`; audio input goes to `input_audio_tokens`.
    - output: `candidates_token_count` plus `thoughts_token_count`; thoughts go to `reasoning_tokens`, image and
      audio candidates (from `candidates_tokens_details`) to `output_image_tokens` / `output_audio_tokens`, the
      rest (text) to `output_tokens`.
    """
    if usage is None:
        return None
    prompt = usage.prompt_token_count or 0
    tool_use = usage.tool_use_prompt_token_count or 0
    cached = usage.cached_content_token_count or 0
    thoughts = usage.thoughts_token_count or 0
    candidates = usage.candidates_token_count or 0
    details: dict[str, int] = {}
    if tool_use:
        # Part of `input_tokens`; kept so that the split can be audited.
        details['tool_use_prompt_tokens'] = tool_use
    return TokenCounts.from_inclusive(
        input_tokens=prompt + tool_use,
        cache_read_tokens=cached,
        input_audio_tokens=modality_tokens(usage.prompt_tokens_details, 'AUDIO')
        + modality_tokens(usage.tool_use_prompt_tokens_details, 'AUDIO'),
        cache_audio_read_tokens=modality_tokens(usage.cache_tokens_details, 'AUDIO'),
        output_tokens=candidates + thoughts,
        reasoning_tokens=thoughts,
        output_audio_tokens=modality_tokens(usage.candidates_tokens_details, 'AUDIO'),
        output_image_tokens=modality_tokens(usage.candidates_tokens_details, 'IMAGE'),
        details=details,
    )


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
