"""The PostgreSQL rollups of `token_usage`, daily and monthly, and summaries read from them.

Migration `0002_daily_rollup.sql` creates `token_usage_daily`: one row per (organization, provider, model,
operation, source, UTC day) with the same sums `query_summary` computes; `0006_monthly_rollup.sql` adds
`token_usage_monthly`, the same per UTC month. Statement-level triggers on every insert, update, delete and
truncate of `token_usage` keep both exact, in the writer's own transaction.

`rollup_summary()` answers from the rollups only when that gives exactly the raw table's answer: on
PostgreSQL, with the rollup's triggers present and enabled, for a range of whole UTC days, neither grouped
nor filtered by user (the rollups do not keep users). It reads the coarsest level that answers: whole months
from the monthly level, the days before and after them from the daily level (all from the daily level when
grouped by day). Otherwise it returns None and the caller reads the raw table.

Grouped by the monthly level's key but for provider (organization and model: a dashboard of every
organization), a group is about one row of the monthly level: those rows are read as they are, ordered by the group,
and the rare groups of several rows (a model under two providers) added up in Python, where PostgreSQL summing
~10k groups took 3 times as long as reading them. Each shape of query is built once, and a summary that needs no
planner setting runs in autocommit: one round trip for the check of the triggers, one for the answer.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from .summary import (
    _MEASURES,  # pyright: ignore[reportPrivateUsage]
    GROUP_BY_DIMENSIONS,
    GroupBy,
    UsageSummary,
    _gc_paused,  # pyright: ignore[reportPrivateUsage]
    _summary_of,  # pyright: ignore[reportPrivateUsage]
)
from .usage import TOKEN_BUCKETS

__all__ = (
    'ROLLUP_TRIGGERS',
    'TOKEN_USAGE_DAILY',
    'TOKEN_USAGE_MONTHLY',
    'RollupMismatch',
    'rebuild_rollup',
    'rollup_available',
    'rollup_disabled',
    'rollup_summary',
    'verify_rollup',
)

_metadata = sa.MetaData()


_KEY_COLUMNS = ('organization_id', 'provider', 'model', 'operation', 'source')
_MONTHLY_KEY_COLUMNS = ('organization_id', 'provider', 'model')
_MONTHLY_DIMENSIONS = frozenset({'organization', 'provider', 'model', 'month'})
"""What the monthly level can group by: its key, and the month."""
_KEY_TYPES = {
    'organization_id': sa.String(255),
    'provider': sa.String(255),
    'model': sa.String(255),
    'operation': sa.String(255),
    'source': sa.String(16),
}


def _rollup_table(name: str, period: str, key: tuple[str, ...]) -> sa.Table:
    return sa.Table(
        name,
        _metadata,
        sa.Column(period, sa.Date, nullable=False),
        *(sa.Column(k, _KEY_TYPES[k], nullable=k in ('organization_id', 'provider', 'model')) for k in key),
        sa.Column('events', sa.BigInteger, nullable=False),
        sa.Column('cost_usd', sa.Numeric(38, 12, asdecimal=True), nullable=False),
        sa.Column('unpriced_events', sa.BigInteger, nullable=False),
        sa.Column('error_events', sa.BigInteger, nullable=False),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in TOKEN_BUCKETS),
    )


TOKEN_USAGE_DAILY = _rollup_table('token_usage_daily', 'day', _KEY_COLUMNS)
"""The daily rollup, per (organization, provider, model, operation, source, UTC day) (PostgreSQL only; defined
by `migrations/postgresql/0002_daily_rollup.sql`)."""
TOKEN_USAGE_MONTHLY = _rollup_table('token_usage_monthly', 'month', _MONTHLY_KEY_COLUMNS)
"""The monthly rollup, per (organization, provider, model, UTC month), `month` being the month's first day
(PostgreSQL only; `migrations/postgresql/0006_monthly_rollup.sql`)."""

ROLLUP_TRIGGERS = (
    'pai_usage_rollup_insert',
    'pai_usage_rollup_update',
    'pai_usage_rollup_delete',
    'pai_usage_rollup_truncate',
)
"""The triggers on `token_usage` that keep the rollup exact; the rollup is only read while all are enabled."""

_COLUMNS: dict[str, str] = {'organization': 'organization_id'}

_disabled: ContextVar[bool] = ContextVar('pai_usage_rollup_disabled', default=False)
_daily_only: ContextVar[bool] = ContextVar('pai_usage_rollup_daily_only', default=False)

_LEVELS = sa.text(
    # A role that may not read a level (e.g. a tenant granted only the daily one) is answered from the others.
    "SELECT coalesce(has_table_privilege(to_regclass(:daily), 'SELECT'), false) AND ("
    '  SELECT count(*) FROM pg_trigger'
    '  WHERE tgrelid = to_regclass(:raw) AND tgname = ANY(:triggers) AND tgenabled IN (:origin, :always)'
    ") = :count, coalesce(has_table_privilege(to_regclass(:monthly), 'SELECT'), false)"
).bindparams(
    daily='token_usage_daily',
    monthly='token_usage_monthly',
    raw='token_usage',
    triggers=list(ROLLUP_TRIGGERS),
    origin='O',
    always='A',
    count=len(ROLLUP_TRIGGERS),
)


@contextmanager
def rollup_disabled() -> Generator[None]:
    """Read the raw table inside this block, even where the rollup could answer (e.g. to compare timings)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


@contextmanager
def _daily_level_only() -> Generator[None]:
    """Leave the monthly level unread inside this block (`benchmarks/scale.py` compares the two levels)."""
    token = _daily_only.set(True)
    try:
        yield
    finally:
        _daily_only.reset(token)


def _levels(conn: sa.Connection) -> tuple[bool, bool]:
    """Whether the rollup is exact (daily table and every trigger enabled), and whether it has a monthly level."""
    if conn.dialect.name != 'postgresql':
        return False, False
    exact, monthly = conn.execute(_LEVELS).one()
    return bool(exact), bool(exact and monthly)


def rollup_available(conn: sa.Connection) -> bool:
    """Whether `token_usage_daily` exists and every trigger that maintains the rollup is enabled."""
    return _levels(conn)[0]


def _has_monthly(conn: sa.Connection) -> bool:
    return conn.execute(sa.text("SELECT to_regclass('token_usage_monthly') IS NOT NULL")).scalar() is True


def _whole_day(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.astimezone(UTC).time() == time(0)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _whole_months(first: date, end: date) -> tuple[date, date] | None:
    """The whole calendar months inside `[first, end)`, as `[start, stop)`, or None if there are none."""
    start = first if first.day == 1 else _next_month(first)
    stop = end.replace(day=1)
    return (start, stop) if start < stop else None


_Layout = tuple[tuple[str, bool], ...]
"""The levels a summary reads, in order: per part, `day` or `month` and whether it is one period (an equality)."""


@functools.lru_cache(maxsize=256)
def _statement(group_by: tuple[GroupBy, ...], by_organization: bool, layout: _Layout, merge: bool) -> sa.TextClause:
    """The summary's SQL for one shape, built once.

    A summary for one organization takes a millisecond or two, and building and compiling a SQLAlchemy construct
    for each call cost about as much as running it.

    Part `i` binds `lo{i}` (and `hi{i}` unless it is one period), and `organization_id` when `by_organization`.
    With `merge`, the level's rows come back ordered by the group, not summed (`_summary_of(merge_adjacent=True)`).
    """
    key = _KEY_COLUMNS if layout == (('day', False),) else _MONTHLY_KEY_COLUMNS
    parts: list[str] = []
    for i, (period, single) in enumerate(layout):
        table = 'token_usage_monthly' if period == 'month' else 'token_usage_daily'
        # One month is an equality, so that the (month, organization_id, model) index gives the rows in group order.
        when = f'{period} = :lo{i}' if single else f'{period} >= :lo{i} AND {period} < :hi{i}'
        if by_organization:
            when += ' AND organization_id = :organization_id'
        parts.append(f'SELECT {period} AS period, {", ".join(key)}, {", ".join(_MEASURES)} FROM {table} WHERE {when}')
    dims = [_dimension_sql(g) for g in group_by]
    if merge:
        measures = list(_MEASURES)
    else:
        # Counts as integers, as the raw table's query returns them (a bigint sum is a numeric).
        measures = [f'sum({m})' if m == 'cost_usd' else f'sum({m})::bigint' for m in _MEASURES]
    sql = f'SELECT {", ".join((*dims, *measures))} FROM ({" UNION ALL ".join(parts)}) AS rollup'
    positions = ', '.join(str(i + 1) for i in range(len(dims)))
    if not merge:
        sql += f' GROUP BY {positions}' if dims else ''
        # Groups whose rows were all deleted leave zero rows behind; the raw table has no such group.
        sql += ' HAVING sum(events) > 0'
    if dims:
        sql += f' ORDER BY {positions}'
    return sa.text(sql)


def _dimension_sql(name: GroupBy) -> str:
    if name == 'day':
        return "to_char(period, 'YYYY-MM-DD')"
    if name == 'month':
        return "to_char(period, 'YYYY-MM')"
    return _COLUMNS.get(name, name)


def rollup_summary(
    engine: sa.Engine,
    start: datetime,
    end: datetime,
    *,
    organization_id: str | None = None,
    user_id: str | None = None,
    group_by: Sequence[GroupBy] = ('model',),
) -> UsageSummary | None:
    """`query_summary`'s answer, read from the rollups; None when they cannot give it exactly.

    They can when the database is PostgreSQL with the rollup migrations applied and their triggers enabled,
    `start` and `end` are midnights UTC, there is no `user_id` filter and no `user` dimension, and not inside
    `rollup_disabled()`. Whole months are read from the monthly level (migration 0006) when the summary is
    grouped by nothing but organization, provider, model and month; the days around them, and everything else,
    from the daily level.
    """
    group_by = tuple(dict.fromkeys(group_by))
    if (
        _disabled.get()
        or engine.dialect.name != 'postgresql'
        or not (_whole_day(start) and _whole_day(end))
        or start >= end
        or user_id is not None
        or any(g not in GROUP_BY_DIMENSIONS or g == 'user' for g in group_by)
    ):
        return None
    first, stop = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    months = _whole_months(first, stop) if _MONTHLY_DIMENSIONS.issuperset(group_by) and not _daily_only.get() else None
    # Grouped by the monthly level's key but for provider (a model rarely has two), a group is one or two of the
    # level's rows: PostgreSQL summing ~10k groups of twelve columns took 3 times as long as reading the rows.
    merge = (
        months == (first, stop)
        and {'organization', 'model'} <= set(group_by)
        and ('month' in group_by or stop == _next_month(first))
    )
    # Summing thousands of groups in PostgreSQL needs a planner setting, and so a transaction; everything else runs
    # in autocommit, which saves the BEGIN and ROLLBACK: two of a one-organization summary's four round trips.
    hint = organization_id is None and bool(group_by) and not merge
    options: dict[str, Any] = {} if hint else {'isolation_level': 'AUTOCOMMIT'}
    with engine.connect().execution_options(**options) as conn:
        exact, monthly = _levels(conn)
        if not exact:
            return None
        if not monthly:
            months, merge = None, False
        periods: list[tuple[str, date, date]] = []
        if months is None:
            periods.append(('day', first, stop))
        else:
            periods.append(('month', *months))
            periods += [('day', lo, hi) for lo, hi in ((first, months[0]), (months[1], stop)) if lo < hi]
        layout = tuple((period, period == 'month' and hi == _next_month(lo)) for period, lo, hi in periods)
        params: dict[str, Any] = {} if organization_id is None else {'organization_id': organization_id}
        for i, (_, lo, hi) in enumerate(periods):
            params.update({f'lo{i}': lo, f'hi{i}': hi})
        if hint:
            # Thousands of groups: PostgreSQL underestimates them and picks a hash aggregate that spills to disk
            # in the default work_mem, then sorts; sorting the level's rows and aggregating in order is ~2x faster.
            conn.exec_driver_sql('SET LOCAL enable_hashagg = off')
        with _gc_paused():  # the fetched rows are as many objects again as the summary's (`_gc_paused`)
            results = conn.execute(_statement(group_by, organization_id is not None, layout, merge), params).all()
            return _summary_of(
                results,
                start=start,
                end=end,
                organization_id=organization_id,
                user_id=user_id,
                group_by=group_by,
                merge_adjacent=merge,
            )


_RAW_SUMS = """count(*), coalesce(sum(cost_usd), 0),
           count(*) FILTER (WHERE cost_usd IS NULL), count(*) FILTER (WHERE status = 'error'),
           sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(input_audio_tokens),
           sum(output_tokens), sum(reasoning_tokens), sum(output_audio_tokens), sum(output_image_tokens)"""
_PERIOD = {
    'day': "(created_at AT TIME ZONE 'UTC')::date",
    'month': "date_trunc('month', created_at AT TIME ZONE 'UTC')::date",
}
_REBUILD_DAILY = (
    'LOCK TABLE token_usage IN SHARE ROW EXCLUSIVE MODE',
    'TRUNCATE token_usage_daily',
    f"""INSERT INTO token_usage_daily
    SELECT {_PERIOD['day']} AS day, organization_id, provider, model, operation, source, {_RAW_SUMS}
    FROM token_usage
    GROUP BY 1, 2, 3, 4, 5, 6""",
)
_REBUILD_MONTHLY = (
    'TRUNCATE token_usage_monthly',
    f"""INSERT INTO token_usage_monthly
    SELECT date_trunc('month', day)::date, {', '.join(_MONTHLY_KEY_COLUMNS)},
           {', '.join(f'sum({m})' for m in _MEASURES)}
    FROM token_usage_daily
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 4, 3""",
)


def rebuild_rollup(engine: sa.Engine) -> int:
    """Recompute the rollups from `token_usage` (e.g. after loading rows with triggers disabled).

    Blocks writes to `token_usage` while it runs. Returns the number of rollup rows, both levels together.
    """
    with engine.begin() as conn:
        for statement in _REBUILD_DAILY:
            conn.exec_driver_sql(statement)
        tables = [TOKEN_USAGE_DAILY]
        if _has_monthly(conn):
            tables.append(TOKEN_USAGE_MONTHLY)
            for statement in _REBUILD_MONTHLY:
                conn.exec_driver_sql(statement)
        return sum(int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()) for t in tables)


@dataclass(frozen=True, slots=True)
class RollupMismatch:
    """A group whose rollup sums differ from the raw table's, on the daily or the monthly level."""

    key: dict[str, Any]
    """The group: `day` and the daily key columns, or `month` (the month's first day) and the monthly ones."""
    raw: dict[str, Any] | None
    """The raw table's sums, or None if it has no such group."""
    rollup: dict[str, Any] | None
    """The rollup's sums, or None if it has no such group."""


def verify_rollup(
    engine: sa.Engine, start: datetime | None = None, end: datetime | None = None
) -> list[RollupMismatch]:
    """Compare the rollups with the raw table, group by group, over `[start, end)` (whole days); [] when exact.

    The daily level is compared over the range, the monthly level over the whole months inside it. The
    comparison runs in the database (`EXCEPT ALL` both ways), so only differing groups come back.
    """
    first = start.astimezone(UTC).date() if start is not None else None
    stop = end.astimezone(UTC).date() if end is not None else None
    found: list[RollupMismatch] = []
    with engine.connect() as conn:
        levels: list[tuple[str, str, tuple[str, ...], date | None, date | None]] = [
            ('day', 'token_usage_daily', _KEY_COLUMNS, first, stop)
        ]
        if _has_monthly(conn):
            lo = None if first is None else (first if first.day == 1 else _next_month(first))
            hi = None if stop is None else stop.replace(day=1)
            if lo is None or hi is None or lo < hi:
                levels.append(('month', 'token_usage_monthly', _MONTHLY_KEY_COLUMNS, lo, hi))
        for period, table, key, lo, hi in levels:
            found += _compare(conn, period, table, key, lo, hi)
    return found


def _compare(
    conn: sa.Connection, period: str, table: str, key: tuple[str, ...], lo: date | None, hi: date | None
) -> list[RollupMismatch]:
    raw_where, rollup_where = '', ''
    params: dict[str, Any] = {}
    if lo is not None:
        raw_where += ' AND created_at >= :lo_at'
        rollup_where += f' AND {period} >= :lo'
        params.update(lo=lo, lo_at=datetime.combine(lo, time(0), UTC))
    if hi is not None:
        raw_where += ' AND created_at < :hi_at'
        rollup_where += f' AND {period} < :hi'
        params.update(hi=hi, hi_at=datetime.combine(hi, time(0), UTC))
    keys = ', '.join((period, *key))
    sql = f"""
        WITH raw AS (
            SELECT {_PERIOD[period]} AS {period}, {', '.join(key)},
                   count(*)::bigint AS events, coalesce(sum(cost_usd), 0)::numeric(38, 12) AS cost_usd,
                   count(*) FILTER (WHERE cost_usd IS NULL)::bigint AS unpriced_events,
                   count(*) FILTER (WHERE status = 'error')::bigint AS error_events,
                   {', '.join(f'sum({b})::bigint AS {b}' for b in TOKEN_BUCKETS)}
            FROM token_usage WHERE true{raw_where}
            GROUP BY {keys}
        ), rolled AS (
            SELECT {keys}, {', '.join(_MEASURES)} FROM {table} WHERE true{rollup_where}
        )
        SELECT 'raw' AS side, * FROM (SELECT * FROM raw EXCEPT ALL SELECT * FROM rolled) AS only_raw
        UNION ALL
        SELECT 'rollup' AS side, * FROM (SELECT * FROM rolled EXCEPT ALL SELECT * FROM raw) AS only_rollup"""
    sides: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    names = (period, *key)
    for row in conn.execute(sa.text(sql), params).mappings():
        sides.setdefault(tuple(row[c] for c in names), {})[row['side']] = _measures(row)
    return [
        RollupMismatch(dict(zip(names, key, strict=True)), found.get('raw'), found.get('rollup'))
        for key, found in sorted(sides.items(), key=lambda item: repr(item[0]))
    ]


def _measures(row: sa.RowMapping) -> dict[str, Any]:
    return {m: Decimal(row[m]) if m == 'cost_usd' else int(row[m]) for m in _MEASURES}
