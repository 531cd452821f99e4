"""The docs site builds, and every Python sample in README.md and docs/ runs, offline.

The samples of one page run in order in one namespace, as a reader pastes them into one session, with this
prelude (`sample_session`), so that no sample needs a key or a server:

- the working directory is a fresh temporary one (`sqlite:///pai_usage.db` lands there), holding `sneaker.png`,
  `budgets.json` and `prices.toml` (the TOML sample of docs/pricing.md) for the samples that read them;
- pydantic-ai's `ALLOW_MODEL_REQUESTS` is off, and a model string such as `'openai:gpt-4o'` resolves to a
  `FunctionModel` with that model and provider name and fixed token usage, so costs are real genai-prices costs;
- `genai.Client()` reaches the fake Gemini server of `tests/fake_gemini.py` (`GOOGLE_API_KEY` and
  `GOOGLE_GEMINI_BASE_URL` are set), through the real google-genai SDK.

A sample that needs what the suite cannot provide is compiled only, marked by an HTML comment right above it,
invisible on GitHub and on the site: `<!-- sample: compile-only, needs a PostgreSQL server -->`. The reason is
required. `<!-- sample: requires logfire -->` runs the sample when `logfire` is installed and compiles it otherwise.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import ModelMessage, ModelResponse, TextPart, models
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

import pai_usage.tracker
from pai_usage import UsageTracker
from tests.fake_gemini import FakeGemini

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
_BLOCK = re.compile(
    r'(?:^<!--\s*sample:\s*(?P<mark>.*?)\s*-->\n)?^```python\n(?P<source>.*?)^```', re.MULTILINE | re.DOTALL
)
_TOML = re.compile(r'^```toml\n(?P<source>.*?)^```', re.MULTILINE | re.DOTALL)
# A PNG header is all the fake Gemini server needs of an image.
_PNG = b'\x89PNG\r\n\x1a\n' + b'\x00' * 64
_BUDGETS_JSON = '[{"scope": "organization", "limit_usd": "100"}, {"organization_id": "acme", "limit_usd": "20"}]'


@dataclass(frozen=True)
class Sample:
    path: Path
    line: int
    source: str
    mark: str | None
    """The `<!-- sample: ... -->` above the block, if any."""

    @property
    def where(self) -> str:
        return f'{self.path.name}:{self.line}'

    @property
    def runs(self) -> bool:
        if self.mark is None:
            return True
        if self.mark.startswith('requires '):
            return importlib.util.find_spec(self.mark.removeprefix('requires ').strip()) is not None
        return False


def _samples(path: Path) -> list[Sample]:
    text = path.read_text()
    return [
        Sample(path, text[: match.start('source')].count('\n'), match['source'], match['mark'])
        for match in _BLOCK.finditer(text)
    ]


ALL = [sample for path in DOCS for sample in _samples(path)]
PAGES = [path for path in DOCS if _samples(path)]


@pytest.mark.parametrize('sample', ALL, ids=[s.where for s in ALL])
def test_python_samples_compile(sample: Sample) -> None:
    compile(sample.source, sample.where, 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


@pytest.mark.parametrize('sample', [s for s in ALL if s.mark], ids=[s.where for s in ALL if s.mark])
def test_marks_are_known_and_give_a_reason(sample: Sample) -> None:
    assert sample.mark is not None
    assert re.fullmatch(r'compile-only, \S.{8,}|requires [a-z_]+', sample.mark), sample.mark


def test_samples_name_real_modules() -> None:
    # `from pai_usage.x import y` in a sample must name something that exists.
    import importlib

    for sample in ALL:
        for node in ast.walk(ast.parse(sample.source, sample.where)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pai_usage'):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f'{sample.where}: `{node.module}` has no `{alias.name}`'


# --- running them ------------------------------------------------------------------------------------


def _offline_model(original: Any) -> Any:
    """`infer_model` for the samples: `'provider:model'` becomes a FunctionModel of that name and provider."""

    def infer(model: Any) -> Any:
        if not isinstance(model, str) or ':' not in model:
            return original(model)
        provider, _, name = model.partition(':')

        def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            return ModelResponse(
                parts=[TextPart('An offline answer.')],
                provider_name=provider,
                usage=RequestUsage(input_tokens=120, output_tokens=30),
            )

        return FunctionModel(answer, model_name=name)

    return infer


@pytest.fixture
def sample_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The documented prelude (see the module docstring); closes every tracker the samples opened."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'sneaker.png').write_bytes(_PNG)
    (tmp_path / 'budgets.json').write_text(_BUDGETS_JSON)
    [toml] = _TOML.findall((ROOT / 'docs' / 'pricing.md').read_text())
    (tmp_path / 'prices.toml').write_text(toml)
    for name in [n for n in os.environ if n.startswith(('GOOGLE_', 'GEMINI_', 'PAI_USAGE_DATABASE'))]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(models, 'ALLOW_MODEL_REQUESTS', False)
    monkeypatch.setattr(models, 'infer_model', _offline_model(models.infer_model))
    monkeypatch.setattr(pai_usage.tracker, '_default', None)
    # A reader's session has no pytest plugin: the default tracker is the documented SQLite file, not in memory.
    monkeypatch.setattr(pai_usage.tracker, '_default_factory', None)
    # One event loop for the page, closed at its end: `run_sync` and top-level `await` samples share it.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with FakeGemini() as gemini:
            monkeypatch.setenv('GOOGLE_API_KEY', 'test-key')
            monkeypatch.setenv('GOOGLE_GEMINI_BASE_URL', gemini.base_url)
            monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
            monkeypatch.setenv('LOGFIRE_SEND_TO_LOGFIRE', 'false')
            yield tmp_path
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _run(sample: Sample, namespace: dict[str, Any]) -> None:
    code = compile(sample.source, sample.where, 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(code, namespace)  # `exec`, and with top-level `await` a coroutine to run
    if inspect.iscoroutine(result):
        asyncio.get_event_loop_policy().get_event_loop().run_until_complete(result)


# Rows each page's samples write into `sqlite:///pai_usage.db`: their effect, checked, not only their running.
_ROWS = {
    'README.md': 4,  # the agent run, the two Gemini calls, the ElevenLabs characters
    'budgets.md': 2,  # two runs under budgets
    'gemini.md': 8,  # six GeminiService calls, the characters, one caption
    'index.md': 1,
    'pydantic-ai.md': 1,
}


@pytest.mark.parametrize('page', PAGES, ids=[p.name for p in PAGES])
def test_samples_run(page: Path, sample_session: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {'__name__': '__sample__'}
    try:
        for sample in _samples(page):
            if sample.runs:
                _run(sample, namespace)
    finally:
        trackers = {id(v): v for v in namespace.values() if isinstance(v, UsageTracker)}
        if pai_usage.tracker._default is not None:  # pyright: ignore[reportPrivateUsage]
            trackers[id(pai_usage.tracker._default)] = pai_usage.tracker._default  # pyright: ignore[reportPrivateUsage]
        for tracker in trackers.values():
            assert tracker.flush(timeout=30), tracker.stats()
            tracker.close()
            tracker.engine.dispose()
    ledger = sample_session / 'pai_usage.db'
    rows = 0
    if ledger.exists():
        with sqlite3.connect(ledger) as conn:
            rows = conn.execute('SELECT count(*) FROM token_usage').fetchone()[0]
            priced = conn.execute("SELECT count(*) FROM token_usage WHERE pricing_status != 'unpriced'").fetchone()[0]
        conn.close()
        assert priced >= 1 or rows == 0
    assert rows == _ROWS.get(page.name, 0)


def test_every_unmarked_sample_runs() -> None:
    # Compile-only is the exception: only samples needing a server or the network may be marked.
    marked = [s for s in ALL if s.mark and s.mark.startswith('compile-only')]
    # Each is a sample that needs a server or Alembic's env.py; tests elsewhere run that code for real.
    assert len(marked) <= 9, [s.where for s in marked]


def test_api_reference_covers_every_public_module() -> None:
    import pkgutil

    import pai_usage

    public = {
        info.name
        for info in pkgutil.walk_packages(pai_usage.__path__, 'pai_usage.')
        if not any(part.startswith('_') for part in info.name.split('.')[1:]) and info.name.count('.') == 1
    }
    entries = set(re.findall(r'^::: (pai_usage\.\w+)$', (ROOT / 'docs' / 'api.md').read_text(), re.MULTILINE))
    assert public - entries == set(), 'add `::: <module>` to docs/api.md'


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
    api = (tmp_path / 'site' / 'api' / 'index.html').read_text()
    # The API reference is generated from the docstrings.
    assert 'UsageTracker' in api and 'The usage-and-cost ledger' in api
