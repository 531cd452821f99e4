"""Optional monthly partitioning of `token_usage` on PostgreSQL, for large installations.

`apply_partitioning(engine)` applies `migrations/optional/postgresql_partition_by_month.sql` (never applied by
`migrate()`): it converts `token_usage` into a table partitioned by `RANGE (created_at)`, one partition per UTC
month plus a DEFAULT one, with primary key `(id, created_at)`. It takes an ACCESS EXCLUSIVE lock on `token_usage`
and rewrites the whole table in one transaction. `ensure_month_partitions(engine)` then creates the coming months'
partitions, from a cron job or at app start. See `docs/scale.md`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

__all__ = ('apply_partitioning', 'ensure_month_partitions', 'is_partitioned', 'partitioning_sql')

_IS_PARTITIONED = sa.text(
    "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('token_usage')), false)"
)


def _optional_dir() -> Path:
    installed = Path(__file__).with_name('_migrations') / 'optional'  # wheels ship `migrations/` here
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / 'migrations' / 'optional'


def _require_postgres(engine: sa.Engine) -> None:
    if engine.dialect.name != 'postgresql':
        raise ValueError(f'partitioning needs PostgreSQL, not {engine.dialect.name!r}')


def partitioning_sql() -> str:
    """The SQL of the optional migration that partitions `token_usage` by month."""
    return (_optional_dir() / 'postgresql_partition_by_month.sql').read_text()


def is_partitioned(engine: sa.Engine) -> bool:
    """Whether `token_usage` (in the connection's search path) is a partitioned table."""
    if engine.dialect.name != 'postgresql':
        return False
    with engine.connect() as conn:
        return bool(conn.execute(_IS_PARTITIONED).scalar())


def apply_partitioning(engine: sa.Engine) -> bool:
    """Partition `token_usage` by UTC month; returns False when it already was (then nothing is done).

    Run it after `migrate()`, as the tables' owner, at a quiet time: it holds an ACCESS EXCLUSIVE lock on
    `token_usage` (no reads, no writes) while it copies every row into the new partitions and rebuilds the
    indexes, all in one transaction, and needs about twice the table's disk space meanwhile. Writers wait (or
    the tracker spills to disk and replays later). If anything fails, nothing changes.
    """
    _require_postgres(engine)
    if is_partitioned(engine):
        return False
    with engine.begin() as conn:
        # One simple-protocol query: the file has `$$` bodies, so it cannot be split on `;` like migrations.
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(partitioning_sql())
    return True


def _add_months(month: date, n: int) -> date:
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def ensure_month_partitions(engine: sa.Engine, months_ahead: int = 3, *, now: datetime | None = None) -> list[str]:
    """Create the partitions of the current UTC month and the next `months_ahead` ones, where missing.

    Idempotent and cheap when they exist (no lock is taken then): call it at app start or from a daily cron
    job. Rows already in the DEFAULT partition for a new month are moved into it. Returns the names of the
    partitions created now. Needs `apply_partitioning()` first.
    """
    _require_postgres(engine)
    if months_ahead < 0:
        raise ValueError(f'`months_ahead` must be >= 0, not {months_ahead!r}')
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    first = date(moment.year, moment.month, 1)
    created: list[str] = []
    with engine.begin() as conn:
        for n in range(months_ahead + 1):
            name = conn.execute(
                sa.text('SELECT pai_usage_create_month_partition(:month)'), {'month': _add_months(first, n)}
            ).scalar()
            if name is not None:
                created.append(str(name))
    return created
