"""Shared fixtures: a fresh database per test on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import uuid
import warnings
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from pai_usage import UsageTracker
from pai_usage.pricing import set_price_table

PG_SERVER_URL = os.environ.get('PAI_USAGE_TEST_PG', 'postgresql+psycopg://postgres@127.0.0.1:5432/test')
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


def _pg_available() -> str | None:
    try:
        engine = sa.create_engine(PG_SERVER_URL, connect_args={'connect_timeout': 3})
        with engine.connect() as conn:
            conn.execute(sa.text('SELECT 1'))
        engine.dispose()
    except Exception as exc:
        return f'{type(exc).__name__}: {exc}'
    return None


_pg_error: str | bool | None = False


def require_postgres() -> None:
    """Skip (locally) or fail (under CI=true) when PostgreSQL is unreachable."""
    global _pg_error
    if _pg_error is False:
        _pg_error = _pg_available()
    if _pg_error:
        message = f'PostgreSQL at {PG_SERVER_URL} is unreachable: {_pg_error}'
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A URL whose connections live in a fresh, private schema, dropped afterwards."""
    require_postgres()
    schema = f'pai_test_{uuid.uuid4().hex[:12]}'
    admin = sa.create_engine(PG_SERVER_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA {schema}')
    sep = '&' if '?' in PG_SERVER_URL else '?'
    try:
        yield f'{PG_SERVER_URL}{sep}options={quote(f"-csearch_path={schema}")}'
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA {schema} CASCADE')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f'sqlite:///{tmp_path}/usage.db'


@pytest.fixture(params=['sqlite', pytest.param('postgresql', marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on each backend."""
    return request.getfixturevalue('sqlite_url' if request.param == 'sqlite' else 'pg_schema_url')


@pytest.fixture
def tracker(database_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(database_url, flush_interval=0.01) as t:
        yield t
    t.engine.dispose()


@pytest.fixture(autouse=True, scope='session')
def _private_spill_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Trackers spill (and park rejected records) under $PAI_USAGE_SPILL_DIR: keep the suite's out of the checkout.
    previous = os.environ.get('PAI_USAGE_SPILL_DIR')
    os.environ['PAI_USAGE_SPILL_DIR'] = str(tmp_path_factory.mktemp('spill'))
    yield
    if previous is None:
        os.environ.pop('PAI_USAGE_SPILL_DIR', None)
    else:
        os.environ['PAI_USAGE_SPILL_DIR'] = previous


@pytest.fixture(autouse=True)
def _default_prices() -> Iterator[None]:
    set_price_table(None)
    yield
    set_price_table(None)


@pytest.fixture(autouse=True)
def _close_run_sync_loop() -> Iterator[None]:
    yield
    # `agent.run_sync()` in the main thread leaves the loop it made as the current one. Unclosed, it is collected
    # in whichever later test the GC runs, and that test fails on its ResourceWarning: close it where it was left.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return
    if not loop.is_running():
        loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def anyio_backend() -> str:
    return 'asyncio'
