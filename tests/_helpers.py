"""Helpers shared by test modules (fixtures live in `conftest.py`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pai_usage.table import TOKEN_USAGE


def token_usage_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every `token_usage` row, oldest first, read straight from the table (not through pai-usage's own readers)."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(TOKEN_USAGE).order_by(TOKEN_USAGE.c.created_at)).mappings()]
