"""Reprice: recompute stored costs from stored usage with the current price tables, audited.

Prices get corrected (genai-prices ships fixes, a contract changes). `reprice()` reads the rows of a time range,
prices each one again exactly as the writer would now (`pricing.price_fields`, ignoring the stored cost), and
reports the difference per provider and model. Only with `apply=True` does it update the rows, recording the
old and new cost, status and `price_source` of every changed row in `token_usage_reprice`. On PostgreSQL the
daily rollup's UPDATE triggers keep summaries equal to the raw table.

Rows with nothing billable stored (zero-cost error markers, rows whose response carried no usage) and rows
without a model (a run's unattributed remainder) keep their cost: there is nothing to price them from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa

from .pricing import CONFIG_SOURCE, UNPRICED_SOURCE, PriceTable, genai_prices_total, price_fields
from .record import label_filter
from .table import COST_SCALE, REPRICE_AUDIT, TOKEN_USAGE, TokenUsageReprice
from .usage import TOKEN_BUCKETS

__all__ = ('REPRICE_AUDIT', 'RepriceGroup', 'RepriceResult', 'TokenUsageReprice', 'format_reprice', 'reprice')

_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
_BATCH = 1000


@dataclass(kw_only=True)
class RepriceGroup:
    """The difference for one provider and model."""

    provider: str | None
    """Provider id of the rows."""
    model: str | None
    """Model of the rows."""
    rows: int = 0
    """Rows looked at."""
    changed: int = 0
    """Rows whose cost, status or `price_source` changes."""
    old_total: Decimal = Decimal(0)
    """Sum of the stored costs (unpriced rows count 0)."""
    new_total: Decimal = Decimal(0)
    """Sum of the recomputed costs (unpriced rows count 0)."""
    old_unpriced: int = 0
    """Rows stored unpriced."""
    new_unpriced: int = 0
    """Rows unpriced after repricing."""


@dataclass
class RepriceResult:
    """What `reprice` found, and whether it applied it."""

    groups: list[RepriceGroup] = field(default_factory=list[RepriceGroup])
    """Per provider and model, largest difference first."""
    _: KW_ONLY
    applied: bool = False
    """Whether the changed rows were updated (and audited)."""
    repriced_at: datetime | None = None
    """The audit timestamp of the run, when applied."""

    @property
    def rows(self) -> int:
        """Rows looked at."""
        return sum(g.rows for g in self.groups)

    @property
    def changed(self) -> int:
        """Rows whose price changes."""
        return sum(g.changed for g in self.groups)


def _quantized(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def _rows(
    conn: sa.Connection, since: datetime, until: datetime | None, organization_id: str | None, model: str | None
) -> Iterator[dict[str, Any]]:
    query = sa.select(TOKEN_USAGE).where(TOKEN_USAGE.c.created_at >= since).order_by(TOKEN_USAGE.c.created_at)
    if until is not None:
        query = query.where(TOKEN_USAGE.c.created_at < until)
    if (organization_id := label_filter(organization_id, 'organization_id')) is not None:
        query = query.where(TOKEN_USAGE.c.organization_id == organization_id)
    if (model := label_filter(model, 'model')) is not None:
        query = query.where(TOKEN_USAGE.c.model == model)
    for row in conn.execution_options(yield_per=_BATCH).execute(query).mappings():
        yield dict(row)


# What `price_source` says of a cost pai-usage or pydantic-ai computed; any other priced row's cost was given.
_PYDANTIC_AI = 'pydantic-ai'
_OUR_SOURCES = ('genai-prices', _PYDANTIC_AI, f'{CONFIG_SOURCE}:', f'{UNPRICED_SOURCE}:')


def _pydantic_ai_priced(row: dict[str, Any], table: PriceTable | None) -> bool:
    """Whether the writer kept this row's cost from pydantic-ai, and would keep it now."""
    if row['cost_usd'] is None or not (row['price_source'] or '').startswith(_PYDANTIC_AI):
        return False
    kept = price_fields({**row, 'pricing_status': 'priced'}, table)
    return kept.price_source == row['price_source']


def _pydantic_ai_source() -> str:
    from .capability import PYDANTIC_AI_PRICE_SOURCE  # imports pydantic-ai: only when such a row is repriced

    return PYDANTIC_AI_PRICE_SOURCE


def _repriceable(row: dict[str, Any]) -> bool:
    if row['model'] is None:
        return False
    if row['cost_usd'] is not None and not (row['price_source'] or '').startswith(_OUR_SOURCES):
        # A cost the caller passed as `cost_usd` (a negotiated rate, a bill): kept as given, as when it was tracked.
        return False
    return any(row[name] for name in TOKEN_BUCKETS) or bool(row['details']) or bool(row['units'])


def reprice(
    engine: sa.Engine,
    *,
    since: datetime,
    until: datetime | None = None,
    organization_id: str | None = None,
    model: str | None = None,
    apply: bool = False,
    table: PriceTable | None = None,
) -> RepriceResult:
    """Recompute the costs of the rows created in `[since, until)` with `table` (None: the process-wide table).

    Returns the difference per provider and model. With `apply`, changed rows are updated in one transaction
    and each change is recorded in `token_usage_reprice` with the old and new cost, status and source.
    """
    groups: dict[tuple[str | None, str | None], RepriceGroup] = {}
    changes: list[tuple[dict[str, Any], Decimal | None, str, str | None]] = []
    with engine.connect() as conn:
        for row in _rows(conn, since, until, organization_id, model):
            key = (row['provider'], row['model'])
            group = groups.get(key)
            if group is None:
                group = groups[key] = RepriceGroup(provider=key[0], model=key[1])
            group.rows += 1
            old_cost = row['cost_usd']
            group.old_total += old_cost or 0
            group.old_unpriced += row['pricing_status'] == 'unpriced'
            if not _repriceable(row):
                group.new_total += old_cost or 0
                group.new_unpriced += row['pricing_status'] == 'unpriced'
                continue
            fields = {**row, 'cost_usd': None, 'pricing_status': None, 'price_source': None}
            priced = price_fields(fields, table)
            if priced.pricing_status == 'unpriced' and _pydantic_ai_priced(row, table):
                # The writer kept pydantic-ai's cost, where a quantity without a price counts nothing: priced
                # again as pydantic-ai would price it now, not made unpriced by our stricter rule.
                priced = genai_prices_total(fields, _pydantic_ai_source()) or priced
            new_cost = _quantized(priced.cost_usd)
            group.new_total += new_cost or 0
            group.new_unpriced += priced.pricing_status == 'unpriced'
            # A new `price_source` alone (another genai-prices version, same cost) is not a change to write.
            if (new_cost, priced.pricing_status) != (old_cost, row['pricing_status']):
                group.changed += 1
                changes.append((row, new_cost, priced.pricing_status, priced.price_source))
    result = RepriceResult(
        sorted(groups.values(), key=lambda g: (-abs(g.new_total - g.old_total), str(g.provider), str(g.model)))
    )
    if apply and changes:
        result.repriced_at = datetime.now(UTC)
        _apply(engine, changes, result.repriced_at)
    result.applied = apply
    return result


def _apply(
    engine: sa.Engine, changes: Sequence[tuple[dict[str, Any], Decimal | None, str, str | None]], when: datetime
) -> None:
    update = (
        TOKEN_USAGE.update()
        .where(TOKEN_USAGE.c.id == sa.bindparam('row_id'))
        .values(
            cost_usd=sa.bindparam('new_cost'),
            pricing_status=sa.bindparam('new_status'),
            price_source=sa.bindparam('new_source'),
        )
    )
    with engine.begin() as conn:
        for start in range(0, len(changes), _BATCH):
            chunk = changes[start : start + _BATCH]
            conn.execute(
                update,
                [
                    {'row_id': row['id'], 'new_cost': cost, 'new_status': status, 'new_source': source}
                    for row, cost, status, source in chunk
                ],
            )
            conn.execute(
                REPRICE_AUDIT.insert(),
                [
                    {
                        'usage_id': row['id'],
                        'repriced_at': when,
                        'old_cost_usd': row['cost_usd'],
                        'old_pricing_status': row['pricing_status'],
                        'old_price_source': row['price_source'],
                        'new_cost_usd': cost,
                        'new_pricing_status': status,
                        'new_price_source': source,
                    }
                    for row, cost, status, source in chunk
                ],
            )


def format_reprice(result: RepriceResult) -> str:
    """The per-model difference as a plain-text table, with what was (or would be) done."""
    lines = [f'{"provider/model":<48} {"rows":>8} {"changed":>8} {"old total":>16} {"new total":>16} {"diff":>16}']
    for g in result.groups:
        name = f'{g.provider or "-"}/{g.model or "-"}'
        diff = g.new_total - g.old_total
        unpriced = f'  unpriced {g.old_unpriced} -> {g.new_unpriced}' if g.old_unpriced != g.new_unpriced else ''
        lines.append(
            f'{name:<48} {g.rows:>8} {g.changed:>8} {_usd(g.old_total):>16} {_usd(g.new_total):>16} '
            f'{_usd(diff, sign=True):>16}{unpriced}'
        )
    old = sum((g.old_total for g in result.groups), Decimal(0))
    new = sum((g.new_total for g in result.groups), Decimal(0))
    lines.append(
        f'{"total":<48} {result.rows:>8} {result.changed:>8} {_usd(old):>16} {_usd(new):>16} '
        f'{_usd(new - old, sign=True):>16}'
    )
    if result.applied:
        lines.append(f'applied: {result.changed} rows updated, old costs kept in token_usage_reprice')
    else:
        lines.append('dry run: nothing changed; run again with --apply to update the rows')
    return '\n'.join(lines)


def _usd(value: Decimal, *, sign: bool = False) -> str:
    text = format(value.quantize(Decimal('0.000001'), rounding=ROUND_HALF_EVEN), 'f')
    return f'+{text}' if sign and value > 0 else text
