"""The background writer: drains the tracker's queue and inserts batches, off the caller's thread.

Records arrive as `UsageRecord`s or as raw field dicts, each with the journal segment that holds it (or None);
validation and pricing happen here, per batch, so that `track()` costs the caller a few microseconds. Inserts
are idempotent on the record id, so every retry and every replay is safe.

Delivery, in order of preference:

1. A batch is inserted: PostgreSQL gets a binary `COPY` straight into `token_usage` (falling back to a
   staging table and `INSERT ... SELECT ... ON CONFLICT DO NOTHING` when a unique key is already there);
   SQLite gets one transaction with `executemany`. A database error about the data (not the connection)
   splits the batch in halves until only the refused rows are left; those are rejected, one by one.
2. A failed write is retried with capped exponential backoff and jitter. When writes have failed for
   `spill_after` seconds (or the queue is half full, or we are shutting down), the batch goes to the spill
   file (`_spill.py`) and the writer switches to spilling: batches go to disk, and the database is probed
   at least every second. When it answers, the spill files are replayed, and new batches go to it again.
3. If even the spill fails (disk full), the batch is held in memory and retried (database and spill file)
   at least every second; only what is still held when `stop()` gives up is counted as lost and logged.

A flush or close request probes at once and replays this process's spilled records before it answers, and
answers True only when everything tracked before it is in the database. The loop is guarded: a bug in one
cycle is logged and counted (`loop_errors`), and the loop goes on.
"""

from __future__ import annotations

import json
import operator
import os
import queue
import random
import socket
import sqlite3
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, cast

import sqlalchemy as sa
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from ._journal import Journal, Segment
from ._locks import sqlite_gate, sqlite_gate_paused
from ._log import RateLimitedLog
from ._spill import SpillDir, encode, encode_lenient, encode_rejected
from ._validate import fields_many, record_from_fields
from .migrate import migrate
from .pricing import PriceTable, price_fields, price_fields_many
from .record import UsageRecord, json_text
from .table import COST_SCALE, UNITS_SCALE
from .table import TOKEN_USAGE as _table

__all__ = ('Writer', 'WriterStats')

_log = RateLimitedLog()


@dataclass(slots=True)
class WriterStats:
    """Counters shared by the tracker and its writer.

    Only the writer thread updates most of them; the rare updates from other threads (queue overflow,
    shutdown, and `put()`'s one increment) hold `Writer._count_lock`.
    """

    queued: int = 0
    """Records `put()` placed on the in-memory queue."""
    taken: int = 0
    """Records the writer took from the queue (or the shutdown drained from it)."""
    overflowed: int = 0
    """Records `track()` handled itself because the queue was full (or it failed)."""
    written: int = 0
    """Records inserted straight from the queue (new rows)."""
    duplicates: int = 0
    """Records from the queue whose id was already in the table (stored once)."""
    invalid: int = 0
    """Records rejected by validation or refused by the database, in the queue or in spill files."""
    replay_invalid: int = 0
    """The part of `invalid` found while replaying spill files."""
    failed_writes: int = 0
    """Batch writes that failed (and were retried or spilled)."""
    dropped: int = 0
    """Records lost: not written, and the spill failed too."""
    journal_only: int = 0
    """Records not written whose spill failed too, but which the journal still holds (the next start replays them)."""
    unpriced: int = 0
    """Records written with no known price."""
    errors: int = 0
    """Records written with `status='error'` (failed calls, failed runs)."""
    spilled: int = 0
    """Records appended to the spill file."""
    replayed: int = 0
    """Records re-sent to the database from spill files or journals (any process's)."""
    replay_duplicates: int = 0
    """The part of `replayed` whose id was already in the table."""
    loop_errors: int = 0
    """Writer cycles that failed on an unexpected error (logged; the loop went on)."""
    quarantined: int = 0
    """Spill files set aside because they could not be replayed (not for an outage)."""

    def reset(self) -> None:
        """Zero every counter (a forked child starts its own)."""
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass(slots=True)
class _Flush:
    spilled: int | None = None
    """`SpillDir.own_mark()` when `flush()` was called: what `track()` spills after it is not this flush's to wait
    for (what the writer spills is: it took those records off the queue, ahead of the marker)."""
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    """Set before `done`: whether everything put before the marker is in the database."""


_STOP = object()
_CHUNK = 250
"""Records validated in one call, between two chances for other threads to take the GIL."""
_RECORDS = TypeAdapter(list[UsageRecord])
_COLUMNS: tuple[str, ...] = tuple(c.name for c in _table.columns)
_COST_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
_UNITS_QUANTUM = Decimal(1).scaleb(-UNITS_SCALE)
# Binary COPY carries no types, only each column's bytes: the id (`uuid`) and the JSON columns (`jsonb`) are
# encoded by `_copy_row` itself, in their binary forms, and written as they are, like `bytea`. psycopg's own
# dumpers for those types are Python calls, one per value.
_PG_TYPES: tuple[str, ...] = tuple(
    {
        'id': 'bytea',
        'created_at': 'timestamptz',
        'details': 'bytea',
        'metadata': 'bytea',
        'units': 'numeric',
        'cost_usd': 'numeric',
        'duration_ms': 'int4',
    }.get(name, 'int8' if name.endswith('_tokens') else 'text')
    for name in _COLUMNS
)
_COLUMN_LIST = ', '.join(f'"{name}"' for name in _COLUMNS)
_STAGE = 'pai_usage_stage'
_get_columns = cast('Callable[[Any], tuple[Any, ...]]', operator.itemgetter(*_COLUMNS))
_ID_INDEX = _COLUMNS.index('id')
_DETAILS_INDEX = _COLUMNS.index('details')
_METADATA_INDEX = _COLUMNS.index('metadata')
_COST_INDEX = _COLUMNS.index('cost_usd')
_UNITS_INDEX = _COLUMNS.index('units')
_EMPTY_JSONB = b'\x01{}'


def _jsonb(value: dict[str, Any]) -> bytes:
    # jsonb's binary form: a version byte, then the JSON text. `json_text` refuses what is not JSON (a data error).
    return b'\x01' + json_text(value).encode() if value else _EMPTY_JSONB


def _copy_row(record: UsageRecord) -> list[Any]:
    """The record as one binary COPY row, in `_COLUMNS` order, with the types `_PG_TYPES` names."""
    values = record.__dict__
    row = list(_get_columns(values))  # `metadata` is named the same on the model as in the table
    row[_ID_INDEX] = values['id'].bytes
    row[_DETAILS_INDEX] = _jsonb(values['details'])
    row[_METADATA_INDEX] = _jsonb(values['metadata'])
    # Round like `ExactDecimal` does for the Core path, not like PostgreSQL would (half away from zero).
    if (cost := values['cost_usd']) is not None:
        row[_COST_INDEX] = cost.quantize(_COST_QUANTUM, rounding=ROUND_HALF_EVEN)
    if (units := values['units']) is not None:
        row[_UNITS_INDEX] = units.quantize(_UNITS_QUANTUM, rounding=ROUND_HALF_EVEN)
    return row


def _priced(record: UsageRecord, table: PriceTable | None) -> UsageRecord:
    # One rule for every row, shared with budgets (`price_fields`): the tracker's table, else the process-wide one.
    priced = price_fields(record.__dict__, table)
    values = record.__dict__
    if (
        priced.cost_usd == values['cost_usd']
        and priced.pricing_status == values['pricing_status']
        and priced.price_source == values['price_source']
    ):
        return record
    return record.model_copy(
        update={
            'cost_usd': priced.cost_usd,
            'pricing_status': priced.pricing_status,
            'price_source': priced.price_source,
        }
    )


_SQLITE_INSERT = (
    f'INSERT INTO token_usage ({_COLUMN_LIST}) VALUES ({", ".join("?" * len(_COLUMNS))}) ON CONFLICT DO NOTHING'
)
_bind_processors: dict[sa.Dialect, tuple[tuple[int, Callable[[Any], Any]], ...]] = {}


def _empty_first(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON column's bind processor, with the text of `{}` (most rows' `details` and `metadata`) made once."""
    empty = processor({})

    def process(value: Any) -> Any:
        return empty if type(value) is dict and not value else processor(value)

    return process


def _insert_sqlite(conn: sa.Connection, records: Sequence[UsageRecord]) -> int:
    """Insert records on SQLite, ignoring ids already present, without SQLAlchemy's per-row parameter machinery.

    Returns how many rows were new.

    The column types' own bind processors (UUID, UTC datetime, exact decimals, JSON) convert the values, so the
    rows are stored exactly as a Core `insert()` stores them (`tests/test_writer.py` checks).
    """
    if not records:
        return 0
    dialect = conn.dialect
    processors = _bind_processors.get(dialect)
    if processors is None:
        found: list[tuple[int, Callable[[Any], Any]]] = []
        for i, column in enumerate(_table.columns):
            processor = column.type._cached_bind_processor(dialect)  # pyright: ignore[reportPrivateUsage]
            if processor is not None:
                found.append((i, _empty_first(processor) if isinstance(column.type, sa.JSON) else processor))
        processors = _bind_processors[dialect] = tuple(found)
    rows: list[tuple[Any, ...]] = []
    for record in records:
        row = list(_get_columns(record.__dict__))
        for i, processor in processors:
            if (value := row[i]) is not None:
                row[i] = processor(value)
        rows.append(tuple(row))
    result = conn.exec_driver_sql(_SQLITE_INSERT, rows)
    return len(rows) if result.rowcount < 0 else result.rowcount


def _copy_records(
    conn: sa.Connection,
    records: list[UsageRecord],
    *,
    staged: bool,
    more: Iterator[list[UsageRecord]] | None = None,
) -> int:
    """Binary COPY into `token_usage`, or into a temp table and on with `ON CONFLICT DO NOTHING`.

    The conflict has no target, so that the same statement serves a plain table (primary key `id`) and one
    partitioned by month (primary key `(id, created_at)`, as the optional partitioning migration makes it).
    `more` yields further records as they are validated, appended to `records` as they are written: the server
    inserts one chunk while the next is validated, instead of waiting for the whole batch.
    Returns how many rows were new.
    """
    raw: Any = conn.connection.driver_connection
    from psycopg.adapt import PyFormat  # PostgreSQL is an optional extra

    with raw.cursor() as cur:
        # The dumper `bytea` maps to is psycopg's Python one (for its `Binary` wrapper); the one for `bytes` is
        # in C. This cursor's own map only: the connection's stays as it is.
        cur.adapters.register_dumper(bytes, raw.adapters.get_dumper(bytes, PyFormat.BINARY))
        if staged:
            # Per-session temp table, emptied at each commit; `IF NOT EXISTS` makes reused connections cheap.
            cur.execute(
                f'CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE token_usage INCLUDING DEFAULTS) ON COMMIT DELETE ROWS'
            )
        target = _STAGE if staged else 'token_usage'
        with cur.copy(f'COPY {target} ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)') as copy:
            copy.set_types(_PG_TYPES)
            write_row = copy.write_row
            for record in records:
                write_row(_copy_row(record))
            if more is not None:
                for chunk in more:
                    records.extend(chunk)
                    for record in chunk:
                        write_row(_copy_row(record))
        if staged:
            cur.execute(
                f'INSERT INTO token_usage ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGE} ON CONFLICT DO NOTHING'
            )
            return max(cur.rowcount, 0)
    return len(records)


_Entry = tuple[Any, Segment | None]
"""What the queue holds for one record: the record (a `UsageRecord` or a dict of fields) and its journal segment."""
_PROBE_CAP = 1.0
"""Longest gap between two probes of a database that is down: replay starts within a second of its return."""
_FIELDS = tuple(UsageRecord.model_fields)


def _same_names(target: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """Whether a spill directory's target names our database and schema (perhaps on another server)."""
    return target.get('database') == ours.get('database') and target.get('schema') == ours.get('schema')


def _is_unique_violation(exc: BaseException) -> bool:
    return getattr(getattr(exc, 'orig', exc), 'sqlstate', None) == '23505'


def _is_data_error(exc: BaseException) -> bool:
    """Whether `exc` is about the rows written (split the batch, reject the refused rows), not the connection."""
    orig = getattr(exc, 'orig', None) or exc
    sqlstate = getattr(orig, 'sqlstate', None)
    if isinstance(sqlstate, str) and sqlstate:
        # 22: data exception (a NUL byte, a value out of range); 23: integrity (a CHECK, a NOT NULL).
        return sqlstate[:2] in ('22', '23')
    if isinstance(orig, sqlite3.Error):
        return isinstance(orig, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError)
    name = type(orig).__name__
    if name in ('DataError', 'IntegrityError'):  # psycopg's client-side checks (e.g. NUL in text)
        return True
    if isinstance(exc, SQLAlchemyError) or isinstance(orig, OSError | TimeoutError):
        return False
    module = type(orig).__module__
    if module.startswith(('psycopg', 'sqlite3', 'sqlalchemy')):
        return False
    # A Python error while encoding a row (a value the COPY dumper refuses): about the data too.
    return isinstance(orig, TypeError | ValueError | OverflowError | ArithmeticError | KeyError | AttributeError)


def _drain(more: Iterator[list[UsageRecord]] | None, records: list[UsageRecord]) -> None:
    if more is not None:
        for chunk in more:
            records.extend(chunk)


def _all_journalled(entries: Sequence[_Entry]) -> bool:
    return all(seg is not None for _, seg in entries)


def _is_marker(item: object) -> bool:
    return item is _STOP or type(item) is _Flush


def _raw(item: object) -> dict[str, Any]:
    if isinstance(item, UsageRecord):
        return item.model_dump(mode='json')
    if isinstance(item, dict):
        return item  # pyright: ignore[reportUnknownVariableType]
    raise TypeError(f'not a usage record: {type(item).__name__}')


def _describe(exc: ValidationError) -> str:
    """The validation errors without the input values (a mistaken `prompt=` must never reach the log)."""
    errors = exc.errors(include_url=False, include_input=False)
    lines = [f'{len(errors)} validation error{"s" if len(errors) != 1 else ""} for UsageRecord']
    for e in errors:
        lines.append('.'.join(map(str, e['loc'])) or '(record)')
        lines.append(f'  {e["msg"]} [type={e["type"]}]')
    return '\n'.join(lines)


def _settle_counts(entries: Iterable[_Entry]) -> dict[Segment, int]:
    return Counter(seg for _, seg in entries if seg is not None)


@dataclass(eq=False)
class Writer:
    """A named daemon thread that writes what `put()` enqueues, in batches; see the module docstring."""

    engine: sa.Engine
    stats: WriterStats
    batch_size: int = 2000
    """Most records written in one transaction."""
    flush_interval: float = 0.2
    """Longest a record waits for its batch to fill, in seconds."""
    auto_migrate: bool = True
    """Apply pending migrations before the first write."""
    price_table: PriceTable | None = None
    """Our prices; None for the process-wide table."""
    listeners: Sequence[Callable[[UsageRecord], None]] = ()
    """Called in the writer thread with each record once it is written (e.g. the OpenTelemetry exporter)."""
    retry_interval: float = 0.1
    """First backoff after a failed write, in seconds; it doubles (with jitter) on each failure."""
    max_retry_interval: float = 10.0
    """Cap on the backoff between two retries of a failing write."""
    spill_after: float = 2.0
    """Seconds of failing writes after which batches go to the spill file instead of waiting in memory."""
    max_queue: int = 10_000
    """Records held in memory at most; beyond that `track()` appends to the spill file."""
    spill: SpillDir | None = None
    """Where records go when the database cannot take them; None to keep them in memory only (and drop)."""
    journal: Journal | None = None
    """The write-ahead journal `put()` copies each record into first; None for memory-only durability."""
    replay_interval: float = 30.0
    """How often an idle, healthy writer looks for spill files left by other (dead) processes."""
    identity: Callable[[sa.Connection], Mapping[str, Any] | None] | None = None
    """Reads the identity of the database (server, database, schema) once connected, for the spill directory."""
    io_timeout: float = 30.0
    """Longest one database call of the writer may take before its sockets are shut down (a stalled network)."""
    _queue: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue[object], init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # Re-entrant: a SIGTERM handler may close the tracker while the main thread holds it.
    _count_lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    # Set when a full batch (or a flush or stop marker) waits: ends the writer's wait for a batch to fill.
    _batch_ready: threading.Event = field(default_factory=threading.Event, init=False)
    _migrated: bool = field(default=False, init=False)
    _identified: bool = field(default=False, init=False)
    # Our spill directory names another database (`target.json`): replay only what this process spilled.
    _foreign_target: bool = field(default=False, init=False)
    _spilling: bool = field(default=False, init=False)
    _probe_attempt: int = field(default=0, init=False)
    _next_probe: float = field(default=0.0, init=False)
    _next_replay: float = field(default=0.0, init=False)
    _stopping: bool = field(default=False, init=False)
    _stopped_clean: bool = field(default=False, init=False)
    _deadline: float = field(default=float('inf'), init=False)
    _inflight: list[UsageRecord] = field(default_factory=list[UsageRecord], init=False)
    _unvalidated: list[object] = field(default_factory=list[object], init=False)
    _entries: list[_Entry] = field(default_factory=list[_Entry], init=False)
    # Whether the batch being delivered is all in the journal, and whether any of it was neither written nor
    # spilled: then its journal entries stay unsettled, so that the next start replays them.
    _batch_journalled: bool = field(default=False, init=False)
    _batch_lost: bool = field(default=False, init=False)
    _siblings: list[SpillDir] = field(default_factory=list[SpillDir], init=False)
    _warned_dirs: set[str] = field(default_factory=set[str], init=False)
    _pid: int = field(default_factory=os.getpid, init=False)
    _io_since: float | None = field(default=None, init=False)
    _connections: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet[Any], init=False)

    def __post_init__(self) -> None:
        if self.engine.dialect.name == 'postgresql':
            event.listen(self.engine, 'connect', self._on_connect)

    def _on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        try:
            self._connections.add(dbapi_connection)
        except TypeError:  # pragma: no cover - a driver whose connections take no weak reference
            pass

    # --- called from the product's threads ---

    def put(self, item: UsageRecord | dict[str, Any]) -> None:
        """Journal one record (if journalling) and enqueue it; never blocks. A full queue sends it to the spill file."""
        if self._thread is None:
            self._start()
        seg: Segment | None = None
        if (journal := self.journal) is not None:
            try:
                seg = journal.append(item if type(item) is dict else dict(item.__dict__))
            except Exception as exc:  # e.g. a full disk: the record still goes on, in memory only
                _log.error('journal', 'pai-usage: could not journal a usage record (kept in memory): %r', exc)
        size = self._queue.qsize()
        if size >= self.max_queue:
            self.spill_now(item, seg=seg)
            return
        self._queue.put((item, seg))
        # Counted, not derived from `taken + qsize()`: the writer takes a batch off the queue before it adds to
        # `taken`, so a derived count reads up to one batch short meanwhile (seen under 8 producer threads).
        with self._count_lock:
            self.stats.queued += 1
        # The writer sleeps while a batch fills instead of waking for each record (each wake-up would cost this
        # thread a GIL hand-off): tell it when a batch is full.
        if size + 1 >= self.batch_size and not self._batch_ready.is_set():
            self._batch_ready.set()

    def enqueued(self) -> int:
        """Records accepted so far (put on the queue, or handled on overflow)."""
        with self._count_lock:
            return self.stats.queued + self.stats.overflowed

    def count_invalid_input(self) -> None:
        """Count something `track()` got that is not a usage record at all (rejected, like an invalid record)."""
        with self._count_lock:
            self.stats.overflowed += 1
            self.stats.invalid += 1

    def count_dropped(self, n: int = 1) -> None:
        """Count records `track()` could not even hand over."""
        with self._count_lock:
            self.stats.overflowed += n
            self.stats.dropped += n

    def alive(self) -> bool:
        """Whether the writer thread runs (or has not been needed yet, or stopped cleanly)."""
        thread = self._thread
        return thread is None or thread.is_alive() or self._stopped_clean

    def start_if_spilled(self) -> None:
        """Start the thread now if spill files or journals wait for replay (e.g. left by a killed process)."""
        if self.spill is not None and (self.spill.pending() or any(s.pending() for s in self.spill.siblings())):
            self._start()

    def flush(self, timeout: float | None) -> bool:
        """Wait until everything put so far is in the database; False on timeout or while some is only on disk."""
        self._check_pid()
        thread = self._thread
        if thread is None:
            return self._settled_ok()
        if not thread.is_alive():
            return False  # the writer died: what is queued will never be written by it
        marker = _Flush(self.spill.own_mark() if self.spill is not None else None)
        self._queue.put(marker)
        self._batch_ready.set()
        self._wake.set()
        if not marker.done.wait(timeout):
            return False
        return marker.ok

    def stop(self, timeout: float | None) -> bool:
        """Write what is queued and stop the thread within `timeout`, probing and replaying until then.

        Returns False if anything of this process is not in the database by then (it is on disk, not lost).
        """
        self._check_pid()
        thread = self._thread
        if thread is None:
            clean = self._close_files()
            return clean and self._settled_ok()
        self._deadline = time.monotonic() + (timeout if timeout is not None else float('inf'))
        self._stopping = True
        self._queue.put(_STOP)
        self._wake.set()
        self._batch_ready.set()
        thread.join(timeout)
        if thread.is_alive():
            self._spill_leftovers()
            if self.spill is not None:
                try:
                    self.spill.rotate()  # unlock our file: the next start (or another process) replays it
                except OSError as exc:
                    _log.error('rotate', 'pai-usage: could not close the spill file: %r', exc)
            return False
        clean = self._stopped_clean
        clean = self._close_files() and clean
        return clean and self._settled_ok()

    def _settled_ok(self, spilled: int | None = None) -> bool:
        # A record lost once stays lost (or only in the journal, for the next start): every later answer says so,
        # as `close()` does. A loss before the call counts too: those records were tracked before it.
        with self._count_lock:
            lost = self._not_kept()
        own = self.spill is not None and self.spill.own_pending(spilled)
        return not lost and not own

    def _not_kept(self) -> int:
        """Records neither written nor spilled so far (lost, or only in the journal)."""
        return self.stats.dropped + self.stats.journal_only

    def _close_files(self) -> bool:
        clean = True
        if self.journal is not None:
            clean = self.journal.close()
        if self.spill is not None:
            self.spill.close()
        return clean

    def after_fork(self) -> None:
        """In a forked child: forget the parent's queue, thread, locks, files and connections."""
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()
        self._count_lock = threading.RLock()
        self._wake = threading.Event()
        self._batch_ready = threading.Event()
        self._spilling = self._stopping = self._stopped_clean = False
        self._deadline = float('inf')
        self._inflight = []
        self._unvalidated = []
        self._entries = []
        self._pid = os.getpid()
        self.stats.reset()
        if self.spill is not None:
            self.spill.after_fork()
        if self.journal is not None:
            self.journal.after_fork()
        # The parent's pooled connections belong to the parent: drop them without closing their sockets.
        self.engine.dispose(close=False)

    def _check_pid(self) -> None:
        # `os.register_at_fork` covers `os.fork()`; this catches a fork that bypassed it (e.g. from C).
        if self._pid != os.getpid():
            self.after_fork()

    def _start(self) -> None:
        self._check_pid()
        with self._lock:
            if self._thread is None:
                # One thread: a second stage (validating the next batch while this one is written) was
                # measured no faster, because of the GIL.
                self._thread = threading.Thread(target=self._run, name='pai-usage-writer', daemon=True)
                self._thread.start()
                if self.engine.dialect.name == 'postgresql':
                    thread = self._thread
                    threading.Thread(target=self._watch, args=(thread,), name='pai-usage-watchdog', daemon=True).start()

    def _watch(self, thread: threading.Thread) -> None:
        """Shut down the sockets under a database call that hangs past `io_timeout` (a stalled TCP connection).

        Timeouts on the server (`statement_timeout`) cannot answer through a connection that no longer moves
        bytes, and TCP keepalives are answered by whatever middlebox holds it: only the client can give up.
        """
        while thread.is_alive():
            time.sleep(min(1.0, self.io_timeout / 4))
            since = self._io_since
            if since is not None and time.monotonic() - since > self.io_timeout:
                self._io_since = time.monotonic()  # once per timeout, not once a second
                _log.error(
                    'stalled', 'pai-usage: a database call hung for %.0f s; dropping its connection', self.io_timeout
                )
                for conn in list(self._connections):
                    try:
                        fd = conn.pgconn.socket
                        sock = socket.socket(fileno=os.dup(fd))
                    except Exception:  # closed meanwhile
                        continue
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    finally:
                        sock.close()

    def spill_now(self, item: object, *, closed: bool = False, seg: Segment | None = None) -> None:
        """Append one record to the spill file from the calling thread (buffered, no fsync on this thread).

        With `closed` (the writer is stopped), the record goes into the one open file kept for late records,
        in the page cache at once (it survives the process) and fsynced at exit.
        """
        with self._count_lock:
            self.stats.overflowed += 1
        self._spill_entries([(item, seg)], sync=False, overflow=True)

    def sync_late(self) -> None:
        """Fsync and close the file of records tracked after `close()` (at exit, or on the next `close()`)."""
        if self.spill is not None:
            try:
                self.spill.rotate()
            except OSError as exc:
                _log.error('rotate', 'pai-usage: could not close the spill file: %r', exc)

    def _spill_leftovers(self) -> None:
        # The writer is stuck (hung database) past the deadline: save its batch and the queue from here.
        # A record may end up both written by the writer and spilled; replay inserts it once.
        inflight, unvalidated = list(self._inflight), self._unvalidated
        if self.spill is not None and (inflight or unvalidated):
            # Not counted: the writer thread still owns (and counts) these; this copy is insurance.
            try:
                lines = [encode(r.model_dump(mode='json')) for r in inflight]
                lines.extend(encode(_raw(item)) for item in unvalidated)
                self.spill.append(lines)
            except Exception as exc:
                _log.error('leftovers', 'pai-usage: could not spill the batch being written: %r', exc)
        markers: list[_Flush] = []
        entries: list[_Entry] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Flush):
                markers.append(item)
            elif item is not _STOP:
                entries.append(cast('_Entry', item))
        with self._count_lock:
            self.stats.taken += len(entries)
        self._spill_entries(entries, sync=True)
        if self.spill is not None:
            try:
                self.spill.sync()
            except OSError:  # pragma: no cover - counted by the append that follows, if any
                pass
        for marker in markers:
            marker.done.set()

    def _spill_entries(self, entries: Sequence[_Entry], *, sync: bool, overflow: bool = False) -> None:
        """Spill unvalidated entries (validated on replay), off the writer's batch path.

        Their journal entries are settled only once the spill file holds them.
        """
        lines: list[bytes] = []
        for item, _ in entries:
            try:
                lines.append(encode(_raw(item)))
            except Exception:
                try:  # e.g. cyclic metadata: made JSON-safe now, as validation would on replay
                    lines.append(encode_lenient(_raw(item)))
                except Exception as exc:
                    self._count_invalid(1, replay=False)
                    self._reject(item, f'cannot be encoded as JSON: {exc!r}')
        kept = self._spill_lines(lines, sync=sync, journalled=_all_journalled(entries), overflow=overflow)
        if kept and self.journal is not None:
            self.journal.settle(_settle_counts(entries))

    # --- the writer thread ---

    def _run(self) -> None:
        """Guarded loop: take batches, validate, price and write them (retrying, spilling); replay and probe."""
        self._next_replay = time.monotonic() + self.replay_interval
        with sqlite_gate(self.engine.dialect.name):
            self._guarded(self._startup)
        while True:
            try:
                if self._cycle():
                    break
            except Exception as exc:
                self._loop_error(exc)
        self._stopped_clean = True

    def _guarded(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            self._loop_error(exc)

    def _loop_error(self, exc: Exception) -> None:
        with self._count_lock:
            self.stats.loop_errors += 1
        _log.error('loop', 'pai-usage: the writer hit an unexpected error (it goes on): %r', exc, exc_info=True)
        # What the failed cycle held is saved, so that nothing it took is lost.
        entries, self._entries = self._entries, []
        self._inflight, self._unvalidated = [], []
        if entries:
            self._spill_entries(entries, sync=True)
        time.sleep(0.01)  # never a busy loop, even if every cycle fails

    def _startup(self) -> None:
        spill = self.spill
        if spill is not None:
            spill.remove_stale()
        if spill is not None and (spill.pending() or any(s.pending() for s in spill.siblings())):
            self._io_since = time.monotonic()
            try:
                self._ensure_ready()
            except Exception as exc:
                self._io_since = None
                with self._count_lock:
                    self.stats.failed_writes += 1
                self._enter_spilling()
                _log.error('write', 'pai-usage: the database is unreachable, replay postponed: %r', exc)
                return
            self._io_since = None
            self._replay()

    def _cycle(self) -> bool:
        items = self._take()
        # Held from here, never while waiting on the queue: a fork waits only for the work in hand.
        with sqlite_gate(self.engine.dialect.name):
            return self._cycle_on(items)

    def _cycle_on(self, items: list[object]) -> bool:
        if not items:
            self._maintain()
            return False
        stop = False
        markers: list[_Flush] = []
        entries: list[_Entry] = []
        for item in items:
            if item is _STOP:
                stop = True
            elif type(item) is _Flush:
                markers.append(item)
            else:
                entries.append(cast('_Entry', item))
        if entries:
            self._process(entries)
        self._maintain()
        if stop:
            self._shutdown()
        for marker in markers:
            self._answer(marker)
        return stop

    def _process(self, entries: list[_Entry]) -> None:
        self._entries = entries
        fresh = [item for item, _ in entries]
        with self._count_lock:
            self.stats.taken += len(fresh)
        records: list[UsageRecord] = []
        # Validated chunk by chunk while the batch is written (see `_copy_records`).
        self._inflight, self._unvalidated = records, fresh
        self._batch_journalled, self._batch_lost = _all_journalled(entries), False
        self._deliver(records, self._validated(fresh))
        self._inflight, self._unvalidated = [], []
        self._entries, self._batch_journalled = [], False
        if self.journal is not None and not self._batch_lost:
            self.journal.settle(_settle_counts(entries))

    def _answer(self, marker: _Flush) -> None:
        """Probe at once and replay what this process spilled, then say whether everything is in.

        Everything put before the marker, that is: other threads may go on spilling meanwhile (a burst that
        overflows the queue), and what they spill after `flush()` was called is not its to wait for.
        """
        spill = self.spill
        if spill is not None and spill.own_pending(marker.spilled):
            self._probe_now()
        marker.ok = self._settled_ok(marker.spilled)
        marker.done.set()

    def _probe_now(self) -> None:
        if self._spilling:
            self._probe()
        elif self.spill is not None and self.spill.own_pending():
            self._recover()

    def _shutdown(self) -> None:
        """Stopping: keep probing and replaying our own spilled records until the deadline."""
        spill = self.spill
        # A margin before the deadline, so that the thread ends (and closes its files) before `stop()` gives up.
        deadline = self._deadline - 0.1
        while spill is not None and spill.own_pending() and time.monotonic() < deadline:
            self._probe_now()
            if not spill.own_pending():
                break
            with sqlite_gate_paused():
                time.sleep(max(min(0.2, deadline - time.monotonic()), 0))
            self._next_probe = 0.0

    def _take(self) -> list[object]:
        timeout = 1.0
        if self._spilling:
            timeout = min(max(self._next_probe - time.monotonic(), 0.01), 1.0)
        try:
            items: list[object] = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        if _is_marker(items[0]):
            return items
        # Let the batch fill, then drain it in one go: waiting in `get()` for each record would wake this
        # thread (and take the GIL from the product's threads) once per record.
        deadline = time.monotonic() + self.flush_interval
        batch_size = self.batch_size
        get = self._queue.get_nowait
        ready = self._batch_ready
        while True:
            ready.clear()
            while len(items) < batch_size:
                try:
                    item = get()
                except queue.Empty:
                    break
                items.append(item)
                if _is_marker(item):
                    return items
            remaining = deadline - time.monotonic()
            if len(items) >= batch_size or remaining <= 0:
                return items
            ready.wait(remaining)

    def _validate(self, item: object, *, replay: bool = False) -> UsageRecord | None:
        try:
            record = item if isinstance(item, UsageRecord) else UsageRecord.model_validate(self._prepared(item))
            return _priced(record, self.price_table)
        except ValidationError as exc:
            message = _describe(exc)
            kind = ','.join(sorted({'.'.join(map(str, e['loc'])) for e in exc.errors(include_input=False)}))
        except Exception as exc:  # a bug or an odd value in validation or pricing: this record only
            message = f'{type(exc).__name__}: {exc}'[:2000]
            kind = type(exc).__name__
        self._count_invalid(1, replay=replay)
        # One message per kind of problem per interval: clear, without flooding the product's log.
        _log.error(f'invalid:{kind}', 'pai-usage: invalid usage record rejected: %s', message)
        self._reject(item, message)
        return None

    def _count_invalid(self, n: int, *, replay: bool) -> None:
        with self._count_lock:
            self.stats.invalid += n
            if replay:
                self.stats.replay_invalid += n

    def _validated(self, items: list[object], *, replay: bool = False) -> Iterator[list[UsageRecord]]:
        """Validate and price `items`, one chunk at a time; `_unvalidated` holds the rest (for `_spill_leftovers`)."""
        table = self.price_table
        try:
            for start in range(0, len(items), _CHUNK):
                if start:
                    # Validation holds the GIL in C for the whole call: between chunks, let the product's
                    # threads run, so that `track()` never waits long behind the writer.
                    time.sleep(0)
                chunk = [self._prepared(i) for i in items[start : start + _CHUNK]]
                valid = self._validate_chunk(chunk, table, replay=replay)
                self._unvalidated = items[start + _CHUNK :]
                yield valid
        finally:
            self._unvalidated = []

    def _validate_chunk(self, chunk: list[object], table: PriceTable | None, *, replay: bool) -> list[UsageRecord]:
        """Validate and price one chunk, keeping its order; the invalid records are rejected and left out."""
        try:
            plain = fields_many(chunk)
            # Priced before the record is built: a record is made once, never copied to add its price.
            fast = [values for values in plain if values is not None]
            for values, priced in zip(fast, price_fields_many(fast, table), strict=True):
                values['cost_usd'] = priced.cost_usd
                values['pricing_status'] = priced.pricing_status
                values['price_source'] = priced.price_source
        except Exception:  # a bug in the shortcut must not cost a record: the model sees them all
            plain = [None] * len(chunk)
        slow = [item for item, values in zip(chunk, plain, strict=True) if values is None]
        checked = iter(self._validate_slow(slow, table, replay=replay) if slow else ())
        out: list[UsageRecord] = []
        for item, values in zip(chunk, plain, strict=True):
            if values is not None:
                out.append(record_from_fields(values, set(cast('dict[str, Any]', item))))
            elif (record := next(checked)) is not None:
                out.append(record)
        return out

    def _validate_slow(
        self, items: list[object], table: PriceTable | None, *, replay: bool
    ) -> list[UsageRecord | None]:
        # One call for all of them (cheaper than one per record); on any error, record by record, so that each
        # bad record gets its own message and the good ones around it are kept.
        try:
            return [_priced(r, table) for r in _RECORDS.validate_python(items)]
        except Exception:
            return [self._validate(item, replay=replay) for item in items]

    def _prepared(self, item: object) -> object:
        if not isinstance(item, dict):
            return item
        fields_ = cast('dict[str, Any]', item)
        if self._caller_priced(fields_):
            # Priced by the caller (pydantic-ai's cost): saying so now saves a model copy later. The dict is
            # ours: `track()` always hands over a fresh one.
            fields_['pricing_status'] = 'priced'
        return fields_

    def _caller_priced(self, item: dict[str, Any]) -> bool:
        if item.get('cost_usd') is None or item.get('pricing_status') is not None:
            return False
        table = self.price_table
        return table is None or table.token_price(item.get('provider'), item.get('model')) is None

    def _reject(self, item: object, error: str) -> None:
        if self.spill is None:
            return
        try:
            if isinstance(item, UsageRecord):
                record: Mapping[str, Any] | str = item.model_dump(mode='json')
            elif isinstance(item, Mapping):
                record = cast('Mapping[str, Any]', item)
            else:
                record = str(item)[:1000]
            self.spill.reject(encode_rejected(error, record, _FIELDS))
        except Exception as exc:
            _log.error('reject', 'pai-usage: could not keep a rejected record in %s: %r', self.spill.path, exc)

    def _deliver(self, records: list[UsageRecord], more: Iterator[list[UsageRecord]] | None = None) -> None:
        """Write `records` and those `more` yields (appended to `records`), retrying, or spill them.

        If the spill file refuses them too (a full disk), they are held here and the write retried: they are lost
        only if neither has taken them by the stop deadline. Meanwhile the queue fills, up to `max_queue`.
        """
        if self._spilling and not self._stopping and time.monotonic() < self._next_probe:
            _drain(more, records)
            if self._spill_records(records):
                return
        attempt = 0
        failing_since: float | None = None
        held = False
        while True:
            try:
                self._write_checked(records, more=more)
            except Exception as exc:
                _drain(more, records)  # the rest of the batch, for the retry or the spill file
                more = None
                with self._count_lock:
                    self.stats.failed_writes += 1
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                attempt += 1
                if self.spill is not None and (
                    self._spilling
                    or self._stopping
                    or now - failing_since >= self.spill_after
                    or self._queue.qsize() >= self.max_queue // 2
                ):
                    _log.error('write', 'pai-usage: writing usage records failed, spilling to disk: %r', exc)
                    self._enter_spilling()
                    if self._spill_records(records):
                        return
                    held = True
                else:
                    _log.error('write', 'pai-usage: writing %d usage records failed, retrying: %r', len(records), exc)
                if self._stopping and now >= self._deadline:  # neither database nor disk took them in time
                    self._count_lost(len(records), exc, journalled=self._batch_journalled)
                    return
                # Held in memory, the batch is retried at least every second, as a probe would be.
                self._sleep(min(self._backoff(attempt), _PROBE_CAP) if held else self._backoff(attempt))
                continue
            if self._spilling:
                self._recover()
            return

    def _write_checked(
        self, records: list[UsageRecord], *, replay: bool = False, more: Iterator[list[UsageRecord]] | None = None
    ) -> None:
        """Write and count `records`; a data error splits them until only the refused rows are left (rejected).

        Raises on anything else (an outage), with `records` cut down to the rows not written yet.
        """
        try:
            inserted = self._write(records, replay=replay, more=more)
        except Exception as exc:
            _drain(more, records)
            if not _is_data_error(exc):
                raise
            self._split(records, exc, replay=replay)
            return
        self._count_written(records, inserted, replay=replay)

    def _split(self, records: list[UsageRecord], first: BaseException, *, replay: bool) -> None:
        parts: deque[tuple[list[UsageRecord], BaseException]] = deque([(records[:], first)])
        while parts:
            part, error = parts.popleft()
            if len(part) == 1:
                self._refused(part[0], error, replay=replay)
                continue
            mid = len(part) // 2
            halves = (part[:mid], part[mid:])
            for i, half in enumerate(halves):
                try:
                    inserted = self._write(half, replay=True)
                except Exception as exc:
                    if not _is_data_error(exc):  # an outage mid-way: the caller retries (or spills) the rest
                        records[:] = [r for rest in (*halves[i:], *(p for p, _ in parts)) for r in rest]
                        raise
                    parts.append((half, exc))
                    continue
                self._count_written(half, inserted, replay=replay)
        records.clear()

    def _refused(self, record: UsageRecord, error: BaseException, *, replay: bool) -> None:
        orig = getattr(error, 'orig', None) or error
        message = f'refused by the database: {type(orig).__name__}: {orig}'.splitlines()[0][:1000]
        self._count_invalid(1, replay=replay)
        _log.error(f'refused:{type(orig).__name__}', 'pai-usage: usage record %s %s', record.id, message)
        self._reject(record, message)

    def _ensure_ready(self) -> None:
        if self.auto_migrate and not self._migrated:
            migrate(self.engine)
            self._migrated = True
        if not self._identified and self.identity is not None:
            try:
                with self.engine.connect() as conn:
                    identity = self.identity(conn)
            except Exception:  # a permission missing: the URL-derived key stays the only one
                identity = None
            self._identified = True
            if identity is not None and self.spill is not None:
                recorded = self.spill.read_target()
                if recorded is not None and recorded != dict(identity):
                    # The same URL reached another database before (a tunnel to another server, a restored
                    # copy): what other processes spilled here is that one's, never to be replayed into ours.
                    self._foreign_target = True
                    _log.error(
                        'target-conflict',
                        'pai-usage: the spill directory %s holds records for another database (%s), not this one '
                        '(%s): they stay there, replayed only by a tracker connected to that database',
                        self.spill.path,
                        recorded,
                        dict(identity),
                    )
                else:
                    try:
                        self.spill.write_target(identity)
                    except OSError as exc:
                        _log.error('target', 'pai-usage: could not record the spill directory target: %r', exc)
                self._find_siblings(identity)

    def _find_siblings(self, identity: Mapping[str, Any]) -> None:
        """Spill directories of the same database under another key (another URL spelling): replay them too."""
        assert self.spill is not None
        ours = dict(identity)
        for other in self.spill.siblings():
            target = other.read_target()
            if target == ours:
                self._siblings.append(other)
            elif (
                target is None
                and other.pending()
                and str(other.path) not in self._warned_dirs
                and self._maybe_same(other, ours)
            ):
                self._warned_dirs.add(str(other.path))
                _log.warning(
                    f'sibling:{other.path}',
                    'pai-usage: spill files in %s may be for this database (%s) but name no server; not replayed',
                    other.path,
                    ours.get('database'),
                )

    def _maybe_same(self, other: SpillDir, ours: Mapping[str, Any]) -> bool:
        for claimed_name in sorted(os.listdir(other.path)):
            if not claimed_name.endswith('.jsonl') or claimed_name.startswith(('rejected-', 'quarantine-')):
                continue
            try:
                with open(other.path / claimed_name, 'rb') as f:
                    header = json.loads(f.readline())
            except (OSError, ValueError):
                continue
            target: object = cast('dict[str, Any]', header).get('target') if isinstance(header, dict) else None
            if isinstance(target, dict):
                return _same_names(cast('dict[str, Any]', target), ours)
        hint = other.read_hint()  # only journal segments: they name no target, the hint beside them does
        return hint is not None and _same_names(hint, ours)

    def _sibling_dirs(self) -> list[SpillDir]:
        return [s for s in self._siblings if s.pending()]

    def _write(
        self, records: list[UsageRecord], *, replay: bool = False, more: Iterator[list[UsageRecord]] | None = None
    ) -> int:
        self._io_since = time.monotonic()
        try:
            return self._write_now(records, replay=replay, more=more)
        finally:
            self._io_since = None

    def _write_now(self, records: list[UsageRecord], *, replay: bool, more: Iterator[list[UsageRecord]] | None) -> int:
        self._ensure_ready()
        if self.engine.dialect.name != 'postgresql':
            _drain(more, records)
            with self.engine.begin() as conn:
                return _insert_sqlite(conn, records)
        if not replay:
            # Fresh records are new ids: COPY straight into the table, the fastest path by far.
            try:
                with self.engine.begin() as conn:
                    return _copy_records(conn, records, staged=False, more=more)
            except Exception as exc:  # raw COPY raises psycopg's UniqueViolation, not SQLAlchemy's IntegrityError
                _drain(more, records)
                if not _is_unique_violation(exc):
                    raise
        _drain(more, records)
        with self.engine.begin() as conn:
            return _copy_records(conn, records, staged=True)

    def _count_written(self, records: list[UsageRecord], inserted: int, *, replay: bool = False) -> None:
        if not records:
            return
        unpriced = sum(r.pricing_status == 'unpriced' for r in records)
        errors = sum(r.status == 'error' for r in records)
        duplicates = max(len(records) - inserted, 0)
        with self._count_lock:
            if replay:
                self.stats.replayed += len(records)
                self.stats.replay_duplicates += duplicates
            else:
                self.stats.written += len(records) - duplicates
                self.stats.duplicates += duplicates
            self.stats.unpriced += unpriced
            self.stats.errors += errors
        self._notify(records)

    def _count_lost(self, n: int, exc: BaseException, *, journalled: bool) -> None:
        """`n` records could be neither written nor spilled: lost, unless the journal holds them."""
        if threading.current_thread() is self._thread:
            self._batch_lost = True
        with self._count_lock:
            if journalled:
                self.stats.journal_only += n
            else:
                self.stats.dropped += n
        if journalled:
            _log.error(
                'journal-only',
                'pai-usage: %d usage records neither written nor spilled; kept in the journal, replayed by the next'
                ' start: %r',
                n,
                exc,
            )
        else:
            _log.error('dropped', 'pai-usage: %d usage records LOST (not written, not spilled): %r', n, exc)

    def _spill_records(self, records: list[UsageRecord]) -> bool:
        """Spill `records`; False if the spill file refuses them, with `records` cut to those it may take later.

        A record JSON cannot encode is rejected (and counted) either way, never retried.
        """
        lines: list[bytes] = []
        kept: list[UsageRecord] = []
        for r in records:
            try:
                lines.append(encode(r.model_dump(mode='json')))
            except Exception as exc:
                self._count_invalid(1, replay=False)
                self._reject(r, f'cannot be encoded as JSON: {exc!r}')
                continue
            kept.append(r)
        if self._spill_lines(lines, sync=True, journalled=self._batch_journalled, held=True):
            return True
        records[:] = kept  # the rejected ones are counted: never again
        return False

    def _spill_lines(
        self, lines: list[bytes], *, sync: bool, journalled: bool, held: bool = False, overflow: bool = False
    ) -> bool:
        """Append `lines` to the spill file; returns whether they were kept (else they are counted as lost).

        With `held`, a refusal is logged, not counted: the caller still holds the records, and retries.
        `overflow`: records `track()` spilled itself (the queue was full), not taken from the queue by the writer.
        """
        if not lines:
            return True
        if self.spill is None:
            if not held:
                self._count_lost(len(lines), RuntimeError('spilling is disabled'), journalled=journalled)
            return False
        try:
            self.spill.append(lines, sync=sync, overflow=overflow)
        except Exception as exc:
            if held:
                _log.error(
                    'spill-held',
                    'pai-usage: the spill file refuses writes too; %d usage records held in memory, retried: %r',
                    len(lines),
                    exc,
                )
            else:
                self._count_lost(len(lines), exc, journalled=journalled)
            return False
        with self._count_lock:
            self.stats.spilled += len(lines)
        return True

    def _enter_spilling(self) -> None:
        if not self._spilling:
            self._spilling = True
            self._probe_attempt = 0
        self._probe_attempt += 1
        # Probes back off, but never past a second: replay starts soon after the database is back.
        self._next_probe = time.monotonic() + min(self._backoff(self._probe_attempt), _PROBE_CAP)

    def _probe(self) -> None:
        self._io_since = time.monotonic()
        try:
            self._ensure_ready()
            with self.engine.connect() as conn:
                conn.execute(sa.text('SELECT 1'))
        except Exception:
            self._enter_spilling()
            return
        finally:
            self._io_since = None
        self._recover()

    def _recover(self) -> None:
        if self._spilling:
            _log.warning('recovered', 'pai-usage: the database is back; replaying spilled usage records')
        self._spilling = False
        self._probe_attempt = 0
        if self.spill is not None:
            try:
                self.spill.rotate()  # so our own file can be claimed and replayed too
            except OSError as exc:
                _log.error('rotate', 'pai-usage: could not close the spill file: %r', exc)
        self._replay()

    def _maintain(self) -> None:
        spill = self.spill
        if spill is None:
            return
        try:
            spill.sync()  # what `track()` appended on overflow
        except OSError as exc:
            _log.error('sync', 'pai-usage: could not fsync the spill file: %r', exc)
        if self._stopping:
            return
        now = time.monotonic()
        if self._spilling:
            if now >= self._next_probe:
                self._probe()
        elif spill.has_own_file() and self._queue.qsize() < self.max_queue // 2:
            # A burst overflowed the queue while the database was fine: we have caught up, put it in.
            self._recover()
        elif now >= self._next_replay:
            self._next_replay = now + self.replay_interval
            if spill.pending() or self._sibling_dirs():
                self._replay()

    def _replay(self) -> None:
        """Insert every claimable spill file and journal, then delete it; stops (keeping the file) on an outage."""
        if self.spill is None:
            return
        skip = self.journal.own_names() if self.journal is not None else set[str]()
        for spill in (self.spill, *self._siblings):
            only = spill.own_names() if spill is self.spill and self._foreign_target else None
            for claimed in spill.claim(skip, only=only):
                try:
                    self._replay_file(claimed.records())
                except Exception as exc:
                    if _is_data_error(exc):  # not an outage: this file is poison, never let it block the others
                        target = claimed.quarantine()
                        with self._count_lock:
                            self.stats.quarantined += 1
                        _log.error('quarantine', 'pai-usage: could not replay %s, set aside: %r', target, exc)
                        continue
                    claimed.release()
                    with self._count_lock:
                        self.stats.failed_writes += 1
                    _log.error('replay', 'pai-usage: replaying %s failed, will retry: %r', claimed.path, exc)
                    self._enter_spilling()
                    return
                claimed.done()
            spill.tidy()

    def _replay_file(self, raws: Iterator[dict[str, Any] | ValueError]) -> None:
        pending: list[object] = []
        for raw in raws:
            if isinstance(raw, ValueError):
                self._count_invalid(1, replay=True)
                self._reject(str(raw), 'torn line in a spill file')
                continue
            pending.append(raw)
            if len(pending) >= self.batch_size:
                self._replay_batch(pending)
                pending = []
        if pending:
            self._replay_batch(pending)

    def _replay_batch(self, raws: list[object]) -> None:
        batch: list[UsageRecord] = []
        for chunk in self._validated(raws, replay=True):
            batch.extend(chunk)
        if batch:
            self._write_checked(batch, replay=True)

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads the retries of many processes; never 0, so never a busy loop.
        cap = min(self.max_retry_interval, self.retry_interval * 2 ** min(attempt - 1, 30))
        return cap / 2 + random.uniform(0, cap / 2)

    def _sleep(self, seconds: float) -> None:
        with sqlite_gate_paused():
            if self._stopping:  # `_wake` stays set once stopping: sleep for real, but not past the deadline
                time.sleep(max(min(seconds, self._deadline - time.monotonic()), 0))
                return
            self._wake.wait(seconds)
            self._wake.clear()

    def _notify(self, records: list[UsageRecord]) -> None:
        for listener in self.listeners:
            try:
                for record in records:
                    listener(record)
            except Exception as exc:
                _log.error(f'listener:{listener!r}', 'pai-usage: usage listener %r failed: %r', listener, exc)
