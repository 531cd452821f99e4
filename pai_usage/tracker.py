"""`UsageTracker`: fire-and-forget recording of usage events, and the summaries read back from them."""

from __future__ import annotations

import asyncio
import atexit
import getpass
import hashlib
import json
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Self
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import StaticPool

from ._journal import Journal
from ._log import RateLimitedLog
from ._spill import SpillDir, default_spill_dir
from ._warnings import UnknownFieldWarning, emit_pending, has_pending, warn_once
from ._writer import Writer, WriterStats
from .migrate import migrate
from .pricing import PriceTable
from .record import UsageRecord
from .summary import GroupBy, UsageSummary, month_bounds, query_summary

__all__ = (
    'DATABASE_URL_ENV_VAR',
    'DEFAULT_DATABASE_URL',
    'DISABLED_ENV_VAR',
    'Durability',
    'TrackerStats',
    'UsageTracker',
    'configure',
    'create_engine',
    'get_tracker',
)

DATABASE_URL_ENV_VAR = 'PAI_USAGE_DATABASE_URL'
"""Environment variable holding the default database URL."""
DEFAULT_DATABASE_URL = 'sqlite:///pai_usage.db'
"""The embedded default, used when neither a URL nor the environment variable is given."""
DISABLED_ENV_VAR = 'PAI_USAGE_DISABLED'
"""Set to `1` to turn `track()` into a no-op (counted in `stats().disabled`), e.g. in a test or a batch job."""

_RECORD_FIELDS = frozenset(UsageRecord.model_fields)
# The off switch: None follows `$PAI_USAGE_DISABLED` (read when a tracker is created), else `configure(enabled=)`.
_enabled: bool | None = None
# Set by `pai_usage.testing` while a `usage_ledger` captures records: `track()` hands them over instead of queuing.
_sink: Callable[[UsageTracker, UsageRecord | dict[str, Any]], None] | None = None
# Set by `pai_usage.testing` so that a test session's default tracker is in memory, never a real ledger.
_default_factory: Callable[[], UsageTracker] | None = None

Durability = Literal['journal', 'memory']
"""How a tracked record waits for the writer: `journal` (survives the process) or `memory` (see `docs/delivery.md`)."""

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
    errors: int = 0
    """Written with `status='error'`: calls that failed (a Gemini `APIError`) and agent runs that failed."""
    disabled: int = 0
    """Ignored because tracking is switched off (`PAI_USAGE_DISABLED=1` or `configure(enabled=False)`)."""
    spilled: int = 0
    """Saved to the spill file (queue full, database failing, or shutdown deadline); replayed later."""
    replayed: int = 0
    """Re-sent to the database from spill files or journals, this process's or others' (so it can exceed `spilled`)."""
    duplicates: int = 0
    """Accepted, but their id was already in the table (stored once, not counted in `written`)."""
    writer_alive: bool = True
    """Whether the writer thread runs (or is not needed yet); when False, `flush()` and `close()` return False."""
    journal_only: int = 0
    """Neither written nor spilled (e.g. the database down and the disk full), but held by the write-ahead journal:
    the next tracker on this spill directory replays them. `flush()` and `close()` return False meanwhile."""
    loop_errors: int = 0
    """Writer cycles that failed on an unexpected error: logged, and the writer went on."""
    quarantined: int = 0
    """Spill files set aside as `quarantine-*` because they could not be replayed (not for an outage)."""


def create_engine(database: str | sa.Engine | None = None) -> sa.Engine:
    """The engine for a database URL (default: `$PAI_USAGE_DATABASE_URL`, else the embedded SQLite file).

    `postgresql://` URLs use psycopg 3; SQLite connections get WAL and a busy timeout. An in-memory SQLite
    database (`sqlite:///:memory:`) is one connection shared by every thread, so the writer, the migrations and
    the reads all see the same tables.
    """
    if isinstance(database, sa.Engine):
        return database
    url = database or os.environ.get(DATABASE_URL_ENV_VAR) or DEFAULT_DATABASE_URL
    # Plain `postgresql://` would pick psycopg2; pai-usage is built on psycopg 3.
    for prefix in ('postgresql://', 'postgres://'):
        if url.startswith(prefix):
            url = 'postgresql+psycopg://' + url[len(prefix) :]
    if url.startswith('postgresql'):
        # Pre-ping drops connections a restart or network cut killed; the timeout bounds a connect to a hung host.
        # A statement timeout and TCP keepalives / user timeout keep a stalled server or network from holding the
        # writer forever (`options` from the URL, e.g. a search_path, are kept).
        # libpq reads `$PGOPTIONS` only when no `options` are given, as these always are: merged in, as it would.
        options = ' '.join(o for o in (_pg_options(sa.make_url(url)), _PG_OPTIONS) if o)
        try:
            engine = sa.create_engine(url, pool_pre_ping=True, connect_args={**_PG_CONNECT_ARGS, 'options': options})
        except ModuleNotFoundError as exc:
            if not (exc.name or '').startswith('psycopg'):
                raise
            raise ModuleNotFoundError(
                f"PostgreSQL needs psycopg 3, which is not installed: `pip install 'pai-usage[postgres]'` ({exc})",
                name=exc.name,
            ) from exc
    elif _is_sqlite_memory(url):
        # Each new connection would be a new, empty database: keep one, shared with the writer thread.
        engine = sa.create_engine(url, poolclass=StaticPool, connect_args={'check_same_thread': False})
    else:
        engine = sa.create_engine(url)
    if engine.dialect.name == 'sqlite':
        event.listen(engine, 'connect', _sqlite_pragmas)
    return engine


def _is_sqlite_memory(url: str) -> bool:
    parsed = sa.make_url(url)
    return parsed.get_backend_name() == 'sqlite' and parsed.database in (None, '', ':memory:')


_PG_OPTIONS = '-c statement_timeout=60000'
_PG_CONNECT_ARGS: dict[str, Any] = {
    'connect_timeout': 10,
    'keepalives': 1,
    'keepalives_idle': 30,
    'keepalives_interval': 10,
    'keepalives_count': 3,
    'tcp_user_timeout': 60_000,
}
_LOOPBACK = frozenset({'localhost', '127.0.0.1', '::1', 'ip6-localhost', ''})


def _database_file(engine: sa.Engine) -> Path | None:
    database = engine.url.database
    if engine.dialect.name != 'sqlite' or not database or database == ':memory:' or database.startswith('file:'):
        return None
    return Path(database).resolve()


def _target(engine: sa.Engine) -> dict[str, Any]:
    """What a spill directory is for, from the URL alone: stable across spellings of the same address."""
    url = engine.url
    if (path := _database_file(engine)) is not None:
        return {'backend': 'sqlite', 'database': str(path)}
    if engine.dialect.name != 'postgresql':
        return {'backend': engine.dialect.name, 'url': url.render_as_string(hide_password=True)}
    # libpq takes `?host=`, `?port=`, `?dbname=` and `?user=` over the URL's own parts (psycopg passes them on),
    # and its environment variables for what neither gives.
    env = os.environ.get
    host = (_query(url, 'host') or url.host or env('PGHOST') or '').lower()
    port = _query(url, 'port') or url.port or env('PGPORT') or 5432
    user = _query(url, 'user') or url.username or env('PGUSER') or _os_user()
    return {
        'backend': 'postgresql',
        'host': 'localhost' if host in _LOOPBACK else host,
        'port': int(port) if str(port).isdigit() else port,
        'database': _query(url, 'dbname') or url.database or env('PGDATABASE') or user,
        # The role too: its own default `search_path` (`ALTER ROLE ... SET`) may pick another schema.
        'user': user,
        'schema': _search_path(_pg_options(url)),
    }


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        return ''


def _pg_options(url: sa.URL) -> str:
    """The server options a connection to `url` carries: the URL's `options`, else libpq's `$PGOPTIONS`."""
    given = _query(url, 'options')
    return given if given is not None else os.environ.get('PGOPTIONS', '').strip()


def _query(url: sa.URL, name: str) -> str | None:
    value = url.query.get(name)
    if isinstance(value, tuple):  # given twice: libpq takes the last
        value = value[-1] if value else None
    return value or None


def _search_path(options: str) -> str:
    """The schema a connection's `options` make current: the first of the last `search_path` they set.

    Read as the server reads them: `-c name=value`, `-cname=value` or `--name=value`, names in any case and with
    `-` for `_`, arguments split on spaces that no backslash escapes. Without one, `public`.
    """
    args = _split_options(unquote(options))
    value: str | None = None
    for i, arg in enumerate(args):
        if arg == '-c':
            setting = args[i + 1] if i + 1 < len(args) else ''
        elif arg.startswith('--') or (arg.startswith('-c') and arg != '-c'):
            setting = arg[2:]
        else:
            continue
        name, sep, given = setting.partition('=')
        if sep and name.replace('-', '_').lower() == 'search_path':
            value = given
    first = (value or '').split(',')[0].strip()
    if first.startswith('"') and first.endswith('"') and len(first) > 1:
        return first[1:-1] or 'public'  # quoted: as written
    return first.lower() or 'public'  # unquoted identifiers fold to lower case


def _split_options(options: str) -> list[str]:
    """The arguments libpq splits `options` into: on whitespace, a backslash keeping the next character."""
    args: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == '\\':
            escaped = True
        elif char.isspace():
            if current:
                args.append(''.join(current))
                current = []
        else:
            current.append(char)
    if current:
        args.append(''.join(current))
    return args


def _identity(conn: sa.Connection) -> dict[str, Any] | None:
    """The database's identity as the server tells it: the same whatever URL reaches it."""
    if conn.dialect.name == 'sqlite':
        file = conn.engine.url.database
        return {'backend': 'sqlite', 'database': str(Path(file).resolve())} if file and file != ':memory:' else None
    if conn.dialect.name != 'postgresql':
        return None
    database, schema = conn.execute(sa.text('SELECT current_database(), current_schema()')).one()
    try:
        with conn.begin_nested():
            server = conn.execute(sa.text('SELECT system_identifier::text FROM pg_control_system()')).scalar_one()
    except Exception:  # not allowed for this role: the data directory's identity stays unknown
        return None
    return {'backend': 'postgresql', 'server': server, 'database': database, 'schema': schema}


def _spill_path(spill_dir: str | os.PathLike[str] | None, engine: sa.Engine) -> Path:
    # One sub-directory per database, so that a shared spill directory never replays into the wrong one.
    root = Path(spill_dir) if spill_dir is not None else default_spill_dir(_database_file(engine))
    key = json.dumps(_target(engine), sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)  # a forked child must never repeat its parent's ids
_getrandbits = _rng.getrandbits
_time_ns = time.time_ns


def new_id() -> str:
    """A time-ordered UUIDv7, as 32 hex digits: cheaper than `uuid4()`, whose `os.urandom` releases the GIL."""
    rand = _getrandbits(74)
    # `bytes.hex()` of the 128-bit value: half the cost of formatting it with `:032x`.
    return ((_time_ns() // 1_000_000) << 80 | _V7_BITS | (rand >> 62) << 64 | (rand & _LOW_62)).to_bytes(16).hex()


_LOW_62 = (1 << 62) - 1
_V7_BITS = 0x7 << 76 | 0b10 << 62
"""Version 7 and the RFC 9562 variant."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets summaries read while the writer writes; NORMAL sync is durable across process crashes.
    cursor = dbapi_connection.cursor()
    cursor.execute('PRAGMA journal_mode=WAL')
    cursor.execute('PRAGMA synchronous=NORMAL')
    cursor.execute('PRAGMA busy_timeout=5000')
    cursor.close()


class UsageTracker:
    """Records usage events in the `token_usage` table without slowing or breaking the caller.

    `track()` enqueues and returns; a background thread validates, prices and writes batches, retries
    with backoff, and spills to a local file what the database cannot take (see `docs/delivery.md`).
    `flush()` waits for what was tracked so far; `close()` (also at interpreter exit and on SIGTERM)
    flushes within a deadline and spills whatever remains.
    """

    def __init__(
        self,
        database: str | sa.Engine | None = None,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.2,
        auto_migrate: bool = True,
        price_table: PriceTable | None = None,
        close_timeout: float = 10.0,
        listeners: Sequence[Callable[[UsageRecord], None]] = (),
        max_queue: int = 10_000,
        spill_dir: str | os.PathLike[str] | None = None,
        spill: bool = True,
        spill_after: float = 2.0,
        retry_interval: float = 0.1,
        max_retry_interval: float = 10.0,
        handle_sigterm: bool = True,
        durability: Durability = 'journal',
    ) -> None:
        """Create a tracker.

        Args:
            database: A database URL (`sqlite:///path`, `postgresql+psycopg://...`) or an SQLAlchemy engine.
                Defaults to `$PAI_USAGE_DATABASE_URL`, else `sqlite:///pai_usage.db`.
            batch_size: Most records written in one transaction.
            flush_interval: Longest a record waits in the queue for its batch to fill, in seconds.
            auto_migrate: Apply pending migrations before the first write.
            price_table: Our own prices; defaults to the process-wide table (`pai_usage.pricing`).
            close_timeout: The shutdown deadline: how long `close()`, the exit hook and SIGTERM wait for the
                queue to drain before spilling what is left.
            listeners: Called in the writer thread with each record once written; failures are logged.
            max_queue: Records held in memory at most; beyond that, `track()` appends them to the spill file.
            spill_dir: Where records go when the database cannot take them, replayed when it is back and at the
                next start. Defaults to `$PAI_USAGE_SPILL_DIR`, else a directory beside the SQLite file, else
                `$XDG_STATE_HOME/pai-usage/spill` (`~/.local/state/pai-usage/spill`); each database gets its own
                sub-directory.
            spill: False to never touch the disk: what the queue cannot hold is dropped (and counted).
            spill_after: Seconds of failing writes before batches go to the spill file.
            retry_interval: First backoff after a failed write; doubles, with jitter, up to `max_retry_interval`.
            max_retry_interval: Cap on the backoff and on the gap between probes of a database that is down.
            handle_sigterm: Flush (within `close_timeout`) on SIGTERM, then call the previous handler. Installed
                only from the main thread.
            durability: `journal` (the default) copies each record into a memory-mapped journal file before
                `track()` returns, so that it survives SIGKILL or a crash of the process; `memory` keeps it in
                the queue only (a little cheaper; lost if the process dies before the writer has it). Needs
                `spill=True`. See `docs/delivery.md`.
        """
        self.engine = create_engine(database)
        in_memory = _is_sqlite_memory(self.engine.url.render_as_string())
        if auto_migrate and in_memory:
            # A private in-memory database starts empty: create the tables now, so that reads work before writes.
            migrate(self.engine)
        self.close_timeout = close_timeout
        self.handle_sigterm = handle_sigterm
        self._stats = WriterStats()
        # An in-memory database dies with its process: no journal or spill file could ever be replayed into it.
        spill_dir_ = (
            SpillDir(_spill_path(spill_dir, self.engine), target=_target(self.engine))
            if spill and not in_memory
            else None
        )
        self._writer = Writer(
            self.engine,
            self._stats,
            batch_size=batch_size,
            flush_interval=flush_interval,
            auto_migrate=auto_migrate,
            price_table=price_table,
            listeners=listeners,
            retry_interval=retry_interval,
            max_retry_interval=max_retry_interval,
            spill_after=spill_after,
            max_queue=max_queue,
            spill=spill_dir_,
            journal=Journal(spill_dir_.path, on_first_segment=spill_dir_.write_hint)
            if spill_dir_ is not None and durability == 'journal'
            else None,
            identity=_identity,
        )
        self.durability: Durability = durability if spill_dir_ is not None else 'memory'
        """`journal` or `memory`: how tracked records wait for the writer."""
        self._closed = False
        self._enabled_by_env = os.environ.get(DISABLED_ENV_VAR, '').strip().lower() not in ('1', 'true', 'yes')
        self._disabled = 0
        self._disabled_lock = threading.Lock()
        self._late = False
        self._close_result = True
        self._observers: tuple[Callable[[UsageRecord | dict[str, Any]], None], ...] = ()
        _live_trackers.add(self)
        if handle_sigterm:
            _install_sigterm_handler()
        self._writer.start_if_spilled()

    @property
    def spill_dir(self) -> Path | None:
        """This tracker's spill directory (one per database), or None when spilling is off."""
        return self._writer.spill.path if self._writer.spill is not None else None

    def track(self, record: UsageRecord | Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        """Record one usage event, fire-and-forget. Never raises and never waits on I/O.

        Pass a `UsageRecord`, a mapping of its fields, or its fields as keywords. Raw fields are
        validated in the background; invalid records are logged and counted in `stats().invalid`.
        Field names `UsageRecord` does not have are dropped, values unseen, with an `UnknownFieldWarning`
        (raised in strict mode, see `pai_usage.set_strict`).
        """
        unknown = self._track(record, fields)
        # Warnings last: in strict mode they raise, and by then the record is in. A mistake fails the call that
        # made it (or, for a warning the writer held, the next one), never at the cost of a billing row.
        if unknown:
            _warn_unknown_fields(unknown)
        if has_pending():
            emit_pending(stacklevel=2)

    def _track(self, record: UsageRecord | Mapping[str, Any] | None, fields: dict[str, Any]) -> list[str] | None:
        """`track()` without its warnings (the capability's and the Gemini mixin's calls must never raise).

        Returns the unknown field names it dropped, if any.
        """
        if not (_enabled if _enabled is not None else self._enabled_by_env):
            with self._disabled_lock:
                self._disabled += 1
            return None
        unknown: list[str] | None = None
        try:
            if record is None:
                item = fields
            elif isinstance(record, UsageRecord):
                # Validated again with the rest, never trusted as built: a record's fields can be set after
                # validation (no `validate_assignment`) or skip it (`model_construct`), and a NaN cost or a NUL
                # byte must not reach the table. `model_copy(update=...)` would skip validation of overrides too.
                item = {**record.__dict__, **fields}
            elif not isinstance(record, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
                # Not a record at all: invalid input (like a record validation rejects), not a lost record.
                self._writer.count_invalid_input()
                _log.error('track-input', 'pai-usage: track() got a %s, not a usage record', type(record).__name__)
                return None
            else:
                item = {**record, **fields}
            if not _RECORD_FIELDS.issuperset(item):
                # Only the names are kept: a mistaken `prompt=` must never reach a log, the spill file or the database.
                unknown = sorted(k for k in item if k not in _RECORD_FIELDS)
                item = {k: v for k, v in item.items() if k in _RECORD_FIELDS}
            # Identity and time are fixed now, so a retried or replayed record is the same event.
            if 'id' not in item:
                item['id'] = new_id()
            if 'created_at' not in item:
                item['created_at'] = datetime.now(UTC)
            for observer in self._observers:
                # Budgets count spend here, at settle, before the writer has the row (see `add_observer`).
                try:
                    observer(item)
                except Exception as exc:
                    _log.error('observer', 'pai-usage: a track() observer failed: %r', exc)
            sink = _sink
            if sink is not None:
                sink(self, item)
            elif self._closed:
                # Late events (e.g. from a thread still running at exit) go to one open spill file.
                self._late = True
                self._writer.spill_now(item, closed=True)
            else:
                self._writer.put(item)
        except Exception as exc:
            self._writer.count_dropped()
            _log.error('track', 'pai-usage: could not track a usage record: %r', exc)
        return unknown

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record tracked so far is in the database.

        Probes the database at once and replays what this tracker spilled. Returns True only when every record
        tracked before the call is in the database (or was rejected as invalid); False if `timeout` ran out,
        while records are only on disk (the database is down), if any record of this process was ever lost (or
        is only in the journal, for the next start: `stats().dropped`, `stats().journal_only`), or if the writer
        died.
        """
        done = self._writer.flush(timeout)
        if has_pending():
            emit_pending(stacklevel=2)
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Flush and stop the writer within `timeout` (default `close_timeout`), probing and replaying until then.

        Returns True only when everything this tracker accepted is in the database; False while anything is
        still only on disk (spilled, replayed by the next start) or was lost. Records tracked after `close()`
        go to one spill file; a later `close()` fsyncs it and returns False.
        """
        if self._closed:
            if self._late:
                self._writer.sync_late()
                return False
            return self._close_result
        self._closed = True
        _live_trackers.discard(self)
        _closed_trackers.add(self)
        self._close_result = self._writer.stop(self.close_timeout if timeout is None else timeout)
        if has_pending():
            emit_pending(stacklevel=2)
        return self._close_result

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

    def add_listener(self, listener: Callable[[UsageRecord], None]) -> None:
        """Call `listener` in the writer thread with each record written from now on; failures are logged."""
        # Swapping in a new tuple is atomic: the writer thread sees the old or the new listeners, never half.
        self._writer.listeners = (*self._writer.listeners, listener)

    @property
    def price_table(self) -> PriceTable | None:
        """This tracker's own price table, or None for the process-wide one (`pai_usage.pricing`)."""
        return self._writer.price_table

    def add_observer(self, observer: Callable[[UsageRecord | dict[str, Any]], None]) -> None:
        """Call `observer` synchronously inside `track()`, on the caller's thread, with each record as given.

        For in-process accounting that cannot wait for the writer (budgets). The record is not validated yet;
        the observer must be cheap and must not keep it. Failures are logged, never raised into `track()`.
        """
        self._observers = (*self._observers, observer)

    def remove_observer(self, observer: Callable[[UsageRecord | dict[str, Any]], None]) -> None:
        """Stop calling `observer` from `track()`."""
        self._observers = tuple(o for o in self._observers if o is not observer)

    def stats(self) -> TrackerStats:
        """Counters of what happened to tracked records (in this process, since it started or forked)."""
        s = self._stats
        enqueued = self._writer.enqueued()
        settled = s.written + s.duplicates + (s.invalid - s.replay_invalid) + s.spilled + s.dropped + s.journal_only
        return TrackerStats(
            enqueued=enqueued,
            written=s.written,
            pending=max(enqueued - settled, 0),
            invalid=s.invalid,
            failed_writes=s.failed_writes,
            dropped=s.dropped,
            unpriced=s.unpriced,
            errors=s.errors,
            spilled=s.spilled,
            replayed=s.replayed,
            disabled=self._disabled,
            duplicates=s.duplicates + s.replay_duplicates,
            writer_alive=self._writer.alive(),
            loop_errors=s.loop_errors,
            quarantined=s.quarantined,
            journal_only=s.journal_only,
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

    async def aget_usage_summary(
        self,
        start: datetime,
        end: datetime,
        *,
        organization_id: str | None = None,
        user_id: str | None = None,
        group_by: Sequence[GroupBy] = ('model',),
    ) -> UsageSummary:
        """`get_usage_summary()` without blocking the event loop (the query runs in a worker thread)."""
        return await asyncio.to_thread(
            self.get_usage_summary, start, end, organization_id=organization_id, user_id=user_id, group_by=group_by
        )

    async def aget_current_month_usage(
        self, organization_id: str, *, group_by: Sequence[GroupBy] = ('model',), now: datetime | None = None
    ) -> UsageSummary:
        """`get_current_month_usage()` without blocking the event loop (the query runs in a worker thread)."""
        return await asyncio.to_thread(self.get_current_month_usage, organization_id, group_by=group_by, now=now)

    def __repr__(self) -> str:
        return f'UsageTracker({self.engine.url.render_as_string(hide_password=True)!r})'


def _warn_unknown_fields(unknown: list[str]) -> None:
    warn_once(
        f'unknown-field:{",".join(unknown)}',
        f'pai-usage: `track()` got unknown field(s) {", ".join(f"`{k}`" for k in unknown)}; their values were '
        'discarded. The fields are those of `pai_usage.UsageRecord`.',
        UnknownFieldWarning,
        stacklevel=3,
    )


_live_trackers: weakref.WeakSet[UsageTracker] = weakref.WeakSet()
_closed_trackers: weakref.WeakSet[UsageTracker] = weakref.WeakSet()


def _close_all(*, sigterm: bool = False) -> None:
    # One deadline for all trackers: the longest `close_timeout`, not their sum.
    if not sigterm:
        for closed in list(_closed_trackers):
            if closed._late:  # pyright: ignore[reportPrivateUsage]
                closed._writer.sync_late()  # pyright: ignore[reportPrivateUsage]
    trackers = [t for t in list(_live_trackers) if t.handle_sigterm or not sigterm]
    if not trackers:
        return
    deadline = time.monotonic() + max(t.close_timeout for t in trackers)
    for tracker in trackers:
        tracker.close(max(deadline - time.monotonic(), 0.0))


atexit.register(_close_all)


def _after_fork_in_child() -> None:
    # The child must not share the parent's queue, thread, spill file or connections: give each tracker
    # a fresh writer state. The parent still writes what it had queued.
    for tracker in list(_live_trackers):
        tracker._writer.after_fork()  # pyright: ignore[reportPrivateUsage]


os.register_at_fork(after_in_child=_after_fork_in_child)

_previous_sigterm: Any = None
_sigterm_installed = False


def _install_sigterm_handler() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter without signals
        return
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    try:
        _close_all(sigterm=True)
    finally:
        previous = _previous_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            # The default action (terminate), as if we had never been here.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


_default: UsageTracker | None = None


def configure(database: str | sa.Engine | None = None, *, enabled: bool | None = None, **options: Any) -> UsageTracker:
    """Set the process-wide default tracker, used when neither deps nor a capability names one.

    In the spirit of `logfire.configure()`: call it once at start-up. Replaces (and closes) any previous default.
    `enabled=False` switches tracking off in the whole process (every tracker's `track()` becomes a no-op,
    counted in `stats().disabled`), `enabled=True` back on; by default `$PAI_USAGE_DISABLED` decides.
    """
    global _default, _enabled
    if enabled is not None:
        _enabled = enabled
    if database is None and not options and _default_factory is not None:
        # Under `pai_usage.testing`: `$PAI_USAGE_DATABASE_URL` may name the real ledger, so stay in memory.
        new = _default_factory()
    else:
        new = UsageTracker(database, **options)
    previous, _default = _default, new
    if previous is not None:
        previous.close()
    return _default


def get_tracker() -> UsageTracker:
    """The process-wide default tracker, created from the environment on first use."""
    global _default
    if _default is None:
        _default = _default_factory() if _default_factory is not None else UsageTracker()
    return _default
