"""A private PostgreSQL schema for a benchmark, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import sqlalchemy as sa

PG_URL = os.environ.get('PAI_USAGE_BENCH_PG', 'postgresql+psycopg://postgres@127.0.0.1:5432/test')


@contextmanager
def pg_schema() -> Iterator[str]:
    """A URL whose connections live in a fresh schema (search_path), dropped on exit."""
    schema = f'pai_bench_{uuid.uuid4().hex[:12]}'
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA {schema}')
    sep = '&' if '?' in PG_URL else '?'
    try:
        yield f'{PG_URL}{sep}options={quote(f"-csearch_path={schema}")}'
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA {schema} CASCADE')
        admin.dispose()
