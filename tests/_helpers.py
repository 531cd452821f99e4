"""Helpers shared by test modules (fixtures live in `conftest.py`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pai_usage.table import TOKEN_USAGE


def token_usage_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every `token_usage` row, oldest first, read straight from the table (not through pai-usage's own readers)."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(TOKEN_USAGE).order_by(TOKEN_USAGE.c.created_at)).mappings()]


class LazyDeps:
    """Deps like an ORM object whose lazy attribute cannot load: reading `failing` raises, the rest is there."""

    def __init__(self, failing: str, **fields: str) -> None:
        self._failing = failing
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> object:
        if name == self._failing:
            raise RuntimeError('session closed')
        raise AttributeError(name)
