"""The `pai-usage` command line: every command, and every error path (one line, exit code 2)."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from pai_usage import UsageRecord, UsageTracker, _cli, export
from pai_usage._cli import cli_logic
from pai_usage._format import format_usd
from pai_usage.export import export_rows
from pai_usage.migrate import available_migrations
from pai_usage.pricing import PRICES_ENV_VAR, PriceTable, get_price_table, set_price_table
from pai_usage.table import TOKEN_USAGE, cost_sum
from pai_usage.tracker import DATABASE_URL_ENV_VAR
from pai_usage.usage import TOKEN_BUCKETS

ALL_TIME = ['--since', '2000-01-01', '--until', '2099-12-31']
_IMAGEN_3 = PriceTable().unit_price('google-vertex', 'imagen-3.0-generate-002', 'image')
assert _IMAGEN_3 is not None
IMAGEN_3_PRICE = _IMAGEN_3.usd_per_unit
"""The shipped list price of an Imagen 3 image (`pai_usage.pricing.DEFAULT_UNIT_PRICES`)."""


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


def _assert_rejected(
    capsys: pytest.CaptureFixture[str], command: str, sqlite_url: str, args: list[str], fragments: list[str]
) -> None:
    """`command` with `args` fails with exit code 2, prints nothing on stdout, and never creates `sqlite_url`.

    With `fragments`, the failure is one error line holding each (without, argparse's own usage message).
    """
    code, out, err = _run(capsys, command, '--database-url', sqlite_url, *args)
    assert (code, out) == (2, '')
    if fragments:
        _assert_one_error_line(err, *fragments)
    assert not Path(sqlite_url.removeprefix('sqlite:///')).exists()


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
        # SQLite keeps fixed-decimal text: its exact sum is over the digits, in pico-dollars (docs/columns.md).
        sqlite = engine.dialect.name == 'sqlite'
        exact = "sum(CAST(replace(cost_usd, '.', '') AS INTEGER))" if sqlite else 'sum(cost_usd)'
        cost = conn.exec_driver_sql(f'SELECT {exact} FROM token_usage').scalar()
        events, unpriced = conn.exec_driver_sql('SELECT count(*), count(*) - count(cost_usd) FROM token_usage').one()
        tokens = conn.exec_driver_sql(f'SELECT {columns} FROM token_usage').one()
    assert cost is not None
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


@pytest.mark.parametrize('command', ['summary', 'export'])
def test_org_is_matched_as_the_ledger_stores_it(
    populated: UsageTracker, capsys: pytest.CaptureFixture[str], command: str
):
    url = populated.engine.url.render_as_string(False)
    code, out, _ = _run(capsys, command, '--database-url', url, '--format', 'json' if command == 'summary' else 'jsonl',
                        '--org', ' glob\x00ex ')  # fmt: skip
    assert code == 0
    if command == 'summary':
        assert json.loads(out)['events'] == 2
    else:
        assert len(out.splitlines()) == 2
    code, out, err = _run(capsys, command, '--database-url', url, '--org', '   ')
    assert (code, out) == (2, '')
    assert "argument --org: '   ' is blank" in err


@pytest.mark.parametrize('command', ['summary', 'export', 'reprice'])
@pytest.mark.parametrize(
    ('args', 'fragment'),
    [
        (['--since', '2026-01-01', '--until', '9999-12-31T23:00-05:00'], "--until: '9999-12-31T23:00-05:00' is out of"),
        (['--since', '0001-01-01T00:00+01:00'], "--since: '0001-01-01T00:00+01:00' is out of range"),
        (['--since', '2026-03-01', '--until', '2026-02-01'], 'the range is empty'),
    ],
)
def test_a_range_beyond_the_calendar_or_empty_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], sqlite_url: str, command: str, args: list[str], fragment: str
):
    _assert_rejected(capsys, command, sqlite_url, args, [fragment])


def test_summary_until_the_last_day_is_a_usage_error(capsys: pytest.CaptureFixture[str], sqlite_url: str):
    _assert_rejected(capsys, 'summary', sqlite_url, ['--until', '9999-12-31'], ["'9999-12-31' is out of range"])


def test_a_dry_run_reprice_never_creates_the_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    database = tmp_path / 'other.db'
    with sqlite3.connect(database) as conn:
        conn.execute('CREATE TABLE x (a)')
    code, out, err = _run(capsys, 'reprice', '--database-url', f'sqlite:///{database}', '--since', '2026-01-01')
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'no `token_usage` table', 'reprice never creates it')
    with sqlite3.connect(database) as conn:
        assert conn.execute('SELECT name FROM sqlite_master').fetchall() == [('x',)]


def test_summary_table_escapes_control_characters_in_labels(tracker: UsageTracker, capsys: pytest.CaptureFixture[str]):
    for org in ('esc\x1b[2J\x1b[31mRED', 'nl\nTotal: $0.0000', 'bel\x07'):
        tracker.track(organization_id=org, provider='openai', model='gpt-4o', input_tokens=10)
    assert tracker.flush()
    code, out, _ = _run(capsys, 'summary', '--database-url', tracker.engine.url.render_as_string(False),
                        '--by', 'organization')  # fmt: skip
    assert code == 0
    assert all(line.isprintable() for line in out.splitlines())
    assert '\\x1b[2J' in out and '\\n' in out
    assert sum('RED' in line or 'Total: $0.0000' in line or 'bel' in line for line in out.splitlines()) == 3


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
    images = 3 * IMAGEN_3_PRICE  # the shipped Imagen 3 list price
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
    # No row has an error: no errors column; input and output add up their buckets (--wide shows each).
    assert header.split() == ['organization', 'model', 'events', 'unpriced', 'input', 'output', 'cost']
    mystery = next(line for line in lines if 'mystery-llm' in line)
    assert mystery.split()[-1] == 'unpriced'  # unknown is not shown as $0
    gpt = next(line for line in lines if 'gpt-4o' in line)
    assert gpt.split()[-3:-1] == ['12,000', '700']  # 9,000 uncached + 3,000 cache reads in; 700 out
    raw = _raw_totals(populated.engine)
    current = raw['cost'] - Decimal('0.123456789012')  # minus the 2024 event
    total_line = lines[-1]
    assert total_line.startswith(f'Total: {format_usd(current)} over 5 events (1 unpriced')
    tokens = sum(raw[name] for name in TOKEN_BUCKETS)
    assert f'{tokens:,} tokens' in total_line
    # Aligned: the last column is right-justified, so the header, the rule and every row end together.
    start = lines.index(header)
    table = lines[start : lines.index('', start)]
    assert set(table[1].replace(' ', '')) == {'-'}
    assert len(table) == 2 + 5  # header, rule, one line per (organization, model) this month
    assert len({len(line) for line in table}) == 1
    # Money has four places everywhere, so the decimal points line up.
    costs = [line.split()[-1] for line in table[2:] if line.split()[-1] != 'unpriced']
    assert all(re.fullmatch(r'\$\d[\d,]*\.\d{4}', cost) for cost in costs), costs
    assert len({line.rindex('.') for line in table[2:] if not line.endswith('unpriced')}) == 1


def test_summary_table_wide(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(populated), '--by', 'model', '--wide')
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith('model'))
    assert header.split() == [
        'model', 'events', 'unpriced', 'errors', 'input_tokens', 'cache_read_tokens', 'output_tokens',
        'reasoning_tokens', 'tokens', 'cost',
    ]  # fmt: skip
    pro = next(line for line in out.splitlines() if line.startswith('gemini-2.5-pro'))
    assert '230,000' in pro.split() and '4,000' in pro.split()  # exact counts, not 230k


def test_summary_csv(populated: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', populated.engine.url.render_as_string(False),
                        '--format', 'csv', '--by', 'model', *ALL_TIME)  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row['model'] for row in rows] == sorted({r.model for r in _records() if r.model})
    by_model = {row['model']: row for row in rows}
    assert by_model['gpt-4o']['events'] == '2'
    assert by_model['mystery-llm']['cost_usd'] == ''
    assert Decimal(by_model['imagen-3.0-generate-002']['cost_usd']) == 3 * IMAGEN_3_PRICE
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
    assert fragments  # each failure is one line of ours
    _assert_rejected(capsys, 'summary', sqlite_url, args, fragments)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


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
    veo = get_price_table().unit_price('google-vertex', 'veo-3.0-generate-001', 'video_second')
    assert veo is not None and f'video_second  ${veo.usd_per_unit.normalize():f}' in out


def test_prices_of_an_unknown_model(capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'prices', 'no-such-model-7b')
    assert code == 1
    assert 'no price known' in out


def test_prices_lists_the_table(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code, out, _ = _run(capsys, 'prices')
    assert code == 0
    assert 'built-in defaults' in out
    assert f'google*/imagen-3.0-generate-*  image  ${IMAGEN_3_PRICE}  (default)' in out

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


# --- summary --by day, and FOCUS csv ------------------------------------------------------------------

JUNE = ['--since', '2026-06-01', '--until', '2026-06-03']  # three whole days: --until includes its day
JUNE_START, JUNE_END = datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 6, 4, tzinfo=UTC)


@pytest.fixture
def june(tracker: UsageTracker) -> UsageTracker:
    """Priced events on June 1st and 3rd 2026 (none on the 2nd), one unpriced, and one on either side of the range."""
    for created_at, org, provider, cost in [
        (datetime(2026, 5, 31, 23, 59, 59, 999_999, tzinfo=UTC), 'acme', 'openai', Decimal(1000)),
        (datetime(2026, 6, 1, 0, 0, tzinfo=UTC), 'acme', 'openai', Decimal('1.5')),
        (datetime(2026, 6, 1, 12, 30, tzinfo=UTC), 'globex', 'google-gla', Decimal('0.5')),
        (datetime(2026, 6, 3, 8, 0, tzinfo=UTC), 'acme', 'google-gla', Decimal('0.000000000123')),
        (datetime(2026, 6, 3, 9, 0, tzinfo=UTC), 'globex', 'openai', None),
        (datetime(2026, 6, 4, 0, 0, tzinfo=UTC), 'acme', 'openai', Decimal(1000)),
    ]:
        tracker.track(
            created_at=created_at,
            organization_id=org,
            provider=provider,
            model='m',
            input_tokens=10,
            cost_usd=cost,
            pricing_status='unpriced' if cost is None else 'priced',
        )
    assert tracker.flush()
    return tracker


def _url(tracker: UsageTracker) -> str:
    return tracker.engine.url.render_as_string(hide_password=False)


def _in_range(engine: sa.Engine, start: datetime, end: datetime) -> tuple[int, Decimal]:
    """`SELECT count(*), sum(cost_usd)` over `[start, end)`, with bound parameters (exact on SQLite too)."""
    t = TOKEN_USAGE
    query = sa.select(sa.func.count(), cost_sum()).where(t.c.created_at >= start, t.c.created_at < end)
    with engine.connect() as conn:
        count, cost = conn.execute(query).one()
    return count, Decimal(cost)


@pytest.mark.parametrize('extra', [[], ['--by', 'day,organization']], ids=['day', 'day-and-org'])
def test_summary_by_day_draws_daily_costs(june: UsageTracker, capsys: pytest.CaptureFixture[str], extra: list[str]):
    code, out, err = _run(capsys, 'summary', '--database-url', _url(june), '--by', 'day', *JUNE, *extra)
    assert (code, err) == (0, '')
    table, _, chart = out.partition('Total: ')
    assert '█' not in table
    chart_lines = chart.splitlines()[1:]
    assert chart_lines[0] == ''  # a blank line between the totals and the chart
    assert [line[:10] for line in chart_lines[1:]] == ['2026-06-01', '2026-06-02', '2026-06-03']  # empty days too
    first, second, third = chart_lines[1:]
    assert first.count('█') == 40 and first.endswith('$2.0000')  # the largest day fills the bar
    assert '█' not in second and second.endswith('$0.0000')
    assert third.endswith('$0.0000')  # 0.000000000123, shown to 4 places


def test_daily_chart_spans_the_days_with_usage(june: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(june), '--by', 'day', *ALL_TIME)
    assert code == 0
    chart = out.split('\n\n')[-1].splitlines()
    # A century of range, but only the days from the first to the last with usage are drawn.
    assert [line[:10] for line in chart] == ['2026-05-31', '2026-06-01', '2026-06-02', '2026-06-03', '2026-06-04']
    assert chart[0].endswith('$1,000.0000') and chart[0].count('█') == 40


@pytest.mark.parametrize(
    'args',
    [
        pytest.param(['--by', 'model', *JUNE], id='not-by-day'),
        pytest.param(['--by', 'day', '--since', '2026-07-01', '--until', '2026-07-02'], id='no-rows'),
        pytest.param(['--by', 'day', '--format', 'json', *JUNE], id='json'),
    ],
)
def test_no_daily_chart(june: UsageTracker, capsys: pytest.CaptureFixture[str], args: list[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(june), *args)
    assert code == 0
    assert '█' not in out
    assert not re.search(r'^\d{4}-\d{2}-\d{2}  .*\$', out, re.MULTILINE)  # no chart line, not even an empty one


def test_summary_focus_csv(june: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, err = _run(capsys, 'summary', '--database-url', _url(june), '--format', 'csv', '--focus',
                          '--by', 'day,organization,provider,model', *JUNE)  # fmt: skip
    assert (code, err) == (0, '')
    reader = csv.DictReader(io.StringIO(out))
    assert (reader.fieldnames or [])[:8] == [
        'ChargePeriodStart', 'ChargePeriodEnd', 'SubAccountId', 'ProviderName', 'model',
        'BilledCost', 'EffectiveCost', 'BillingCurrency',
    ]  # fmt: skip
    assert 'day' not in (reader.fieldnames or []) and 'cost_usd' not in (reader.fieldnames or [])
    rows = list(reader)
    count, cost = _in_range(june.engine, JUNE_START, JUNE_END)
    assert sum(int(row['events']) for row in rows) == count == 4
    assert sum(Decimal(row['BilledCost'] or 0) for row in rows) == cost == Decimal('2.000000000123')
    assert all(row['BilledCost'] == row['EffectiveCost'] and row['BillingCurrency'] == 'USD' for row in rows)
    globex = next(row for row in rows if row['SubAccountId'] == 'globex' and row['ProviderName'] == 'openai')
    assert globex['BilledCost'] == ''  # unpriced: unknown, not zero
    assert (globex['ChargePeriodStart'], globex['ChargePeriodEnd']) == (
        '2026-06-03T00:00:00+00:00',
        '2026-06-04T00:00:00+00:00',
    )


@pytest.mark.parametrize(
    ('by', 'since', 'periods'),
    [
        # Without day or month, the charge period is the summary's range.
        ('organization', '2026-06-01', {('2026-06-01T00:00:00+00:00', '2026-06-04T00:00:00+00:00')}),
        # A month is clipped to the range: FOCUS periods never claim time outside it.
        ('month', '2026-06-01T12:00', {('2026-06-01T12:00:00+00:00', '2026-06-04T00:00:00+00:00')}),
        ('day', '2026-06-01T12:00', {
            ('2026-06-01T12:00:00+00:00', '2026-06-02T00:00:00+00:00'),
            ('2026-06-03T00:00:00+00:00', '2026-06-04T00:00:00+00:00'),
        }),
    ],
)  # fmt: skip
def test_summary_focus_charge_periods(
    june: UsageTracker, capsys: pytest.CaptureFixture[str], by: str, since: str, periods: set[tuple[str, str]]
):
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(june), '--format', 'csv', '--focus', '--by', by,
                        '--since', since, '--until', '2026-06-03')  # fmt: skip
    assert code == 0
    assert {(row['ChargePeriodStart'], row['ChargePeriodEnd']) for row in csv.DictReader(io.StringIO(out))} == periods


@pytest.mark.parametrize('fmt', ['table', 'json'])
def test_summary_focus_needs_csv(capsys: pytest.CaptureFixture[str], sqlite_url: str, fmt: str):
    code, out, err = _run(capsys, 'summary', '--database-url', sqlite_url, '--format', fmt, '--focus')
    assert (code, out) == (2, '')
    _assert_one_error_line(err, '--focus applies to --format csv')


# --- export -------------------------------------------------------------------------------------


def _parse_export(text: str, fmt: str) -> list[dict[str, Any]]:
    if fmt == 'csv':
        return list(csv.DictReader(io.StringIO(text)))
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize('focus', [False, True], ids=['ours', 'focus'])
@pytest.mark.parametrize('fmt', ['csv', 'jsonl'])
@pytest.mark.parametrize('to_file', [False, True], ids=['stdout', 'file'])
def test_export_agrees_with_sql(
    june: UsageTracker, capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str, focus: bool, to_file: bool
):
    target = tmp_path / 'exports' / f'export.{fmt}'
    target.parent.mkdir()
    options = ['--format', fmt, *(['--focus'] if focus else []), *(['-o', str(target)] if to_file else [])]
    code, out, err = _run(capsys, 'export', '--database-url', _url(june), *JUNE, *options)
    assert (code, err) == (0, '')  # stderr is not a terminal: no progress
    if to_file:
        assert out == ''
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no `.partial` left behind
        out = target.read_text()
    rows = _parse_export(out, fmt)
    count, cost = _in_range(june.engine, JUNE_START, JUNE_END)
    cost_column, time_column = ('BilledCost', 'ChargePeriodStart') if focus else ('cost_usd', 'created_at')
    assert len(rows) == count == 4
    assert sum(Decimal(row[cost_column] or 0) for row in rows) == cost
    times = [datetime.fromisoformat(row[time_column]) for row in rows]
    assert times == sorted(times)
    assert JUNE_START <= times[0] <= times[-1] < JUNE_END
    if fmt == 'csv':
        header = out.splitlines()[0].split(',')
        assert header[:2] == (['BilledCost', 'EffectiveCost'] if focus else ['id', 'created_at'])
        assert all(row[cost_column] != '' for row in rows[:-1]) and rows[-1][cost_column] == ''
    else:
        assert rows[-1][cost_column] is None  # the unpriced event: unknown, not zero
    if focus:
        assert {row['SubAccountId'] for row in rows} == {'acme', 'globex'}
        assert all(row['BillingCurrency'] == 'USD' for row in rows)


def test_export_filters(june: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'export', '--database-url', _url(june), '--format', 'jsonl', '--org', 'globex', *JUNE)
    assert code == 0
    rows = _parse_export(out, 'jsonl')
    assert [(row['organization_id'], row['provider']) for row in rows] == [
        ('globex', 'google-gla'),
        ('globex', 'openai'),
    ]
    code, out, _ = _run(capsys, 'export', '--database-url', _url(june), '--user', 'nobody', *JUNE)
    assert code == 0
    assert out.splitlines() == [out.splitlines()[0]] and out.startswith('id,created_at,')  # the header only


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(('every', 'shown'), [(2, '\r2 rows\r4 rows\r6 rows\n'), (4, '\r4 rows\r6 rows\n')])
def test_export_progress_on_a_terminal(
    june: UsageTracker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, every: int, shown: str
):
    monkeypatch.setattr(_cli, '_PROGRESS_EVERY', every)
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    code, out, _ = _run(capsys, 'export', '--database-url', _url(june), '--format', 'jsonl', *ALL_TIME)
    assert code == 0
    assert len(out.splitlines()) == 6
    assert terminal.getvalue() == shown  # on stderr only, never mixed into the data; the final count once


def _broken_rows(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    yield from export_rows(*args, **kwargs, batch_size=1)
    raise sa_exc.OperationalError('SELECT', {}, Exception('server closed the connection unexpectedly'))


def test_export_database_failure_midway(
    june: UsageTracker, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(export, 'export_rows', _broken_rows)
    target = tmp_path / 'exports' / 'out.csv'
    target.parent.mkdir()
    code, out, err = _run(capsys, 'export', '--database-url', _url(june), *JUNE, '-o', str(target))
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'cannot read token_usage', 'server closed the connection')
    assert list(target.parent.iterdir()) == []  # no half-written export, under either name


@pytest.mark.parametrize(
    ('args', 'fragments'),
    [
        (['--since', '2026-02-30'], ["--since: '2026-02-30' is not a date"]),
        (['--since', '2026-03-01', '--until', '2026-02-01'], ['the range is empty']),
        (['--format', 'xml'], []),
    ],
)
def test_export_bad_arguments(
    capsys: pytest.CaptureFixture[str], sqlite_url: str, args: list[str], fragments: list[str]
):
    _assert_rejected(capsys, 'export', sqlite_url, args, fragments)


def test_export_to_an_unwritable_place(june: UsageTracker, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    code, out, err = _run(capsys, 'export', '--database-url', _url(june), '-o', str(tmp_path / 'no' / 'x.csv'))
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'cannot write', 'No such file or directory')


# --- the commands that read the ledger, on a missing database or table ----------------------------


@pytest.mark.parametrize('command', [['summary'], ['export'], ['budgets', '--limit', '1']])
def test_reading_commands_never_create_the_ledger(
    capsys: pytest.CaptureFixture[str], database_url: str, tmp_path: Path, command: list[str]
):
    if database_url.startswith('sqlite'):
        code, out, err = _run(capsys, *command, '--database-url', f'sqlite:///{tmp_path}/missing.db')
        assert (code, out) == (2, '')
        _assert_one_error_line(err, 'no SQLite database at', 'pai-usage migrate')
        with sqlite3.connect(database_url.removeprefix('sqlite:///')) as conn:  # exists, never migrated
            conn.execute('CREATE TABLE unrelated (x INTEGER)')
        conn.close()
    code, out, err = _run(capsys, *command, '--database-url', database_url)
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'no `token_usage` table', f'({command[0]} never creates it)')
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table('token_usage')
    engine.dispose()
    assert not (tmp_path / 'missing.db').exists()


@pytest.mark.postgres
def test_missing_table_hint_hides_the_password(capsys: pytest.CaptureFixture[str], pg_schema_url: str):
    if '://postgres@' not in pg_schema_url:
        pytest.skip('needs a test server URL without a password (which a trusting server then ignores)')
    url = pg_schema_url.replace('://postgres@', '://postgres:secret@', 1)
    code, _, err = _run(capsys, 'export', '--database-url', url)
    assert code == 2
    _assert_one_error_line(err, 'no `token_usage` table', 'pai-usage migrate --database-url postgresql+psycopg://')
    assert 'secret' not in err and 'postgres:***@' in err


@pytest.mark.parametrize('command', [['summary'], ['migrate'], ['export'], ['budgets', '--limit', '1']])
def test_unreachable_database(capsys: pytest.CaptureFixture[str], command: list[str]):
    url = f'postgresql://postgres:secret@127.0.0.1:{_closed_port()}/test'
    code, out, err = _run(capsys, *command, '--database-url', url)
    assert (code, out) == (2, '')
    _assert_one_error_line(err, 'cannot reach database', '127.0.0.1')
    assert 'secret' not in err


# --- budgets ------------------------------------------------------------------------------------


@pytest.fixture
def this_month(tracker: UsageTracker) -> UsageTracker:
    """Spend now: acme $3, globex $1.25 (and $1000 over a year ago, which no current budget counts)."""
    now = datetime.now(UTC)
    for created_at, org, cost in [
        (now, 'acme', Decimal(2)),
        (now, 'acme', Decimal(1)),
        (now, 'globex', Decimal('1.25')),
        (now - timedelta(days=400), 'acme', Decimal(1000)),
    ]:
        tracker.track(created_at=created_at, organization_id=org, model='m', cost_usd=cost, pricing_status='priced')
    assert tracker.flush()
    return tracker


@pytest.mark.parametrize(
    ('options', 'code', 'spend'),
    [
        (['--limit', '3', '--org', 'acme'], 1, '$3.0000'),  # spend reached the limit: exceeded
        (['--limit', '3.01', '--org', 'acme'], 0, '$3.0000'),
        (['--limit', '$5', '--org', 'acme', '--period', 'day'], 0, '$3.0000'),
        (['--limit', '4.25'], 1, '$4.2500'),  # all usage this month
        (['--limit', '100', '--org', 'initech'], 0, '$0.0000'),  # an org without spend
    ],
)
def test_budgets_limit(
    this_month: UsageTracker, capsys: pytest.CaptureFixture[str], options: list[str], code: int, spend: str
):
    result, out, err = _run(capsys, 'budgets', '--database-url', _url(this_month), *options)
    assert (result, err) == (code, '')
    [line] = out.splitlines()[1:]
    assert spend in line.split()
    assert ('EXCEEDED' in line) == (code == 1)


def test_budgets_file(this_month: UsageTracker, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    path = tmp_path / 'budgets.json'
    path.write_text(json.dumps([
        {'scope': 'organization', 'limit_usd': '2.5'},
        {'organization_id': 'globex', 'limit_usd': 10, 'period': 'day', 'name': 'globex daily'},
    ]))  # fmt: skip
    code, out, err = _run(capsys, 'budgets', '--database-url', _url(this_month), '--file', str(path))
    assert (code, err) == (1, '')  # acme is over its per-organization budget
    lines = out.splitlines()[1:]
    assert len(lines) == 3  # one line per organization with spend, then the named budget
    per_org = {line.split()[2]: line for line in lines if line.startswith('per organizatio\u2026')}
    acme, globex = per_org['acme'], per_org['globex']
    daily = next(line for line in lines if line.startswith('globex daily'))
    assert '$3.0000' in acme.split() and acme.endswith('EXCEEDED')
    assert '$1.2500' in globex.split() and not globex.endswith('EXCEEDED')
    assert '$1.2500' in daily.split() and '$10.0000' in daily.split() and not daily.endswith('EXCEEDED')

    path.write_text('[{"scope": "organization", "limit_usd": "100"}]')
    code, out, _ = _run(capsys, 'budgets', '--database-url', _url(this_month), '--file', str(path))
    assert code == 0
    assert 'EXCEEDED' not in out


@pytest.mark.parametrize(
    ('options', 'fragments'),
    [
        ([], ['give --limit USD']),
        (['--limit', 'ten'], ["--limit: 'ten' is not an amount in USD"]),
        (['--limit', '-1'], ["--limit: '-1' is not an amount"]),
        (['--limit', 'NaN'], ["--limit: 'NaN' is not an amount"]),
        (['--file', '{dir}/missing.json'], ['cannot read budgets file', 'No such file or directory']),
        (['--file', '{dir}/bad.json'], ['bad budgets file', 'not valid JSON']),
        (['--file', '{dir}/wrong.json'], ['bad budgets file', 'budget #1 has unknown fields']),
        (['--file', '{dir}/bad.json', '--org', 'acme'], ['--period, --timezone and --org go with --limit']),
    ],
)
def test_budgets_bad_options(
    capsys: pytest.CaptureFixture[str], sqlite_url: str, tmp_path: Path, options: list[str], fragments: list[str]
):
    (tmp_path / 'bad.json').write_text('[{"limit_usd": ')
    (tmp_path / 'wrong.json').write_text('[{"limit_usd": 1, "org": "acme"}]')
    options = [option.format(dir=tmp_path) for option in options]
    assert fragments  # each failure is one line of ours
    _assert_rejected(capsys, 'budgets', sqlite_url, options, fragments)


def test_budgets_limit_and_file_are_exclusive(capsys: pytest.CaptureFixture[str]):
    assert cli_logic(['budgets', '--limit', '1', '--file', 'b.json']) == 2
    assert 'not allowed with argument' in capsys.readouterr().err


# --- sorting, top N, grouping by agent, status and source -----------------------------------------


@pytest.fixture
def team(tracker: UsageTracker) -> UsageTracker:
    """Users u1..u12 with costs that do not follow their names, two agents, direct calls and errors."""
    now = datetime.now(UTC)
    for i in (1, 2, 10, 11, 3, 12):
        tracker.track(created_at=now, user_id=f'u{i}', organization_id='acme', model='gpt-4o', provider='openai',
                      source='agent', agent_name='writer' if i % 2 else 'critic', input_tokens=1_000 * i,
                      output_tokens=10 * i, cost_usd=Decimal(13 - i), pricing_status='priced',
                      status='error' if i == 3 else 'ok')  # fmt: skip
    tracker.track(created_at=now, user_id='u2', organization_id='acme', model='imagen', source='direct',
                  operation='generate_image', units=Decimal(2), unit_type='image')  # fmt: skip
    assert tracker.flush()
    return tracker


def _json_rows(capsys: pytest.CaptureFixture[str], tracker: UsageTracker, *args: str) -> dict[str, Any]:
    code, out, err = _run(capsys, 'summary', '--database-url', _url(tracker), '--format', 'json', *args)
    assert (code, err) == (0, '')
    return json.loads(out)


def test_natural_sort_by_default(team: UsageTracker, capsys: pytest.CaptureFixture[str]):
    rows = _json_rows(capsys, team, '--by', 'user')['rows']
    assert [row['user'] for row in rows] == ['u1', 'u2', 'u3', 'u10', 'u11', 'u12']  # not u1, u10, u11, ...
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(team), '--by', 'user')
    assert code == 0
    assert [line.split()[0] for line in out.splitlines() if re.match(r'u\d', line)] == [
        'u1', 'u2', 'u3', 'u10', 'u11', 'u12',
    ]  # fmt: skip


@pytest.mark.parametrize(
    ('sort', 'users'),
    [
        ('cost', ['u1', 'u2', 'u3', 'u10', 'u11', 'u12']),  # largest first: $12, $11 + the unpriced image, ...
        ('tokens', ['u12', 'u11', 'u10', 'u3', 'u2', 'u1']),
        ('input', ['u12', 'u11', 'u10', 'u3', 'u2', 'u1']),
        ('events', ['u2', 'u1', 'u3', 'u10', 'u11', 'u12']),  # ties keep the natural order
        ('errors', ['u3', 'u1', 'u2', 'u10', 'u11', 'u12']),
        ('user', ['u1', 'u2', 'u3', 'u10', 'u11', 'u12']),
    ],
)
def test_sort(team: UsageTracker, capsys: pytest.CaptureFixture[str], sort: str, users: list[str]):
    document = _json_rows(capsys, team, '--by', 'user', '--sort', sort)
    assert [row['user'] for row in document['rows']] == users
    if sort == 'cost':
        costs = [Decimal(row['cost_usd']) for row in document['rows']]
        assert costs == sorted(costs, reverse=True)


def test_top(team: UsageTracker, capsys: pytest.CaptureFixture[str]):
    document = _json_rows(capsys, team, '--by', 'user', '--sort', 'tokens', '--top', '2')
    assert [row['user'] for row in document['rows']] == ['u12', 'u11']
    assert document['omitted_rows'] == 4
    assert Decimal(document['total_cost_usd']) == _raw_totals(team.engine)['cost']  # totals stay whole

    code, out, _ = _run(capsys, 'summary', '--database-url', _url(team), '--by', 'user', '--sort', 'cost', '--top', '3')
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if re.match(r'u\d', line)] == ['u1', 'u2', 'u3']
    # The rest, in one line: u10, u11 and u12 cost $3 + $2 + $1.
    assert '\u2026 and 3 more rows: $6.0000 over 3 events' in lines

    code, out, _ = _run(
        capsys, 'summary', '--database-url', _url(team), '--by', 'user', '--format', 'csv', '--top', '1'
    )
    assert [row['user'] for row in csv.DictReader(io.StringIO(out))] == ['u1']


@pytest.mark.parametrize(
    ('args', 'fragments'),
    [
        (['--sort', 'price'], ["--sort: cannot sort by 'price'", 'cost,events']),
        (['--by', 'model', '--sort', 'user'], ["cannot sort by 'user'"]),  # not a column of this summary
        (['--wide', '--format', 'json'], ['--wide applies to --format table']),
    ],
)
def test_sort_and_wide_errors(
    capsys: pytest.CaptureFixture[str], sqlite_url: str, args: list[str], fragments: list[str]
):
    _assert_rejected(capsys, 'summary', sqlite_url, args, fragments)


@pytest.mark.parametrize('value', ['0', '-3', 'ten'])
def test_top_must_be_positive(capsys: pytest.CaptureFixture[str], value: str):
    assert cli_logic(['summary', '--top', value]) == 2
    assert 'is not a positive whole number' in capsys.readouterr().err


@pytest.mark.parametrize(
    ('by', 'expected'),
    [
        ('agent', {'critic': 3, 'writer': 3, None: 1}),
        ('status', {'ok': 6, 'error': 1}),
        ('source', {'agent': 6, 'direct': 1}),
    ],
)
def test_group_by_agent_status_source(
    team: UsageTracker, capsys: pytest.CaptureFixture[str], by: str, expected: dict[str | None, int]
):
    rows = _json_rows(capsys, team, '--by', by, *ALL_TIME)['rows']
    assert {row[by]: row['events'] for row in rows} == expected
    column = {'agent': 'agent_name'}.get(by, by)
    with team.engine.connect() as conn:
        raw = dict(conn.exec_driver_sql(f'SELECT {column}, count(*) FROM token_usage GROUP BY {column}').all())
    assert raw == expected


def test_group_by_agent_and_status_in_the_table(team: UsageTracker, capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'summary', '--database-url', _url(team), '--by', 'agent,status')
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith('agent'))
    assert header.split()[:5] == ['agent', 'status', 'events', 'unpriced', 'errors']
    writer_errors = next(line for line in out.splitlines() if line.startswith('writer') and 'error' in line)
    assert writer_errors.split()[2:5] == ['1', '0', '1']


# --- a terminal of 100 columns ---------------------------------------------------------------------


@pytest.fixture
def crowded(sqlite_url: str) -> str:
    """A SQLite ledger with long labels in every dimension (sqlite only: this is about the layout)."""
    now = datetime.now(UTC)
    with UsageTracker(sqlite_url) as tracker:
        for i in range(12):
            tracker.track(
                created_at=now,
                organization_id=f'organization-with-a-very-long-name-number-{i}',
                user_id=f'user-{i}@example-customer-domain.com',
                agent_name=f'the-marketing-copy-agent-{i % 3}',
                model='gemini-2.5-flash-image-preview' if i % 2 else 'gpt-4o-2024-08-06',
                provider='google-gla' if i % 2 else 'openai',
                operation='generate_image' if i % 2 else 'chat',
                input_tokens=12_345_678 * (i + 1),
                cache_read_tokens=1_000 * i,
                output_tokens=98_765 * i,
                reasoning_tokens=4_321 * i,
                cost_usd=Decimal('12345.678901234567') * i,
                pricing_status='priced',
            )
        assert tracker.flush()
    tracker.engine.dispose()
    return sqlite_url


def _in_a_terminal(args: list[str], *, columns: int) -> str:
    """What `pai-usage ARGS` shows in a pseudo-terminal `columns` wide (`$COLUMNS` too, as a shell sets it)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 50, columns, 0, 0))
    env = {**os.environ, 'COLUMNS': str(columns)}
    process = subprocess.Popen(
        [sys.executable, '-m', 'pai_usage', *args], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0, b''.join(chunks).decode()
    return b''.join(chunks).decode().replace('\r\n', '\n')


@pytest.mark.parametrize(
    ('by', 'rows'),
    [
        ('organization,user,model', 12),
        ('organization,user,agent,provider,model,operation,source,status,day', 12),
        ('model', 2),
    ],
)
def test_summary_fits_a_100_column_terminal(crowded: str, by: str, rows: int):
    shown = _in_a_terminal(['summary', '--database-url', crowded, '--by', by, '--sort', 'cost'], columns=100)
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= 100, '\n'.join(line for line in lines if len(line) > 100)
    table = [line for line in lines if re.search(r'\$[\d,]+\.\d{4}$', line) and not line.startswith(('Total', '20'))]
    assert len(table) == rows  # every row is there, with its cost
    if rows == 12:
        assert table[0].endswith(format_usd(Decimal('12345.678901234567') * 11))  # the biggest, in full
    assert len({line.rindex('.') for line in table}) == 1  # decimal points aligned


def test_summary_wide_is_wider(crowded: str):
    shown = _in_a_terminal(['summary', '--database-url', crowded, '--by', 'organization,user,model', '--wide'],
                           columns=100)  # fmt: skip
    lines = shown.splitlines()
    assert max(len(line) for line in lines) > 100
    assert any('organization-with-a-very-long-name-number-11' in line for line in lines)  # labels in full
    assert any(f'{12_345_678 * 12:,}' in line for line in lines)  # exact counts


def test_summary_follows_a_narrower_terminal(crowded: str):
    shown = _in_a_terminal(['summary', '--database-url', crowded, '--by', 'organization,model'], columns=72)
    assert max(len(line) for line in shown.splitlines()) <= 72


# --- pipes and Ctrl-C -----------------------------------------------------------------------------


@pytest.fixture
def many_rows(sqlite_url: str) -> str:
    """2,000 rows of 2,000 users: more output than a pipe buffers (64 KiB) from both export and summary."""
    now = datetime.now(UTC)
    with UsageTracker(sqlite_url) as tracker:
        for i in range(2_000):
            tracker.track(created_at=now, user_id=f'user-{i}', organization_id='acme', model='gpt-4o',
                          provider='openai', input_tokens=i, cost_usd=Decimal(i), pricing_status='priced')  # fmt: skip
        assert tracker.flush()
    tracker.engine.dispose()
    return sqlite_url


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, '-m', 'pai_usage', *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    'args',
    [
        pytest.param(['export', *ALL_TIME], id='export'),
        pytest.param(['export', '--format', 'jsonl', *ALL_TIME], id='export-jsonl'),
        pytest.param(['summary', '--by', 'user', *ALL_TIME], id='summary'),
        pytest.param(['summary', '--by', 'user', '--format', 'csv', *ALL_TIME], id='summary-csv'),
    ],
)
def test_closed_pipe_exits_quietly(many_rows: str, args: list[str]):
    """`pai-usage ... | head -1`: exit code 141 (128 + SIGPIPE), nothing on stderr."""
    process = _start([*args, '--database-url', many_rows])
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    assert first
    process.stdout.close()  # what `head` does after its line
    code = process.wait(timeout=60)
    err = process.stderr.read().decode()
    process.stderr.close()
    assert (code, err) == (141, '')


def test_head_in_a_shell_pipeline(many_rows: str):
    result = subprocess.run(
        ['bash', '-c', f'set -o pipefail; "{sys.executable}" -m pai_usage export --database-url "$1" | head -n 2',
         'sh', many_rows],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.stdout.startswith('id,created_at,') and len(result.stdout.splitlines()) == 2
    assert (result.returncode, result.stderr) == (141, '')


def test_ctrl_c_exits_quietly(many_rows: str):
    import signal

    process = _start(['export', '--format', 'jsonl', '--database-url', many_rows, *ALL_TIME])
    assert process.stdout is not None
    assert process.stdout.readline()  # it is writing; the pipe fills and it waits for us
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, err.decode()) == (130, '')
    assert b'Traceback' not in out


def test_interrupt_in_cli_logic(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, '_prices', interrupted)
    parser = _cli._parser()  # pyright: ignore[reportPrivateUsage]
    monkeypatch.setattr(_cli, '_parser', lambda: parser)
    parser.set_defaults(command=interrupted)
    assert cli_logic(['prices']) == 130
    assert capsys.readouterr() == ('', '')


# --- passwords are never shown ----------------------------------------------------------------------

SECRET = 's3cret-Pa55'


@pytest.mark.parametrize(
    'url',
    [
        f'postgresql://u:{SECRET}@[bad',
        f'postgresql://u:{SECRET}@127.0.0.1:notaport/db',
        f'postgresql://u:{SECRET}@127.0.0.1:99999/db',
        f'postgresql+nodriver://u:{SECRET}@127.0.0.1/db',
        f'postgresql://u:{SECRET}@127.0.0.1:{_closed_port()}/db?sslmode=disable',
        f'postgresql://u:{SECRET}@with@at@127.0.0.1:{_closed_port()}/db',
        f'postgresql://127.0.0.1:{_closed_port()}/db?password={SECRET}',
        f'sqlite://u:{SECRET}@/missing.db',
        f'u:{SECRET}@127.0.0.1/db',
        f'mysql://u:{SECRET}@127.0.0.1/db',
    ],
)
@pytest.mark.parametrize('command', [['summary'], ['export'], ['migrate'], ['budgets', '--limit', '1']])
def test_password_is_masked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, command: list[str]
):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *command, '--database', url)
    assert code == 2
    _assert_one_error_line(err)
    assert SECRET not in out + err
    assert 'with@at' not in err  # the rest of a password that holds `@`


def test_password_is_masked_from_the_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(DATABASE_URL_ENV_VAR, f'postgresql://u:{SECRET}@[bad')
    code, out, err = _run(capsys, 'summary')
    assert code == 2
    assert SECRET not in out + err and 'u:***@' in err


def test_password_is_masked_in_usage_errors(capsys: pytest.CaptureFixture[str]):
    # A URL given without its option: argparse echoes the unrecognized argument.
    code, out, err = _run(capsys, 'summary', f'postgresql://u:{SECRET}@127.0.0.1/db')
    assert code == 2
    assert 'unrecognized arguments' in err and SECRET not in out + err


def test_password_is_masked_in_a_traceback(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    def buggy(url: str) -> sa.Engine:
        raise RuntimeError(f'a bug that prints {url}')

    monkeypatch.setattr('pai_usage.tracker.create_engine', buggy)
    code, out, err = _run(capsys, 'summary', '--database', f'postgresql://u:{SECRET}@127.0.0.1/db')
    assert code == 1  # a bug, not an expected failure: the traceback stays for the report
    assert 'Traceback' in err and 'RuntimeError: a bug that prints postgresql://u:***@127.0.0.1' in err
    assert SECRET not in out + err


# --- prices of pydantic-ai model strings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ('model_string', 'model', 'provider'),
    [
        ('openai:gpt-4o', 'gpt-4o', 'openai'),
        ('google-gla:gemini-2.5-pro', 'gemini-2.5-pro', 'google'),
        ('google-vertex:gemini-2.5-pro', 'gemini-2.5-pro', 'google'),
        ('anthropic:claude-sonnet-4-0', 'claude-sonnet-4-0', 'anthropic'),
        ('gateway/openai:gpt-4o', 'gpt-4o', 'openai'),
    ],
)
def test_prices_of_a_pydantic_ai_model_string(
    capsys: pytest.CaptureFixture[str], model_string: str, model: str, provider: str
):
    code, out, _ = _run(capsys, 'prices', model_string)
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        f'model:    {model}',
        f'provider: {provider} (pydantic-ai `{model_string.partition(":")[0]}:`)',
        f'source:   genai-prices {genai_prices.__version__}',
    ]
    # The input price shown is genai-prices' own for that provider and model (of the first tier).
    price = genai_prices.calc_price(genai_prices.Usage(input_tokens=1_000), model, provider_id=provider)
    input_line = next(line for line in lines if line.strip().startswith('input '))
    assert input_line.split()[1].strip('$;') == f'{(price.input_price * 1000).normalize():f}'
    code, plain, _ = _run(capsys, 'prices', model, '--provider', provider)
    assert plain.splitlines()[2:] == lines[2:]


def test_prices_keeps_a_colon_in_a_model_name(capsys: pytest.CaptureFixture[str]):
    code, out, _ = _run(capsys, 'prices', 'anthropic.claude-v2:1')  # a Bedrock id, not `provider:model`
    assert out.splitlines()[0] == 'model:    anthropic.claude-v2:1'
    assert code in (0, 1)


# --- `--help` is fast: the CLI imports no heavy library until a command runs ---------------------------------

HEAVY = ('sqlalchemy', 'sqlmodel', 'pydantic_ai', 'genai_prices', 'pydantic', 'google.genai', 'psycopg')


@pytest.mark.parametrize(
    'code',
    [
        'import pai_usage._cli',
        'import pai_usage',
        'from pai_usage._cli import cli_logic; cli_logic(["--help"])',
        'from pai_usage._cli import cli_logic; cli_logic(["summary", "--help"])',
        'from pai_usage._cli import cli_logic; cli_logic(["--version"])',
    ],
)
def test_help_imports_no_heavy_library(code: str):
    check = (
        f'{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m in {HEAVY!r}))'
    )
    result = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[-1] == '[]'


def test_help_describes_the_new_options(capsys: pytest.CaptureFixture[str]):
    assert cli_logic(['summary', '--help']) == 0
    out = capsys.readouterr().out
    for option in ('--sort', '--top', '--wide', 'agent', 'status'):
        assert option in out


def test_mirrored_constants_match_their_modules():
    from pai_usage.pricing import PRICES_ENV_VAR as prices_env
    from pai_usage.summary import GROUP_BY_DIMENSIONS
    from pai_usage.tracker import DEFAULT_DATABASE_URL

    assert _cli._GROUP_BY_DIMENSIONS == GROUP_BY_DIMENSIONS  # pyright: ignore[reportPrivateUsage]
    assert _cli._DATABASE_URL_ENV_VAR == DATABASE_URL_ENV_VAR  # pyright: ignore[reportPrivateUsage]
    assert _cli._DEFAULT_DATABASE_URL == DEFAULT_DATABASE_URL  # pyright: ignore[reportPrivateUsage]
    assert _cli._PRICES_ENV_VAR == prices_env == PRICES_ENV_VAR  # pyright: ignore[reportPrivateUsage]


def test_one_event_is_singular(tracker: UsageTracker, capsys: pytest.CaptureFixture[str]):
    tracker.track(organization_id='acme', provider='openai', model='gpt-4o', input_tokens=10)
    assert tracker.flush()
    code, out, _ = _run(capsys, 'summary', '--database-url', tracker.engine.url.render_as_string(False))
    assert code == 0
    assert ' over 1 event (0 unpriced' in out
