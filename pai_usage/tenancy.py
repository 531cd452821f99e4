"""Optional row-level security on PostgreSQL, for apps that let tenants read the ledger directly.

`enable_row_level_security(engine)` applies `migrations/optional/postgresql_rls.sql` (never applied by
`migrate()`): roles other than the tables' owner then see only the rows of the organization named by the
`pai_usage.organization_id` setting, which `tenant_scope(conn, organization_id)` sets for one transaction.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

__all__ = ('RLS_SETTING', 'enable_row_level_security', 'rls_sql', 'tenant_scope')

RLS_SETTING = 'pai_usage.organization_id'
"""The setting the row-level security policies compare `organization_id` with."""


def _optional_dir() -> Path:
    installed = Path(__file__).with_name('_migrations') / 'optional'  # wheels ship `migrations/` here
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / 'migrations' / 'optional'


def rls_sql() -> str:
    """The SQL of the optional row-level security migration."""
    return (_optional_dir() / 'postgresql_rls.sql').read_text()


def enable_row_level_security(engine: sa.Engine) -> None:
    """Apply the optional row-level security migration (idempotent). Run it as the tables' owner."""
    if engine.dialect.name != 'postgresql':
        raise ValueError(f'row-level security needs PostgreSQL, not {engine.dialect.name!r}')
    lines = [line for line in rls_sql().splitlines() if not line.lstrip().startswith('--')]
    with engine.begin() as conn:
        for statement in '\n'.join(lines).split(';'):
            if statement.strip():
                conn.exec_driver_sql(statement)


def tenant_scope(conn: sa.Connection, organization_id: str) -> None:
    """Restrict `conn` to `organization_id`'s rows until the end of its current transaction.

    Only has an effect for roles subject to the policies (not the tables' owner, not superusers).
    """
    if not organization_id:
        raise ValueError('`organization_id` must be a non-empty string')
    conn.execute(sa.select(sa.func.set_config(RLS_SETTING, organization_id, True)))
