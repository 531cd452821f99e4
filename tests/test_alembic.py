"""A sample SQLModel + Alembic app next to a pai-usage ledger: autogenerate never touches our tables."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import pai_usage
from pai_usage._cli import cli_logic
from pai_usage.alembic import include_modeled_object, include_name, include_object, is_pai_usage_table

# Tables a later pai-usage version (or the optional monthly partitions) could add: the prefixes must cover them.
FUTURE_TABLES = ('pai_usage_future_feature', 'token_usage_2026_01')

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

import pai_usage
import pai_usage.alembic
from {models} import SQLModel

config = context.config
if {manage!r}:
    target_metadata = [SQLModel.metadata, pai_usage.metadata]
    hooks = {{'include_object': pai_usage.alembic.include_modeled_object}}
else:
    target_metadata = SQLModel.metadata
    hooks = {{'include_name': pai_usage.alembic.include_name, 'include_object': pai_usage.alembic.include_object}}

section = config.get_section(config.config_ini_section)
engine = engine_from_config(section, prefix='sqlalchemy.', poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True, **hooks)
    with context.begin_transaction():
        context.run_migrations()
"""

MODELS_PY = """
from sqlmodel import Field, SQLModel


class Hero(SQLModel, table=True):
    __tablename__ = {table!r}

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
"""


def test_our_tables_are_not_in_sqlmodel_metadata():
    assert 'token_usage' in pai_usage.metadata.tables
    assert all(is_pai_usage_table(name) for name in pai_usage.metadata.tables)
    assert not any(is_pai_usage_table(name) for name in SQLModel.metadata.tables)
    assert pai_usage.TokenUsage.metadata is pai_usage.metadata  # pyright: ignore[reportUnknownMemberType]


@pytest.mark.parametrize(
    ('name', 'ours'),
    [
        ('token_usage', True),
        ('token_usage_daily', True),
        ('pai_usage_migrations', True),
        ('myschema.token_usage', True),
        ('hero', False),
        ('usage', False),
        ('my_token_usage', False),
        (None, False),
    ],
)
def test_is_pai_usage_table(name: str | None, ours: bool):
    assert is_pai_usage_table(name) is ours


@pytest.fixture
def sample_app(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Alembic project of an app whose models use the global `SQLModel.metadata`."""
    app = tmp_path / 'app'
    (app / 'migrations' / 'versions').mkdir(parents=True)
    suffix = uuid.uuid4().hex[:8]
    models = f'sample_models_{suffix}'
    (app / f'{models}.py').write_text(MODELS_PY.format(table=f'hero_{suffix}'))
    # Alembic's own template, plus the import every SQLModel app adds for `sqlmodel.sql.sqltypes.AutoString`.
    template = (Path(command.__file__).parent / 'templates' / 'generic' / 'script.py.mako').read_text()
    template = template.replace('import sqlalchemy as sa\n', 'import sqlalchemy as sa\nimport sqlmodel\n', 1)
    assert 'import sqlmodel' in template
    (app / 'migrations' / 'script.py.mako').write_text(template)
    (app / 'alembic.ini').write_text(
        f'[alembic]\nscript_location = %(here)s/migrations\nsqlalchemy.url = {database_url.replace("%", "%%")}\n'
    )
    (app / 'models_name').write_text(models)
    monkeypatch.syspath_prepend(str(app))
    yield app
    # The app's table went into the process-wide `SQLModel.metadata`: take it out again.
    module = sys.modules.pop(models, None)
    if module is not None:
        SQLModel.metadata.remove(module.Hero.__table__)


@pytest.mark.parametrize('manage', [False, True], ids=['exclude', 'manage'])
def test_autogenerate_in_a_sample_app_leaves_our_tables_alone(
    sample_app: Path, database_url: str, manage: bool, capsys: pytest.CaptureFixture[str]
):
    models = (sample_app / 'models_name').read_text()
    (sample_app / 'migrations' / 'env.py').write_text(ENV_PY.format(models=models, manage=manage))
    assert cli_logic(['migrate', '--database-url', database_url]) == 0
    assert 'applied 0001' in capsys.readouterr().out
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        for name in FUTURE_TABLES:
            conn.exec_driver_sql(f'CREATE TABLE {name} (id INTEGER PRIMARY KEY)')
            conn.exec_driver_sql(f'CREATE INDEX ix_{name}_id ON {name} (id)')

    config = Config(str(sample_app / 'alembic.ini'))
    command.revision(config, message='app', autogenerate=True)
    [revision] = (sample_app / 'migrations' / 'versions').glob('*.py')
    source = revision.read_text()
    assert "op.create_table('hero_" in source  # the app's own table is found...
    assert 'token_usage' not in source and 'pai_usage' not in source  # ...and nothing of ours
    command.upgrade(config, 'head')
    command.check(config)  # raises if autogenerate still sees differences

    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {'token_usage', 'pai_usage_migrations', *FUTURE_TABLES} <= tables
    engine.dispose()


def _diffs(engine: sa.Engine, metadata: Any, **opts: Any) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={'compare_type': True, **opts})
        return list(compare_metadata(context, metadata))


def _touched(diffs: list[Any]) -> set[str]:
    """Names of the tables the autogenerate operations touch."""
    names: set[str] = set()
    for diff in diffs:
        for op in diff if isinstance(diff, list) else [diff]:
            for part in op:
                table = getattr(part, 'table', part)
                name = getattr(table, 'name', None)
                if isinstance(name, str):
                    names.add(name)
                elif isinstance(part, str):
                    names.add(part)
    return names


def test_without_the_hooks_autogenerate_would_drop_our_tables(database_url: str):
    # Proves the test above is not vacuous: Alembic alone proposes to drop what `pai-usage migrate` created.
    engine = sa.create_engine(database_url)
    pai_usage.migrate.migrate(engine)
    app = sa.MetaData()
    sa.Table('hero', app, sa.Column('id', sa.Integer, primary_key=True))
    touched = _touched(_diffs(engine, app))
    assert {'token_usage', 'pai_usage_migrations'} <= touched
    assert not any(is_pai_usage_table(t) for t in _touched(_diffs(engine, app, include_object=include_object)))
    assert not any(is_pai_usage_table(t) for t in _touched(_diffs(engine, app, include_name=include_name)))
    managed = _diffs(engine, [app, pai_usage.metadata], include_object=include_modeled_object)
    assert not any(is_pai_usage_table(t) for t in _touched(managed))
    assert 'hero' in _touched(managed)
    engine.dispose()


def test_managed_mode_reports_drift_of_our_table(database_url: str):
    # With `pai_usage.metadata` in the target, a hand-made change to `token_usage` shows up in autogenerate.
    engine = sa.create_engine(database_url)
    pai_usage.migrate.migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP INDEX ix_token_usage_run_id')
    diffs = _diffs(engine, pai_usage.metadata, include_object=include_modeled_object)
    assert [d[0] for d in diffs] == ['add_index']
    assert _diffs(engine, pai_usage.metadata, include_object=include_object) == []
    engine.dispose()


def test_app_create_all_and_drop_all_leave_our_tables_alone(sqlite_url: str):
    engine = sa.create_engine(sqlite_url)
    pai_usage.migrate.migrate(engine)
    app = sa.MetaData()
    sa.Table('hero', app, sa.Column('id', sa.Integer, primary_key=True))
    for metadata in (SQLModel.metadata, app):
        metadata.create_all(engine)
        metadata.drop_all(engine)
    with engine.connect() as conn:
        assert {'token_usage', 'pai_usage_migrations'} <= set(sa.inspect(conn).get_table_names())
        assert 'hero' not in sa.inspect(conn).get_table_names()
    engine.dispose()
