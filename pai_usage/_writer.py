"""The background writer: drains the tracker's queue and inserts batches, off the caller's thread.

Records arrive as `UsageRecord`s or as raw field dicts; validation and pricing happen here, so that
`track()` costs the caller a few microseconds. Inserts are idempotent on the record id.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.dialects import postgresql, sqlite

from ._log import RateLimitedLog
from .migrate import migrate
from .pricing import PriceTable, price_usage
from .record import UsageRecord
from .table import TOKEN_USAGE as _table
from .usage import TokenCounts

__all__ = ('Writer', 'WriterStats', 'to_row')

_log = RateLimitedLog()


@dataclass(slots=True)
class WriterStats:
    """Counters shared by the tracker and its writer (ints: `+=` under the GIL is good enough for stats)."""

    enqueued: int = 0
    written: int = 0
    invalid: int = 0
    failed_writes: int = 0
    dropped: int = 0
    unpriced: int = 0


@dataclass(slots=True)
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


def to_row(record: UsageRecord) -> dict[str, Any]:
    """The `token_usage` row for a record."""
    row = record.model_dump(exclude={'metadata'})
    row['metadata'] = record.metadata
    return row


def _priced(record: UsageRecord, table: PriceTable | None) -> UsageRecord:
    override = table is not None and table.token_price(record.provider, record.model) is not None
    if record.pricing_status is not None and not override:
        return record
    if record.cost_usd is not None and record.pricing_status is None and not override:
        return record.model_copy(update={'pricing_status': 'priced', 'price_source': record.price_source})
    priced = price_usage(
        provider=record.provider,
        model=record.model,
        tokens=TokenCounts.from_columns(record.__dict__),
        units=record.units,
        unit_type=record.unit_type,
        timestamp=record.created_at,
        table=table,
    )
    return record.model_copy(
        update={
            'cost_usd': priced.cost_usd,
            'pricing_status': priced.pricing_status,
            'price_source': priced.price_source,
        }
    )


def insert_rows(conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows, ignoring ids already present."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == 'postgresql':
        stmt = postgresql.insert(_table).on_conflict_do_nothing(index_elements=['id'])
    elif dialect == 'sqlite':
        stmt = sqlite.insert(_table).on_conflict_do_nothing(index_elements=['id'])
    else:  # pragma: no cover - guarded by migrate()
        raise RuntimeError(f'unsupported database {dialect!r}')
    conn.execute(stmt, list(rows))


@dataclass
class Writer:
    """A named daemon thread that writes what `put()` enqueues, in batches."""

    engine: sa.Engine
    stats: WriterStats
    batch_size: int = 500
    flush_interval: float = 0.2
    auto_migrate: bool = True
    price_table: PriceTable | None = None
    listeners: Sequence[Callable[[UsageRecord], None]] = ()
    """Called in the writer thread with each record once it is written (e.g. the OpenTelemetry exporter)."""
    retry_interval: float = 0.5
    _queue: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue[object], init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _migrated: bool = field(default=False, init=False)

    def put(self, item: UsageRecord | dict[str, Any]) -> None:
        """Enqueue one record (never blocks)."""
        if self._thread is None:
            self._start()
        self._queue.put(item)

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything put so far is written; returns False on timeout."""
        if self._thread is None:
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def stop(self, timeout: float | None) -> bool:
        """Write what is queued and stop the thread; returns False if it did not finish in time."""
        thread = self._thread
        if thread is None:
            return True
        self._queue.put(_STOP)
        thread.join(timeout)
        return not thread.is_alive()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name='pai-usage-writer', daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            items = self._take()
            stop = any(item is _STOP for item in items)
            records = [r for item in items if (r := self._validate(item)) is not None]
            self._write(records)
            for item in items:
                if isinstance(item, _Flush):
                    item.done.set()
            if stop:
                return

    def _take(self) -> list[object]:
        items: list[object] = [self._queue.get()]
        deadline = time.monotonic() + self.flush_interval
        while len(items) < self.batch_size and not isinstance(items[-1], _Flush) and items[-1] is not _STOP:
            try:
                items.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                break
        return items

    def _validate(self, item: object) -> UsageRecord | None:
        if isinstance(item, _Flush) or item is _STOP:
            return None
        try:
            record = item if isinstance(item, UsageRecord) else UsageRecord.model_validate(item)
            record = _priced(record, self.price_table)
        except ValidationError as exc:
            self.stats.invalid += 1
            _log.error('invalid', 'pai-usage: invalid usage record dropped: %s', exc)
            return None
        if record.pricing_status == 'unpriced':
            self.stats.unpriced += 1
        return record

    def _write(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        rows = [to_row(r) for r in records]
        while True:
            try:
                if self.auto_migrate and not self._migrated:
                    migrate(self.engine)
                    self._migrated = True
                with self.engine.begin() as conn:
                    insert_rows(conn, rows)
            except Exception as exc:
                self.stats.failed_writes += 1
                _log.error('write', 'pai-usage: writing %d usage records failed, retrying: %s', len(rows), exc)
                time.sleep(self.retry_interval)
                continue
            self.stats.written += len(rows)
            self._notify(records)
            return

    def _notify(self, records: list[UsageRecord]) -> None:
        for listener in self.listeners:
            try:
                for record in records:
                    listener(record)
            except Exception as exc:
                _log.error(f'listener:{listener!r}', 'pai-usage: usage listener %r failed: %r', listener, exc)
