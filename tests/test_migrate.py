"""Migrations: the SQL files build exactly the SQLModel schema, once, safely, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import pai_usage  # noqa: F401  # registers every table on SQLModel.metadata
from pai_usage.migrate import (
    MIGRATIONS_TABLE,
    MigrationError,
    applied_migrations,
    available_migrations,
    migrate,
)

MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent / 'migrations'
NOT_MODELED = {
    MIGRATIONS_TABLE,  # our bookkeeping
    'token_usage_daily',  # PostgreSQL's derived daily rollup (0002), deliberately not a SQLModel table
    'pai_usage_budget_counters',  # hard-mode budget counters (0004), a Core table checked in test_budgets.py
}
"""Tables the migrations create that `SQLModel.metadata` does not describe, on purpose."""


def _all_names(dialect: str) -> list[str]:
    return [m.name for m in available_migrations(dialect)]


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = sa.create_engine(database_url)
    yield engine
    engine.dispose()


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    if type_ == 'table':
        return name not in NOT_MODELED
    table = getattr(obj, 'table', None)
    return getattr(table, 'name', None) not in NOT_MODELED


def _drift(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={'compare_type': True, 'compare_server_default': True, 'include_object': _include}
        )
        return list(compare_metadata(context, SQLModel.metadata))


def test_migrated_schema_matches_the_model(engine: sa.Engine):
    assert migrate(engine) == _all_names(engine.dialect.name)
    assert _drift(engine) == []


def _drifted_root(tmp_path: Path, dialect: str) -> Path:
    sql = (MIGRATIONS_ROOT / dialect / '0001_create_token_usage.sql').read_text()
    cost = 'cost_usd BIGINT' if dialect == 'sqlite' else 'cost_usd NUMERIC(24, 12)'
    assert cost in sql
    sql = sql.replace(cost, 'cost_usd NUMERIC(10, 2)')
    sql = sql.replace('CREATE INDEX IF NOT EXISTS ix_token_usage_run_id ON token_usage (run_id);', '')
    (tmp_path / dialect).mkdir()
    (tmp_path / dialect / '0001_create_token_usage.sql').write_text(sql)
    return tmp_path


def test_drift_check_catches_drift(engine: sa.Engine, tmp_path: Path):
    # Proves the check above is not vacuous: a wrong type and a missing index are both reported.
    migrate(engine, root=_drifted_root(tmp_path, engine.dialect.name))
    found = {str(diff) for diff in _drift(engine)}
    assert any('modify_type' in d and 'cost_usd' in d for d in found), found
    assert any('add_index' in d and 'ix_token_usage_run_id' in d for d in found), found


def test_migrate_is_idempotent_and_recorded(engine: sa.Engine):
    names = _all_names(engine.dialect.name)
    assert applied_migrations(engine) == []
    assert migrate(engine) == names
    assert migrate(engine) == []
    assert applied_migrations(engine) == [name[:4] for name in names]
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f'SELECT version, name, applied_at FROM {MIGRATIONS_TABLE} ORDER BY version')).all()
        assert sa.inspect(conn).has_table('token_usage')
    assert [(v, n) for v, n, _ in rows] == [(name[:4], name) for name in names]
    assert all(applied_at for _, _, applied_at in rows)


def test_new_migration_is_applied_after_the_first(engine: sa.Engine, tmp_path: Path):
    dialect = engine.dialect.name
    (tmp_path / dialect).mkdir()
    first = MIGRATIONS_ROOT / dialect / '0001_create_token_usage.sql'
    (tmp_path / dialect / first.name).write_text(first.read_text())
    assert migrate(engine, root=tmp_path) == [first.name]
    (tmp_path / dialect / '0002_add_note.sql').write_text(
        '-- a later migration\nALTER TABLE token_usage ADD COLUMN note VARCHAR(10);\n'
    )
    assert migrate(engine, root=tmp_path) == ['0002_add_note.sql']
    assert applied_migrations(engine) == ['0001', '0002']
    with engine.connect() as conn:
        assert 'note' in {c['name'] for c in sa.inspect(conn).get_columns('token_usage')}


def test_concurrent_migrate_is_safe(database_url: str):
    engines = [sa.create_engine(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            results.append(migrate(engine))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for engine in engines:
        engine.dispose()

    assert errors == []
    assert sorted(results) == [[], [], [], _all_names(engines[0].dialect.name)]


@pytest.mark.parametrize('bad_name', ['create.sql', '1_create.sql', '0002-Add-Column.sql', '0003_ünïcode.sql'])
def test_bad_file_names_raise(tmp_path: Path, bad_name: str):
    (tmp_path / 'sqlite').mkdir()
    (tmp_path / 'sqlite' / '0001_ok.sql').write_text('SELECT 1;')
    (tmp_path / 'sqlite' / bad_name).write_text('SELECT 1;')
    with pytest.raises(MigrationError, match=r'is not `NNNN_name\.sql`'):
        available_migrations('sqlite', tmp_path)


def test_unsupported_dialect_and_missing_folder_raise(tmp_path: Path):
    with pytest.raises(MigrationError, match="not 'mysql'"):
        available_migrations('mysql')
    with pytest.raises(MigrationError, match='no migrations folder'):
        available_migrations('sqlite', tmp_path)


def test_shipped_migrations_are_aligned_across_backends():
    versions = {dialect: [m.version for m in available_migrations(dialect)] for dialect in ('postgresql', 'sqlite')}
    assert versions['postgresql'] == versions['sqlite']
    assert versions['sqlite'][0] == '0001'
    # Numbers are pre-assigned to parallel branches (0003 costs, 0004 budgets, ...): a branch may skip one
    # until they are merged. TODO(lead): restore the no-gaps check once 0001-0006 are all in.
    assert versions['sqlite'] == sorted(set(versions['sqlite']))
