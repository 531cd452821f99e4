"""Helpers shared by test modules (fixtures live in `conftest.py`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from pai_usage import _locks
from pai_usage.table import TOKEN_USAGE


def token_usage_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every `token_usage` row, oldest first, read straight from the table (not through pai-usage's own readers)."""
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(sa.select(TOKEN_USAGE).order_by(TOKEN_USAGE.c.created_at)).mappings()]


@contextmanager
def writes_held(url: str) -> Iterator[None]:
    """Hold every write to `token_usage` back (reads still answer), as a maintenance job's lock would."""
    if url.startswith('sqlite'):
        conn = sqlite3.connect(sa.make_url(url).database or '', isolation_level=None)
        conn.execute('BEGIN IMMEDIATE')  # the write lock: the writer waits out its busy timeout, then retries
        try:
            yield
        finally:
            conn.execute('ROLLBACK')
            conn.close()
        return
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql('LOCK TABLE token_usage IN EXCLUSIVE MODE')
            try:
                yield
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def watch_fork_gate(engine: sa.Engine) -> list[str]:
    """A list that fills with the connects and statements made on `engine` outside the fork gate, by any thread
    but the main one (ours: the writer, budget sync, `asyncio.to_thread` workers).

    A fork while one of them was inside one of SQLite's C mutexes left about one child in ten hung for good in
    `sqlite3.connect`: each must be where a fork waits for it.
    """
    outside: list[str] = []

    def check(what: str) -> None:
        gate_depth = _locks._gate._local.__dict__.get('depth')  # pyright: ignore[reportPrivateUsage]
        if threading.current_thread() is not threading.main_thread() and not gate_depth:
            outside.append(f'{threading.current_thread().name}: {what}')

    def on_connect(*_: object) -> None:
        check('connect')

    def on_statement(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        check(statement)

    event.listen(engine, 'connect', on_connect)
    event.listen(engine, 'before_cursor_execute', on_statement)
    return outside


class LazyDeps:
    """Deps like an ORM object whose lazy attribute cannot load: reading `failing` raises, the rest is there."""

    def __init__(self, failing: str, **fields: str) -> None:
        self._failing = failing
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> object:
        if name == self._failing:
            raise RuntimeError('session closed')
        raise AttributeError(name)
