"""Costs: genai-prices for tokens, plus a small configurable table for what it lacks.

Token costs come from genai-prices, priced per request at the request's timestamp, so tiered and
historic prices are right. `PriceTable` adds per-unit prices (images, video seconds, characters) and
lets users override any model's token prices. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, cast

import genai_prices

from ._log import RateLimitedLog
from ._warnings import UnpricedModelWarning, warn_later
from .record import MAX_COST_USD, PricingStatus
from .usage import TokenCounts

__all__ = (
    'CONFIG_SOURCE',
    'DEFAULT_UNIT_PRICES',
    'GENAI_PRICES_SOURCE',
    'PRICES_ENV_VAR',
    'EffectivePrice',
    'PriceTable',
    'Priced',
    'TokenPrice',
    'UnitPrice',
    'effective_price',
    'get_price_table',
    'price_usage',
    'set_price_table',
)

GENAI_PRICES_SOURCE = f'genai-prices {genai_prices.__version__}'
"""`price_source` of rows priced by genai-prices."""
CONFIG_SOURCE = 'config'
"""`price_source` of rows priced by the `PriceTable`."""
PRICES_ENV_VAR = 'PAI_USAGE_PRICES'
"""Environment variable naming a TOML or JSON price file that replaces the default table."""

_log = RateLimitedLog()
_MTOK = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """A price per non-token unit, for models genai-prices does not cover."""

    model: str
    """Model name, or a glob pattern such as `imagen-*`."""
    unit_type: str
    """The unit priced: `image`, `video_second`, `character`, ..."""
    usd_per_unit: Decimal
    """USD for one unit."""
    _: KW_ONLY
    provider: str = '*'
    """Provider id or glob pattern (`google*` matches `google-gla` and `google-vertex`)."""

    def matches(self, provider: str | None, model: str | None, unit_type: str | None) -> bool:
        """Whether this price applies to the call."""
        return (
            unit_type == self.unit_type
            and fnmatchcase(model or '', self.model)
            and fnmatchcase(provider or '', self.provider)
        )


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per million tokens for one model, overriding genai-prices."""

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
        return fnmatchcase(model or '', self.model) and fnmatchcase(provider or '', self.provider)

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


DEFAULT_UNIT_PRICES: tuple[UnitPrice, ...] = (
    UnitPrice('imagen-*', 'image', Decimal('0.02'), provider='google*'),
    UnitPrice('veo-*', 'video_second', Decimal('0.05'), provider='google*'),
    UnitPrice('*', 'character', Decimal('0.00003'), provider='elevenlabs'),
)
"""Defaults, not truth: check them against your contracts and override them in a price file."""


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Our own prices: per-unit prices and token-price overrides. The first matching entry wins."""

    units: tuple[UnitPrice, ...] = DEFAULT_UNIT_PRICES
    """Per-unit prices."""
    tokens: tuple[TokenPrice, ...] = ()
    """Token-price overrides; they win over genai-prices."""

    def unit_price(self, provider: str | None, model: str | None, unit_type: str | None) -> UnitPrice | None:
        """The unit price for the call, if any."""
        return next((p for p in self.units if p.matches(provider, model, unit_type)), None)

    def token_price(self, provider: str | None, model: str | None) -> TokenPrice | None:
        """The token-price override for the model, if any."""
        return next((p for p in self.tokens if p.matches(provider, model)), None)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, include_defaults: bool = True) -> PriceTable:
        """Build a table from parsed TOML/JSON: `[[units]]` and `[[tokens]]` arrays of tables.

        Entries from the file come first, so they override the defaults for the same model and unit.
        Raises `ValueError` naming the bad entry.
        """
        unknown = set(data) - {'units', 'tokens'}
        if unknown:
            raise ValueError(f'unknown price table keys: {sorted(unknown)!r}; expected `units` and `tokens`')
        units = tuple(_build(UnitPrice, entry, 'units', i) for i, entry in enumerate(_entries(data, 'units')))
        tokens = tuple(_build(TokenPrice, entry, 'tokens', i) for i, entry in enumerate(_entries(data, 'tokens')))
        if include_defaults:
            units += DEFAULT_UNIT_PRICES
        return cls(units=units, tokens=tokens)

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


def _build(kind: type[UnitPrice] | type[TokenPrice], entry: Any, key: str, index: int) -> Any:
    if not isinstance(entry, Mapping):
        raise ValueError(f'bad entry `{key}[{index}]` {entry!r}: expected a table')
    entry = cast(Mapping[str, Any], entry)
    try:
        for name in ('model', 'unit_type', 'provider'):
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
    """Where the price came from."""


def price_usage(
    *,
    provider: str | None,
    model: str | None,
    tokens: TokenCounts,
    units: Decimal | None = None,
    unit_type: str | None = None,
    timestamp: datetime | None = None,
    table: PriceTable | None = None,
) -> Priced:
    """Price one request. Never raises: an unknown model gives `Priced(None, 'unpriced', None)`.

    Tokens are priced by a `TokenPrice` override if one matches, else by genai-prices at `timestamp`;
    units by the table's `UnitPrice`. A call whose tokens or units have no price is unpriced as a whole,
    never partly priced or zero.
    """
    if table is None:
        try:
            table = get_price_table()
        except ValueError as exc:
            # A broken price file must not break the caller, nor price with a table the user did not mean.
            _log.error('price-table', 'pai-usage: %s; usage is recorded unpriced until it is fixed', exc)
            return Priced(None, 'unpriced', None)
    overridden = False
    parts: list[Decimal] = []
    sources: list[str] = []

    if units is not None and unit_type is not None:
        unit_price = table.unit_price(provider, model, unit_type)
        if unit_price is not None:
            parts.append(units * unit_price.usd_per_unit)
            sources.append(CONFIG_SOURCE)
            overridden = True
        elif not tokens.total_tokens:
            _warn_unpriced(provider, model, unit_type)
            return Priced(None, 'unpriced', None)

    if tokens.total_tokens or not parts:
        override = table.token_price(provider, model)
        if override is not None:
            parts.append(override.cost(tokens))
            sources.append(CONFIG_SOURCE)
            overridden = True
        else:
            token_cost = _genai_prices_cost(provider, model, tokens, timestamp)
            if token_cost is None:
                return Priced(None, 'unpriced', None)
            parts.append(token_cost)
            sources.append(GENAI_PRICES_SOURCE)

    source = ' + '.join(dict.fromkeys(sources))
    total = sum(parts, Decimal(0))
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
        return Priced(None, 'unpriced', None)
    return Priced(total, 'override' if overridden else 'priced', source)


def _genai_prices_cost(
    provider: str | None, model: str | None, tokens: TokenCounts, timestamp: datetime | None
) -> Decimal | None:
    if not model:
        _warn_unpriced(provider, model, None)
        return None
    snapshot = genai_prices.data_snapshot.get_snapshot()
    found = _find_model(snapshot, provider, model)
    if found is None:
        _warn_unpriced(provider, model, None)
        return None
    provider_info, model_info = found
    try:
        # What `genai_prices.calc_price` does once it has found the model, per request (tiers, history).
        return model_info.calc_price(
            tokens.to_price_usage(),
            provider_info,
            genai_request_timestamp=timestamp or datetime.now(UTC),
            auto_update_timestamp=snapshot.timestamp if snapshot.from_auto_update else None,
        ).total_price
    except LookupError:
        _warn_unpriced(provider, model, None)
    except ValueError as exc:
        _log.warning(f'inconsistent:{provider}:{model}', 'pai-usage: cannot price %s/%s: %s', provider, model, exc)
    return None


_Found = tuple[genai_prices.types.Provider, genai_prices.types.ModelInfo]
_MAX_CACHED_MODELS = 4096
_found: dict[tuple[str | None, str], _Found | None] = {}
_found_in: list[genai_prices.data_snapshot.DataSnapshot | None] = [None]


def _find_model(snapshot: genai_prices.data_snapshot.DataSnapshot, provider: str | None, model: str) -> _Found | None:
    """The genai-prices provider and model for a call, or None; cached per snapshot, unknown models included.

    genai-prices caches the models it finds, but not a miss: an unknown model, or a model named with a provider
    id it does not know the model under, would be matched against every pattern of the provider on each call.
    """
    if _found_in[0] is not snapshot:  # new price data (`UpdatePrices`, `set_custom_snapshot`): look again
        _found.clear()
        _found_in[0] = snapshot
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
        if provider is not None:
            # genai-prices may know the model under another provider id (e.g. a reseller's name).
            try:
                found = snapshot.find_provider_model(model, None, None, None)
            except LookupError:
                pass
    if len(_found) >= _MAX_CACHED_MODELS:  # arbitrary model names must not grow memory without bound
        _found.clear()
    _found[key] = found
    return found


def _warn_unpriced(provider: str | None, model: str | None, unit_type: str | None) -> None:
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
    """USD per million tokens, by kind (`input_mtok`, `output_mtok`, ...); the base tier when tiered."""
    unit_prices: dict[str, Decimal] = field(default_factory=dict[str, Decimal])
    """USD per unit, by unit type, from our table, for this provider and model."""
    token_tiers: dict[str, tuple[tuple[int, Decimal], ...]] = field(
        default_factory=dict[str, tuple[tuple[int, Decimal], ...]]
    )
    """Tiered token prices: `(input tokens from which it applies, USD per million)` above the base tier."""
    price_source: str | None = None
    """The `price_source` rows priced this way get: `genai-prices 0.2.3`, `config`, or None."""


def effective_price(
    model: str, provider: str | None = None, *, at: datetime | None = None, table: PriceTable | None = None
) -> EffectivePrice:
    """The price that applies to `model` now (or at `at`), from our table or genai-prices.

    Unit prices are those that `price_usage` would use for the same provider: without a provider (given,
    or found by genai-prices), only unit prices naming the model itself apply, not provider-wide ones.
    """
    table = table or get_price_table()
    try:
        found_provider, info = genai_prices.data_snapshot.get_snapshot().find_provider_model(
            model, provider=None, provider_id=provider, provider_api_url=None
        )
    except LookupError:
        found_provider, info = None, None
    resolved = provider or (found_provider.id if found_provider is not None else None)
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
        return EffectivePrice(resolved, model, 'config', tokens, units, price_source=CONFIG_SOURCE)
    if info is None or found_provider is None:
        source = 'config' if units else 'none'
        return EffectivePrice(resolved, model, source, {}, units, price_source=CONFIG_SOURCE if units else None)
    model_price = info.get_prices(at or datetime.now(UTC))
    tokens, tiers = _price_fields(model_price)
    return EffectivePrice(found_provider.id, model, 'genai-prices', tokens, units, tiers, GENAI_PRICES_SOURCE)


def _unit_applies(price: UnitPrice, provider: str | None, model: str) -> bool:
    if not fnmatchcase(model, price.model):
        return False
    if provider is None:
        # Unknown provider: a catch-all model pattern (ElevenLabs' `*`) would claim every model.
        return price.model != '*'
    return fnmatchcase(provider, price.provider)


def _price_fields(model_price: object) -> tuple[dict[str, Decimal], dict[str, tuple[tuple[int, Decimal], ...]]]:
    prices: dict[str, Decimal] = {}
    tiers: dict[str, tuple[tuple[int, Decimal], ...]] = {}
    attributes = vars(model_price)
    for name, value in attributes.items():
        if not name.endswith('_mtok'):
            continue
        if isinstance(value, Decimal):
            prices[name] = value
        elif isinstance(value, genai_prices.types.TieredPrices):
            prices[name] = value.base
            tiers[name] = tuple((tier.start, tier.price) for tier in value.tiers)
    return prices, tiers
