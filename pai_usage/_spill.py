"""The spill directory: an append-only JSON-lines file per process, replayed into the database later.

Records go here when the in-memory queue is full, when writes keep failing, and at shutdown when the
deadline runs out. Each process appends only to its own file (`spill-<host>-<pid>-<rand>.jsonl`) and
holds an exclusive `flock` on it while it is open. A replayer claims a file by taking that lock without
waiting (so it never reads a file a live process still appends to) and renaming it to `replay-...`;
the rename makes the claim visible and keeps two replayers from reading the same file. Replay inserts
idempotently (`ON CONFLICT DO NOTHING` on the primary key), so a file replayed twice, e.g. after a crash in the middle
of a replay, still gives exactly one row per record.

Records that fail validation go to `rejected-<host>-<pid>.jsonl` with the error, never back to replay.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

__all__ = ('SPILL_DIR_ENV_VAR', 'ClaimedFile', 'SpillDir', 'default_spill_dir', 'encode')

SPILL_DIR_ENV_VAR = 'PAI_USAGE_SPILL_DIR'
"""Environment variable naming the spill directory."""
_DEFAULT_SPILL_DIR = '.pai_usage_spill'
_MAX_REJECTED_LINE = 1 << 20


def default_spill_dir() -> Path:
    """`$PAI_USAGE_SPILL_DIR`, else `./.pai_usage_spill` (next to the default SQLite file)."""
    return Path(os.environ.get(SPILL_DIR_ENV_VAR) or _DEFAULT_SPILL_DIR)


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
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _fd: int | None = field(default=None, init=False)
    _file: Path | None = field(default=None, init=False)
    _dirty: bool = field(default=False, init=False)
    _rejected_fd: int | None = field(default=None, init=False)

    def append(self, lines: Iterable[bytes], *, sync: bool = True) -> None:
        """Append encoded records to this process's file; with `sync`, fsync before returning.

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

    def pending(self) -> bool:
        """Whether the directory holds spill files other than our own open one (cheap: one listdir)."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return False
        own = self._file.name if self._file is not None else None
        return any(n != own and n.endswith('.jsonl') and not n.startswith('rejected-') for n in names)

    def claim(self) -> Iterator[ClaimedFile]:
        """Claim replayable files one at a time: those whose writer is gone (or closed) and no one replays."""
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            return
        own = self._file.name if self._file is not None else None
        for name in names:
            if name == own or not name.endswith('.jsonl') or name.startswith('rejected-'):
                continue
            claimed = self._claim(self.path / name)
            if claimed is not None:
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
        target = path.with_name(f'replay-{_tag()}.jsonl')
        try:
            # The lock is on the inode: we may have locked it just after another replayer deleted it.
            if os.fstat(fd).st_nlink == 0:
                raise FileNotFoundError(path)
            os.rename(path, target)
        except OSError:
            os.close(fd)
            return None
        return ClaimedFile(target, fd)

    def reject(self, raw: object, error: str) -> None:
        """Keep a record that failed validation, with the reason, in `rejected-<host>-<pid>.jsonl`."""
        line = json.dumps({'error': error, 'record': raw}, default=repr, separators=(',', ':'))
        if len(line) > _MAX_REJECTED_LINE:
            line = json.dumps({'error': error, 'truncated': line[:_MAX_REJECTED_LINE]}, separators=(',', ':'))
        with self._lock:
            if self._rejected_fd is None:
                name = f'rejected-{socket.gethostname()}-{os.getpid()}.jsonl'
                self._rejected_fd = self._create(self.path / name, exclusive=False)
            _write_all(self._rejected_fd, line.encode() + b'\n')

    def close(self) -> None:
        """Close our files (what was appended is kept for replay)."""
        with self._lock:
            self.rotate()
            if self._rejected_fd is not None:
                os.close(self._rejected_fd)
                self._rejected_fd = None

    def tidy(self) -> None:
        """Remove the directory if replay left it empty (another process creating a file meanwhile retries)."""
        try:
            self.path.rmdir()
        except OSError:
            pass

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

    def _open(self) -> int:
        if self._fd is None:
            tag = _tag()
            # Lock under a name replayers ignore, then publish: no one can claim the file before it is locked.
            hidden, file = self.path / f'.spill-{tag}.tmp', self.path / f'spill-{tag}.jsonl'
            fd = self._create(hidden)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, file)
            self._fd, self._file = fd, file
        return self._fd


def _tag() -> str:
    return f'{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
