"""The `pai-usage` command line: summary, migrate and prices, and every error path (one line, exit code 2)."""

from __future__ import annotations

import csv
import io
import json
import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa

from pai_usage import UsageRecord, UsageTracker
from pai_usage._cli import cli_logic
from pai_usage.migrate import available_migrations
from pai_usage.pricing import PRICES_ENV_VAR, set_price_table
from pai_usage.tracker import DATABASE_URL_ENV_VAR
from pai_usage.usage import TOKEN_BUCKETS

ALL_TIME = ['--since', '2000-01-01', '--until', '2099-12-31']


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_logic(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('pai-usage: error: ')
    assert 'Traceback' not in err
    for fragment in fragments:
        assert fragment in lines[0]


def _records() -> list[UsageRecord]:
    now = datetime.now(UTC)
    return [
        UsageRecord(model='gpt-4o', provider='openai', input_tokens=9_000, cache_read_tokens=3_000, output_tokens=700,
                    organization_id='acme', user_id='alice', created_at=now),
        UsageRecord(model='gemini-2.5-pro', provider='google-gla', input_tokens=230_000, output_tokens=1_000,
                    reasoning_tokens=4_000, organization_id='acme', user_id='bob', created_at=now),
        UsageRecord(model='gemini-2.0-flash', provider='google-gla', input_tokens=7_777, cache_read_tokens=333,
                    output_tokens=55, organization_id='globex', created_at=now),
        UsageRecord(model='imagen-3.0-generate-002', provider='google-vertex', units=Decimal(3), unit_type='image',
                    operation='generate_image', organization_id='globex', created_at=now),
        UsageRecord(model='mystery-llm', provider='acme-ai', input_tokens=10, organization_id='acme', created_at=now),
        UsageRecord(model='gpt-4o', provider='openai', cost_usd=Decimal('0.123456789012'), pricing_status='priced',
                    organization_id='acme', created_at=datetime(2024, 5, 5, tzinfo=UTC)),
    ]  # fmt: skip


@pytest.fixture
def populated(tracker: UsageTracker) -> UsageTracker:
    for record in _records():
        tracker.track(record)
    assert tracker.flush()
    return tracker


def _raw_totals(engine: sa.Engine) -> dict[str, Any]:
    """Totals straight from SQL, not through pai-usage's summary code."""
    columns = ', '.join(f'sum({name})' for name in TOKEN_BUCKETS)
    with engine.connect() as conn:
        cost = conn.exec_driver_sql('SELECT sum(cost_usd) FROM token_usage').scalar()
        events, unpriced = conn.exec_driver_sql('SELECT count(*), count(*) - count(cost_usd) FROM token_usage').one()
        tokens = conn.exec_driver_sql(f'SELECT {columns} FROM token_usage').one()
    if engine.dialect.name == 'sqlite':
        assert isinstance(cost, int)  # scaled pico-dollars
        cost = Decimal(cost) / Decimal(10**12)
    return {
        'cost': Decimal(cost),
        'events': events,
        'unpriced_events': unpriced,
        **{name: int(value) for name, value in zip(TOKEN_BUCKETS, tokens, strict=True)},
    }


def test_summary_json_agrees_with_sql(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, err = _run(capsys, 'summary', '--database-url', str(populated.engine.url.render_as_string(False)),
                          '--format', 'json', '--by', 'organization,model', *ALL_TIME)  # fmt: skip
    assert (code, err) == (0, '')
    document = json.loads(out)
    raw = _raw_totals(populated.engine)

    assert Decimal(document['total_cost_usd']) == raw['cost']
    assert document['events'] == raw['events'] == 6
    assert document['unpriced_events'] == raw['unpriced_events'] == 1
    for name in TOKEN_BUCKETS:
        assert document[name] == raw[name], name
    assert sum(Decimal(row['cost_usd'] or 0) for row in document['rows']) == raw['cost']
    assert document['group_by'] == ['organization', 'model']
    [mystery] = [row for row in document['rows'] if row['model'] == 'mystery-llm']
    assert (mystery['organization'], mystery['cost_usd'], mystery['unpriced_events']) == ('acme', None, 1)


def test_summary_json_cost_matches_genai_prices(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', populated.engine.url.render_as_string(False),
                        '--format', 'json', '--org', 'globex')  # fmt: skip
    assert code == 0
    document = json.loads(out)
    flash = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=8_110, cache_read_tokens=333, output_tokens=55),
        'gemini-2.0-flash',
        provider_id='google-gla',
    ).total_price
    images = 3 * Decimal('0.02')  # the documented default Imagen price
    assert Decimal(document['total_cost_usd']) == flash + images
    assert document['organization_id'] == 'globex'
    assert {row['model'] for row in document['rows']} == {'gemini-2.0-flash', 'imagen-3.0-generate-002'}


def test_summary_default_range_is_the_current_month(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', populated.engine.url.render_as_string(False),
                        '--format', 'json')  # fmt: skip
    assert code == 0
    document = json.loads(out)
    assert document['events'] == 5  # the 2024 event is outside
    start = datetime.fromisoformat(document['start'])
    now = datetime.now(UTC)
    assert (start.year, start.month, start.day, start.hour) == (now.year, now.month, 1, 0)


def test_summary_table(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, err = _run(capsys, 'summary', '--database-url', populated.engine.url.render_as_string(False),
                          '--by', 'organization,model')  # fmt: skip
    assert (code, err) == (0, '')
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith('organization'))
    assert header.split()[:4] == ['organization', 'model', 'events', 'unpriced']
    assert header.split()[-2:] == ['tokens', 'cost']
    mystery = next(line for line in lines if 'mystery-llm' in line)
    assert mystery.split()[-1] == 'unpriced'  # unknown is not shown as $0
    raw = _raw_totals(populated.engine)
    current = raw['cost'] - Decimal('0.123456789012')  # minus the 2024 event
    total_line = lines[-1]
    assert total_line.startswith(f'Total: ${current.normalize():f}')
    assert 'over 5 events (1 unpriced' in total_line
    tokens = sum(raw[name] for name in TOKEN_BUCKETS)
    assert f'{tokens:,} tokens' in total_line
    # Aligned: the last column is right-justified, so the header, the rule and every row end together.
    start = lines.index(header)
    table = lines[start : lines.index('', start)]
    assert set(table[1].replace(' ', '')) == {'-'}
    assert len(table) == 2 + 5  # header, rule, one line per (organization, model) this month
    assert len({len(line) for line in table}) == 1


def test_summary_csv(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', populated.engine.url.render_as_string(False),
                        '--format', 'csv', '--by', 'model', *ALL_TIME)  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row['model'] for row in rows] == sorted({r.model for r in _records() if r.model})
    by_model = {row['model']: row for row in rows}
    assert by_model['gpt-4o']['events'] == '2'
    assert by_model['mystery-llm']['cost_usd'] == ''
    assert Decimal(by_model['imagen-3.0-generate-002']['cost_usd']) == Decimal('0.06')
    assert sum(Decimal(row['cost_usd'] or 0) for row in rows) == _raw_totals(populated.engine)['cost']


@pytest.mark.parametrize(
    ('until', 'events'),
    [('2026-01-31', 1), ('2026-02-01', 2), ('2026-01-31T23:59:59.999999+00:00', 0), ('2026-02-01T00:00:00', 1)],
)
def test_until_date_includes_that_whole_day(
    tracker: UsageTracker, capsys: pytest.CaptureFixture[str], until: str, events: int
):
    for created_at in (datetime(2026, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)):
        tracker.track(created_at=created_at, model='m', cost_usd=Decimal(1), pricing_status='priced')
    assert tracker.flush()
    code, out, _ = _run(capsys, 'summary', '--database-url', tracker.engine.url.render_as_string(False),
                        '--format', 'json', '--since', '2026-01-31', '--until', until)  # fmt: skip
    assert code == 0
    assert json.loads(out)['events'] == events


@pytest.mark.parametrize(
    ('args', 'fragments'),
    [
        (['--since', '2026-02-30'], ["--since: '2026-02-30' is not a date"]),
        (['--until', 'yesterday'], ["--until: 'yesterday' is not a date"]),
        (['--since', '2026-03-01', '--until', '2026-02-01'], ['the range is empty']),
        (['--by', 'model,week'], ["cannot group by 'week'", 'organization,user']),
    ],
)
def test_summary_bad_arguments(
    capsys: pytest.CaptureFixture[str], sqlite_url: str, args: list[str], fragments: list[str]
):
    code, out, err = _run(capsys, 'summary', '--database-url', sqlite_url, *args)
    assert (code, out) == (2, '')
    _assert_one_error_line(err, *fragments)
    assert not Path(sqlite_url.removeprefix('sqlite:///')).exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('command', ['summary', 'migrate'])
def test_unreachable_database(capsys: pytest.CaptureFixture[str], command: str):
    url = f'postgresql://postgres:secret@127.0.0.1:{_closed_port()}/test'
    code, out, err = _run(capsys, command, '--database-url', url)
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'cannot reach database', '127.0.0.1')
    assert 'secret' not in err


def test_missing_table_is_not_created(capsys: pytest.CaptureFixture[str], database_url: str):
    if database_url.startswith('sqlite'):
        path = database_url.removeprefix('sqlite:///')
        with sqlite3.connect(path) as conn:  # an existing database, never migrated
            conn.execute('CREATE TABLE unrelated (x INTEGER)')
        conn.close()
    code, out, err = _run(capsys, 'summary', '--database-url', database_url)
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'no `token_usage` table', 'pai-usage migrate')
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table('token_usage')
    engine.dispose()


def test_missing_sqlite_file_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATABASE_URL_ENV_VAR, raising=False)
    code, _, err = _run(capsys, 'summary')  # the default: sqlite:///pai_usage.db
    assert code == 2
    _assert_one_error_line(err, "no SQLite database at 'pai_usage.db'", 'pai-usage migrate')
    assert list(tmp_path.iterdir()) == []


def test_database_url_from_environment(
    populated: UsageTracker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(DATABASE_URL_ENV_VAR, populated.engine.url.render_as_string(False))
    code, out, _ = _run(capsys, 'summary', '--format', 'json', *ALL_TIME)
    assert code == 0
    assert json.loads(out)['events'] == 6


@pytest.mark.parametrize(
    ('url', 'fragment'), [('nonsense', "invalid database URL 'nonsense'"), ('mysql://u@h/db', 'cannot use database')]
)
def test_unusable_database_url(capsys: pytest.CaptureFixture[str], url: str, fragment: str):
    code, _, err = _run(capsys, 'summary', '--database-url', url)
    assert code == 2
    _assert_one_error_line(err, fragment)


def test_migrate_then_up_to_date(capsys: pytest.CaptureFixture[str], database_url: str):
    dialect = 'sqlite' if database_url.startswith('sqlite') else 'postgresql'
    code, out, err = _run(capsys, 'migrate', '--database-url', database_url)
    assert (code, err) == (0, '')
    assert out.splitlines() == [f'applied {m.name}' for m in available_migrations(dialect)]
    code, out, _ = _run(capsys, 'migrate', '--database-url', database_url)
    assert code == 0
    assert 'is up to date' in out
    # And now the summary works, on an empty ledger.
    code, out, _ = _run(capsys, 'summary', '--database-url', database_url, '--format', 'json')
    assert code == 0
    assert json.loads(out)['total_cost_usd'] == '0.000000000000'


def test_migrate_into_a_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    code, _, err = _run(capsys, 'migrate', '--database-url', f'sqlite:///{tmp_path}/no/such/dir/usage.db')
    assert code == 2
    _assert_one_error_line(err, 'unable to open database file')


def test_prices_of_a_model(capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'prices', 'gemini-2.5-pro')
    assert code == 0
    assert f'source:   genai-prices {genai_prices.__version__}' in out
    assert 'from 200,000 input tokens' in out  # the upper tier is shown
    assert 'character' not in out  # no ElevenLabs price on a Gemini model


def test_prices_of_a_unit_priced_model(capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'prices', 'veo-3.0-generate-001', '--provider', 'google-vertex')
    assert code == 0
    assert 'source:   config' in out
    assert 'video_second  $0.05' in out


def test_prices_of_an_unknown_model(capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'prices', 'no-such-model-7b')
    assert code == 1
    assert 'no price known' in out


def test_prices_lists_the_table(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code, out, _ = _run(capsys, 'prices')
    assert code == 0
    assert 'built-in defaults' in out
    assert 'google*/imagen-*  image  $0.02  (default)' in out

    path = tmp_path / 'prices.toml'
    path.write_text('[[tokens]]\nmodel = "gpt-4o"\ninput_mtok = 2\noutput_mtok = 8\n')
    monkeypatch.setenv(PRICES_ENV_VAR, str(path))
    set_price_table(None)  # forget the table loaded above
    code, out, _ = _run(capsys, 'prices')
    assert code == 0
    assert str(path) in out
    assert '*/gpt-4o  input $2, output $8' in out
    code, out, _ = _run(capsys, 'prices', 'gpt-4o')
    assert 'source:   config' in out


def test_prices_with_a_bad_price_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / 'prices.toml'
    path.write_text('[[units]]\nmodel = "x"\n')
    monkeypatch.setenv(PRICES_ENV_VAR, str(path))
    code, _, err = _run(capsys, 'prices', 'gpt-4o')
    assert code == 2
    _assert_one_error_line(err, 'bad price file', str(path))


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]):
    assert cli_logic(['summary', '--format', 'xml']) == 2
    assert cli_logic([]) == 2
    assert 'invalid choice' in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, '-m', 'pai_usage', '--version'], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith('pai-usage ')
    result = subprocess.run(
        [sys.executable, '-m', 'pai_usage', 'summary'], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count('\n') == 1
    assert list(tmp_path.iterdir()) == []
