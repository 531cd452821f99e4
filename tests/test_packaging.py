"""The built wheel: typed, licensed, described, with its migrations, extras and pytest plugin."""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from pai_usage.tracker import create_engine

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp('dist')
    # No isolation: hatchling is a dev dependency, so the build needs no network and takes about a second.
    subprocess.run(
        [sys.executable, '-m', 'build', '--wheel', '--no-isolation', '--outdir', str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [path] = out.glob('pai_usage-*.whl')
    return zipfile.ZipFile(path)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if re.fullmatch(rf'pai_usage-[^/]+\.dist-info/{name}', n)]
    return wheel.read(path).decode()


def test_wheel_is_typed_and_licensed(wheel: zipfile.ZipFile):
    names = wheel.namelist()
    assert 'pai_usage/py.typed' in names
    assert _dist_info(wheel, 'licenses/LICENSE') == (ROOT / 'LICENSE').read_text()
    assert 'MIT License' in (ROOT / 'LICENSE').read_text()


def test_wheel_metadata(wheel: zipfile.ZipFile):
    meta = email.parser.Parser().parsestr(_dist_info(wheel, 'METADATA'))
    assert meta['License-Expression'] == 'MIT'
    urls = dict(u.split(', ', 1) for u in meta.get_all('Project-URL', []))
    assert {'Homepage', 'Documentation', 'Repository', 'Issues'} <= set(urls)
    classifiers = meta.get_all('Classifier', [])
    assert 'Typing :: Typed' in classifiers and 'Framework :: Pytest' in classifiers
    requires = meta.get_all('Requires-Dist', [])
    assert any(r.startswith('logfire') and "extra == 'logfire'" in r for r in requires), requires
    assert any(r.startswith('psycopg') and "extra == 'postgres'" in r for r in requires), requires
    entry_points = _dist_info(wheel, 'entry_points.txt')
    assert '[pytest11]\npai_usage = pai_usage.testing' in entry_points
    assert 'pai-usage = pai_usage._cli:cli' in entry_points


def test_wheel_ships_every_migration(wheel: zipfile.ZipFile):
    source = {p.relative_to(ROOT / 'migrations').as_posix(): p.read_text() for p in ROOT.glob('migrations/**/*.sql')}
    shipped = {
        n.removeprefix('pai_usage/_migrations/'): wheel.read(n).decode()
        for n in wheel.namelist()
        if n.startswith('pai_usage/_migrations/')
    }
    assert shipped == source
    assert {'postgresql/0001_create_token_usage.sql', 'sqlite/0001_create_token_usage.sql'} <= set(shipped)
    assert 'optional/postgresql_rls.sql' in shipped


def test_missing_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    for name in [m for m in sys.modules if m == 'psycopg' or m.startswith('psycopg.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'psycopg', None)  # what `import psycopg` sees when it is not installed
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'pai-usage[postgres]'")):
        create_engine('postgresql://postgres@127.0.0.1:5432/test')
    engine = create_engine('sqlite://')  # other backends are unaffected
    assert isinstance(engine, sa.Engine)


def test_missing_google_genai_names_the_extra():
    # A fresh interpreter, as a user without the extra: `google.genai` cannot be imported.
    code = "import sys; sys.modules['google.genai'] = None\nimport pai_usage.gemini"
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        'ImportError: `pai_usage.gemini` needs google-genai: install it with `pip install "pai-usage[gemini]"`'
    )


def test_opentelemetry_docs_first_sample_runs(tmp_path: Path):
    # The `[logfire]` extra installs logfire: the first sample of docs/opentelemetry.md runs as written.
    doc = (ROOT / 'docs' / 'opentelemetry.md').read_text()
    sample = re.search(r'```python\n(.*?)```', doc, re.S)
    assert sample is not None and 'import logfire' in sample.group(1)
    check = (
        "tracker.track(provider='openai', model='gpt-4o', input_tokens=10)\n"
        'assert tracker.flush()\n'
        'assert tracker.stats().written == 1\n'
        'tracker.close()\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOGFIRE_', 'OTEL_', 'PAI_USAGE_'))}
    env['PAI_USAGE_SPILL_DIR'] = str(tmp_path / 'spill')
    done = subprocess.run(
        [sys.executable, '-c', sample.group(1) + check], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'pai_usage.db').exists()  # the sample's tracker uses the embedded default
