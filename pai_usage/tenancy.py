"""Optional row-level security on PostgreSQL, for apps that let tenants read the ledger directly.

`enable_row_level_security(engine)` applies `migrations/optional/postgresql_rls.sql` (never applied by
`migrate()`). Roles other than the tables' owner are then restricted in one of two ways:

- **A role per tenant** (`add_tenant_role(engine, role, organization_id)`): the role sees and writes only that
  organization's rows, keyed on `current_user`. A tenant who can run arbitrary SQL on its own connection cannot
  widen this: the mapping is the owner's, and no setting the tenant controls is consulted.
- **A shared role scoped by a setting** (`tenant_scope(conn, organization_id)` sets `pai_usage.organization_id`
  for one transaction): a guard against *application bugs* (a query that forgets its `WHERE`), **not** against
  a tenant who can run SQL, who can set the setting to any organization. Never give such a connection to a tenant.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

__all__ = (
    'RLS_SETTING',
    'TENANT_ROLES_TABLE',
    'add_tenant_role',
    'enable_row_level_security',
    'remove_tenant_role',
    'rls_sql',
    'tenant_scope',
)

RLS_SETTING = 'pai_usage.organization_id'
"""The setting the row-level security policies compare `organization_id` with, for roles without a mapping."""
TENANT_ROLES_TABLE = 'pai_usage_tenant_roles'
"""Maps a PostgreSQL role to the one organization it may see (created by the row-level security migration)."""


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


def add_tenant_role(engine: sa.Engine, role: str, organization_id: str, *, grant_select: bool = True) -> None:
    """Restrict the (existing) PostgreSQL role `role` to `organization_id`'s rows, whatever it runs.

    Run as the tables' owner, after `enable_row_level_security`. With `grant_select`, also grants the role
    `SELECT` on `token_usage` and its rollups `token_usage_daily`, `token_usage_monthly` (it still needs `USAGE`
    on their schema, and a login).
    """
    if not role or not organization_id:
        raise ValueError('`role` and `organization_id` must be non-empty strings')
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f'INSERT INTO {TENANT_ROLES_TABLE} (role_name, organization_id) VALUES (:role, :org) '
                'ON CONFLICT (role_name) DO UPDATE SET organization_id = EXCLUDED.organization_id'
            ),
            {'role': role, 'org': organization_id},
        )
        if grant_select:
            quoted = conn.dialect.identifier_preparer.quote(role)
            conn.exec_driver_sql(f'GRANT SELECT ON token_usage, token_usage_daily, token_usage_monthly TO {quoted}')


def remove_tenant_role(engine: sa.Engine, role: str) -> None:
    """Remove `role`'s mapping: it then falls back to the setting-scoped policy (and sees nothing without it)."""
    with engine.begin() as conn:
        conn.execute(sa.text(f'DELETE FROM {TENANT_ROLES_TABLE} WHERE role_name = :role'), {'role': role})
