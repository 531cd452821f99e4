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
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

__all__ = (
    'COST_SCALE',
    'TOKEN_USAGE',
    'UNITS_SCALE',
    'ExactDecimal',
    'TableBase',
    'TokenUsage',
    'UTCDateTime',
    'metadata',
)

COST_SCALE = 12
"""Decimal places kept for `cost_usd` (pico-dollars): enough for any per-token price in genai-prices."""
UNITS_SCALE = 6
"""Decimal places kept for `units` (micro-units, e.g. fractions of a video second)."""


class ExactDecimal(sa.types.TypeDecorator[Decimal]):
    """An exact decimal on every backend.

    PostgreSQL stores `NUMERIC(p, scale)`. SQLite has no exact decimal type (its NUMERIC is a float), so
    there the value is stored as an integer count of `10**-scale` units, which `sum()` adds exactly.
    Values are rounded half-even to `scale` places.
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
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = Decimal(value).quantize(self._quantum, rounding=ROUND_HALF_EVEN)
        if dialect.name == 'sqlite':
            return int(exact.scaleb(self.scale))
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == 'sqlite':
            return Decimal(int(value)).scaleb(-self.scale)
        return Decimal(value)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

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

    id: UUID = Field(primary_key=True)
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
