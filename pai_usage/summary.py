"""Summaries of the ledger: totals and per-group rows over a time range, computed in SQL."""

from __future__ import annotations

import gc
import operator
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field, fields
from datetime import UTC, datetime
from decimal import MAX_PREC, ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from itertools import repeat
from typing import Any, Literal, TypeVar, get_args

import sqlalchemy as sa

from ._locks import sqlite_gate
from .record import label_filter
from .table import TOKEN_USAGE as _t
from .table import cost_sum
from .usage import TOKEN_BUCKETS

__all__ = (
    'GROUP_BY_DIMENSIONS',
    'GroupBy',
    'SummaryRow',
    'UsageSummary',
    'UsageTotals',
    'month_bounds',
    'query_summary',
)

GroupBy = Literal['organization', 'user', 'agent', 'provider', 'model', 'operation', 'source', 'status', 'day', 'month']
"""A dimension summaries can be grouped by: `agent` is the agent's name, `source` `agent` or `direct`, `status`
`ok` or `error`; `day` and `month` are UTC calendar periods."""
GROUP_BY_DIMENSIONS: tuple[GroupBy, ...] = get_args(GroupBy)

_T = TypeVar('_T')

_COLUMNS: dict[str, str] = {'organization': 'organization_id', 'user': 'user_id', 'agent': 'agent_name'}
_RAW_ONLY: frozenset[str] = frozenset({'agent', 'status'})
"""Dimensions the daily rollup does not keep: a summary by one of them reads the raw table."""


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Sums over a set of events. Token fields are the ledger's non-overlapping buckets."""

    _: KW_ONLY
    events: int = 0
    """Number of events (rows)."""
    cost_usd: Decimal = Decimal(0)
    """Sum of known costs, exact."""
    unpriced_events: int = 0
    """Events whose cost is unknown: not included in `cost_usd`."""
    error_events: int = 0
    """Events with `status = 'error'`."""
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Every token once."""
        return sum(getattr(self, name) for name in TOKEN_BUCKETS)

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(UsageTotals)})


@dataclass(frozen=True, slots=True)
class SummaryRow:
    """One group of a summary."""

    group: dict[str, str | None]
    """The group's value for each `group_by` dimension (None where the column is NULL)."""
    totals: UsageTotals
    """Sums over the group."""


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """Usage between `start` (inclusive) and `end` (exclusive), optionally for one org or user."""

    _: KW_ONLY
    start: datetime
    end: datetime
    organization_id: str | None = None
    user_id: str | None = None
    group_by: tuple[GroupBy, ...] = ()
    totals: UsageTotals = field(default_factory=UsageTotals)
    """Sums over every row."""
    rows: list[SummaryRow] = field(default_factory=list[SummaryRow])
    """One row per group, ordered by the group values."""

    @property
    def total_cost_usd(self) -> Decimal:
        """Total known cost."""
        return self.totals.cost_usd


def month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month containing `moment`, as `[start, end)`."""
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _dimension(name: GroupBy, dialect: str) -> sa.ColumnElement[Any]:
    if name in ('day', 'month'):
        if dialect == 'postgresql':
            fmt = 'YYYY-MM-DD' if name == 'day' else 'YYYY-MM'
            return sa.func.to_char(sa.func.timezone('UTC', _t.c.created_at), fmt).label(name)
        return sa.func.strftime('%Y-%m-%d' if name == 'day' else '%Y-%m', _t.c.created_at).label(name)
    return _t.c[_COLUMNS.get(name, name)].label(name)


def query_summary(
    engine: sa.Engine,
    start: datetime,
    end: datetime,
    *,
    organization_id: str | None = None,
    user_id: str | None = None,
    group_by: Sequence[GroupBy] = ('model',),
) -> UsageSummary:
    """Sum the ledger over `[start, end)`, grouped by `group_by`. All values are bound parameters.

    Ids are matched as the ledger stores them (`normalize_label`). Raises `ValueError` for an unknown dimension,
    naive datetimes or a blank id.
    """
    group_by = tuple(dict.fromkeys(group_by))
    unknown = [g for g in group_by if g not in GROUP_BY_DIMENSIONS]
    if unknown:
        raise ValueError(f'cannot group by {unknown!r}; choose from {", ".join(GROUP_BY_DIMENSIONS)}')
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError('start and end must be timezone-aware')
    # As the ledger stores ids: a lookup by the id the app passed to `track()` finds its rows.
    organization_id = label_filter(organization_id, 'organization_id')
    user_id = label_filter(user_id, 'user_id')
    from .rollup import rollup_summary  # here, not at the top: `rollup` imports this module

    fast = (
        None
        if _RAW_ONLY.intersection(group_by)
        else rollup_summary(engine, start, end, organization_id=organization_id, user_id=user_id, group_by=group_by)
    )
    if fast is not None:
        return fast
    dims = [_dimension(g, engine.dialect.name) for g in group_by]
    # In `_MEASURES` order. Counts come back as integers (a bigint sum is a numeric on PostgreSQL).
    measures = [
        sa.func.count(),
        cost_sum(),
        sa.cast(sa.func.sum(sa.case((_t.c.cost_usd.is_(None), 1), else_=0)), sa.BigInteger),
        sa.cast(sa.func.sum(sa.case((_t.c.status == 'error', 1), else_=0)), sa.BigInteger),
        *(sa.cast(sa.func.sum(_t.c[name]), sa.BigInteger) for name in TOKEN_BUCKETS),
    ]
    stmt = sa.select(*dims, *measures).where(_t.c.created_at >= start, _t.c.created_at < end)
    if organization_id is not None:
        stmt = stmt.where(_t.c.organization_id == organization_id)
    if user_id is not None:
        stmt = stmt.where(_t.c.user_id == user_id)
    if dims:
        stmt = stmt.group_by(*dims).order_by(*dims)
    # The gate: summaries run in worker threads too (`aget_usage_summary`, budgets), and a fork must wait for them.
    with sqlite_gate(engine.dialect.name), engine.connect() as conn, _gc_paused():
        return _summary_of(
            conn.execute(stmt).all(),
            start=start,
            end=end,
            organization_id=organization_id,
            user_id=user_id,
            group_by=group_by,
        )


_MEASURES: tuple[str, ...] = ('events', 'cost_usd', 'unpriced_events', 'error_events', *TOKEN_BUCKETS)
"""The `UsageTotals` fields, in the order aggregate queries select them after their `group_by` columns."""


def _summary_of(
    results: Iterable[Sequence[Any]],
    *,
    start: datetime,
    end: datetime,
    organization_id: str | None,
    user_id: str | None,
    group_by: tuple[GroupBy, ...],
    merge_adjacent: bool = False,
) -> UsageSummary:
    """The summary of aggregate rows: a column per `group_by` dimension, then one per `_MEASURES` field.

    Shared with `rollup_summary`, so that the raw table and the rollup turn sums into totals the same way. With
    `merge_adjacent`, `results` are not yet summed per group but ordered by it (a rollup level's own rows), and
    consecutive rows of one group are added up here.

    Kept lean: a month of all organizations by organization and model is ~10k groups, and building their objects
    was most of that summary's time. Hence it works on columns, with `map` calling positional constructors that set
    slots directly (`_slot_constructor`), and no Python loop over rows. The callers pause the cyclic garbage
    collector around the fetch and this (`_gc_paused`).
    """
    k = len(group_by)
    rows: list[SummaryRow] = []
    totals = UsageTotals()
    with localcontext(_EXACT):
        # An ungrouped aggregate over no rows still returns one row, of zero events.
        kept = [result for result in results if result[k]]
        columns, keys = _columns(kept, k)
        if merge_adjacent and any(map(operator.eq, keys, keys[1:])):
            columns, keys = _columns(_merged(kept, k), k)
        if keys:
            sums = columns[k:]
            # The cost of a group whose every event is unpriced. By identity: `Decimal == None` checks ABCs.
            if any(map(operator.is_, sums[1], repeat(None))):
                sums[1] = [_ZERO if cost is None else cost for cost in sums[1]]
            # Counts are integers and the cost a Decimal: no conversions.
            groups = map(dict, map(zip, repeat(group_by), keys))
            rows = list(map(_new_summary_row, groups, map(_new_totals, *sums)))
            totals = _new_totals(sum(sums[0]), sum(sums[1], _ZERO), *map(sum, sums[2:]))
    return UsageSummary(
        start=start,
        end=end,
        organization_id=organization_id,
        user_id=user_id,
        group_by=group_by,
        totals=totals,
        rows=rows,
    )


_ZERO = Decimal(0)
_EXACT = Context(prec=MAX_PREC, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation])
"""Decimal sums in Python never round: the default context keeps 28 digits, a `numeric(38, 12)` has up to 38."""


def _slot_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A positional constructor of the frozen slots dataclass `cls`, its fields in order; `__init__` not run.

    A frozen dataclass's `__init__` sets each field with `object.__setattr__(self, name, value)`, looking the
    slot up by name; calling each slot's descriptor directly builds a `UsageTotals` 2.5 times as fast. What is
    skipped is only that lookup: these classes have no `__post_init__`, and every field is given.
    """
    if hasattr(cls, '__post_init__'):
        raise TypeError(f'{cls.__name__} has a `__post_init__`, which this constructor would skip')
    names = [f.name for f in fields(cls)]  # pyright: ignore[reportArgumentType]
    namespace: dict[str, Any] = {f'_set_{name}': getattr(cls, name).__set__ for name in names}
    namespace.update(_new=object.__new__, _cls=cls)
    body = ''.join(f'    _set_{name}(self, {name})\n' for name in names)
    exec(f'def new({", ".join(names)}):\n    self = _new(_cls)\n{body}    return self\n', namespace)
    return namespace['new']


_new_totals = _slot_constructor(UsageTotals)
_new_summary_row = _slot_constructor(SummaryRow)


def _columns(results: list[Sequence[Any]], k: int) -> tuple[list[Sequence[Any]], list[tuple[Any, ...]]]:
    """The columns of `results`, and each row's first `k` values (its group)."""
    columns: list[Sequence[Any]] = list(zip(*results, strict=True))
    return columns, list(zip(*columns[:k], strict=True)) if k else [()] * len(results)


def _merged(results: Iterable[Sequence[Any]], k: int) -> list[Sequence[Any]]:
    """`results` ordered by their first `k` columns, consecutive rows with the same first `k` values added up."""
    merged: list[Sequence[Any]] = []
    previous: Sequence[Any] = ()
    for result in results:
        if merged and result[:k] == previous:
            last = merged[-1]
            merged[-1] = (*previous, *(a + b for a, b in zip(last[k:], result[k:], strict=True)))
        else:
            merged.append(result)
            previous = result[:k]
    return merged


@contextmanager
def _gc_paused() -> Generator[None]:
    """Pause the cyclic garbage collector while fetching and building a summary's objects.

    They hold no reference cycles, so a collection cannot free any of them; but the tens of thousands of objects
    of a large summary (fetched rows, then groups and totals) trigger collections, and one of the oldest generation
    traverses every object of the process: it doubled the time of a 10k-group summary, more in a process that holds
    earlier ones. Reference counting frees everything as usual, and cycles made meanwhile by anything else are
    collected once it resumes. Left as found when the collector was already disabled (by the application, or by a
    concurrent summary).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
