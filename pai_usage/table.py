"""`TokenUsage`: the `token_usage` table, shared by agent runs and direct API calls.

The SQLModel class defines the schema and serves reads; the background writer inserts with
SQLAlchemy Core / COPY against `TokenUsage.__table__`, never through ORM objects (27x faster).
`migrations/` holds the same schema as SQL, and a test keeps the two from drifting.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import registry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlmodel import Field, SQLModel

__all__ = (
    'COST_SCALE',
    'REPRICE_AUDIT',
    'SQLITE_TIMESTAMP_FORMAT',
    'TOKEN_USAGE',
    'UNITS_SCALE',
    'DashedUUID',
    'ExactDecimal',
    'TableBase',
    'TokenUsage',
    'TokenUsageReprice',
    'UTCDateTime',
    'cost_sum',
    'exact_sum',
    'metadata',
)

COST_SCALE = 12
"""Decimal places kept for `cost_usd` (pico-dollars): enough for any per-token price in genai-prices."""
UNITS_SCALE = 6
"""Decimal places kept for `units` (micro-units, e.g. fractions of a video second)."""
SQLITE_TIMESTAMP_FORMAT = (
    '%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d+00:00'
)
"""How `created_at` is stored on SQLite: ISO 8601 UTC text with its zone, e.g. `2026-12-01 09:30:00.000000+00:00`.

Fixed width, so text order is time order; the space (not `T`) makes it compare correctly with SQLite's own
`datetime('now')`, and it reads like PostgreSQL's `timestamptz` output.
"""


class ExactDecimal(sa.types.TypeDecorator[Decimal]):
    """An exact decimal on every backend, readable in raw SQL on both.

    PostgreSQL stores `NUMERIC(p, scale)`. SQLite has no exact decimal type (its NUMERIC is a float), so there
    the value is stored as `TEXT` with exactly `scale` decimals (`0.002523000000`), which reads as dollars;
    `exact_sum()` adds such values exactly, as integers of `10**-scale` units. Values are rounded half-even to
    `scale` places.
    """

    impl = sa.Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__()
        self.precision = precision
        self.scale = scale
        self._quantum = Decimal(1).scaleb(-scale)

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == 'sqlite':
            return dialect.type_descriptor(sa.Text())
        return dialect.type_descriptor(sa.Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = Decimal(value).quantize(self._quantum, rounding=ROUND_HALF_EVEN)
        if dialect.name == 'sqlite':
            # Always `scale` decimals and never `-0`: `exact_sum` reads the digits without the point.
            return f'{exact if exact else abs(exact):f}'
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == 'sqlite' and not isinstance(value, str):
            # The column holds text; a number here is an aggregate such as `sum(cost_usd)`, which SQLite adds
            # as floats: refuse it rather than return a Decimal that looks exact and is not.
            raise TypeError(
                f'got {value!r} for an exact decimal on SQLite, which computes sum(), avg() and total() '
                'of it as floats: use pai_usage.table.exact_sum(column) (or cost_sum()) to add costs exactly'
            )
        return Decimal(value)


class _ScaledSum(sa.types.TypeDecorator[Decimal]):
    """The result of `exact_sum`: on SQLite an integer count of `10**-scale` units, turned back into a Decimal."""

    impl = sa.Numeric
    cache_ok = True

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        # Not SQLite's Numeric, whose result processor goes through a float.
        return dialect.type_descriptor(sa.BigInteger() if dialect.name == 'sqlite' else sa.Numeric(asdecimal=True))

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == 'sqlite':
            return Decimal(int(value)).scaleb(-self.scale)
        return Decimal(value)


class _ExactSum(FunctionElement[Decimal]):
    inherit_cache = True
    name = 'exact_sum'

    def __init__(self, column: sa.ColumnElement[Decimal], scale: int) -> None:
        super().__init__(column)
        self.type = _ScaledSum(scale)


@compiles(_ExactSum)
def _compile_sum(element: _ExactSum, compiler: SQLCompiler, **kw: Any) -> str:
    return f'sum({compiler.process(element.clauses, **kw)})'


@compiles(_ExactSum, 'sqlite')
def _compile_sum_sqlite(element: _ExactSum, compiler: SQLCompiler, **kw: Any) -> str:
    # `0.002523000000` -> 2523000000: an integer sum is exact, where SQLite's own sum of the text is a float.
    return f"sum(CAST(replace({compiler.process(element.clauses, **kw)}, '.', '') AS INTEGER))"


def exact_sum(column: sa.ColumnElement[Decimal]) -> sa.ColumnElement[Decimal]:
    """`sum(column)` of an `ExactDecimal` column (`cost_usd`, `units`), exact on every backend, as a Decimal.

    Use it for every sum of money in SQL: a plain `sum()` is exact on PostgreSQL but a float on SQLite.
    NULLs are skipped as `sum()` does, and the sum of no rows is NULL. On SQLite one sum holds at most
    2**63 units of `10**-scale` (about $9.2 million of `cost_usd`); more raises SQLite's integer overflow.
    """
    column_type = column.type
    if not isinstance(column_type, ExactDecimal):
        raise TypeError(f'exact_sum() needs an ExactDecimal column, not {column_type!r}')
    return _ExactSum(column, column_type.scale)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores `SQLITE_TIMESTAMP_FORMAT` text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == 'sqlite':
            return dialect.type_descriptor(sqlite.DATETIME(storage_format=SQLITE_TIMESTAMP_FORMAT))
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError('naive datetimes are ambiguous: pass a timezone-aware datetime')
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == 'sqlite' else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DashedUUID(sa.types.TypeDecorator[UUID]):
    """A UUID that reads the same on every backend: native `UUID` on PostgreSQL, dashed `CHAR(36)` text on SQLite.

    SQLAlchemy's own `Uuid` stores 32 hex digits without dashes on SQLite, unlike `run_id` and exports.
    """

    impl = sa.Uuid
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == 'sqlite':
            return dialect.type_descriptor(sa.CHAR(36))
        return dialect.type_descriptor(sa.Uuid())

    def process_bind_param(self, value: UUID | str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value if isinstance(value, UUID) else UUID(value)
        return str(value) if dialect.name == 'sqlite' else value

    def process_result_value(self, value: Any, dialect: Dialect) -> UUID | None:
        if value is None:
            return None
        return value if isinstance(value, UUID) else UUID(value)


_JSON = sa.JSON().with_variant(JSONB(), 'postgresql')

metadata = sa.MetaData()
"""pai-usage's own `MetaData`: never the application's `SQLModel.metadata`.

So an application's `SQLModel.metadata.create_all()`/`drop_all()` and its Alembic autogenerate leave our
tables alone (see `pai_usage.alembic` for living with Alembic). `pai-usage migrate` owns this schema.
"""


class TableBase(SQLModel, registry=registry(metadata=metadata)):
    """Base of pai-usage's SQLModel tables: its own registry, hence `metadata`, never the application's."""


class TokenUsage(TableBase, table=True):
    """One row per usage event. Column semantics are documented in `docs/columns.md`."""

    __tablename__ = 'token_usage'  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        sa.Index('ix_token_usage_created_at', 'created_at'),
        sa.Index('ix_token_usage_org_created_at', 'organization_id', 'created_at'),
        sa.Index('ix_token_usage_user_created_at', 'user_id', 'created_at'),
        sa.Index('ix_token_usage_run_id', 'run_id'),
    )

    id: UUID = Field(primary_key=True, sa_type=DashedUUID)
    created_at: datetime = Field(sa_type=UTCDateTime, nullable=False)

    organization_id: str | None = Field(default=None, max_length=255)
    user_id: str | None = Field(default=None, max_length=255)

    provider: str | None = Field(default=None, max_length=255)
    model: str | None = Field(default=None, max_length=255)
    service_tier: str | None = Field(default=None, max_length=32)
    operation: str = Field(max_length=255)
    source: str = Field(max_length=16)

    run_id: str | None = Field(default=None, max_length=255)
    parent_run_id: str | None = Field(default=None, max_length=255)
    agent_name: str | None = Field(default=None, max_length=255)
    request_id: str | None = Field(default=None, max_length=255)

    input_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    cache_read_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    cache_write_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    input_audio_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    output_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    reasoning_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    output_audio_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    output_image_tokens: int = Field(default=0, sa_type=sa.BigInteger, nullable=False)
    details: dict[str, int] = Field(default_factory=dict[str, int], sa_type=_JSON, nullable=False)

    units: Decimal | None = Field(default=None, sa_type=ExactDecimal(20, UNITS_SCALE))  # pyright: ignore[reportArgumentType]
    unit_type: str | None = Field(default=None, max_length=255)

    cost_usd: Decimal | None = Field(default=None, sa_type=ExactDecimal(24, COST_SCALE))  # pyright: ignore[reportArgumentType]
    price_source: str | None = Field(default=None, max_length=100)
    pricing_status: str = Field(max_length=16)

    duration_ms: int | None = Field(default=None)
    status: str = Field(max_length=16)
    metadata_: dict[str, Any] = Field(
        default_factory=dict[str, Any], sa_column=sa.Column('metadata', _JSON, nullable=False)
    )


TOKEN_USAGE: sa.Table = TokenUsage.__table__  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType, reportUnknownVariableType]
"""The Core `Table` behind `TokenUsage`, for bulk writes and aggregate reads."""


class TokenUsageReprice(TableBase, table=True):
    """One repriced row of one `reprice` run: what it cost before and after, and by which rule."""

    __tablename__ = 'token_usage_reprice'  # pyright: ignore[reportAssignmentType]
    __table_args__ = (sa.Index('ix_token_usage_reprice_usage_id', 'usage_id'),)

    usage_id: UUID = Field(sa_type=DashedUUID, primary_key=True)
    repriced_at: datetime = Field(sa_type=UTCDateTime, primary_key=True)
    old_cost_usd: Decimal | None = Field(default=None, sa_type=ExactDecimal(24, COST_SCALE))  # pyright: ignore[reportArgumentType]
    old_pricing_status: str = Field(max_length=16)
    old_price_source: str | None = Field(default=None, max_length=100)
    new_cost_usd: Decimal | None = Field(default=None, sa_type=ExactDecimal(24, COST_SCALE))  # pyright: ignore[reportArgumentType]
    new_pricing_status: str = Field(max_length=16)
    new_price_source: str | None = Field(default=None, max_length=100)


REPRICE_AUDIT: sa.Table = TokenUsageReprice.__table__  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType, reportUnknownVariableType]
"""The Core `Table` of the reprice audit trail (migration 0003)."""


def cost_sum() -> sa.ColumnElement[Decimal]:
    """`exact_sum(TOKEN_USAGE.c.cost_usd)`: the exact sum of known costs, for every query that adds up money."""
    return exact_sum(TOKEN_USAGE.c.cost_usd)
