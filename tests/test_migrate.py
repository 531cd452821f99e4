"""Migrations: the SQL files build exactly the SQLModel schema, once, safely, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import pai_usage
from pai_usage import UsageRecord, UsageTracker
from pai_usage.migrate import (
    MIGRATIONS_TABLE,
    MigrationError,
    applied_migrations,
    available_migrations,
    migrate,
)
from pai_usage.summary import month_bounds, query_summary
from tests._helpers import token_usage_rows

MIGRATIONS_ROOT = Path(__file__).resolve().parent.parent / 'migrations'
NOT_MODELED = {
    MIGRATIONS_TABLE,  # our bookkeeping
    'token_usage_daily',  # PostgreSQL's derived daily rollup (0002), deliberately not a SQLModel table
    'token_usage_monthly',  # and its monthly level (0006)
    'pai_usage_budget_counters',  # hard-mode budget counters (0004), a Core table checked in test_budgets.py
    'pai_usage_budget_holds',  # and what each process holds on them (0007), likewise
}
"""Tables the migrations create that `pai_usage.metadata` does not describe, on purpose."""


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
        return list(compare_metadata(context, pai_usage.metadata))


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
    # Each version once, and no gaps: two branches' files with one number would both be applied, in name order.
    assert versions['sqlite'] == [f'{i:04d}' for i in range(1, len(versions['sqlite']) + 1)]


# Rows as the schema before 0005 stored them on SQLite: 32 hex digits, naive UTC text, scaled integers.
_LEGACY_COLUMNS = (
    'id, created_at, organization_id, provider, model, operation, source, input_tokens, cache_read_tokens, '
    'cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens, output_audio_tokens, '
    'output_image_tokens, details, units, unit_type, cost_usd, pricing_status, status, metadata'
)
_LEGACY_ROWS = [
    # (id, created_at, organization_id, units in 1e-6, cost_usd in 1e-12)
    ('12345678123456781234567812345678', '2026-01-31 23:59:59.999999', 'acme', None, 2_523_000_000),
    ('0000000000004000800000000000000a', '2026-02-01 00:00:00.000000', 'acme', 2_500_001, 999_999_123_456_789_012),
    ('ffffffffffff4fffbfffffffffffffff', '2026-02-01 12:00:00', 'globex', None, None),
    ('abcdefabcdef4abc8abcabcdefabcdef', '2026-02-02 08:00:00.5', None, 0, 0),
]
_READABLE = [
    ('12345678-1234-5678-1234-567812345678', '2026-01-31 23:59:59.999999+00:00', None, '0.002523000000'),
    ('00000000-0000-4000-8000-00000000000a', '2026-02-01 00:00:00.000000+00:00', '2.500001', '999999.123456789012'),
    ('ffffffff-ffff-4fff-bfff-ffffffffffff', '2026-02-01 12:00:00.000000+00:00', None, None),
    ('abcdefab-cdef-4abc-8abc-abcdefabcdef', '2026-02-02 08:00:00.5+00:00', '0.000000', '0.000000000000'),
]


def _legacy_database(engine: sa.Engine, tmp_path: Path) -> None:
    (tmp_path / 'sqlite').mkdir()
    for migration in available_migrations('sqlite'):
        if migration.version < '0005':
            (tmp_path / 'sqlite' / migration.name).write_text(migration.sql)
    migrate(engine, root=tmp_path)
    with engine.begin() as conn:
        for i, (id_, created_at, org, units, cost) in enumerate(_LEGACY_ROWS):
            conn.exec_driver_sql(
                f'INSERT INTO token_usage ({_LEGACY_COLUMNS}) VALUES '
                "(?, ?, ?, 'openai', 'gpt-4o', 'request', 'agent', ?, 1, 2, 3, 4, 5, 6, 7, ?, ?, ?, ?, ?, 'ok', ?)",
                (
                    id_,
                    created_at,
                    org,
                    100 + i,
                    '{"a": 1}',
                    units,
                    'image' if units is not None else None,
                    cost,
                    'unpriced' if cost is None else 'priced',
                    f'{{"n": {i}}}',
                ),
            )


def _snapshot(conn: sa.Connection, columns: list[str]) -> list[tuple[Any, ...]]:
    return [
        tuple(r) for r in conn.exec_driver_sql(f'SELECT {", ".join(columns)} FROM token_usage ORDER BY input_tokens')
    ]


def test_0005_makes_existing_sqlite_rows_readable_and_keeps_them_exact(sqlite_url: str, tmp_path: Path):
    engine = sa.create_engine(sqlite_url)
    _legacy_database(engine, tmp_path)
    with engine.connect() as conn:
        before = [c['name'] for c in sa.inspect(conn).get_columns('token_usage')]
        converted = ['id', 'created_at', 'units', 'cost_usd']
        untouched = [c for c in before if c not in converted]
        kept = _snapshot(conn, untouched)

    applied = migrate(engine)
    assert applied[0].startswith('0005_')
    assert _drift(engine) == []  # types, nullability and every index as the model says

    with engine.connect() as conn:
        assert sorted(c['name'] for c in sa.inspect(conn).get_columns('token_usage')) == sorted(before)
        assert _snapshot(conn, untouched) == kept
        assert _snapshot(conn, converted) == _READABLE
    rows = token_usage_rows(engine)
    assert [r['cost_usd'] for r in rows] == [Decimal('0.002523'), Decimal('999999.123456789012'), None, Decimal(0)]
    assert [r['units'] for r in rows] == [None, Decimal('2.500001'), None, Decimal(0)]
    assert rows[0]['id'] == UUID('12345678-1234-5678-1234-567812345678')
    assert rows[0]['created_at'] == datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert rows[3]['created_at'] == datetime(2026, 2, 2, 8, 0, 0, 500_000, tzinfo=UTC)

    # Old and new rows side by side: summaries stay exact and time ranges still cut at the right instant.
    with UsageTracker(engine, auto_migrate=False) as tracker:
        tracker.track(
            UsageRecord(
                created_at=datetime(2026, 2, 1, tzinfo=UTC), organization_id='acme', cost_usd=Decimal('0.000000000001')
            )
        )
        assert tracker.flush()
    february = query_summary(engine, *month_bounds(datetime(2026, 2, 1, tzinfo=UTC)), group_by=('organization',))
    by_org = {row.group['organization']: row.totals for row in february.rows}
    assert by_org['acme'].cost_usd == Decimal('999999.123456789013')
    assert by_org['acme'].events == 2
    assert by_org['globex'].unpriced_events == 1
    january = query_summary(engine, *month_bounds(datetime(2026, 1, 1, tzinfo=UTC)), group_by=())
    assert january.totals.cost_usd == Decimal('0.002523')
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM token_usage WHERE id LIKE '%-%-%-%-%'").scalar() == 5
    engine.dispose()
