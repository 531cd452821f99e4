"""The docs site builds, and every Python sample in the docs at least compiles."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.MULTILINE | re.DOTALL)


def _samples() -> list[tuple[str, str]]:
    return [
        (f'{path.name}:{path.read_text()[: match.start()].count(chr(10)) + 1}', match.group(1))
        for path in DOCS
        for match in _BLOCK.finditer(path.read_text())
    ]


@pytest.mark.parametrize(('where', 'source'), _samples(), ids=[w for w, _ in _samples()])
def test_python_samples_compile(where: str, source: str) -> None:
    compile(source, where, 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def test_samples_name_real_modules() -> None:
    # `from pai_usage.x import y` in a sample must name something that exists.
    import importlib

    for where, source in _samples():
        for node in ast.walk(ast.parse(source, where)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pai_usage'):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f'{where}: `{node.module}` has no `{alias.name}`'


@pytest.mark.skipif(shutil.which('mkdocs', path=str(Path(sys.executable).parent)) is None, reason='mkdocs missing')
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which('mkdocs', path=str(Path(sys.executable).parent))
    assert mkdocs
    result = subprocess.run(
        [mkdocs, 'build', '--strict', '--site-dir', str(tmp_path / 'site')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={'NO_MKDOCS_2_WARNING': '1', 'PATH': '/usr/bin:/bin'},
    )
    assert result.returncode == 0, result.stderr[-3000:]
