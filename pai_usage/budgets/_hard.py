"""Hard mode: budget counters in the database, reserved and settled atomically by every process.

One row per (scope, period, period start) in `pai_usage_budget_counters` (migration `0004`). A reservation
is one conditional `UPDATE ... SET reserved = reserved + :estimate WHERE spent + reserved + :estimate <=
:limit RETURNING ...` in its own short transaction: the row lock makes concurrent reservations from any
number of processes serialize on it, so together they keep the bound one process keeps alone. Settled spend
and released reservations are sent as deltas, with the next reservation or from a background thread.

Each process also keeps, in `pai_usage_budget_holds` (migration `0007`), what it holds on each counter, in
the same transactions, and a heartbeat. A process that dies mid-request (SIGKILL, OOM) stops heartbeating:
`reclaim` gives its reservations back to the counters once its heartbeat is older than the enforcer's TTL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from ..table import COST_SCALE, UTCDateTime

__all__ = (
    'BUDGET_COUNTERS',
    'BUDGET_HOLDS',
    'CounterKey',
    'HardOp',
    'apply_deltas',
    'ensure_table',
    'heartbeat',
    'raise_to',
    'read',
    'reclaim',
    'reserve',
)

_metadata = sa.MetaData()


class _CounterMoney(sa.types.TypeDecorator[Decimal]):
    """Exact money that SQL can add in place: `NUMERIC` on PostgreSQL, an integer of 1e-12 USD on SQLite.

    Not `table.ExactDecimal`, whose SQLite form is readable text: the counters are updated with `spent + ?` in SQL.
    """

    impl = sa.Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == 'sqlite':
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.Numeric(24, COST_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: sa.Dialect) -> Any:
        if value is None or dialect.name != 'sqlite':
            return value
        return int(Decimal(value).scaleb(COST_SCALE).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == 'sqlite':
            return Decimal(int(value)).scaleb(-COST_SCALE)
        return Decimal(value)


_MONEY = _CounterMoney()


def _counter_key() -> tuple[sa.Column[Any], ...]:
    """The columns of a `CounterKey`, which key the counters and, with the holder, the holds."""
    return (
        sa.Column('scope', sa.String(300), primary_key=True),
        sa.Column('period', sa.String(100), primary_key=True),
        sa.Column('period_start', UTCDateTime, primary_key=True),
    )


BUDGET_COUNTERS = sa.Table(
    'pai_usage_budget_counters',
    _metadata,
    *_counter_key(),
    sa.Column('spent_usd', _MONEY, nullable=False),
    sa.Column('reserved_usd', _MONEY, nullable=False),
    sa.Column('updated_at', UTCDateTime, nullable=False),
)
"""The hard-mode counters table (migration `0004_budget_counters.sql`)."""

BUDGET_HOLDS = sa.Table(
    'pai_usage_budget_holds',
    _metadata,
    *_counter_key(),
    sa.Column('holder', sa.String(200), primary_key=True),
    sa.Column('reserved_usd', _MONEY, nullable=False),
    sa.Column('heartbeat_at', UTCDateTime, nullable=False, index=True),
)
"""What each process holds on each counter, and its last heartbeat (migration `0007_budget_holds.sql`)."""

CounterKey = tuple[str, str, datetime]
"""(scope, period, period start) of one counter row."""

_C = BUDGET_COUNTERS.c
_H = BUDGET_HOLDS.c


@dataclass(kw_only=True)
class HardOp:
    """One counter's part of a reservation: deltas to send first, then the estimate to reserve."""

    key: CounterKey
    """The counter row."""
    limit: Decimal
    """The smallest limit of the budgets sharing the counter."""
    spent_delta: Decimal
    """Spend settled in this process since the last statement."""
    released: Decimal
    """Reservations released in this process since the last statement."""
    estimate: Decimal
    """What this request reserves."""
    seed: Decimal
    """The spend a new row starts from (the ledger's, plus this process's unwritten records)."""


def _money(value: Decimal) -> sa.BindParameter[Decimal]:
    return sa.literal(value, _MONEY)


def _where(key: CounterKey) -> sa.ColumnElement[bool]:
    scope, period, start = key
    return sa.and_(_C.scope == scope, _C.period == period, _C.period_start == start)


def _floor0(expr: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    return sa.case((expr < _money(Decimal(0)), _money(Decimal(0))), else_=expr)


def ensure_table(engine: sa.Engine) -> None:
    """Apply migrations if a hard-mode table is missing (the tracker's writer may not have run yet)."""
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        if inspector.has_table(BUDGET_COUNTERS.name) and inspector.has_table(BUDGET_HOLDS.name):
            return
    from ..migrate import migrate

    migrate(engine)


def _insert(engine: sa.Engine, table: sa.Table = BUDGET_COUNTERS) -> Any:
    return (postgresql.insert if engine.dialect.name == 'postgresql' else sqlite.insert)(table)


def _hold(conn: sa.Connection, key: CounterKey, holder: str, change: Decimal, now: datetime) -> None:
    """Add `change` (reserved minus released) to what `holder` holds on the counter `key`, and heartbeat."""
    scope, period, start = key
    insert = _insert(conn.engine, BUDGET_HOLDS).values(
        scope=scope,
        period=period,
        period_start=start,
        holder=holder,
        reserved_usd=max(change, Decimal(0)),
        heartbeat_at=now,
    )
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=[_H.scope, _H.period, _H.period_start, _H.holder],
            set_={'reserved_usd': _floor0(_H.reserved_usd + _money(change)), 'heartbeat_at': now},
        )
    )


def reserve(engine: sa.Engine, ops: Sequence[HardOp], holder: str) -> tuple[int | None, list[tuple[Decimal, Decimal]]]:
    """Send each counter's deltas and reserve its estimate, all or nothing, in one transaction.

    Returns the index of the first counter that refused (None: all reserved) and each counter's spent and
    reserved after the statement. Deltas are applied either way. `holder`'s hold rows change by the same
    amounts, in the same transaction.
    """
    now = datetime.now(UTC)
    refused: int | None = None
    seen: list[tuple[Decimal, Decimal]] = []
    with engine.begin() as conn:
        for i, op in enumerate(ops):
            spent = _C.spent_usd + _money(op.spent_delta)
            reserved = _C.reserved_usd - _money(op.released)
            estimate = _money(op.estimate if refused is None else Decimal(0))
            limit = _money(op.limit)
            admit = sa.and_(spent + reserved + estimate <= limit, spent + reserved < limit)
            row: sa.Row[Any, Any] | None = None
            for attempt in range(2):
                row = conn.execute(
                    sa.update(BUDGET_COUNTERS)
                    .where(_where(op.key), admit if refused is None else sa.true())
                    .values(spent_usd=spent, reserved_usd=_floor0(reserved + estimate), updated_at=now)
                    .returning(_C.spent_usd, _C.reserved_usd)
                ).first()
                if row is not None:
                    break
                # Refused, or no row yet: apply the deltas alone, creating the row from `seed` if needed.
                row = conn.execute(
                    sa.update(BUDGET_COUNTERS)
                    .where(_where(op.key))
                    .values(spent_usd=spent, reserved_usd=_floor0(reserved), updated_at=now)
                    .returning(_C.spent_usd, _C.reserved_usd)
                ).first()
                if row is not None:
                    refused = i
                    break
                scope, period, start = op.key
                inserted = conn.execute(
                    _insert(engine)
                    .values(
                        scope=scope,
                        period=period,
                        period_start=start,
                        spent_usd=op.seed,
                        reserved_usd=Decimal(0),
                        updated_at=now,
                    )
                    .on_conflict_do_nothing()
                ).rowcount
                if inserted:
                    # The row holds `seed`, which already counts this process's settled spend. A row another
                    # process created since the UPDATE above does not: then the delta still goes on it.
                    op.spent_delta = Decimal(0)
                    spent = _C.spent_usd + _money(Decimal(0))
                    admit = sa.and_(spent + reserved + estimate <= limit, spent + reserved < limit)
                assert attempt == 0, 'the counter row exists after the insert'
            assert row is not None
            seen.append((Decimal(row[0]), Decimal(row[1])))
        if refused is not None:
            # All or nothing: give back what the counters before the refusing one reserved.
            for op in ops[:refused]:
                conn.execute(
                    sa.update(BUDGET_COUNTERS)
                    .where(_where(op.key))
                    .values(reserved_usd=_floor0(_C.reserved_usd - _money(op.estimate)), updated_at=now)
                )
        for op in ops:
            change = (op.estimate if refused is None else Decimal(0)) - op.released
            if change:
                _hold(conn, op.key, holder, change, now)
    return refused, seen


def apply_deltas(
    engine: sa.Engine, deltas: Sequence[tuple[CounterKey, Decimal, Decimal]], holder: str
) -> list[CounterKey]:
    """Add settled spend and release reservations: `(key, spent_delta, released)` per counter, one transaction.

    Returns the keys that have no row yet, whose deltas were not applied: the caller keeps them for its next
    reservation, which makes the row (from a `seed` that counts them) or finds it made by another process.
    """
    if not deltas:
        return []
    now = datetime.now(UTC)
    missing: list[CounterKey] = []
    with engine.begin() as conn:
        for key, spent_delta, released in deltas:
            updated = conn.execute(
                sa.update(BUDGET_COUNTERS)
                .where(_where(key))
                .values(
                    spent_usd=_C.spent_usd + _money(spent_delta),
                    reserved_usd=_floor0(_C.reserved_usd - _money(released)),
                    updated_at=now,
                )
            ).rowcount
            if not updated:
                missing.append(key)
            elif released:
                _hold(conn, key, holder, -released, now)
    return missing


def heartbeat(engine: sa.Engine, holder: str) -> None:
    """Say that `holder` is alive: its reservations are not reclaimed while it keeps saying so."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(BUDGET_HOLDS)
            .where(_H.holder == holder, _H.reserved_usd > _money(Decimal(0)))
            .values(heartbeat_at=datetime.now(UTC))
        )


def reclaim(engine: sa.Engine, stale_before: datetime) -> Decimal:
    """Give back to the counters what holders silent since `stale_before` hold (dead processes). Returns the sum.

    The holds are deleted and the counters lowered in one transaction; a hold deleted by a concurrent
    reclaim is not returned to this one, so nothing is given back twice.
    """
    with engine.begin() as conn:
        gone = conn.execute(
            sa.delete(BUDGET_HOLDS)
            .where(_H.heartbeat_at < stale_before)
            .returning(_H.scope, _H.period, _H.period_start, _H.reserved_usd)
        ).all()
        held: dict[CounterKey, Decimal] = {}
        for scope, period, start, reserved in gone:
            held[(scope, period, start)] = held.get((scope, period, start), Decimal(0)) + Decimal(reserved)
        now = datetime.now(UTC)
        for key in sorted(k for k, amount in held.items() if amount > 0):
            conn.execute(
                sa.update(BUDGET_COUNTERS)
                .where(_where(key))
                .values(reserved_usd=_floor0(_C.reserved_usd - _money(held[key])), updated_at=now)
            )
    return sum(held.values(), Decimal(0))


def raise_to(engine: sa.Engine, key: CounterKey, ledger_usd: Decimal) -> None:
    """Raise a counter's spend to the ledger's when the ledger holds more (spend no enforcer settled)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(BUDGET_COUNTERS)
            .where(_where(key), _C.spent_usd < _money(ledger_usd))
            .values(spent_usd=_money(ledger_usd), updated_at=datetime.now(UTC))
        )


def read(engine: sa.Engine, keys: Sequence[CounterKey]) -> dict[CounterKey, tuple[Decimal, Decimal]]:
    """Spent and reserved of the counters that exist among `keys` (none if the table does not exist)."""
    if not keys:
        return {}
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(_C.scope, _C.period, _C.period_start, _C.spent_usd, _C.reserved_usd).where(
                    sa.or_(*(_where(key) for key in keys))
                )
            ).all()
    except SQLAlchemyError:
        return {}  # no hard-mode counters here (yet)
    return {(r[0], r[1], r[2]): (r[3], r[4]) for r in rows}
