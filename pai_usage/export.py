"""Streaming export of ledger rows as CSV or JSON lines, and a terminal bar chart of daily cost.

The logic behind `pai-usage export --since --until [--format csv|jsonl] [--focus]` and
`pai-usage summary --by day`: rows are read with a streaming cursor in `(created_at, id)` order, so an
export of millions of rows runs in constant memory.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Generator, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO
from uuid import UUID

import sqlalchemy as sa

from ._format import exact_usd, format_usd
from .record import label_filter
from .summary import UsageSummary
from .table import TOKEN_USAGE
from .usage import TOKEN_BUCKETS

__all__ = (
    'EXPORT_COLUMNS',
    'FOCUS_COLUMNS',
    'export_rows',
    'focus_row',
    'format_daily_costs',
    'write_csv',
    'write_jsonl',
)

EXPORT_COLUMNS: tuple[str, ...] = tuple(column.name for column in TOKEN_USAGE.columns)
"""The columns of an export, in table order (`metadata` as in the table)."""

FOCUS_COLUMNS: tuple[str, ...] = (
    'BilledCost',
    'EffectiveCost',
    'BillingCurrency',
    'ChargeCategory',
    'ChargePeriodStart',
    'ChargePeriodEnd',
    'ProviderName',
    'SubAccountId',
    'ConsumedQuantity',
    'ConsumedUnit',
    'x_EventId',
    'x_UserId',
    'x_Model',
    'x_Operation',
    'x_Source',
    'x_Status',
    'x_PricingStatus',
    'x_RunId',
    *(f'x_{"".join(part.title() for part in bucket.split("_"))}' for bucket in TOKEN_BUCKETS),
)
"""Columns of a FOCUS-style export: FinOps FOCUS names where one fits, `x_` custom columns for the rest."""

_Progress = Callable[[int], None]


def export_rows(
    engine: sa.Engine,
    start: datetime,
    end: datetime,
    *,
    organization_id: str | None = None,
    user_id: str | None = None,
    batch_size: int = 5000,
) -> Generator[dict[str, Any]]:
    """Yield the rows with `start <= created_at < end`, oldest first, as dicts of `EXPORT_COLUMNS`.

    Streams with a server-side cursor (PostgreSQL) in batches of `batch_size`; filters are bound parameters, ids
    matched as the ledger stores them (`normalize_label`).
    """
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError('start and end must be timezone-aware')
    organization_id = label_filter(organization_id, 'organization_id')
    user_id = label_filter(user_id, 'user_id')
    t = TOKEN_USAGE
    stmt = sa.select(t).where(t.c.created_at >= start, t.c.created_at < end).order_by(t.c.created_at, t.c.id)
    if organization_id is not None:
        stmt = stmt.where(t.c.organization_id == organization_id)
    if user_id is not None:
        stmt = stmt.where(t.c.user_id == user_id)
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=batch_size).execute(stmt)
        for row in result.mappings():
            yield dict(row)


_MONEY_COLUMNS = frozenset({'cost_usd', 'BilledCost', 'EffectiveCost'})
"""Columns written as exact money (`exact_usd`: 12 fixed places), as in `pai-usage summary --format json|csv`."""


def _text(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, Decimal):
        return f'{value.normalize():f}'
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(',', ':'))
    return str(value)


def _money(column: str, value: Any) -> Any:
    return exact_usd(value) if column in _MONEY_COLUMNS and isinstance(value, Decimal) else value


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f'{value.normalize():f}'  # a string: JSON numbers would lose exactness in most readers
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def focus_row(row: dict[str, Any]) -> dict[str, Any]:
    """One exported row under `FOCUS_COLUMNS` names. Token-only events count their tokens as `ConsumedQuantity`."""
    tokens = sum(int(row[bucket]) for bucket in TOKEN_BUCKETS)
    units = row['units']
    focus: dict[str, Any] = {
        'BilledCost': row['cost_usd'],
        'EffectiveCost': row['cost_usd'],
        'BillingCurrency': 'USD',
        'ChargeCategory': 'Usage',
        'ChargePeriodStart': row['created_at'],
        'ChargePeriodEnd': row['created_at'],
        'ProviderName': row['provider'],
        'SubAccountId': row['organization_id'],
        'ConsumedQuantity': units if units is not None else tokens,
        'ConsumedUnit': row['unit_type'] if units is not None else 'Tokens',
        'x_EventId': row['id'],
        'x_UserId': row['user_id'],
        'x_Model': row['model'],
        'x_Operation': row['operation'],
        'x_Source': row['source'],
        'x_Status': row['status'],
        'x_PricingStatus': row['pricing_status'],
        'x_RunId': row['run_id'],
    }
    for bucket, name in zip(TOKEN_BUCKETS, FOCUS_COLUMNS[-len(TOKEN_BUCKETS) :], strict=True):
        focus[name] = row[bucket]
    return focus


def write_csv(
    rows: Iterable[dict[str, Any]],
    out: TextIO,
    *,
    focus: bool = False,
    progress: _Progress | None = None,
    progress_every: int = 10_000,
) -> int:
    """Write rows as CSV (with a header) to `out`; returns how many. `progress(n)` is called every `progress_every`."""
    columns = FOCUS_COLUMNS if focus else EXPORT_COLUMNS
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(columns)
    return _write_each(
        rows,
        lambda values: writer.writerow([_text(_money(c, values[c])) for c in columns]),
        focus=focus,
        progress=progress,
        progress_every=progress_every,
    )


def write_jsonl(
    rows: Iterable[dict[str, Any]],
    out: TextIO,
    *,
    focus: bool = False,
    progress: _Progress | None = None,
    progress_every: int = 10_000,
) -> int:
    """Write rows as JSON lines to `out` (decimals as strings, times in ISO 8601 UTC); returns how many."""
    return _write_each(
        rows,
        lambda values: out.write(
            json.dumps({k: _json(_money(k, v)) for k, v in values.items()}, sort_keys=False) + '\n'
        ),
        focus=focus,
        progress=progress,
        progress_every=progress_every,
    )


def _write_each(
    rows: Iterable[dict[str, Any]],
    write: Callable[[dict[str, Any]], object],
    *,
    focus: bool,
    progress: _Progress | None,
    progress_every: int,
) -> int:
    """`write` each row (as `focus_row(row)` with `focus`), reporting progress; returns how many."""
    count = 0
    for row in rows:
        write(focus_row(row) if focus else row)
        count += 1
        if progress is not None and count % progress_every == 0:
            progress(count)
    return count


_EIGHTHS = ' ▏▎▍▌▋▊▉'


def format_daily_costs(summary: UsageSummary, *, width: int = 40) -> str:
    """A bar chart of known cost per UTC day over the summary's range, one line per day (days without use too).

    The summary must be grouped by `day` (other dimensions are added up per day).
    """
    if 'day' not in summary.group_by:
        raise ValueError("the summary must be grouped by 'day'")
    costs: dict[str, Decimal] = {}
    for row in summary.rows:
        day = row.group['day']
        if day is not None:
            costs[day] = costs.get(day, Decimal(0)) + row.totals.cost_usd
    first = summary.start.astimezone(UTC).date()
    last = (summary.end.astimezone(UTC) - timedelta(microseconds=1)).date()
    days = [str(first + timedelta(days=i)) for i in range((last - first).days + 1)] if first <= last else []
    top = max(costs.values(), default=Decimal(0))
    money = {day: format_usd(costs.get(day, Decimal(0))) for day in days}
    money_width = max(map(len, money.values()), default=0)  # right-aligned: the decimal points line up
    lines: list[str] = []
    for day in days:
        cost = costs.get(day, Decimal(0))
        eighths = int(cost / top * width * 8) if top else 0
        bar = '█' * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else '')
        lines.append(f'{day}  {bar:<{width}}  {money[day]:>{money_width}}')
    return '\n'.join(line.rstrip() for line in lines)
