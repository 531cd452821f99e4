"""Plain-SQL migrations from `migrations/<dialect>/NNNN_name.sql`, applied once each and recorded.

`migrate(engine)` is idempotent and safe to run from many processes at once: on PostgreSQL it holds
an advisory lock per schema (so migrating one schema never waits on another); on SQLite it takes the
database's write lock up front (`BEGIN IMMEDIATE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

__all__ = ('MIGRATIONS_TABLE', 'Migration', 'MigrationError', 'applied_migrations', 'available_migrations', 'migrate')

MIGRATIONS_TABLE = 'pai_usage_migrations'
"""Where applied migrations are recorded."""

_ADVISORY_LOCK_CLASS = 0x70616975  # 'paiu': the first key of our two-key advisory lock
_NAME = re.compile(r'^(\d{4})_[a-z0-9_]+\.sql$')


class MigrationError(RuntimeError):
    """A migration could not be found or applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    version: str
    """The four-digit prefix, e.g. `0001`."""
    name: str
    """The file name."""
    sql: str
    """The SQL to run."""


def _migrations_root() -> Path:
    installed = Path(__file__).with_name('_migrations')  # wheels ship `migrations/` here
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / 'migrations'


def _dialect_dir(dialect: str) -> str:
    if dialect not in ('postgresql', 'sqlite'):
        raise MigrationError(f'pai-usage supports PostgreSQL and SQLite, not {dialect!r}')
    return dialect


def available_migrations(dialect: str, root: Path | None = None) -> list[Migration]:
    """The migrations for `dialect` (`postgresql` or `sqlite`), in order."""
    folder = (root or _migrations_root()) / _dialect_dir(dialect)
    if not folder.is_dir():
        raise MigrationError(f'no migrations folder at {folder}')
    found: list[Migration] = []
    for path in sorted(folder.glob('*.sql')):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f'migration file name {path.name!r} is not `NNNN_name.sql`')
        found.append(Migration(match.group(1), path.name, path.read_text()))
    return found


def applied_migrations(engine: sa.Engine) -> list[str]:
    """Versions already applied to the database, in order."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(MIGRATIONS_TABLE):
            return []
        return [row[0] for row in conn.execute(sa.text(f'SELECT version FROM {MIGRATIONS_TABLE} ORDER BY version'))]


def migrate(engine: sa.Engine, *, root: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names of those applied now (empty when up to date)."""
    migrations = available_migrations(engine.dialect.name, root)
    applied_now: list[str] = []
    with engine.begin() as conn:
        if engine.dialect.name == 'postgresql':
            # Keyed by schema: the tables live in `current_schema()`, and other schemas migrate independently.
            conn.execute(
                sa.text('SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))'), {'key': _ADVISORY_LOCK_CLASS}
            )
        elif engine.dialect.name == 'sqlite':
            # pysqlite has not begun a transaction yet (it only does so before DML): take the write lock now,
            # so a concurrent migrate waits here and then sees what this one applied.
            conn.exec_driver_sql('BEGIN IMMEDIATE')
        conn.execute(
            sa.text(
                f'CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} '
                '(version VARCHAR(16) PRIMARY KEY, name VARCHAR(255) NOT NULL, applied_at VARCHAR(40) NOT NULL)'
            )
        )
        done = {row[0] for row in conn.execute(sa.text(f'SELECT version FROM {MIGRATIONS_TABLE}'))}
        for migration in migrations:
            if migration.version in done:
                continue
            for statement in _statements(migration.sql):
                conn.exec_driver_sql(statement)
            conn.execute(
                sa.text(
                    f'INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) '
                    'VALUES (:version, :name, CAST(CURRENT_TIMESTAMP AS VARCHAR(40))) '
                    'ON CONFLICT (version) DO NOTHING'
                ),
                {'version': migration.version, 'name': migration.name},
            )
            applied_now.append(migration.name)
    return applied_now


def _statements(sql: str) -> list[str]:
    # Our migration files hold no semicolons inside literals or bodies, so splitting on `;` is exact;
    # the DBAPIs here cannot all run several statements in one call.
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith('--')]
    return [s.strip() for s in '\n'.join(lines).split(';') if s.strip()]
