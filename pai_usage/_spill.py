"""The spill directory: an append-only JSON-lines file per process, replayed into the database later.

Records go here when the in-memory queue is full, when writes keep failing, and at shutdown when the
deadline runs out. Each process appends only to its own file (`spill-<host>-<pid>-<rand>.jsonl`) and
holds an exclusive `flock` on it while it is open. A replayer claims a file by taking that lock without
waiting (so it never reads a file a live process still appends to) and renaming it to `replay-...`;
the rename makes the claim visible and keeps two replayers from reading the same file. Replay inserts
idempotently (`ON CONFLICT DO NOTHING` on the primary key), so a file replayed twice, e.g. after a crash in the middle
of a replay, still gives exactly one row per record.

Records that fail validation go to `rejected-<host>-<pid>.jsonl` with the error and the record as typed JSON
(only the fields a `UsageRecord` has), never back to replay. A file that cannot be replayed for a reason other
than the database being unreachable is renamed `quarantine-...` and never blocks the others.

Each spill file starts with a header line naming its target (`{"pai_usage_spill": 1, "target": {...}}`), and
each directory may hold `target.json`: the identity of the database (server, database, schema) learnt by a
tracker that reached it, so that a tracker reaching the same database under another URL spelling finds them.
Journal segments of dead processes (`_journal.py`) are claimed and replayed like spill files.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from ._journal import JOURNAL_PREFIX, read_segment

__all__ = (
    'SPILL_DIR_ENV_VAR',
    'TARGET_FILE',
    'TARGET_HINT_FILE',
    'ClaimedFile',
    'SpillDir',
    'default_spill_dir',
    'encode',
    'encode_lenient',
    'encode_rejected',
)

SPILL_DIR_ENV_VAR = 'PAI_USAGE_SPILL_DIR'
"""Environment variable naming the spill directory."""
STALE_TMP_SECONDS = 600.0
"""Age after which a hidden `.tmp` file is known abandoned: creating one takes well under a second."""
TARGET_FILE = 'target.json'
"""Name of the file in a spill directory that holds the identity of its database, once known."""
TARGET_HINT_FILE = 'target-hint.json'
"""What a directory's journal is for, as its tracker's URL named it, before any tracker reached the database."""
_MAX_REJECTED_LINE = 1 << 20
_HEADER_KEY = 'pai_usage_spill'


def default_spill_dir(database_file: str | os.PathLike[str] | None = None) -> Path:
    """`$PAI_USAGE_SPILL_DIR`; else beside the SQLite file; else a per-user state directory.

    The state directory is `$XDG_STATE_HOME/pai-usage/spill`, else `~/.local/state/pai-usage/spill`: stable
    whatever the working directory of the process.
    """
    if env := os.environ.get(SPILL_DIR_ENV_VAR):
        return Path(env)
    if database_file is not None:
        path = Path(database_file).absolute()
        return path.with_name(f'{path.name}.pai-usage-spill')
    state = os.environ.get('XDG_STATE_HOME') or str(Path.home() / '.local' / 'state')
    return Path(state) / 'pai-usage' / 'spill'


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(cast('Iterable[object]', value))
    raise TypeError(f'{type(value).__name__} is not JSON-serializable')


def encode(item: dict[str, Any]) -> bytes:
    """One JSON line for a record's fields (UUIDs, datetimes and Decimals as strings)."""
    return json.dumps(item, default=_json_default, separators=(',', ':')).encode() + b'\n'


def encode_lenient(item: dict[str, Any]) -> bytes:
    """`encode` for fields not validated yet whose values JSON cannot hold (cyclic or odd metadata, an object).

    Metadata and details are made JSON-safe as validation would make them; any other odd value becomes its
    `repr`, which validation then rejects, for this record alone. Raises when even that cannot be encoded.
    """
    from .record import safe_metadata  # imports pydantic: only on this rare path

    fields = dict(item)
    for name in ('metadata', 'details'):
        if name in fields:
            fields[name] = safe_metadata(fields[name])
    return json.dumps(fields, default=_safe_default, skipkeys=True, separators=(',', ':')).encode() + b'\n'


def _safe_default(value: object) -> object:
    try:
        return _json_default(value)
    except TypeError:
        return repr(value)[:200]


def encode_rejected(error: str, record: Mapping[str, Any] | str, fields: Iterable[str] | None) -> bytes:
    """One line of `rejected-*.jsonl`: the error and the record as typed JSON, keeping only known `fields`."""
    if isinstance(record, Mapping) and fields is not None:
        known = set(fields)
        record = {k: v for k, v in record.items() if k in known}
    try:
        line = json.dumps({'error': error, 'record': record}, default=_safe_default, separators=(',', ':'))
    except (TypeError, ValueError):  # a cycle, a key that is not a string, a huge int: keep the error at least
        line = json.dumps({'error': error, 'record': None}, separators=(',', ':'))
    if len(line) > _MAX_REJECTED_LINE:
        line = json.dumps({'error': error, 'record': None, 'truncated': True}, separators=(',', ':'))
    return line.encode() + b'\n'


def _write_all(fd: int, data: bytes) -> None:
    # A separate function so tests can make the disk "full".
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(eq=False)
class ClaimedFile:
    """A spill file this process has claimed for replay; the lock is held until `done()` or `release()`."""

    path: Path
    """Where the claimed file is now."""
    fd: int
    """The open descriptor holding the lock."""

    def lines(self) -> Iterator[bytes]:
        """The file's lines (a torn last line, from a crash mid-write, is yielded as is)."""
        with open(self.path, 'rb') as f:
            yield from f

    def records(self) -> Iterator[dict[str, Any] | ValueError]:
        """The records the file holds, in order; what cannot be read is yielded as a `ValueError`."""
        if self.path.suffix == '.bin':
            yield from read_segment(self.path)
            return
        for line in self.lines():
            try:
                value = json.loads(line)
            except ValueError:
                # A torn line: the process died mid-append, before the write (and its fsync) completed.
                yield ValueError(line.decode(errors='replace')[:1000])
                continue
            if isinstance(value, dict) and _HEADER_KEY in value:
                continue
            if not isinstance(value, dict):
                yield ValueError('a spill line that is not a record')
                continue
            yield cast('dict[str, Any]', value)

    def quarantine(self) -> Path:
        """The file cannot be replayed (not for an outage): set it aside as `quarantine-...`, never blocking others."""
        target = self.path.with_name(f'quarantine-{_tag()}{self.path.suffix}')
        try:
            os.rename(self.path, target)
        finally:
            os.close(self.fd)
        return target

    def done(self) -> None:
        """Everything in the file is in the database: delete it."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)

    def release(self) -> None:
        """Replay failed part-way: keep the file for a later replay (re-inserting is idempotent)."""
        os.close(self.fd)


@dataclass(eq=False)
class SpillDir:
    """One process's view of a spill directory."""

    path: Path
    """The directory (created on first use)."""
    target: Mapping[str, Any] | None = None
    """What the files are for (database URL without password, key), written in each file's header."""
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _fd: int | None = field(default=None, init=False)
    _file: Path | None = field(default=None, init=False)
    _dirty: bool = field(default=False, init=False)
    _rejected_fd: int | None = field(default=None, init=False)
    _own: dict[str, int] = field(default_factory=dict[str, int], init=False)
    """This process's files not replayed yet, by name, with the generation each was opened in."""
    _generation: int = field(default=0, init=False)
    _taken: set[int] = field(default_factory=set[int], init=False)
    """Generations holding records other than `track()`'s overflow (a batch the writer took and spilled)."""

    def append(self, lines: Iterable[bytes], *, sync: bool = True, overflow: bool = False) -> None:
        """Append encoded records to this process's file; with `sync`, fsync before returning.

        `overflow` says they come straight from `track()` (the queue was full): see `own_pending`.
        Raises `OSError` when the disk refuses; then nothing of this call is left in the file.
        """
        data = b''.join(lines)
        if not data:
            return
        with self._lock:
            fd = self._open()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                _write_all(fd, data)
            except OSError:
                # Don't leave a torn line that the next append would glue onto.
                try:
                    os.ftruncate(fd, start)
                except OSError:  # pragma: no cover - the disk is in a bad way already
                    pass
                raise
            self._dirty = True
            if not overflow:
                self._taken.add(self._generation)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Flush to disk (fsync) what was appended without `sync` (e.g. by `track()` when the queue was full)."""
        with self._lock:
            fd, dirty, self._dirty = self._fd, self._dirty, False
        if fd is not None and dirty:
            try:
                os.fsync(fd)
            except OSError:
                self._dirty = True
                raise

    def rotate(self) -> None:
        """Close this process's file, releasing its lock, so that it can be replayed (by anyone)."""
        with self._lock:
            fd, self._fd, self._file = self._fd, None, None
            if fd is not None:
                if self._dirty:
                    os.fsync(fd)
                    self._dirty = False
                os.close(fd)

    def has_own_file(self) -> bool:
        """Whether this process has an open spill file (records appended since the last `rotate()`)."""
        return self._fd is not None

    def own_pending(self, upto: int | None = None) -> bool:
        """Whether records this process spilled are still only on disk (in its open file, or not replayed yet).

        With `upto` (an `own_mark()`), what `track()` spilled itself after the mark does not count: it is in later
        files. Everything else does (what the writer spilled it took off its queue).
        """
        with self._lock:
            if self._own:
                self._own = {n: g for n, g in self._own.items() if (self.path / n).exists()}
                self._taken &= set(self._own.values())
            if upto is None:
                return self._fd is not None or bool(self._own)
            return any(g <= upto or g in self._taken for g in self._own.values())

    def own_mark(self) -> int:
        """A mark for `own_pending(upto=...)`: what this process has spilled so far is in files up to this one."""
        with self._lock:
            return self._generation

    def own_names(self) -> frozenset[str]:
        """The files this process spilled that are not replayed yet (its open file aside)."""
        with self._lock:
            return frozenset(self._own)

    def pending(self) -> bool:
        """Whether the directory holds replayable files other than our own open one (cheap: one listdir)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return False
        own = self._file.name if self._file is not None else None
        return any(n != own and _replayable(n) for n in names)

    def claim(self, skip: Iterable[str] = (), *, only: Container[str] | None = None) -> Iterator[ClaimedFile]:
        """Claim replayable files one at a time: those whose writer is gone (or closed) and no one replays.

        With `only`, just the files so named (e.g. `own_names()`: what this process spilled).
        """
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            return
        own = {self._file.name} if self._file is not None else set[str]()
        own.update(skip)
        for name in names:
            if name in own or not _replayable(name) or (only is not None and name not in only):
                continue
            claimed = self._claim(self.path / name)
            if claimed is not None:
                with self._lock:
                    if name in self._own:
                        self._own[claimed.path.name] = self._own.pop(name)
                yield claimed

    def _claim(self, path: Path) -> ClaimedFile | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # claimed and finished by someone else meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None  # its writer is alive, or another process replays it
        target = path.with_name(f'replay-{_tag()}{path.suffix}')
        try:
            # The lock is on the inode: we may have locked it just after another replayer deleted it.
            if os.fstat(fd).st_nlink == 0:
                raise FileNotFoundError(path)
            os.rename(path, target)
        except OSError:
            os.close(fd)
            return None
        return ClaimedFile(target, fd)

    def read_target(self) -> dict[str, Any] | None:
        """The identity of this directory's database, as a tracker that reached it recorded it."""
        return self._read_json(TARGET_FILE)

    def write_target(self, identity: Mapping[str, Any]) -> None:
        """Record the identity of this directory's database (atomically; only when it changed)."""
        if self.read_target() == dict(identity):
            return
        self._write_json(TARGET_FILE, dict(identity))

    def read_hint(self) -> dict[str, Any] | None:
        """What the URL of the tracker that journalled here named (`write_hint`), if any."""
        return self._read_json(TARGET_HINT_FILE)

    def write_hint(self) -> None:
        """Record `target` beside the journal, once; never raises (a hint only).

        Journal segments have no header, and a tracker that never reached the database writes no `target.json`.
        """
        try:
            if self.target is not None and not (self.path / TARGET_HINT_FILE).exists():
                self._write_json(TARGET_HINT_FILE, dict(self.target))
        except OSError:  # the journal's own segment reports a full disk
            pass

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None
        return cast('dict[str, Any]', value) if isinstance(value, dict) else None

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f'.{name}.{_tag()}.tmp'
        tmp.write_text(json.dumps(value, default=str, sort_keys=True))
        os.replace(tmp, self.path / name)

    def siblings(self) -> list[SpillDir]:
        """The other databases' directories under the same spill root."""
        try:
            entries = sorted(self.path.parent.iterdir())
        except OSError:
            return []
        return [SpillDir(p) for p in entries if p != self.path and p.is_dir()]

    def reject(self, line: bytes) -> None:
        """Keep a rejected record (a line from `encode_rejected`) in `rejected-<host>-<pid>.jsonl`."""
        with self._lock:
            if self._rejected_fd is None:
                name = f'rejected-{socket.gethostname()}-{os.getpid()}.jsonl'
                self._rejected_fd = self._create(self.path / name, exclusive=False)
            _write_all(self._rejected_fd, line)

    def close(self) -> None:
        """Close our files (what was appended is kept for replay)."""
        with self._lock:
            self.rotate()
            if self._rejected_fd is not None:
                os.close(self._rejected_fd)
                self._rejected_fd = None

    def tidy(self) -> None:
        """Remove the directory if replay left it empty (another process creating a file meanwhile retries).

        Abandoned `.tmp` files go first (`remove_stale`), which would keep the directory forever.
        """
        self.remove_stale()
        try:
            self.path.rmdir()
        except OSError:
            pass

    def remove_stale(self) -> None:
        """Delete hidden `.tmp` files older than `STALE_TMP_SECONDS`.

        A process killed while it created a file (a journal segment is 8 MB) left them; they hold nothing yet.
        """
        now = time.time()
        try:
            stale = [t for t in self.path.glob('.*.tmp') if now - t.stat().st_mtime > STALE_TMP_SECONDS]
        except OSError:
            return
        for tmp in stale:
            try:
                tmp.unlink()
            except OSError:
                continue

    def _create(self, path: Path, *, exclusive: bool = True) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else 0)
        for attempt in range(3):
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(path, flags, 0o600)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # `tidy()` in another process removed the empty directory between our mkdir and open.
        raise AssertionError('unreachable')  # pragma: no cover

    def after_fork(self) -> None:
        """In a forked child: forget the parent's files without unlocking them (the parent still owns them)."""
        self._lock = threading.RLock()
        for fd in (self._fd, self._rejected_fd):
            if fd is not None:
                try:
                    os.close(fd)  # closes our copy only: the flock stays with the parent's descriptor
                except OSError:  # pragma: no cover
                    pass
        self._fd = self._rejected_fd = self._file = None
        self._dirty = False
        self._own = {}
        self._taken = set()

    def _open(self) -> int:
        if self._fd is None:
            tag = _tag()
            # Lock under a name replayers ignore, then publish: no one can claim the file before it is locked.
            hidden, file = self.path / f'.spill-{tag}.tmp', self.path / f'spill-{tag}.jsonl'
            fd = self._create(hidden)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            header = {_HEADER_KEY: 1, 'target': dict(self.target or {}), 'pid': os.getpid()}
            os.write(fd, json.dumps(header, default=str, separators=(',', ':')).encode() + b'\n')
            os.rename(hidden, file)
            self._fd, self._file = fd, file
            self._generation += 1
            self._own[file.name] = self._generation
        return self._fd


def _replayable(name: str) -> bool:
    if name.startswith(JOURNAL_PREFIX):
        return name.endswith('.bin')
    if name.startswith('replay-'):
        return name.endswith(('.jsonl', '.bin'))
    return name.startswith('spill-') and name.endswith('.jsonl')


def _tag() -> str:
    return f'{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
