"""`make bench`: run every `benchmarks/*.py` module that has a `main()`, or only those named.

    python -m benchmarks                         # all of them
    python -m benchmarks hot_path throughput     # a subset

Each benchmark prints its own ratios against a baseline measured in the same run; nothing asserts.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def discover() -> list[str]:
    """Module names of `benchmarks/*.py` (private `_x.py` helpers and this runner excluded)."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob('*.py') if not p.stem.startswith('_'))


def run(names: list[str]) -> int:
    failed: list[str] = []
    total = time.perf_counter()
    for name in names:
        module = importlib.import_module(f'benchmarks.{name}')
        main = getattr(module, 'main', None)
        if not callable(main):
            continue
        print(f'=== {name} ===', flush=True)
        started = time.perf_counter()
        argv = sys.argv
        sys.argv = [f'benchmarks.{name}']  # each benchmark reads its own optional args: give it none
        try:
            main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        finally:
            sys.argv = argv
        print(f'--- {name}: {time.perf_counter() - started:.1f} s\n', flush=True)
    print(f'all benchmarks: {time.perf_counter() - total:.1f} s' + (f'; FAILED: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


def cli(args: list[str]) -> int:
    available = discover()
    unknown = [a for a in args if a not in available]
    if unknown:
        print(f'unknown benchmark(s) {", ".join(unknown)}; available: {", ".join(available)}', file=sys.stderr)
        return 2
    return run(args or available)


if __name__ == '__main__':
    sys.exit(cli(sys.argv[1:]))
