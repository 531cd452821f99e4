"""Living with an application's Alembic: filters that keep autogenerate away from pai-usage's tables.

pai-usage's tables live in their own `pai_usage.metadata`, never in the application's `SQLModel.metadata`, and
`pai-usage migrate` owns their schema. An Alembic `env.py` that autogenerates against a database holding them
would propose dropping them, because the application's metadata does not describe them. Two ways out:

1. **Exclude them** (the usual choice): pass `include_name=pai_usage.alembic.include_name` and/or
   `include_object=pai_usage.alembic.include_object` to `context.configure(...)`.
2. **Let the app see them**: `target_metadata=[app_metadata, pai_usage.metadata]` with
   `include_object=pai_usage.alembic.include_modeled_object`. Autogenerate then compares `token_usage` with
   pai-usage's model (and reports drift, should anyone alter it by hand), and still ignores the tables pai-usage
   keeps outside its model (`pai_usage_migrations`, `token_usage_daily`, monthly partitions). The schema is still
   created and upgraded by `pai-usage migrate`, never by an Alembic revision.

Ours are matched by name prefix (`token_usage`, `pai_usage_`), so tables added by future pai-usage versions are
covered too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .table import metadata

__all__ = ('TABLE_PREFIXES', 'include_modeled_object', 'include_name', 'include_object', 'is_pai_usage_table')

TABLE_PREFIXES = ('token_usage', 'pai_usage_')
"""Name prefixes of every table (and partition) pai-usage creates, now or in a later version."""


def is_pai_usage_table(name: str | None) -> bool:
    """Whether a table of this name belongs to pai-usage (by prefix, schema-qualified names included)."""
    if not name:
        return False
    return name.rsplit('.', 1)[-1].startswith(TABLE_PREFIXES)


def include_name(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Alembic `include_name` hook: skip pai-usage's tables when reflecting the database."""
    if type_ == 'table':
        return not is_pai_usage_table(name)
    if type_ == 'schema':
        return True
    # Indexes, columns and constraints name the table they belong to.
    return not is_pai_usage_table(parent_names.get('table_name'))


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic `include_object` hook: skip pai-usage's tables and everything on them."""
    return not is_pai_usage_table(_table_name(obj, name, type_))


def include_modeled_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic `include_object` hook for `target_metadata=[app_metadata, pai_usage.metadata]`.

    Keeps the tables `pai_usage.metadata` models (so autogenerate checks them against the model) and skips the
    rest of pai-usage's tables, which `pai-usage migrate` keeps outside the model on purpose.
    """
    table = _table_name(obj, name, type_)
    return not is_pai_usage_table(table) or table in metadata.tables


def _table_name(obj: Any, name: str | None, type_: str) -> str | None:
    if type_ == 'table':
        return name
    table = getattr(obj, 'table', None)  # indexes, columns and constraints
    return getattr(table, 'name', None)
