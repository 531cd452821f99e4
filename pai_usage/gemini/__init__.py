"""Usage tracking for direct Gemini calls (`pip install 'pai-usage[gemini]'`).

`GeminiUsageMixin` adds tracking to any class holding a `google.genai.Client`; `GeminiService` is a
ready-made service built on it. Both record one `source='direct'` row per API call, attributed to the
explicit deps given at construction, else to the current agent run (`TrackUsage`), else to nobody.
"""

from __future__ import annotations

try:
    from google import genai as _genai  # noqa: F401  # pyright: ignore[reportUnusedImport]
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        '`pai_usage.gemini` needs google-genai: install it with `pip install "pai-usage[gemini]"`'
    ) from _exc

from ._mixin import (
    DEFAULT_VEO_DURATION_SECONDS,
    GEMINI_API_PROVIDER,
    NOT_BILLED_SOURCE,
    VERTEX_PROVIDER,
    GeminiStats,
    GeminiUsageMixin,
    gemini_stats,
)
from ._usage import merge_usage_metadata, token_counts
from .service import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, DEFAULT_VIDEO_MODEL, GeminiService, GeneratedImage

__all__ = (
    'DEFAULT_IMAGE_MODEL',
    'DEFAULT_TEXT_MODEL',
    'DEFAULT_VEO_DURATION_SECONDS',
    'DEFAULT_VIDEO_MODEL',
    'GEMINI_API_PROVIDER',
    'NOT_BILLED_SOURCE',
    'VERTEX_PROVIDER',
    'GeminiService',
    'GeminiStats',
    'GeminiUsageMixin',
    'GeneratedImage',
    'gemini_stats',
    'merge_usage_metadata',
    'token_counts',
)
