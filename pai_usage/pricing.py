"""Costs: genai-prices first, our own table for overrides and the units genai-prices does not price.

Every billable quantity of a record goes to pricing under genai-prices' own usage keys (tokens by modality,
cache reads and writes, reasoning and citation tokens, web searches, characters, audio seconds, ...). A row is
priced in full or not at all: anything billable that no price covers leaves it unpriced, with the reason in
`price_source`. A provider is never guessed: the provider the row names must be the one genai-prices prices
the model under, unless the price file maps it explicitly (`provider_aliases`).

Rows are priced per request at the request's timestamp and service tier, so tiered, historic and batch or
priority prices are right. Each model price is compiled once into `(usage key, price)` pairs and multiplied per
row; tiered and time-of-day prices, and usage the compiled form cannot split, go through genai-prices itself,
whose result is the reference the tests compare against. Nothing here touches the network.
"""

from __future__ import annotations

import json
import operator
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, cast

import genai_prices
from genai_prices.data_snapshot import DataSnapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices, TimeOfDateConstraint
from genai_prices.units import UnitDef, UnitRegistry

from ._log import RateLimitedLog
from ._warnings import UnpricedModelWarning, warn_later
from .record import MAX_COST_USD, PricingStatus, normalize_label, normalize_service_tier
from .usage import DETAIL_ALIASES, TOKEN_BUCKETS, USAGE_KEYS, TokenCounts, price_values

__all__ = (
    'CONFIG_SOURCE',
    'DEFAULT_UNIT_PRICES',
    'GENAI_PRICES_SOURCE',
    'PRICES_ENV_VAR',
    'PRICE_CONTEXT_KEY',
    'SERVICE_TIERS',
    'UNIT_USAGE_KEYS',
    'UNPRICED_SOURCE',
    'EffectivePrice',
    'PriceTable',
    'Priced',
    'TokenPrice',
    'UnitPrice',
    'effective_price',
    'get_price_table',
    'price_context',
    'price_fields',
    'price_fields_many',
    'price_usage',
    'response_price_context',
    'set_price_table',
    'stored_price_context',
)

GENAI_PRICES_SOURCE = f'genai-prices {genai_prices.__version__}'
"""`price_source` of rows priced by genai-prices."""
CONFIG_SOURCE = 'config'
"""`price_source` prefix of rows priced by the `PriceTable` (the rule follows: `config: units google*/veo-3*`)."""
UNPRICED_SOURCE = 'unpriced'
"""`price_source` prefix of unpriced rows; the reason follows (`unpriced: no price for web_searches`)."""
PRICES_ENV_VAR = 'PAI_USAGE_PRICES'
"""Environment variable naming a TOML or JSON price file that replaces the default table."""
PRICE_CONTEXT_KEY = 'price_context'
"""The `metadata` key of a row's genai-prices price context beyond its `service_tier` (`{'speed': 'fast'}`)."""
SERVICE_TIERS = ('standard', 'flex', 'priority', 'batch')
"""The service tiers a record can name; others are passed to genai-prices as given."""
UNIT_USAGE_KEYS: Mapping[str, str] = {
    'character': 'input_characters',
    'audio_second': 'audio_seconds',
    'input_audio_second': 'input_audio_seconds',
    'output_audio_second': 'output_audio_seconds',
    'web_search': 'web_searches',
    'document_page': 'input_document_pages',
}
"""Our `unit_type`s that genai-prices prices, by its usage key (its own usage keys are accepted as unit types too)."""

_log = RateLimitedLog()
_MTOK = Decimal(1_000_000)
_MAX_SOURCE = 100
_REGISTRY = UnitRegistry(unit_data)
_UNITS: Mapping[str, UnitDef] = _REGISTRY.units


def _pattern_matches(pattern: str, value: str | None) -> bool:
    return fnmatchcase(value or '', pattern)


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """A price per non-token unit, for models genai-prices does not price."""

    model: str
    """Model name, or a glob pattern such as `imagen-4.0-fast-*`."""
    unit_type: str
    """The unit priced: `image`, `video_second`, `video_second_audio`, `character`, ..."""
    usd_per_unit: Decimal
    """USD for one unit."""
    _: KW_ONLY
    provider: str = '*'
    """Provider id or glob pattern (`google*` matches `google-gla` and `google-vertex`)."""
    as_of: str | None = None
    """The date the price was read from its source (ISO date)."""
    source: str | None = None
    """Where the figure comes from (a price page), and whether it could be checked."""

    def matches(self, provider: str | None, model: str | None, unit_type: str | None) -> bool:
        """Whether this price applies to the call."""
        return (
            unit_type == self.unit_type
            and _pattern_matches(self.model, model)
            and _pattern_matches(self.provider, provider)
        )


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per million tokens for one model, overriding genai-prices (and pydantic-ai's cost)."""

    model: str
    """Model name, or a glob pattern."""
    _: KW_ONLY
    provider: str = '*'
    """Provider id or glob pattern."""
    input_mtok: Decimal = Decimal(0)
    """Uncached input (and, unless priced separately, audio input)."""
    output_mtok: Decimal = Decimal(0)
    """Output text and reasoning (and, unless priced separately, audio and image output)."""
    cache_read_mtok: Decimal | None = None
    """Cached input reads; defaults to `input_mtok`."""
    cache_write_mtok: Decimal | None = None
    """Cache writes; defaults to `input_mtok`."""
    output_image_mtok: Decimal | None = None
    """Image output; defaults to `output_mtok`."""

    def matches(self, provider: str | None, model: str | None) -> bool:
        """Whether this price applies to the call."""
        return _pattern_matches(self.model, model) and _pattern_matches(self.provider, provider)

    def cost(self, tokens: TokenCounts) -> Decimal:
        """The cost of `tokens` at these prices."""
        input_cost = (
            (tokens.input_tokens + tokens.input_audio_tokens) * self.input_mtok
            + tokens.cache_read_tokens * _or(self.cache_read_mtok, self.input_mtok)
            + tokens.cache_write_tokens * _or(self.cache_write_mtok, self.input_mtok)
        )
        output_cost = (
            tokens.output_tokens + tokens.reasoning_tokens + tokens.output_audio_tokens
        ) * self.output_mtok + tokens.output_image_tokens * _or(self.output_image_mtok, self.output_mtok)
        return (input_cost + output_cost) / _MTOK


def _or(value: Decimal | None, default: Decimal) -> Decimal:
    return default if value is None else value


_GEMINI_PRICING = 'ai.google.dev/gemini-api/docs/pricing'
_VERTEX_PRICING = 'cloud.google.com/vertex-ai/generative-ai/pricing'
_UNVERIFIED = 'list price as recalled, not verifiable offline when shipped (2026-12-02): check it against the page'


def _list_price(model: str, unit_type: str, usd: str, provider: str, page: str) -> UnitPrice:
    return UnitPrice(
        model, unit_type, Decimal(usd), provider=provider, as_of='2025-10-01', source=f'{page}; {_UNVERIFIED}'
    )


# Most specific patterns first: the first matching entry wins.
DEFAULT_UNIT_PRICES: tuple[UnitPrice, ...] = (
    # Imagen, per image generated (Gemini API and Vertex AI list the same figures).
    _list_price('imagen-4.0-ultra-*', 'image', '0.06', 'google*', _GEMINI_PRICING),
    _list_price('imagen-4.0-fast-*', 'image', '0.02', 'google*', _GEMINI_PRICING),
    _list_price('imagen-4.0-generate-*', 'image', '0.04', 'google*', _GEMINI_PRICING),
    _list_price('imagen-3.0-fast-*', 'image', '0.02', 'google*', _VERTEX_PRICING),
    _list_price('imagen-3.0-generate-*', 'image', '0.03', 'google*', _GEMINI_PRICING),
    _list_price('imagen-3.0-capability-*', 'image', '0.03', 'google*', _VERTEX_PRICING),
    # Veo, per second of video delivered; `video_second_audio` when the video has generated audio.
    _list_price('veo-3.0-fast-*', 'video_second_audio', '0.15', 'google*', _GEMINI_PRICING),
    _list_price('veo-3.0-fast-*', 'video_second', '0.10', 'google*', _GEMINI_PRICING),
    _list_price('veo-3.0-generate-*', 'video_second_audio', '0.40', 'google*', _GEMINI_PRICING),
    _list_price('veo-3.0-generate-*', 'video_second', '0.20', 'google*', _GEMINI_PRICING),
    _list_price('veo-2.0-*', 'video_second', '0.35', 'google-gla', _GEMINI_PRICING),
    _list_price('veo-2.0-*', 'video_second', '0.50', 'google-vertex', _VERTEX_PRICING),
    # ElevenLabs text to speech, per character (API pay-as-you-go: $0.10 / $0.05 per 1,000 characters).
    _list_price('eleven_multilingual_v2', 'character', '0.0001', 'elevenlabs', 'elevenlabs.io/pricing/api'),
    _list_price('eleven_v3', 'character', '0.0001', 'elevenlabs', 'elevenlabs.io/pricing/api'),
    _list_price('eleven_flash_v2*', 'character', '0.00005', 'elevenlabs', 'elevenlabs.io/pricing/api'),
    _list_price('eleven_turbo_v2*', 'character', '0.00005', 'elevenlabs', 'elevenlabs.io/pricing/api'),
)
"""List prices for models genai-prices does not price, each with its date and source. Check them against your
contracts and override them in a price file; a model with no entry is unpriced, never priced at a flat default."""


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Our own prices: unit prices, token-price overrides and gateway aliases. The first matching entry wins."""

    units: tuple[UnitPrice, ...] = DEFAULT_UNIT_PRICES
    """Per-unit prices."""
    tokens: tuple[TokenPrice, ...] = ()
    """Token-price overrides; they win over genai-prices and pydantic-ai's cost."""
    provider_aliases: Mapping[str, str] = field(default_factory=dict[str, str])
    """Provider ids genai-prices does not know, mapped to the one whose prices apply (`{'my-gateway': 'openai'}`)."""

    def unit_price(self, provider: str | None, model: str | None, unit_type: str | None) -> UnitPrice | None:
        """The unit price for the call, if any."""
        return next((p for p in self.units if p.matches(provider, model, unit_type)), None)

    def token_price(self, provider: str | None, model: str | None) -> TokenPrice | None:
        """The token-price override for the model, if any."""
        return next((p for p in self.tokens if p.matches(provider, model)), None)

    def resolve_provider(self, provider: str | None) -> str | None:
        """The provider id to price under: the alias target for a mapped gateway, else `provider` itself."""
        if provider is None or not self.provider_aliases:
            return provider
        return self.provider_aliases.get(provider, provider)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, include_defaults: bool = True) -> PriceTable:
        """Build a table from parsed TOML/JSON: `[[units]]`, `[[tokens]]` and a `[provider_aliases]` table.

        Entries from the file come first, so they override the defaults for the same model and unit.
        Raises `ValueError` naming the bad entry.
        """
        unknown = set(data) - {'units', 'tokens', 'provider_aliases'}
        if unknown:
            raise ValueError(
                f'unknown price table keys: {sorted(unknown)!r}; expected `units`, `tokens` and `provider_aliases`'
            )
        units = tuple(_build(UnitPrice, entry, 'units', i) for i, entry in enumerate(_entries(data, 'units')))
        tokens = tuple(_build(TokenPrice, entry, 'tokens', i) for i, entry in enumerate(_entries(data, 'tokens')))
        aliases = _aliases(data.get('provider_aliases', {}))
        if include_defaults:
            units += DEFAULT_UNIT_PRICES
        return cls(units=units, tokens=tokens, provider_aliases=aliases)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, include_defaults: bool = True) -> PriceTable:
        """Load a `.toml` or `.json` price file (see `from_mapping`)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f'cannot read price file {str(path)!r}: {exc.strerror or exc}') from None
        try:
            data: Any = json.loads(text) if path.suffix == '.json' else tomllib.loads(text)
            if not isinstance(data, Mapping):
                raise ValueError('expected a table (TOML) or an object (JSON) at the top level')
            return cls.from_mapping(cast(Mapping[str, Any], data), include_defaults=include_defaults)
        except ValueError as exc:  # includes TOMLDecodeError and JSONDecodeError
            raise ValueError(f'bad price file {str(path)!r}: {exc}') from None


_DECIMAL_FIELDS = frozenset(
    {'usd_per_unit', 'input_mtok', 'output_mtok', 'cache_read_mtok', 'cache_write_mtok', 'output_image_mtok'}
)


def _entries(data: Mapping[str, Any], key: str) -> list[Any]:
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise ValueError(f'`{key}` must be an array of tables, got {type(entries).__name__}')
    return cast(list[Any], entries)


def _aliases(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f'`provider_aliases` must be a table of provider ids, got {type(value).__name__}')
    aliases = cast(Mapping[Any, Any], value)
    for key, target in aliases.items():
        if not isinstance(key, str) or not isinstance(target, str) or not target:
            raise ValueError(f'bad entry `provider_aliases.{key}` {target!r}: expected a provider id')
    return {str(k): str(v) for k, v in aliases.items()}


def _build(kind: type[UnitPrice] | type[TokenPrice], entry: Any, key: str, index: int) -> Any:
    if not isinstance(entry, Mapping):
        raise ValueError(f'bad entry `{key}[{index}]` {entry!r}: expected a table')
    entry = cast(Mapping[str, Any], entry)
    try:
        for name in ('model', 'unit_type', 'provider', 'as_of', 'source'):
            if name in entry and not isinstance(entry[name], str):
                raise ValueError(f'{name} must be a string')
        values: dict[str, Any] = {k: _decimal(v) if k in _DECIMAL_FIELDS else v for k, v in entry.items()}
        for name, value in values.items():
            if isinstance(value, Decimal) and (not value.is_finite() or value < 0):
                raise ValueError(f'{name} must be a non-negative number, got {value}')
        return kind(**values)
    except (TypeError, ArithmeticError, ValueError) as exc:
        raise ValueError(f'bad entry `{key}[{index}]` {dict(entry)!r}: {exc}') from None


def _decimal(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f'expected a number, got {value!r}')
    return Decimal(str(value))


_table: PriceTable | None = None


def get_price_table() -> PriceTable:
    """The process-wide table: set by `set_price_table`, else loaded from `$PAI_USAGE_PRICES`, else defaults."""
    global _table
    if _table is None:
        path = os.environ.get(PRICES_ENV_VAR)
        _table = PriceTable.from_file(path) if path else PriceTable()
    return _table


def set_price_table(table: PriceTable | None) -> None:
    """Replace the process-wide table; `None` goes back to the environment / defaults."""
    global _table
    _table = table


@dataclass(frozen=True, slots=True)
class Priced:
    """The outcome of pricing one event."""

    cost_usd: Decimal | None
    """Exact cost, or None when unknown."""
    pricing_status: PricingStatus
    """`priced`, `override` or `unpriced`."""
    price_source: str | None
    """The rule that priced the row, or why it is unpriced (`unpriced: ...`)."""


def _unpriced(reason: str) -> Priced:
    return Priced(None, 'unpriced', f'{UNPRICED_SOURCE}: {reason}'[:_MAX_SOURCE])


def price_context(service_tier: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The genai-prices `price_context` of a row: its service tier over the rest of its context (`extra`).

    `batch` is a processing mode, the other tiers are tiers; `standard` (or None) adds nothing. `extra` is what
    `stored_price_context` reads from the row's `metadata`; where both name a key, the `service_tier` column wins.
    """
    tier: dict[str, str] | None
    if not service_tier or service_tier == 'standard':
        tier = None
    elif service_tier == 'batch':
        tier = {'processing': 'batch'}
    else:
        tier = {'service_tier': service_tier}
    if not extra:
        return tier
    return {**extra, **tier} if tier else dict(extra)


def stored_price_context(metadata: object) -> dict[str, str] | None:
    """The price context a row's `metadata` keeps under `price_context` (its string values), or None.

    Rows the capability records keep there what of the response's `provider_details` can change its price
    (`response_price_context`); a direct `track()` call can pass it too: `metadata={'price_context': {...}}`.
    """
    if not metadata or not isinstance(metadata, Mapping):
        return None
    context = cast(Mapping[Any, Any], metadata).get(PRICE_CONTEXT_KEY)
    if not context or not isinstance(context, Mapping):
        return None
    # genai-prices matches string values only: anything else could never select a price, and must not reach a cache key.
    kept = {k: v for k, v in cast(Mapping[Any, Any], context).items() if type(k) is str and type(v) is str}
    return kept or None


def response_price_context(details: Mapping[str, Any] | None, service_tier: str | None) -> dict[str, str] | None:
    """What of a response's `provider_details` a row keeps under `metadata.price_context`, or None.

    pydantic-ai prices a response with its whole `provider_details` as genai-prices' price context (Anthropic's
    fast mode is `{'speed': 'fast'}`). Only the keys a price variant of genai-prices' data reads can change the
    price, and only string values can match: those are kept, less what the row's `service_tier` already says,
    so that a reprice prices the row as pydantic-ai did.
    """
    if not details:
        return None
    keys = _context_keys()
    tier = price_context(service_tier) or {}
    kept = {
        k: v
        for k, v in details.items()
        if k in keys
        and type(v) is str
        and tier.get(k) != v
        and not (k == 'service_tier' and v == service_tier)  # `standard`: the column says it, as no context
    }
    return kept or None


def price_usage(
    *,
    provider: str | None,
    model: str | None,
    tokens: TokenCounts,
    units: Decimal | None = None,
    unit_type: str | None = None,
    timestamp: datetime | None = None,
    service_tier: str | None = None,
    context: Mapping[str, str] | None = None,
    table: PriceTable | None = None,
) -> Priced:
    """Price one request. Never raises: what cannot be priced gives `Priced(None, 'unpriced', 'unpriced: why')`.

    Tokens are priced by a `TokenPrice` override if one matches, else by genai-prices at `timestamp`,
    `service_tier` and the rest of the request's price `context` (`{'speed': 'fast'}`, see `price_context`);
    units by genai-prices when it prices them for the model, else by the table's `UnitPrice`.
    A call with anything billable that has no price is unpriced as a whole, never partly priced or zero.
    """
    if table is None:
        try:
            table = get_price_table()
        except ValueError as exc:
            # A broken price file must not break the caller, nor price with a table the user did not mean.
            _log.error('price-table', 'pai-usage: %s; usage is recorded unpriced until it is fixed', exc)
            return _unpriced('bad price file')
    if not model:
        return _unpriced('no model')
    if units and unit_type is None:
        return _unpriced('units without a unit_type')
    provider = table.resolve_provider(provider)
    values = price_values(tokens)
    unit_key: str | None = None
    if units is not None and unit_type is not None and units:
        unit_key = unit_type if unit_type in USAGE_KEYS else UNIT_USAGE_KEYS.get(unit_type)
    override = table.token_price(provider, model)
    if override is not None:
        return _price_override(table, override, provider, model, tokens, values, units, unit_type)

    found = _find_model(provider, model)
    when = timestamp or datetime.now(UTC)
    request_context = price_context(service_tier, context)
    own_unit: UnitPrice | None = None
    if unit_key is not None and units is not None:
        if found is not None and _compiled(found, when, request_context).covers(unit_key):
            values[unit_key] = units
        else:
            own_unit = table.unit_price(provider, model, unit_type)
            if own_unit is None:
                return _no_price(provider, model, unit_type)
    elif units is not None and unit_type is not None and units:
        own_unit = table.unit_price(provider, model, unit_type)
        if own_unit is None:
            return _no_price(provider, model, unit_type)

    if own_unit is not None and not values:
        assert units is not None
        return _checked(units * own_unit.usd_per_unit, 'override', _unit_source(own_unit), provider, model)
    if found is None:
        return _no_price(provider, model, None)
    result = _genai_cost(found, values, when, request_context)
    if isinstance(result, str):
        _log.warning(
            f'unpriced:{provider}:{model}:{result}', 'pai-usage: cannot price %s/%s: %s', provider, model, result
        )
        return _unpriced(result)
    if own_unit is not None:
        assert units is not None
        source = f'{GENAI_PRICES_SOURCE} + {_unit_source(own_unit)}'
        return _checked(result + units * own_unit.usd_per_unit, 'override', source, provider, model)
    return _checked(result, 'priced', GENAI_PRICES_SOURCE, provider, model)


def _unit_source(price: UnitPrice) -> str:
    return f'{CONFIG_SOURCE}: units {price.provider}/{price.model}'


def _price_override(
    table: PriceTable,
    override: TokenPrice,
    provider: str | None,
    model: str,
    tokens: TokenCounts,
    values: Mapping[str, Any],
    units: Decimal | None,
    unit_type: str | None,
) -> Priced:
    # A token override prices tokens only: any other billable quantity (web searches, ...) has no price in it.
    for key, value in values.items():
        if value and _UNITS[key].dimensions.get('family') != 'tokens':
            return _unpriced(f'override {override.provider}/{override.model} has no price for {key}')
    cost = override.cost(tokens)
    source = f'{CONFIG_SOURCE}: tokens {override.provider}/{override.model}'
    if units is not None and unit_type is not None and units:
        unit_price = table.unit_price(provider, model, unit_type)
        if unit_price is None:
            return _no_price(provider, model, unit_type)
        cost += units * unit_price.usd_per_unit
        source = f'{source} + units {unit_price.provider}/{unit_price.model}'
    return _checked(cost, 'override', source, provider, model)


def _checked(total: Decimal, status: PricingStatus, source: str, provider: str | None, model: str | None) -> Priced:
    if total > MAX_COST_USD:
        # Not believable for one event (corrupt counts or a mistyped price), and too large to store exactly.
        _log.error(
            f'absurd:{provider}:{model}',
            'pai-usage: %s/%s priced at $%s, over the $%s limit per event; recorded unpriced',
            provider,
            model,
            total,
            MAX_COST_USD,
        )
        return _unpriced(f'over ${MAX_COST_USD} for one event')
    return Priced(total, status, source[:_MAX_SOURCE])


def _no_price(provider: str | None, model: str | None, unit_type: str | None) -> Priced:
    what = f'`{unit_type}` units of ' if unit_type else ''
    if provider != 'test':  # pydantic-ai's `TestModel` is unpriced by design
        # Usually called in the writer thread: the warning is given on the caller's thread, at its next
        # `track()`/`flush()`, where warning filters and strict mode apply.
        warn_later(
            f'unpriced:{provider}:{model}:{unit_type}',
            f'pai-usage: no price for {what}`{provider}/{model}`; its usage is recorded with cost_usd=NULL. '
            f'Add it to your price table (`{PRICES_ENV_VAR}`).',
            UnpricedModelWarning,
        )
    _log.warning(
        f'unpriced:{provider}:{model}:{unit_type}',
        'pai-usage: no price for %s%s/%s; recorded with cost_usd=NULL and pricing_status=unpriced. '
        'Add it to your price table (%s).',
        what,
        provider,
        model,
        PRICES_ENV_VAR,
    )
    if unit_type:
        return _unpriced(f'no price for {unit_type} of {provider}/{model}')
    return _unpriced(f'no genai-prices price for {provider}/{model}')


# --- the genai-prices side --------------------------------------------------------------------------------


_Found = tuple[Provider, ModelInfo]
_MAX_CACHED = 4096
_found: dict[tuple[str | None, str], _Found | None] = {}
_compiled_prices: dict[tuple[int, date, tuple[tuple[str, str], ...]], _Compiled] = {}
_cached_for: list[DataSnapshot | None] = [None]
_context_keys_of: list[frozenset[str] | None] = [None]


def _check_snapshot() -> DataSnapshot:
    snapshot = genai_prices.data_snapshot.get_snapshot()
    if _cached_for[0] is not snapshot:  # new price data (`UpdatePrices`, `set_custom_snapshot`): look again
        _found.clear()
        _compiled_prices.clear()
        _context_keys_of[0] = None
        _cached_for[0] = snapshot
    return snapshot


def _context_keys() -> frozenset[str]:
    """The price-context keys some price variant of the current data reads (`service_tier`, `speed`, `route`, ...)."""
    snapshot = _check_snapshot()
    keys = _context_keys_of[0]
    if keys is None:
        keys = _context_keys_of[0] = frozenset(
            key
            for provider in snapshot.providers
            for model in provider.models
            for variant in model.price_variants or ()
            for key in variant.when
        )
    return keys


def _find_model(provider: str | None, model: str) -> _Found | None:
    """The genai-prices provider and model for a call, exactly as `calc_price(provider_id=provider)` finds them.

    Never under another provider: a provider id genai-prices does not know is unpriced (map gateways with
    `provider_aliases`). Cached per snapshot, misses included (genai-prices caches only what it finds).
    """
    snapshot = _check_snapshot()
    key = (provider, model)
    try:
        return _found[key]
    except KeyError:
        pass
    found: _Found | None
    try:
        found = snapshot.find_provider_model(model, None, provider, None)
    except LookupError:
        found = None
    if len(_found) >= _MAX_CACHED:  # arbitrary model names must not grow memory without bound
        _found.clear()
    _found[key] = found
    return found


@dataclass(slots=True)
class _Compiled:
    """One resolved model price as plain `(usage key, price, per)` terms, in genai-prices' order of summing."""

    terms: tuple[tuple[str, Decimal | TieredPrices, int], ...]
    """`(usage key, price, per)` in the order genai-prices adds them up; `requests` counts one per request."""
    tiered: bool
    """Whether a price depends on the request's total input tokens."""
    leaves: tuple[tuple[str, tuple[str, ...]], ...]
    """`(usage key, its priced descendants)`, most specific first: the order genai-prices decomposes in."""
    exact: bool
    """Whether `terms` give genai-prices' result; otherwise (time-of-day prices, ...) genai-prices prices each row."""
    free: bool
    """The price has no entries at all: genai-prices prices everything at 0."""
    priced: tuple[UnitDef, ...]
    """The units this price has a price for."""
    covered: dict[str, bool] = field(default_factory=dict[str, bool])
    """Usage key -> whether a priced unit covers it (itself or an ancestor)."""
    plans: dict[tuple[str, ...], _Plan | None] = field(default_factory=dict[tuple[str, ...], '_Plan | None'])
    """Usage keys a row reports (all non-zero, in order) -> how such rows are decomposed (see `_plan`)."""

    def covers(self, key: str) -> bool:
        """Whether a price applies to `key` (a price for it, or for a more general unit that includes it)."""
        try:
            return self.covered[key]
        except KeyError:
            dims = _UNITS[key].dimensions.items()
            result = self.free or any(p.dimensions.items() <= dims for p in self.priced)
            self.covered[key] = result
            return result


def _has_time_of_day(info: ModelInfo) -> bool:
    constraints = [p.constraint for p in info.prices] if isinstance(info.prices, list) else []
    constraints += [v.constraint for v in info.price_variants or ()]
    return any(isinstance(c, TimeOfDateConstraint) for c in constraints)


def _compiled(found: _Found, when: datetime, context: Mapping[str, str] | None) -> _Compiled:
    provider, info = found
    # genai-prices ignores the request context for a model found through a fallback provider.
    if context and not any(info is m for m in provider.models):
        context = None
    # A naive time is UTC, as genai-prices reads it (`astimezone` would read it as local time).
    day = when.date() if when.tzinfo is None else when.astimezone(UTC).date()
    key = (id(info), day, tuple(sorted(context.items())) if context else ())
    compiled = _compiled_prices.get(key)
    if compiled is not None:
        return compiled
    compiled = _compile(info.get_prices(when, context), provider, info)
    if _has_time_of_day(info):
        compiled.exact = False  # the price depends on the time of day, not only the date: never reused as exact
        return compiled
    if len(_compiled_prices) >= _MAX_CACHED:
        _compiled_prices.clear()
    _compiled_prices[key] = compiled
    return compiled


def _compile(price: ModelPrice, provider: Provider, info: ModelInfo) -> _Compiled:
    items = [(k, v) for k, v in price.__dict__.items() if not k.startswith('_') and v is not None]
    exact = not (provider.id == 'groq' and info.id.startswith('whisper'))  # genai-prices bills >= 10 s there
    terms: list[tuple[str, Decimal | TieredPrices, int]] = []
    priced: list[UnitDef] = []
    for price_key, value in items:
        try:
            unit = _REGISTRY.unit_for_price_key(price_key)
        except KeyError:
            exact = False  # a price key our registry does not know: genai-prices decides
            continue
        priced.append(unit)
        terms.append((unit.usage_key, cast(Decimal | TieredPrices, value), unit.per))
    tiered = any(isinstance(price, TieredPrices) for _, price, _ in terms)
    token_units = sorted(
        (u for u in priced if u.usage_key != 'requests'), key=lambda u: (-len(u.dimensions), u.usage_key)
    )
    leaves = tuple(
        (
            unit.usage_key,
            tuple(
                d.usage_key for d in token_units if d is not unit and unit.dimensions.items() <= d.dimensions.items()
            ),
        )
        for unit in token_units
    )
    return _Compiled(tuple(terms), tiered, leaves, exact, free=not items, priced=tuple(priced))


def _genai_cost(
    found: _Found, values: dict[str, Any], when: datetime, context: Mapping[str, str] | None
) -> Decimal | str:
    """The cost genai-prices gives `values` in the request's price `context`, or the reason there is none."""
    compiled = _compiled(found, when, context)
    for key, value in values.items():
        if value and not compiled.covers(key):
            return f'no price for {key} of {found[0].id}/{found[1].id}'
    if compiled.exact:
        total = _fast_total(compiled, values)
        if total is not None:
            return total
    provider, info = found
    try:
        return info.calc_price(
            genai_prices.Usage(**values),
            provider,
            genai_request_timestamp=when,
            price_context=context,
        ).total_price
    except (LookupError, ValueError) as exc:
        return f'genai-prices: {exc}'


@dataclass(slots=True, frozen=True)
class _Plan:
    """`_fast_total` for rows that report one set of usage keys, all non-zero: what the keys alone decide, done once."""

    leaves: tuple[tuple[str, tuple[str, ...]], ...]
    """`(reported key, its reported priced descendants)` for each priced key reported, most specific first."""
    terms: tuple[tuple[str, Decimal | TieredPrices, int], ...]
    """The compiled terms that can count anything for such rows, in genai-prices' order of summing."""


_MAX_PLANS = 256
"""Sets of usage keys kept per compiled price: a handful in practice, bounded against odd input."""


def _plan(compiled: _Compiled, keys: tuple[str, ...]) -> _Plan | None:
    """The decomposition of rows reporting `keys` (all non-zero), or None where genai-prices must decide.

    A priced key not reported counts 0 (so do its descendants, which are not reported either), unless genai-prices
    would infer or refuse it (`_infers`): then None, for every row with these keys, as `_fast_total_each`
    decides row by row.
    """
    present = frozenset(keys)
    leaves: list[tuple[str, tuple[str, ...]]] = []
    for usage_key, descendants in compiled.leaves:
        if usage_key in present:
            leaves.append((usage_key, tuple(d for d in descendants if d in present)))
        elif _infers(usage_key, present.__contains__):
            return None
    if compiled.tiered and 'input_tokens' not in present:
        return None
    terms = tuple(t for t in compiled.terms if t[0] == 'requests' or t[0] in present)
    return _Plan(tuple(leaves), terms)


def _fast_total(compiled: _Compiled, values: Mapping[str, Any]) -> Decimal | None:
    """genai-prices' total for `values` from the compiled terms, or None when it must decide itself.

    The same leaf counts (each priced key minus its priced descendants), the same tier choice and the same
    Decimal operations in the same order as `ModelPrice.calc_price`, so the result is identical, rounding included.
    Rows whose counts are all non-zero (the usual case) share a `_Plan` per set of keys.
    """
    if min(values.values(), default=0) <= 0:
        return _fast_total_each(compiled, values)
    keys = tuple(values)
    plans = compiled.plans
    try:
        plan = plans[keys]
    except KeyError:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[keys] = _plan(compiled, keys)
    if plan is None:
        return None
    leaves: dict[str, Any] = {}
    for usage_key, descendants in plan.leaves:
        value = values[usage_key]
        if descendants:
            value = value - sum(map(leaves.__getitem__, descendants))
        if value < 0:
            return None
        leaves[usage_key] = value
    return _sum_terms(plan.terms, leaves, values['input_tokens'] if compiled.tiered else 0)


def _fast_total_each(compiled: _Compiled, values: Mapping[str, Any]) -> Decimal | None:
    """`_fast_total` deciding everything for this row alone (some count is reported as zero)."""
    leaves: dict[str, Any] = {}
    get = values.get
    for usage_key, descendants in compiled.leaves:
        value = get(usage_key)
        if value is None:
            if _infers(usage_key, lambda key: (get(key) or 0) > 0):
                return None  # genai-prices infers or refuses a missing total: let it say which
            value = 0
        if descendants:
            value = value - sum(map(leaves.__getitem__, descendants))
        if value < 0:
            return None
        leaves[usage_key] = value
    total_input = 0
    if compiled.tiered:
        total_input = get('input_tokens')
        if total_input is None:
            return None
    return _sum_terms(compiled.terms, leaves, total_input)


def _sum_terms(
    terms: tuple[tuple[str, Decimal | TieredPrices, int], ...], leaves: Mapping[str, Any], total_input: int
) -> Decimal:
    total = Decimal(0)
    for usage_key, price, per in terms:
        count = 1 if usage_key == 'requests' else leaves.get(usage_key, 0)
        if not count:
            continue
        if isinstance(price, TieredPrices):
            applicable = price.base
            for tier in reversed(price.tiers):
                if total_input > tier.start:
                    applicable = tier.price
                    break
            total += applicable * count / per
        else:
            total += price * count / per
    return total


def _joins(unit: UnitDef) -> tuple[tuple[str, str], ...]:
    # Pairs of usage keys that jointly describe `unit` without either containing the other (cache reads and
    # audio input describe cached audio): reported together, genai-prices refuses to infer `unit` itself.
    units = list(_UNITS.values())
    return tuple(
        (a.usage_key, b.usage_key)
        for i, a in enumerate(units)
        for b in units[i + 1 :]
        if a.is_compatible_with(b)
        and not (a.dimensions.items() <= b.dimensions.items() or b.dimensions.items() <= a.dimensions.items())
        and {**a.dimensions, **b.dimensions} == dict(unit.dimensions)
    )


_JOINS: dict[str, tuple[tuple[str, str], ...]] = {}
_DESCENDANTS: dict[str, tuple[str, ...]] = {}


def _infers(usage_key: str, reported: Callable[[str], bool]) -> bool:
    """Whether genai-prices infers (or refuses) the priced `usage_key` a row leaves out, given what it `reported`.

    As `Usage._infer_missing_value`: it does when any reported unit refines the key (priced or not: cached audio
    without cache reads), or when two reported units jointly describe it. Otherwise the key counts 0.
    """
    try:
        descendants = _DESCENDANTS[usage_key]
    except KeyError:
        unit = _UNITS[usage_key]
        descendants = _DESCENDANTS[usage_key] = tuple(
            d.usage_key for d in _UNITS.values() if d is not unit and unit.dimensions.items() <= d.dimensions.items()
        )
    return any(map(reported, descendants)) or any(reported(a) and reported(b) for a, b in _joins_of(usage_key))


def _joins_of(usage_key: str) -> tuple[tuple[str, str], ...]:
    try:
        return _JOINS[usage_key]
    except KeyError:  # worked out on first use: all pairs of units, too slow for import time
        joins = _JOINS[usage_key] = _joins(_UNITS[usage_key])
        return joins


# --- one call for the writer and for budgets ---------------------------------------------------------------


_CALLER_PRICED_PREFIX = 'pydantic-ai'


def price_fields(fields: Mapping[str, Any], table: PriceTable | None = None) -> Priced:
    """Price a record's fields exactly as the writer will, e.g. on the caller's thread for a budget check.

    `fields` is a `UsageRecord`'s `__dict__` or the raw mapping given to `track()`. A cost the caller gave is
    kept (`pricing_status` `priced`, its `price_source`), unless a token override of the table applies to the
    model or the provider is mapped as a gateway: our table wins over pydantic-ai's cost. `table` None means
    the process-wide table. Never raises.
    """
    try:
        resolved = table if table is not None else get_price_table()
    except ValueError as exc:
        _log.error('price-table', 'pai-usage: %s; usage is recorded unpriced until it is fixed', exc)
        return _unpriced('bad price file')
    # Labels as the writer stores them (a raw `track()` mapping is not validated yet): ' gpt-4o ' is `gpt-4o`.
    provider = normalize_label(fields.get('provider'))
    model = normalize_label(fields.get('model'))
    cost = fields.get('cost_usd')
    status = fields.get('pricing_status')
    caller_priced = cost is not None or status is not None
    if caller_priced and not (
        _table_prices(resolved, provider, model) or (status == 'priced' and _missed_by_caller(fields))
    ):
        return _callers_cost(fields, cost, status)
    created = fields.get('created_at')
    try:
        tokens = TokenCounts.from_columns(fields)
        units = _units(fields.get('units'))
    except (TypeError, ValueError, ArithmeticError):
        return _unpriced('invalid usage counts')  # the writer rejects the record itself; budgets must not raise
    return price_usage(
        provider=provider,
        model=model,
        tokens=tokens,
        units=units,
        unit_type=normalize_label(fields.get('unit_type')),
        timestamp=created if isinstance(created, datetime) else None,
        service_tier=normalize_service_tier(fields.get('service_tier')),
        context=stored_price_context(fields.get('metadata')),
        table=resolved,
    )


def genai_prices_total(fields: Mapping[str, Any], source: str) -> Priced | None:
    """genai-prices' own total for a record's tokens, as pydantic-ai prices a response; None if it has none.

    Unlike `price_fields`, a quantity the model has no price for counts nothing (genai-prices' rule, and so
    pydantic-ai's). For repricing rows pydantic-ai priced as pydantic-ai would price them now: units, an
    unknown model or an error give None.
    """
    model = fields.get('model')
    if not model or fields.get('units'):
        return None
    try:
        tokens = TokenCounts.from_columns(fields)
    except (TypeError, ValueError, ArithmeticError):
        return None
    found = _find_model(fields.get('provider'), model)
    if found is None:
        return None
    created = fields.get('created_at')
    provider, info = found
    try:
        total = info.calc_price(
            genai_prices.Usage(**price_values(tokens)),
            provider,
            genai_request_timestamp=created if isinstance(created, datetime) else datetime.now(UTC),
            price_context=price_context(fields.get('service_tier'), stored_price_context(fields.get('metadata'))),
        ).total_price
    except (LookupError, ValueError):
        return None
    return _checked(total, 'priced', source, fields.get('provider'), model)


def _table_prices(table: PriceTable, provider: str | None, model: str | None) -> bool:
    """Whether our table prices this model over a caller's cost: a token override, or a gateway provider."""
    return table.token_price(table.resolve_provider(provider), model) is not None or (
        provider is not None and provider in table.provider_aliases
    )


def _callers_cost(fields: Mapping[str, Any], cost: Any, status: Any) -> Priced:
    """The cost the caller gave, kept as it is (`priced` unless the caller said otherwise)."""
    return Priced(cost, status if status is not None else 'priced', fields.get('price_source'))


def price_fields_many(rows: Sequence[Mapping[str, Any]], table: PriceTable | None = None) -> list[Priced]:
    """`price_fields` for each of `rows`, in order, with what rows share (table, model, price) looked up once.

    The writer prices a whole chunk in one call. Rows of one model and day share the decision (caller's cost
    kept or not, override or genai-prices) and the compiled price; each row only adds up its own counts. A row
    that is anything but plain (units, `details`, an override, an unknown model, counts the compiled price
    cannot split) goes through `price_fields` itself, which logs and warns as it always does.
    """
    try:
        resolved = table if table is not None else get_price_table()
    except ValueError:
        return [price_fields(fields, table) for fields in rows]
    _check_snapshot()  # new price data clears the caches once, before this chunk's plans are made
    kept: dict[tuple[str | None, str | None], bool] = {}
    plans: dict[tuple[Any, ...], _Compiled | None] = {}
    out: list[Priced] = []
    for fields in rows:
        provider = fields.get('provider')
        model = fields.get('model')
        tier = fields.get('service_tier')
        if type(provider) not in _LABEL_TYPES or type(model) not in _LABEL_TYPES or type(tier) not in _LABEL_TYPES:
            out.append(price_fields(fields, resolved))  # labels no validation has seen: it normalises them
            continue
        cost = fields.get('cost_usd')
        status = fields.get('pricing_status')
        if cost is not None or status is not None:
            key = (provider, model)
            ours = kept.get(key)
            if ours is None:
                ours = kept[key] = _table_prices(resolved, normalize_label(provider), normalize_label(model))
            if not ours and not (status == 'priced' and _missed_by_caller(fields)):
                out.append(_callers_cost(fields, cost, status))
                continue
            out.append(price_fields(fields, resolved))
            continue
        created = fields.get('created_at')
        priced = None
        if (
            model
            and type(created) is datetime
            and created.tzinfo is not None
            and fields.get('units') is None
            and not fields.get('details')
        ):
            metadata = fields.get('metadata')
            context = stored_price_context(metadata) if metadata else None
            day = created.date() if created.tzinfo is UTC else created.astimezone(UTC).date()
            plan_key = (provider, model, tier, tuple(sorted(context.items())) if context else (), day)
            try:
                compiled = plans[plan_key]
            except KeyError:
                compiled = plans[plan_key] = _plain_plan(
                    resolved,
                    normalize_label(provider),
                    normalize_label(model),
                    created,
                    price_context(normalize_service_tier(tier), context),
                )
            if compiled is not None:
                priced = _plain_price(compiled, fields, resolved.resolve_provider(provider), model)
        out.append(priced if priced is not None else price_fields(fields, resolved))
    return out


_LABEL_TYPES = frozenset({str, type(None)})


def _plain_plan(
    table: PriceTable, provider: str | None, model: str | None, when: datetime, context: Mapping[str, str] | None
) -> _Compiled | None:
    """The compiled genai-prices price every plain row of this model, day and price context is priced with, if exact."""
    if model is None:
        return None
    resolved = table.resolve_provider(provider)
    if table.token_price(resolved, model) is not None:
        return None
    found = _find_model(resolved, model)
    if found is None:
        return None
    compiled = _compiled(found, when, context)
    return compiled if compiled.exact else None


_get_buckets = cast('Callable[[Mapping[str, Any]], tuple[Any, ...]]', operator.itemgetter(*TOKEN_BUCKETS))
_INT = frozenset({int})


def _plain_values(fields: Mapping[str, Any]) -> dict[str, int] | None:
    """`price_values(TokenCounts.from_columns(fields))` for a validated row with no `details`, or None.

    The same keys in the same order, without building the `TokenCounts` (`tests/test_pricing.py` compares).
    """
    try:
        buckets = _get_buckets(fields)
    except KeyError:
        return None
    if not _INT.issuperset(map(type, buckets)):
        return None
    inp, cache_read, cache_write, inp_audio, out, reasoning, out_audio, out_image = buckets
    values: dict[str, int] = {}
    if total_input := inp + cache_read + cache_write + inp_audio:
        values['input_tokens'] = total_input
    if cache_read:
        values['cache_read_tokens'] = cache_read
    if cache_write:
        values['cache_write_tokens'] = cache_write
    if inp_audio:
        values['input_audio_tokens'] = inp_audio
    if total_output := out + reasoning + out_audio + out_image:
        values['output_tokens'] = total_output
    if reasoning:
        values['output_reasoning_tokens'] = reasoning
    if out_audio:
        values['output_audio_tokens'] = out_audio
    if out_image:
        values['output_image_tokens'] = out_image
    if inp_audio and cache_read:
        values['cache_audio_read_tokens'] = 0
    return values


def _plain_price(compiled: _Compiled, fields: Mapping[str, Any], provider: str | None, model: str) -> Priced | None:
    """`price_usage`'s result for a row of plain token counts priced by `compiled`, or None to let it decide."""
    values = _plain_values(fields)
    if values is None:
        return None
    for key, value in values.items():
        if value and not compiled.covers(key):
            return None
    total = _fast_total(compiled, values)
    if total is None:
        return None
    return _checked(total, 'priced', GENAI_PRICES_SOURCE, provider, model)


def _missed_by_caller(fields: Mapping[str, Any]) -> bool:
    """Whether pydantic-ai's cost left out a billable quantity it keeps only in `details` (web search requests)."""
    source = fields.get('price_source')
    details = fields.get('details')
    if not details or not isinstance(source, str) or not source.startswith(_CALLER_PRICED_PREFIX):
        return False
    return any(details.get(alias) and not details.get(key) for alias, key in DETAIL_ALIASES.items())


def _units(value: Any) -> Decimal | None:
    if value is None or isinstance(value, Decimal):
        return value
    return Decimal(str(value))


# --- what `pai-usage prices MODEL` shows ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectivePrice:
    """What `pai-usage prices MODEL` shows: the price that applies to a model and where it comes from."""

    provider: str | None
    """Provider the price belongs to (as genai-prices names it, when it found the model)."""
    model: str
    """The model asked about."""
    source: Literal['config', 'genai-prices', 'none']
    """Where the token prices come from; `config` also when only unit prices are known."""
    token_prices: dict[str, Decimal] = field(default_factory=dict[str, Decimal])
    """USD per million tokens (or per unit, for genai-prices' other keys), by price key; the base tier when tiered."""
    unit_prices: dict[str, Decimal] = field(default_factory=dict[str, Decimal])
    """USD per unit, by unit type, from our table, for this provider and model."""
    token_tiers: dict[str, tuple[tuple[int, Decimal], ...]] = field(
        default_factory=dict[str, tuple[tuple[int, Decimal], ...]]
    )
    """Tiered token prices: `(input tokens from which it applies, USD per million)` above the base tier."""
    price_source: str | None = None
    """The `price_source` rows priced this way get: `genai-prices 0.2.3`, `config: ...`, or None."""


def effective_price(
    model: str, provider: str | None = None, *, at: datetime | None = None, table: PriceTable | None = None
) -> EffectivePrice:
    """The price that applies to `model` now (or at `at`), from our table or genai-prices.

    Unit prices are those that `price_usage` would use for the same provider: without a provider (given,
    or found by genai-prices), only unit prices naming the model itself apply, not provider-wide ones.
    """
    table = table or get_price_table()
    provider = table.resolve_provider(provider)
    found: _Found | None
    try:
        found = genai_prices.data_snapshot.get_snapshot().find_provider_model(
            model, provider=None, provider_id=provider, provider_api_url=None
        )
    except LookupError:
        found = None
    resolved = provider or (found[0].id if found is not None else None)
    units = {p.unit_type: p.usd_per_unit for p in reversed(table.units) if _unit_applies(p, resolved, model)}

    override = table.token_price(resolved, model)
    if override is not None:
        tokens = {
            k: v
            for k, v in {
                'input_mtok': override.input_mtok,
                'output_mtok': override.output_mtok,
                'cache_read_mtok': override.cache_read_mtok,
                'cache_write_mtok': override.cache_write_mtok,
                'output_image_mtok': override.output_image_mtok,
            }.items()
            if v is not None
        }
        source = f'{CONFIG_SOURCE}: tokens {override.provider}/{override.model}'
        return EffectivePrice(resolved, model, 'config', tokens, units, price_source=source)
    if found is None:
        source = 'config' if units else 'none'
        return EffectivePrice(resolved, model, source, {}, units, price_source=CONFIG_SOURCE if units else None)
    model_price = found[1].get_prices(at or datetime.now(UTC))
    tokens, tiers = _price_fields(model_price)
    return EffectivePrice(found[0].id, model, 'genai-prices', tokens, units, tiers, GENAI_PRICES_SOURCE)


def _unit_applies(price: UnitPrice, provider: str | None, model: str) -> bool:
    if not fnmatchcase(model, price.model):
        return False
    if provider is None:
        # Unknown provider: a catch-all model pattern would claim every model.
        return price.model != '*'
    return fnmatchcase(provider, price.provider)


def _price_fields(model_price: ModelPrice) -> tuple[dict[str, Decimal], dict[str, tuple[tuple[int, Decimal], ...]]]:
    prices: dict[str, Decimal] = {}
    tiers: dict[str, tuple[tuple[int, Decimal], ...]] = {}
    for name, value in vars(model_price).items():
        if name.startswith('_'):
            continue
        if isinstance(value, Decimal):
            prices[name] = value
        elif isinstance(value, TieredPrices):
            prices[name] = value.base
            tiers[name] = tuple((tier.start, tier.price) for tier in value.tiers)
    return prices, tiers
