"""The PostgreSQL daily rollup of `token_usage`, and summaries read from it.

Migration `0002_daily_rollup.sql` creates `token_usage_daily`: one row per (organization, provider, model,
operation, source, UTC day) with the same sums `query_summary` computes, kept exact by statement-level
triggers on every insert, update, delete and truncate of `token_usage`. A month's summary for an
organization then reads a few rows per model and day instead of one per event.

`rollup_summary()` answers from the rollup only when that gives exactly the raw table's answer: on
PostgreSQL, with the rollup's triggers present and enabled, for a range of whole UTC days, neither grouped
nor filtered by user (the rollup does not keep users). Otherwise it returns None and the caller reads the
raw table.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from .summary import (
    GROUP_BY_DIMENSIONS,
    GroupBy,
    UsageSummary,
    _summary_of,  # pyright: ignore[reportPrivateUsage]
)
from .usage import TOKEN_BUCKETS

__all__ = (
    'ROLLUP_TRIGGERS',
    'TOKEN_USAGE_DAILY',
    'RollupMismatch',
    'rebuild_rollup',
    'rollup_available',
    'rollup_disabled',
    'rollup_summary',
    'verify_rollup',
)

_metadata = sa.MetaData()

TOKEN_USAGE_DAILY = sa.Table(
    'token_usage_daily',
    _metadata,
    sa.Column('day', sa.Date, nullable=False),
    sa.Column('organization_id', sa.String(255)),
    sa.Column('provider', sa.String(255)),
    sa.Column('model', sa.String(255)),
    sa.Column('operation', sa.String(255), nullable=False),
    sa.Column('source', sa.String(16), nullable=False),
    sa.Column('events', sa.BigInteger, nullable=False),
    sa.Column('cost_usd', sa.Numeric(38, 12, asdecimal=True), nullable=False),
    sa.Column('unpriced_events', sa.BigInteger, nullable=False),
    sa.Column('error_events', sa.BigInteger, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in TOKEN_BUCKETS),
)
"""The rollup table (PostgreSQL only; defined by `migrations/postgresql/0002_daily_rollup.sql`)."""

ROLLUP_TRIGGERS = (
    'pai_usage_rollup_insert',
    'pai_usage_rollup_update',
    'pai_usage_rollup_delete',
    'pai_usage_rollup_truncate',
)
"""The triggers on `token_usage` that keep the rollup exact; the rollup is only read while all are enabled."""

_KEY_COLUMNS = ('organization_id', 'provider', 'model', 'operation', 'source')
_COLUMNS: dict[str, str] = {'organization': 'organization_id'}
_MEASURES = ('events', 'cost_usd', 'unpriced_events', 'error_events', *TOKEN_BUCKETS)

_disabled: ContextVar[bool] = ContextVar('pai_usage_rollup_disabled', default=False)

_AVAILABLE = sa.text(
    'SELECT to_regclass(:rollup) IS NOT NULL AND ('
    '  SELECT count(*) FROM pg_trigger'
    '  WHERE tgrelid = to_regclass(:raw) AND tgname = ANY(:triggers) AND tgenabled IN (:origin, :always)'
    ') = :count'
).bindparams(
    rollup='token_usage_daily',
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


def rollup_available(conn: sa.Connection) -> bool:
    """Whether `token_usage_daily` exists and every trigger that maintains it is enabled."""
    if conn.dialect.name != 'postgresql':
        return False
    return bool(conn.execute(_AVAILABLE).scalar())


def _whole_day(moment: datetime) -> bool:
    return moment.tzinfo is not None and moment.astimezone(UTC).time() == time(0)


def _dimension(name: GroupBy) -> sa.ColumnElement[Any]:
    d = TOKEN_USAGE_DAILY.c
    if name == 'day':
        return sa.func.to_char(d.day, 'YYYY-MM-DD').label(name)
    if name == 'month':
        return sa.func.to_char(d.day, 'YYYY-MM').label(name)
    return d[_COLUMNS.get(name, name)].label(name)


def rollup_summary(
    engine: sa.Engine,
    start: datetime,
    end: datetime,
    *,
    organization_id: str | None = None,
    user_id: str | None = None,
    group_by: Sequence[GroupBy] = ('model',),
) -> UsageSummary | None:
    """`query_summary`'s answer, read from the daily rollup; None when the rollup cannot give it exactly.

    It can when the database is PostgreSQL with the rollup migration applied and its triggers enabled,
    `start` and `end` are midnights UTC, there is no `user_id` filter and no `user` dimension, and not inside
    `rollup_disabled()`.
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
    d = TOKEN_USAGE_DAILY.c
    dims = [_dimension(g) for g in group_by]
    measures = [sa.func.sum(d[name]).label(name) for name in _MEASURES]
    stmt = sa.select(*dims, *measures).where(d.day >= start.astimezone(UTC).date(), d.day < end.astimezone(UTC).date())
    if organization_id is not None:
        stmt = stmt.where(d.organization_id == organization_id)
    if dims:
        stmt = stmt.group_by(*dims).order_by(*dims)
    # Groups whose rows were all deleted leave zero rows behind; the raw table has no such group.
    stmt = stmt.having(sa.func.sum(d.events) > 0)
    with engine.connect() as conn:
        if not rollup_available(conn):
            return None
        return _summary_of(
            conn.execute(stmt).mappings(),
            start=start,
            end=end,
            organization_id=organization_id,
            user_id=user_id,
            group_by=group_by,
        )


_REBUILD = (
    'LOCK TABLE token_usage IN SHARE ROW EXCLUSIVE MODE',
    'TRUNCATE token_usage_daily',
    """INSERT INTO token_usage_daily
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, organization_id, provider, model,
           operation, source, count(*), coalesce(sum(cost_usd), 0),
           count(*) FILTER (WHERE cost_usd IS NULL), count(*) FILTER (WHERE status = 'error'),
           sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(input_audio_tokens),
           sum(output_tokens), sum(reasoning_tokens), sum(output_audio_tokens), sum(output_image_tokens)
    FROM token_usage
    GROUP BY 1, 2, 3, 4, 5, 6""",
)


def rebuild_rollup(engine: sa.Engine) -> int:
    """Recompute the rollup from `token_usage` (e.g. after loading rows with triggers disabled).

    Blocks writes to `token_usage` while it runs. Returns the number of rollup rows.
    """
    with engine.begin() as conn:
        for statement in _REBUILD:
            conn.exec_driver_sql(statement)
        return int(conn.execute(sa.select(sa.func.count()).select_from(TOKEN_USAGE_DAILY)).scalar_one())


@dataclass(frozen=True, slots=True)
class RollupMismatch:
    """A (day, key) group whose rollup sums differ from the raw table's."""

    key: dict[str, Any]
    """The group: `day` and the key columns."""
    raw: dict[str, Any] | None
    """The raw table's sums, or None if it has no such group."""
    rollup: dict[str, Any] | None
    """The rollup's sums, or None if it has no such group."""


def verify_rollup(
    engine: sa.Engine, start: datetime | None = None, end: datetime | None = None
) -> list[RollupMismatch]:
    """Compare the rollup with the raw table, group by group, over `[start, end)` (whole days); [] when exact.

    The comparison runs in the database (`EXCEPT ALL` both ways), so only differing groups come back.
    """
    raw_where, rollup_where = '', ''
    params: dict[str, Any] = {}
    if start is not None:
        raw_where += ' AND created_at >= :start'
        rollup_where += ' AND day >= :start_day'
        params.update(start=start, start_day=start.astimezone(UTC).date())
    if end is not None:
        raw_where += ' AND created_at < :end'
        rollup_where += ' AND day < :end_day'
        params.update(end=end, end_day=end.astimezone(UTC).date())
    keys = ', '.join(('day', *_KEY_COLUMNS))
    sql = f"""
        WITH raw AS (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, {', '.join(_KEY_COLUMNS)},
                   count(*)::bigint AS events, coalesce(sum(cost_usd), 0)::numeric(38, 12) AS cost_usd,
                   count(*) FILTER (WHERE cost_usd IS NULL)::bigint AS unpriced_events,
                   count(*) FILTER (WHERE status = 'error')::bigint AS error_events,
                   {', '.join(f'sum({b})::bigint AS {b}' for b in TOKEN_BUCKETS)}
            FROM token_usage WHERE true{raw_where}
            GROUP BY {keys}
        ), rolled AS (
            SELECT {keys}, {', '.join(_MEASURES)} FROM token_usage_daily WHERE true{rollup_where}
        )
        SELECT 'raw' AS side, * FROM (SELECT * FROM raw EXCEPT ALL SELECT * FROM rolled) AS only_raw
        UNION ALL
        SELECT 'rollup' AS side, * FROM (SELECT * FROM rolled EXCEPT ALL SELECT * FROM raw) AS only_rollup"""
    sides: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(sa.text(sql), params).mappings():
            sides.setdefault(_key(row), {})[row['side']] = _measures(row)
    return [
        RollupMismatch(dict(zip(('day', *_KEY_COLUMNS), key, strict=True)), found.get('raw'), found.get('rollup'))
        for key, found in sorted(sides.items(), key=lambda item: repr(item[0]))
    ]


def _key(row: sa.RowMapping) -> tuple[Any, ...]:
    return tuple(row[c] for c in ('day', *_KEY_COLUMNS))


def _measures(row: sa.RowMapping) -> dict[str, Any]:
    return {m: Decimal(row[m]) if m == 'cost_usd' else int(row[m]) for m in _MEASURES}
