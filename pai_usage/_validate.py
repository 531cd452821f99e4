"""The writer's batch validation: plain records checked without the model's Python callbacks, a chunk at a time.

`UsageRecord.model_validate` calls back into Python for every label (`normalize_label`), the metadata
(`safe_metadata`) and the timestamp, and builds a model field by field: it costs the writer more per row than
PostgreSQL's COPY does. Most records are plain, though: ASCII labels that need no normalising, `int` tokens in
range, a UTC datetime, small JSON-safe metadata. For those the model's result is known without running it.

`fields_many` validates a chunk with `_PLAIN`, a schema that runs entirely in pydantic-core and accepts only
such plain records, with the model's own validators for everything it keeps (ids, costs, tokens, literals),
then checks in one pass over columns what the schema cannot say (the time zone, metadata as JSON). It returns
each record's field values exactly as the model stores them. What it cannot vouch for (a NUL byte, a cycle in
metadata, an odd type, an overflowing date, a label to shorten, an unknown field) it leaves to the model,
which normalises it or rejects it with its own message. `tests/test_validate.py` compares the two.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, cast
from uuid import UUID

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from .record import (
    MAX_COST_USD,
    MAX_CREATED_AT,
    MAX_LABEL_LENGTH,
    MAX_TOKENS,
    MAX_UNITS,
    MIN_CREATED_AT,
    UsageRecord,
    metadata_kept_as_is,
)

__all__ = ('fields_many', 'record_from_fields', 'stored_fields')


def _plain_text(longest: int) -> StringConstraints:
    # Printable ASCII with no space at either end: `normalize_label` and the model's stripping leave it as it is.
    return StringConstraints(strict=True, pattern=f'^[!-~](?:[ -~]{{0,{longest - 2}}}[!-~])?$')


_Label = Annotated[str, _plain_text(MAX_LABEL_LENGTH)]
_Tier = Annotated[str, _plain_text(32)]
_PriceSource = Annotated[str, _plain_text(100)]
_Key = Annotated[str, StringConstraints(strict=True, pattern='^(?:[!-~](?:[ -~]*[!-~])?)?$')]
_Tokens = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS)]
_Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]


class _Plain(TypedDict, total=False):
    """A plain record: what the model would store unchanged, field for field (the same validators otherwise)."""

    __pydantic_config__ = ConfigDict(extra='forbid')  # pyright: ignore[reportGeneralTypeIssues]

    id: UUID
    created_at: Annotated[datetime, Field(strict=True)]
    organization_id: _Label | None
    user_id: _Label | None
    provider: _Label | None
    model: _Label | None
    service_tier: _Tier | None
    operation: _Label
    source: Literal['agent', 'direct']
    run_id: _Label | None
    parent_run_id: _Label | None
    agent_name: _Label | None
    request_id: _Label | None
    input_tokens: _Tokens
    cache_read_tokens: _Tokens
    cache_write_tokens: _Tokens
    input_audio_tokens: _Tokens
    output_tokens: _Tokens
    reasoning_tokens: _Tokens
    output_audio_tokens: _Tokens
    output_image_tokens: _Tokens
    details: dict[_Key, _Tokens]
    units: Annotated[_Amount, Field(le=MAX_UNITS)] | None
    unit_type: _Label | None
    cost_usd: Annotated[_Amount, Field(le=MAX_COST_USD)] | None
    price_source: _PriceSource | None
    pricing_status: Literal['priced', 'unpriced', 'override'] | None
    duration_ms: Annotated[int, Field(ge=0, le=86_400_000)] | None
    status: Literal['ok', 'error', 'refused']
    metadata: dict[_Key, Any]


_PLAIN = TypeAdapter(list[_Plain])
_FIELDS: tuple[str, ...] = tuple(UsageRecord.model_fields)
_REQUIRED = frozenset({'id', 'created_at'})
"""Fields the model would make up (a new id, the time now): `track()` sets both, and a record must keep them."""
_DEFAULTS: dict[str, Any] = {
    # Those with a default factory are always replaced below: their place keeps the model's order of fields.
    name: None if field.default_factory is not None else field.default
    for name, field in UsageRecord.model_fields.items()
}
_UTC = frozenset({UTC})
_tzinfo = cast('Callable[[datetime], object]', operator.attrgetter('tzinfo'))
_created_at = cast('Callable[[dict[str, Any]], datetime]', operator.itemgetter('created_at'))


def fields_many(items: Sequence[object]) -> list[dict[str, Any] | None]:
    """Each item's field values as `UsageRecord.model_validate(item).__dict__` holds them, or None.

    None for an item the model must see itself, to normalise or reject it. The items are not changed.
    """
    out: list[dict[str, Any] | None] = [None] * len(items)
    index = [
        i for i, item in enumerate(items) if type(item) is dict and _REQUIRED.issubset(cast('dict[str, Any]', item))
    ]
    if not index:
        return out
    candidates = [items[i] for i in index]
    try:
        valid = _PLAIN.validate_python(candidates)
    except ValidationError as exc:
        refused = {e['loc'][0] for e in exc.errors(include_url=False, include_context=False, include_input=False)}
        kept = [k for k in range(len(index)) if k not in refused]
        index = [index[k] for k in kept]
        try:
            valid = _PLAIN.validate_python([candidates[k] for k in kept])
        except ValidationError:  # pragma: no cover - each record validates alone as it does in a list
            return out
    rows = cast('list[dict[str, Any]]', valid)
    created = list(map(_created_at, rows))
    # One check for the chunk; only when it fails, one per record.
    each_time = not (
        _UTC.issuperset(map(_tzinfo, created))
        and min(created, default=MIN_CREATED_AT) >= MIN_CREATED_AT
        and max(created, default=MIN_CREATED_AT) < MAX_CREATED_AT
    )
    for i, fields, at in zip(index, rows, created, strict=True):
        if each_time and (at.tzinfo is not UTC or not MIN_CREATED_AT <= at < MAX_CREATED_AT):
            continue  # the model converts it to UTC, or refuses it
        metadata = fields.get('metadata')
        if metadata and not metadata_kept_as_is(metadata):
            continue
        values = {**_DEFAULTS, **fields}
        if 'details' not in fields:
            values['details'] = {}
        if metadata is None:
            values['metadata'] = {}
        out[i] = values
    return out


def stored_fields(item: dict[str, Any]) -> dict[str, Any] | None:
    """The field values the writer validates `item` into (before pricing), or None when it would reject it.

    For counting a record before the writer has it (budgets): a record the ledger will not hold counts nothing.
    """
    values = fields_many([item])[0]
    if values is not None:
        return values
    try:
        return dict(UsageRecord.model_validate(item).__dict__)
    except Exception:  # invalid: the writer rejects it too
        return None


_new = object.__new__
_set = object.__setattr__


def record_from_fields(values: dict[str, Any], fields_set: set[str]) -> UsageRecord:
    """A `UsageRecord` holding `values` (all its fields, as `fields_many` gives them), not validated again.

    `fields_set` names the fields the input gave. What `model_construct` does, without its loop over the fields.
    """
    record = _new(UsageRecord)
    _set(record, '__dict__', values)
    _set(record, '__pydantic_fields_set__', fields_set)
    _set(record, '__pydantic_extra__', None)
    _set(record, '__pydantic_private__', None)
    return record
