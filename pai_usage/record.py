"""`UsageRecord`: one usage event, validated before it reaches the ledger."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, cast
from uuid import UUID, uuid4

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = (
    'MAX_COST_USD',
    'MAX_LABEL_LENGTH',
    'MAX_METADATA_BYTES',
    'MAX_TOKENS',
    'MAX_UNITS',
    'PricingStatus',
    'Source',
    'Status',
    'UsageRecord',
    'normalize_label',
    'normalize_service_tier',
    'safe_metadata',
)

Source = Literal['agent', 'direct']
"""`agent` for rows recorded by the PydanticAI capability, `direct` for direct API calls."""
Status = Literal['ok', 'error', 'refused']
"""Outcome of the call the row describes: `refused` for a request a budget stopped before it was sent (zero cost)."""
PricingStatus = Literal['priced', 'unpriced', 'override']
"""`priced` by genai-prices, `override` by our configurable price table, `unpriced` when no price is known."""

MAX_TOKENS = 1_000_000_000
"""Upper bound for one token bucket of one request: larger counts are rejected as corrupt input."""
MAX_METADATA_BYTES = 16_384
"""Upper bound for the JSON-encoded `metadata` of one record."""
MAX_COST_USD = 1_000_000
"""Upper bound for the cost of one event: larger values are corrupt input (and overflow SQLite's scaled integer)."""
MAX_UNITS = 1_000_000_000
"""Upper bound for the billable units of one event."""

MAX_LABEL_LENGTH = 255
"""Longest label (ids, names) stored as given; longer ones are shortened by `normalize_label`."""
_HASH_CHARS = 16


def storable_text(text: str) -> str:
    r"""`text` without NUL bytes and with lone surrogates replaced by U+FFFD: PostgreSQL refuses both.

    Lone surrogates come from bytes decoded with `surrogateescape` or from JSON such as `"\udcff"`.
    """
    if '\x00' in text:
        text = text.replace('\x00', '')
    if not text.isascii():
        try:
            text.encode('utf-8')
        except UnicodeEncodeError:
            # Through UTF-16, valid pairs become the character they encode; lone halves become U+FFFD.
            text = text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')
    return text


def normalize_label(value: object) -> str | None:
    """The form in which the ledger stores a label (user id, organization id, model, ...).

    Surrounding whitespace and NUL bytes (which PostgreSQL refuses) are removed, lone surrogates replaced (see
    `storable_text`); an empty result is None.
    A label longer than `MAX_LABEL_LENGTH` keeps its start and ends in `~` and a hash of the whole, so that
    distinct long labels stay distinct and the same label always maps to the same stored value.
    Budgets and summaries use it too, so that a lookup by the raw id finds what the ledger stored.
    """
    if value is None:
        return None
    text = storable_text(value if isinstance(value, str) else _text(value))
    text = text.strip()
    if not text:
        return None
    if len(text) > MAX_LABEL_LENGTH:
        digest = hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:_HASH_CHARS]
        text = f'{text[: MAX_LABEL_LENGTH - _HASH_CHARS - 1]}~{digest}'
    return text


def label_filter(value: object, name: str) -> str | None:
    """A filter on a label column, as the ledger stores labels (`normalize_label`); None filters nothing.

    Raises `ValueError` for a value that stores as no label at all (blank), which no filter can mean.
    """
    if value is None:
        return None
    label = normalize_label(value)
    if label is None:
        raise ValueError(f'{name} {value!r} is blank: the ledger stores no such {name}')
    return label


_Tokens = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
# Labels are normalised, never refused: a billing row must not be lost for an odd user id or model name.
_Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_LENGTH)]
_NullableLabel = Annotated[_Label | None, BeforeValidator(normalize_label)]
_MAX_TIER_LENGTH = 32


def _operation(value: object) -> object:
    return normalize_label(value) or 'request'


def normalize_service_tier(value: object) -> str | None:
    """The form in which the ledger stores a `service_tier`: a label (`normalize_label`) of at most 32 characters.

    Never a reason to reject a billing row: an unknown tier leaves the row unpriced, with the reason.
    """
    tier = normalize_label(value)
    # Shortened after stripping, so stripped again: the model strips what its validator returns.
    return None if tier is None else tier[:_MAX_TIER_LENGTH].rstrip()


def _price_source(value: object) -> str | None:
    text = normalize_label(value)
    return text[:100] if text is not None else None


MIN_CREATED_AT = datetime(1900, 1, 1, tzinfo=UTC)
"""The earliest `created_at` a record may have."""
MAX_CREATED_AT = datetime(3000, 1, 1, tzinfo=UTC)
"""`created_at` must be before this (later ones would overflow other systems' date types)."""
_MAX_METADATA_DEPTH = 20
_METADATA_MARKER = '_pai_usage_metadata'
"""The key of the marker that replaces metadata that could not be kept, saying why."""


def safe_metadata(value: object) -> dict[str, Any]:
    """`value` as JSON-safe metadata: a dict with string keys, no NUL, no NaN, at most `MAX_METADATA_BYTES`.

    Nothing here raises: what cannot be kept becomes a string (`default=str`) or, for the whole value, a
    marker `{'_pai_usage_metadata': '<why>'}`, so that the row (its tokens and cost) is always kept.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        return {_METADATA_MARKER: f'metadata dropped: a {type(value).__name__}, not a mapping'}
    mapping = cast('dict[Any, Any]', value)
    if not mapping:
        return mapping
    if metadata_kept_as_is(mapping):
        return mapping
    try:
        cleaned = _clean(mapping, 0, set())
        encoded = json_text(cleaned)
    except Exception as exc:  # pragma: no cover - `_clean` leaves only JSON types
        return {_METADATA_MARKER: f'metadata dropped: {type(exc).__name__}'}
    if len(encoded) > MAX_METADATA_BYTES:
        why = f'metadata dropped: {len(encoded)} bytes of JSON, more than the {MAX_METADATA_BYTES} allowed'
        return {_METADATA_MARKER: why}
    return cast('dict[str, Any]', cleaned)


def metadata_kept_as_is(mapping: dict[Any, Any]) -> bool:
    """Whether `safe_metadata` returns `mapping` itself: JSON-safe, string keys, no NUL, small enough."""
    try:
        # The common case, in C (keys of other types would be converted silently, hence the check of the keys).
        encoded = json_text(mapping)
    except Exception:  # a cycle, a value JSON cannot hold, an integer too long to print
        return False
    return (
        '\\u0000' not in encoded
        and len(encoded) <= MAX_METADATA_BYTES
        and all(type(k) is str for k in mapping)
        and ('\\ud' not in encoded or not _LONE_SURROGATE.search(encoded))
    )


_LONE_SURROGATE = re.compile(r'\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}')
"""A surrogate escape in ASCII JSON that is not half of a pair: PostgreSQL's `json` refuses it."""


def _clean(value: object, depth: int, path: set[int]) -> object:
    """A JSON-safe copy of `value`: str keys, no NUL, finite numbers, depth-capped, cycles cut."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, int):
        # Beyond 64 bits a JSON integer is not portable (and huge ints cannot even be printed).
        return int(value) if -(1 << 63) <= value < (1 << 63) else f'<int of {value.bit_length()} bits>'
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= _MAX_METADATA_DEPTH:
        return '<too deep>'
    if isinstance(value, dict | list | tuple | set | frozenset):
        container = cast('Iterable[object]', value)
        key = id(container)
        if key in path:
            return '<cycle>'
        path.add(key)
        try:
            if isinstance(container, dict):
                items = cast('dict[object, object]', container).items()
                return {_key(k): _clean(v, depth + 1, path) for k, v in items}
            return [_clean(v, depth + 1, path) for v in container]
        finally:
            path.discard(key)
    return _clean(_text(value), depth, path)


def _key(key: object) -> str:
    return storable_text(key if isinstance(key, str) else _text(key))


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f'<unprintable {type(value).__name__}>'


def _storable_keys(value: object) -> object:
    # Token details are few: a key PostgreSQL's jsonb would refuse (NUL, a lone surrogate) is cleaned, never
    # the reason the billing row is rejected.
    if not isinstance(value, dict):
        return value
    mapping = cast('dict[object, object]', value)
    if all(type(k) is str and storable_text(k) == k for k in mapping):
        return mapping
    return {_key(k): v for k, v in mapping.items()}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _finite(value: Decimal | None) -> Decimal | None:
    if value is not None and not value.is_finite():
        raise ValueError('must be a finite number')
    return value


_Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False), AfterValidator(_finite)]
_Cost = Annotated[_Amount, Field(le=MAX_COST_USD)]
_Units = Annotated[_Amount, Field(le=MAX_UNITS)]


class UsageRecord(BaseModel):
    """One usage event: who spent what, on which model, for what, at what cost.

    Token counts are in non-overlapping buckets (see `pai_usage.usage.TokenCounts`). When `cost_usd`
    and `pricing_status` are left unset, the tracker prices the record in its background thread.
    """

    model_config = ConfigDict(extra='forbid', validate_assignment=False, str_strip_whitespace=True)

    id: UUID = Field(default_factory=uuid4)
    """Our own id for the event; inserting the same id twice stores one row."""
    created_at: datetime = Field(default_factory=_utcnow)
    """When the call happened (timezone-aware, stored as UTC); historic prices are looked up at this time."""

    organization_id: _NullableLabel = None
    """The organization billed, or None when the call carried no attribution."""
    user_id: _NullableLabel = None
    """The user who made the call, or None."""

    provider: _NullableLabel = None
    """Provider id as genai-prices knows it (`openai`, `anthropic`, `google-gla`, `google-vertex`, ...)."""
    model: _NullableLabel = None
    """Model name as the provider reported it (the model that served the call, when the response names it)."""
    service_tier: Annotated[str | None, BeforeValidator(normalize_service_tier)] = None
    """Tier the call was served at (`standard`, `flex`, `priority`, `batch`), priced as such; None is standard."""
    operation: Annotated[_Label, BeforeValidator(_operation)] = 'request'
    """What the call did: `agent_run`, `generate_image`, `analyze_text`, `text_to_speech`, ..."""
    source: Source = 'direct'
    """`agent` for PydanticAI runs, `direct` for direct API calls."""

    run_id: _NullableLabel = None
    """The PydanticAI run this event belongs to."""
    parent_run_id: _NullableLabel = None
    """The run that delegated to `run_id`, for sub-agents."""
    agent_name: _NullableLabel = None
    """Name of the agent that made the request."""
    request_id: _NullableLabel = None
    """The provider's response id; informative only, never a key."""

    input_tokens: _Tokens = 0
    """Uncached, non-audio input tokens."""
    cache_read_tokens: _Tokens = 0
    """Input tokens read from the prompt cache."""
    cache_write_tokens: _Tokens = 0
    """Input tokens written to the prompt cache."""
    input_audio_tokens: _Tokens = 0
    """Uncached audio input tokens."""
    output_tokens: _Tokens = 0
    """Output text tokens, excluding reasoning, audio and image tokens."""
    reasoning_tokens: _Tokens = 0
    """Reasoning tokens, billed as output."""
    output_audio_tokens: _Tokens = 0
    """Audio output tokens."""
    output_image_tokens: _Tokens = 0
    """Image output tokens."""
    details: Annotated[dict[str, _Tokens], BeforeValidator(_storable_keys)] = Field(default_factory=dict[str, int])
    """Rare counts that refine a bucket without adding to it (e.g. `cache_write_1h_tokens`)."""

    units: _Units | None = None
    """Billable non-token units (images, video seconds, characters), or None."""
    unit_type: _NullableLabel = None
    """What `units` counts: `image`, `video_second`, `character`, ..."""

    cost_usd: _Cost | None = None
    """Exact cost in USD; None when unknown, never 0 for unknown."""
    price_source: Annotated[str | None, BeforeValidator(_price_source)] = None
    """Where the price came from: `genai-prices 0.2.3`, `pydantic-ai`, `config`, ..."""
    pricing_status: PricingStatus | None = None
    """None until the tracker prices the record; then `priced`, `unpriced` or `override`."""

    duration_ms: Annotated[int, Field(ge=0, le=86_400_000)] | None = None
    """Wall time of the call in milliseconds."""
    status: Status = 'ok'
    """Whether the call succeeded."""
    metadata: Annotated[dict[str, Any], BeforeValidator(safe_metadata)] = Field(default_factory=dict[str, Any])
    """Free-form JSON, at most 16 KiB (made safe by `safe_metadata`); no prompt or response unless the user puts it."""

    @field_validator('created_at')
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        try:
            # Naive as Python sees it: no tzinfo, or one that gives no offset.
            naive = value.utcoffset() is None
        except Exception as exc:  # a tzinfo whose `utcoffset` raises
            raise ValueError(f'has a time zone that fails: {type(exc).__name__}') from None
        if naive:
            raise ValueError('must be timezone-aware')
        try:
            value = value.astimezone(UTC)
        except (OverflowError, ValueError):
            raise ValueError('is out of range: cannot be converted to UTC') from None
        if not MIN_CREATED_AT <= value < MAX_CREATED_AT:
            raise ValueError(f'is out of range: {value.isoformat()} is not between 1900 and 3000')
        return value

    @property
    def total_tokens(self) -> int:
        """Every token of the event, counted once."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.input_audio_tokens
            + self.output_tokens
            + self.reasoning_tokens
            + self.output_audio_tokens
            + self.output_image_tokens
        )


def _reject(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):  # pragma: no cover - json catches these first
        raise ValueError('NaN')
    raise TypeError(f'{type(value).__name__} is not JSON-serializable')


# Built once: `json.dumps` with non-default arguments builds an encoder on every call.
_ENCODER = json.JSONEncoder(allow_nan=False, default=_reject)


def json_text(value: object) -> str:
    """`value` as strict JSON (no NaN, nothing `json` cannot encode): what `_ENCODER.encode` gives, in less time.

    `JSONEncoder.encode` goes through Python (`iterencode` and its closures) before it reaches the C encoder;
    this calls one C encoder directly. It keeps no state between calls (no dict of seen containers), so one
    serves every thread; a cycle then ends at the recursion limit, raised as the `ValueError` `json` gives.
    """
    if _encode is None or isinstance(value, str):  # pragma: no cover - CPython has the C encoder
        return _ENCODER.encode(value)
    try:
        return ''.join(_encode(value, 0))
    except RecursionError as exc:
        raise ValueError('circular reference, or nesting too deep for JSON') from exc


_c_make_encoder: Callable[..., Callable[[object, int], Iterable[str]]] | None = getattr(
    json.encoder, 'c_make_encoder', None
)
_encode: Callable[[object, int], Iterable[str]] | None = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, _reject, json.encoder.encode_basestring_ascii, None, ': ', ', ', False, False, False)
)
