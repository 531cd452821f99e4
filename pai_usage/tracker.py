"""`UsageTracker`: fire-and-forget recording of usage events, and the summaries read back from them."""

from __future__ import annotations

import asyncio
import atexit
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self
from uuid import uuid4

import sqlalchemy as sa
from sqlalchemy import event

from ._log import RateLimitedLog
from ._writer import Writer, WriterStats
from .pricing import PriceTable
from .record import UsageRecord
from .summary import GroupBy, UsageSummary, month_bounds, query_summary

__all__ = ('DATABASE_URL_ENV_VAR', 'DEFAULT_DATABASE_URL', 'TrackerStats', 'UsageTracker', 'configure', 'get_tracker')

DATABASE_URL_ENV_VAR = 'PAI_USAGE_DATABASE_URL'
"""Environment variable holding the default database URL."""
DEFAULT_DATABASE_URL = 'sqlite:///pai_usage.db'
"""The embedded default, used when neither a URL nor the environment variable is given."""

_log = RateLimitedLog()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackerStats:
    """What happened to the records given to `track()` so far."""

    enqueued: int
    """Accepted by `track()`."""
    written: int
    """Inserted into (or found already in) the database."""
    pending: int
    """Accepted but not yet written."""
    invalid: int
    """Rejected by validation (negative or absurd counts, wrong types, oversized metadata)."""
    failed_writes: int
    """Batch writes that failed and were retried."""
    dropped: int
    """Lost: could not be queued, written or spilled. Always logged."""
    unpriced: int
    """Written with `cost_usd = NULL` because no price was known."""


def _engine(database: str | sa.Engine | None) -> sa.Engine:
    if isinstance(database, sa.Engine):
        return database
    url = database or os.environ.get(DATABASE_URL_ENV_VAR) or DEFAULT_DATABASE_URL
    # Plain `postgresql://` would pick psycopg2; pai-usage is built on psycopg 3.
    for prefix in ('postgresql://', 'postgres://'):
        if url.startswith(prefix):
            url = 'postgresql+psycopg://' + url[len(prefix) :]
    engine = sa.create_engine(url)
    if engine.dialect.name == 'sqlite':
        event.listen(engine, 'connect', _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets summaries read while the writer writes; NORMAL sync is durable across process crashes.
    cursor = dbapi_connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA busy_timeout=5000')
    cursor.close()


class UsageTracker:
    """Records usage events in the `token_usage` table without slowing or breaking the caller.

    `track()` enqueues and returns; a background thread validates, prices and writes batches.
    `flush()` waits for what was tracked so far; `close()` (also at interpreter exit) flushes and stops.
    """

    def __init__(
        self,
        database: str | sa.Engine | None = None,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        auto_migrate: bool = True,
        price_table: PriceTable | None = None,
        close_timeout: float = 10.0,
        listeners: Sequence[Callable[[UsageRecord], None]] = (),
    ) -> None:
        """Create a tracker.

        Args:
            database: A database URL (`sqlite:///path`, `postgresql+psycopg://...`) or an SQLAlchemy engine.
                Defaults to `$PAI_USAGE_DATABASE_URL`, else `sqlite:///pai_usage.db`.
            batch_size: Most records written in one transaction.
            flush_interval: Longest a record waits in the queue for its batch to fill, in seconds.
            auto_migrate: Apply pending migrations before the first write.
            price_table: Our own prices; defaults to the process-wide table (`pai_usage.pricing`).
            close_timeout: How long `close()` and the exit hook wait for the queue to drain.
            listeners: Called in the writer thread with each record once written; failures are logged.
        """
        self.engine = _engine(database)
        self.close_timeout = close_timeout
        self._stats = WriterStats()
        self._writer = Writer(
            self.engine,
            self._stats,
            batch_size=batch_size,
            flush_interval=flush_interval,
            auto_migrate=auto_migrate,
            price_table=price_table,
            listeners=listeners,
        )
        self._closed = False
        _live_trackers.add(self)

    def track(self, record: UsageRecord | Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        """Record one usage event, fire-and-forget. Never raises and never waits on I/O.

        Pass a `UsageRecord`, a mapping of its fields, or its fields as keywords. Raw fields are
        validated in the background; invalid records are logged and counted in `stats().invalid`.
        """
        try:
            if record is None:
                item: UsageRecord | dict[str, Any] = fields
            elif isinstance(record, UsageRecord):
                item = record.model_copy(update=fields) if fields else record
            else:
                item = {**record, **fields}
            if isinstance(item, dict):
                # Identity and time are fixed now, so a retried or replayed record is the same event.
                item.setdefault('id', uuid4())
                item.setdefault('created_at', datetime.now(UTC))
            if self._closed:
                raise RuntimeError('tracker is closed')
            self._writer.put(item)
            self._stats.enqueued += 1
        except Exception as exc:
            self._stats.dropped += 1
            _log.error('track', 'pai-usage: could not track a usage record: %r', exc)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record tracked so far is written. Returns False if `timeout` ran out."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush and stop the writer. Returns False if the queue did not drain in time."""
        if self._closed:
            return True
        self._closed = True
        _live_trackers.discard(self)
        return self._writer.stop(self.close_timeout if timeout is None else timeout)

    async def aflush(self, timeout: float | None = 10.0) -> bool:
        """`flush()` without blocking the event loop."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = None) -> bool:
        """`close()` without blocking the event loop."""
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    def stats(self) -> TrackerStats:
        """Counters of what happened to tracked records."""
        s = self._stats
        return TrackerStats(
            enqueued=s.enqueued,
            written=s.written,
            pending=max(s.enqueued - s.written - s.invalid - s.dropped, 0),
            invalid=s.invalid,
            failed_writes=s.failed_writes,
            dropped=s.dropped,
            unpriced=s.unpriced,
        )

    def get_usage_summary(
        self,
        start: datetime,
        end: datetime,
        *,
        organization_id: str | None = None,
        user_id: str | None = None,
        group_by: Sequence[GroupBy] = ('model',),
    ) -> UsageSummary:
        """Totals and per-group rows for `start <= created_at < end`. Reads the database (blocking)."""
        return query_summary(
            self.engine, start, end, organization_id=organization_id, user_id=user_id, group_by=group_by
        )

    def get_current_month_usage(
        self, organization_id: str, *, group_by: Sequence[GroupBy] = ('model',), now: datetime | None = None
    ) -> UsageSummary:
        """The organization's usage in the current calendar month (UTC)."""
        start, end = month_bounds(now or datetime.now(UTC))
        return self.get_usage_summary(start, end, organization_id=organization_id, group_by=group_by)

    def __repr__(self) -> str:
        return f'UsageTracker({self.engine.url.render_as_string(hide_password=True)!r})'


_live_trackers: weakref.WeakSet[UsageTracker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for tracker in list(_live_trackers):
        tracker.close()


_default: UsageTracker | None = None


def configure(database: str | sa.Engine | None = None, **options: Any) -> UsageTracker:
    """Set the process-wide default tracker, used when neither deps nor a capability names one.

    In the spirit of `logfire.configure()`: call it once at start-up. Replaces (and closes) any previous default.
    """
    global _default
    previous, _default = _default, UsageTracker(database, **options)
    if previous is not None:
        previous.close()
    return _default


def get_tracker() -> UsageTracker:
    """The process-wide default tracker, created from the environment on first use."""
    global _default
    if _default is None:
        _default = UsageTracker()
    return _default
