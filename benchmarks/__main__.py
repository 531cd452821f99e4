"""`make bench`: run every `benchmarks/*.py` module that has a `main()`, or only those named.

    python -m benchmarks                         # all of them
    python -m benchmarks hot_path throughput     # a subset

Each benchmark runs in its own interpreter (so that one's memory, threads and garbage never skew the
next) and prints its own ratios against a baseline measured in the same run; nothing asserts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _has_main(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(isinstance(node, ast.FunctionDef) and node.name == 'main' for node in tree.body)


def discover() -> list[str]:
    """Module names of `benchmarks/*.py` with a top-level `main()` (private `_x.py` helpers excluded)."""
    return sorted(p.stem for p in HERE.glob('*.py') if not p.stem.startswith('_') and _has_main(p))


def run(names: list[str]) -> int:
    failed: list[str] = []
    total = time.perf_counter()
    for name in names:
        print(f'=== {name} ===', flush=True)
        started = time.perf_counter()
        # `main()` with no arguments, in a fresh interpreter, from the project root.
        code = f'import benchmarks.{name} as m; m.main()'
        result = subprocess.run([sys.executable, '-c', code], cwd=HERE.parent, check=False)
        if result.returncode:
            failed.append(name)
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
