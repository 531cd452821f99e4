"""Memory while the database is down: 100k events tracked, RSS stays bounded because they go to disk.

The database is unreachable (a PostgreSQL URL on a closed port: connection refused at once). The baseline
is what an unbounded in-memory queue holds: the same 100k event dicts kept in a list. Peak RSS is read
from `/proc/self/status` (VmHWM, reset through `/proc/self/clear_refs` where allowed, else the current RSS).

    python -m benchmarks.memory [EVENTS]
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.hot_path import fields
from pai_usage import UsageTracker

EVENTS = 100_000


def _status(key: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        return False
    return True


def _peak_since(base: int, resettable: bool) -> int:
    return (_status('VmHWM') if resettable else _status('VmRSS')) - base


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def baseline(n: int) -> int:
    gc.collect()
    resettable = _reset_peak()
    base = _status('VmRSS')
    held: list[dict[str, Any]] = [fields() for _ in range(n)]
    grown = _peak_since(base, resettable)
    del held
    gc.collect()
    return grown


def ours(n: int) -> tuple[int, float, Any, int]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f'postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/test'
        tracker = UsageTracker(url, spill_dir=tmp, handle_sigterm=False, spill_after=0.5)
        gc.collect()
        resettable = _reset_peak()
        base = _status('VmRSS')
        started = time.perf_counter()
        for _ in range(n):
            tracker.track(**fields())
        elapsed = time.perf_counter() - started
        tracker.flush(120)
        grown = _peak_since(base, resettable)
        stats = tracker.stats()
        on_disk = sum(f.stat().st_size for f in Path(tmp).rglob('*.jsonl'))
        tracker.close(5)
        tracker.engine.dispose()
    return grown, elapsed, stats, on_disk


def _in_child(kind: str, n: int) -> dict[str, Any]:
    # Each side in a fresh interpreter: memory freed by one must not be reused, unseen, by the other.
    code = f'import json, benchmarks.memory as m; print(json.dumps(m._measure({kind!r}, {n})))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(kind: str, n: int) -> dict[str, Any]:
    if kind == 'baseline':
        return {'grown': baseline(n)}
    grown, elapsed, stats, on_disk = ours(n)
    return {
        'grown': grown,
        'elapsed': elapsed,
        'spilled': stats.spilled,
        'dropped': stats.dropped,
        'pending': stats.pending,
        'on_disk': on_disk,
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else EVENTS
    held = _in_child('baseline', n)['grown']
    r = _in_child('ours', n)
    mb = 1024 * 1024
    print(f'memory: {n} events tracked with the database down (each side in its own interpreter)')
    print(f'  unbounded in-memory queue (a list of the dicts): +{held / mb:7.1f} MB RSS')
    print(f'  UsageTracker (max_queue=10000, spill to disk):    +{r["grown"] / mb:7.1f} MB peak RSS')
    print(f'  ratio ours / unbounded: {r["grown"] / max(held, 1):.2f}')
    print(
        f'  spilled {r["spilled"]}, dropped {r["dropped"]}, pending {r["pending"]}; {r["on_disk"] / mb:.1f} MB on disk'
    )
    print(f'  track() mean while spilling: {r["elapsed"] / n * 1e6:.1f} us')


if __name__ == '__main__':
    main()
