"""The `pai-usage` command: `summary`, `export`, `budgets`, `migrate` and `prices`.

`cli()` is the console script; `cli_logic(args)` does the work and returns the exit code, for tests.
Expected failures (a bad date, an unreachable database, a missing table, a bad price file) print one
line to stderr and exit with code 2, never a traceback. `budgets` exits with code 1 when a budget is exceeded.
Ctrl-C exits with 130 and a closed stdout (`| head`) with 141, quietly. No message ever shows a password.

Each subcommand is one `commands.add_parser(...)` block in `_parser()` and one handler `_name(args) -> int`,
which imports what it needs: importing this module loads only the standard library, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Generator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

# Only a little of the standard library at import time: `pai-usage --help` must not pay for SQLAlchemy,
# pydantic-ai or genai-prices (~0.6 s), nor for `typing`, `dataclasses` (which loads `inspect`), `json`, `csv`
# or `pathlib`. Each handler imports what it uses.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn, TextIO

    import sqlalchemy as sa

    from .budgets import Budget
    from .pricing import EffectivePrice, PriceTable
    from .summary import GroupBy, SummaryRow, UsageSummary, UsageTotals

__all__ = ('cli', 'cli_logic')

_PROG = 'pai-usage'
_PG_CONNECT_TIMEOUT = 10
"""Seconds to wait for PostgreSQL before reporting it unreachable (when the URL sets no `connect_timeout`)."""
_PROGRESS_EVERY = 10_000
"""Rows between two progress updates of `export` (on a terminal)."""
# FinOps FOCUS names for the summary's group dimensions where the meaning is the same; `day` and `month`
# become `ChargePeriodStart`/`ChargePeriodEnd`, and the other dimensions keep our names.
_FOCUS_DIMENSIONS = {'organization': 'SubAccountId', 'provider': 'ProviderName'}
# Copies of constants of modules too heavy to import for `--help`; `tests/test_cli.py` keeps them equal.
_DATABASE_URL_ENV_VAR = 'PAI_USAGE_DATABASE_URL'
_DEFAULT_DATABASE_URL = 'sqlite:///pai_usage.db'
_PRICES_ENV_VAR = 'PAI_USAGE_PRICES'
_GROUP_BY_DIMENSIONS = (
    'organization',
    'user',
    'agent',
    'provider',
    'model',
    'operation',
    'source',
    'status',
    'day',
    'month',
)
_TABLE_WIDTH = 100
"""The summary table's default maximum width (narrower on a narrower terminal); `--wide` lifts it."""
_EXIT_INTERRUPTED = 130
"""128 + SIGINT: what a shell reports for a command stopped with Ctrl-C."""
_EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a writer whose reader went away (`| head`)."""

# pydantic-ai model strings are `provider:model`; these prefixes name a different provider id in genai-prices
# (the others, e.g. `openai`, `anthropic`, `groq`, `mistral`, are the same id, or one genai-prices matches).
_PYDANTIC_AI_PROVIDERS = {
    'google-gla': 'google',
    'google-vertex': 'google',
    'gemini': 'google',
    'vertexai': 'google',
    'openai-chat': 'openai',
    'openai-responses': 'openai',
    'bedrock': 'aws',
    'bedrock-mantle': 'aws',
    'grok': 'x-ai',
    'xai': 'x-ai',
    'github-copilot': 'github-copilot',
}
_PYDANTIC_AI_PREFIXES = frozenset(
    {
        *_PYDANTIC_AI_PROVIDERS,
        *('anthropic', 'azure', 'cerebras', 'cohere', 'deepseek', 'fireworks', 'github', 'groq', 'heroku'),
        *('huggingface', 'litellm', 'mistral', 'moonshotai', 'nebius', 'ollama', 'openai', 'openrouter'),
        *('ovhcloud', 'sambanova', 'together', 'vercel', 'alibaba', 'zai', 'voyageai', 'cloudflare'),
    }
)

# Passwords in URLs (`scheme://user:SECRET@host`) and in query parameters (`?password=SECRET`).
_URL_PASSWORD = re.compile(r'(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)[^\s]*@')
_QUERY_PASSWORD = re.compile(r'(?P<head>[?&](?:password|passwd|pwd|sslpassword)=)[^&\s\'"#]*', re.IGNORECASE)
_secrets: set[str] = set()
"""Passwords of the database URLs this invocation saw, scrubbed from every message (see `_mask`)."""


class _Fail(Exception):
    """An expected failure: its message is printed as one line and the exit code is 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with passwords masked in its usage errors (they echo the arguments)."""

    def _print_message(self, message: str, file: Any = None) -> None:
        super()._print_message(_mask(message), file)


class _Version(argparse.Action):
    """`--version`, reading the installed version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import version

        sys.stdout.write(f'{_PROG} {version("pai-usage")}\n')
        parser.exit()


def cli() -> NoReturn:  # pragma: no cover - exercised through subprocesses in tests/test_cli.py
    """Run the `pai-usage` command line and exit with its status."""
    try:
        code = cli_logic()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            code = _EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        code = _EXIT_INTERRUPTED
    if code == _EXIT_BROKEN_PIPE:
        # Python flushes stdout once more at exit, which would fail again and print `Exception ignored`.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)


def cli_logic(args: Sequence[str] | None = None) -> int:
    """Run the command line with `args` (default: `sys.argv[1:]`) and return the exit code.

    Ctrl-C returns 130 and a closed stdout (`| head`) 141, quietly; a bug prints its traceback, passwords masked.
    """
    _secrets.clear()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    except BrokenPipeError:
        return _EXIT_BROKEN_PIPE


def _dispatch(args: Sequence[str] | None) -> int:
    import traceback

    parser = _parser()
    try:
        namespace = parser.parse_args(args)
    except SystemExit as exc:  # argparse exits on `--help` and on usage errors (code 2)
        return exc.code if isinstance(exc.code, int) else 2
    command: Any = namespace.command
    try:
        return command(namespace)
    except _Fail as exc:
        _error(str(exc))
        return 2
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception:
        # A bug: keep the traceback for the report, never the password of a URL in it.
        sys.stderr.write(_mask(traceback.format_exc()))
        return 1


def _label(value: str) -> str:
    """An id given on the command line, as the ledger stores it (`label_filter`: blank is a usage error)."""
    from .record import label_filter

    try:
        label = label_filter(value, 'id')
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is blank') from None
    assert label is not None  # a str is never "no filter"
    return label


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description='The usage-and-cost ledger for PydanticAI apps and direct Gemini calls.')
    parser.add_argument('--version', action=_Version, help="show the program's version number and exit")
    commands = parser.add_subparsers(title='commands', required=True, metavar='COMMAND')
    # Every command that opens the database takes `--database-url` first.
    database = _Parser(add_help=False)
    database.add_argument(
        '--database-url',
        '--database',
        dest='database_url',
        metavar='URL',
        help=f'database URL (default: ${_DATABASE_URL_ENV_VAR}, else {_DEFAULT_DATABASE_URL})',
    )

    summary = commands.add_parser(
        'summary',
        parents=[database],
        help='show usage and cost over a time range',
        description='Show usage and cost over a time range (default: the current UTC month). The table fits '
        f'{_TABLE_WIDTH} columns (or the terminal, if narrower): labels are shortened with \u2026 and token '
        'counts abbreviated; --wide shows every token bucket in full.',
    )
    _add_range_options(
        summary,
        since_help='start, inclusive: YYYY-MM-DD or an ISO datetime (UTC unless it says)',
        until_help='end: YYYY-MM-DD includes that whole day; an ISO datetime is an exclusive bound',
    )
    summary.add_argument(
        '--by', metavar='DIMS', default='model', help=f'comma-separated, from {",".join(_GROUP_BY_DIMENSIONS)}'
    )
    summary.add_argument('--format', choices=('table', 'json', 'csv'), default='table', help='output format')
    summary.add_argument(
        '--focus', action='store_true', help='with --format csv: FinOps FOCUS column names where they fit'
    )
    summary.add_argument(
        '--sort',
        metavar='COLUMN',
        help=f'order rows by a --by dimension (ascending) or by {", ".join(_SORT_MEASURES)} (largest first); '
        'default: the --by dimensions, naturally (u2 before u10)',
    )
    summary.add_argument('--top', metavar='N', type=_positive_int, help='only the first N rows (after --sort)')
    summary.add_argument(
        '--wide', action='store_true', help=f'table: every token bucket, exact counts, no {_TABLE_WIDTH}-column limit'
    )
    summary.set_defaults(command=_summary)

    export = commands.add_parser(
        'export',
        parents=[database],
        help='stream ledger rows as CSV or JSON lines',
        description='Stream the rows of a time range (default: the current UTC month), oldest first, in constant '
        'memory. Progress goes to stderr when it is a terminal.',
    )
    _add_range_options(
        export,
        since_help='start, inclusive (as for summary)',
        until_help='end: a bare date includes that whole day (as for summary)',
    )
    export.add_argument('--format', choices=('csv', 'jsonl'), default='csv', help='output format (default: csv)')
    export.add_argument('--focus', action='store_true', help='FinOps FOCUS column names (x_ for our own columns)')
    export.add_argument('-o', '--output', metavar='FILE', help='write to FILE (default: stdout)')
    export.set_defaults(command=_export)

    budgets = commands.add_parser(
        'budgets',
        parents=[database],
        help='show spend against budgets; exit code 1 if one is exceeded',
        description="Show each budget's spend, reservations in flight (hard mode), what remains and when it resets, "
        'for one budget (--limit) or a file of budgets (--file), computed as EnforceBudgets does. '
        'Exits with code 1 when a budget is exceeded, for alerts from cron.',
    )
    source = budgets.add_mutually_exclusive_group()
    source.add_argument('--limit', metavar='USD', help='one budget of USD per period')
    source.add_argument('--file', metavar='FILE', help='budgets as JSON (see docs/budgets.md)')
    budgets.add_argument('--period', choices=('month', 'week', 'day'), help='with --limit: the period (default: month)')
    budgets.add_argument('--timezone', metavar='TZ', help='with --limit: IANA zone of period starts (default: UTC)')
    budgets.add_argument(
        '--org', metavar='ID', type=_label, help='with --limit: only this organization (default: all usage)'
    )
    budgets.set_defaults(command=_budgets)

    migrate_cmd = commands.add_parser(
        'migrate',
        parents=[database],
        help='create or upgrade the token_usage table',
        description='Apply pending migrations.',
    )
    migrate_cmd.set_defaults(command=_migrate)

    prices = commands.add_parser(
        'prices',
        help='show the price of a model, or our configured prices',
        description='Show the price that applies to MODEL and where it comes from; without MODEL, list the '
        f'configured unit prices and token overrides (${_PRICES_ENV_VAR}).',
    )
    prices.add_argument(
        'model',
        nargs='?',
        metavar='MODEL',
        help="model name, e.g. gpt-4o, or a pydantic-ai model string: 'openai:gpt-4o', 'google-gla:gemini-2.5-pro'",
    )
    prices.add_argument('--provider', metavar='P', help='provider id, e.g. openai, google-vertex, elevenlabs')
    prices.set_defaults(command=_prices)

    reprice_cmd = commands.add_parser(
        'reprice',
        parents=[database],
        help='recompute stored costs with the current prices; --apply to update',
        description='Recompute the costs of stored rows from their stored usage with the current price tables '
        f'(genai-prices and ${_PRICES_ENV_VAR}) and show the difference per model. Nothing changes without '
        '--apply; with it, changed rows are updated and their old cost is kept in token_usage_reprice.',
    )
    reprice_cmd.add_argument('--since', metavar='DATE', required=True, help='start, inclusive: YYYY-MM-DD or ISO')
    reprice_cmd.add_argument('--until', metavar='DATE', help='end, exclusive: YYYY-MM-DD or ISO (default: now)')
    reprice_cmd.add_argument('--org', metavar='ID', type=_label, help='only this organization')
    reprice_cmd.add_argument('--model', metavar='MODEL', help='only this model')
    reprice_cmd.add_argument('--apply', action='store_true', help='update the rows (default: a dry run)')
    reprice_cmd.set_defaults(command=_reprice)
    return parser


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f'{value!r} is not a positive whole number')
    return number


def _add_range_options(command: argparse.ArgumentParser, *, since_help: str, until_help: str) -> None:
    """`--since`, `--until`, `--org` and `--user`: the rows a command reads (see `_time_range`)."""
    command.add_argument('--since', metavar='DATE', help=since_help)
    command.add_argument('--until', metavar='DATE', help=until_help)
    command.add_argument('--org', metavar='ID', type=_label, help='only this organization')
    command.add_argument('--user', metavar='ID', type=_label, help='only this user')


def _error(message: str) -> None:
    print(f'{_PROG}: error: {_mask(message)}', file=sys.stderr)


def _mask(text: str) -> str:
    """`text` with every password of a database URL replaced by `***`, whether or not the URL parses."""
    text = _URL_PASSWORD.sub(r'\g<head>***@', text)
    text = _QUERY_PASSWORD.sub(r'\g<head>***', text)
    # What the patterns cannot see (a password with spaces, a driver quoting it alone); short ones would
    # mangle every message, and the patterns catch those inside URLs.
    for secret in sorted(_secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, '***')
    return text


def _remember_secrets(url_text: str) -> None:
    """Note the passwords in `url_text` for `_mask`, from the URL if it parses and from its text if not."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    found: set[str] = set()
    # With or without a scheme (`user:SECRET@host` is no URL, but it is a password all the same).
    if match := re.match(r'(?:[A-Za-z][A-Za-z0-9+.\-]*://)?[^\s/?#@:]*:(?P<secret>[^\s]*)@', url_text):
        secret = match['secret']
        # An unencoded `@` in a password: drivers take what follows the first `@` for the host and echo it.
        found.update({secret, *secret.split('@')[1:]})
    with contextlib.suppress(ValueError):
        query = urlsplit(url_text).query
        found.update(v for k, v in parse_qsl(query) if k.lower() in ('password', 'passwd', 'pwd', 'sslpassword'))
    _secrets.update(found | {unquote(secret) for secret in found} - {''})


# --- database -----------------------------------------------------------------------------------


def _database_url(given: str | None) -> str:
    url_text = given or os.environ.get(_DATABASE_URL_ENV_VAR) or _DEFAULT_DATABASE_URL
    _remember_secrets(url_text)
    return url_text


def _open(given: str | None, *, must_exist: bool) -> tuple[sa.Engine, str]:
    """An engine for the URL and the URL to show; with `must_exist`, refuse to create a missing SQLite file."""
    from pathlib import Path

    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    from .tracker import create_engine

    url_text = _database_url(given)
    try:
        url = sa.make_url(url_text)
        url.port  # noqa: B018 - a non-numeric port only fails here, or later inside the driver
    except (sa_exc.ArgumentError, ValueError):
        raise _Fail(f'invalid database URL {_mask(url_text)!r}') from None
    if url.password is not None:
        _secrets.add(str(url.password))
    if url.get_backend_name() == 'sqlite':
        path = url.database
        if must_exist and path and path != ':memory:' and not path.startswith('file:') and not Path(path).exists():
            hint = _mask(url_text) if url.password is None else _safe(url)
            raise _Fail(f'no SQLite database at {path!r}; create it with `{_PROG} migrate --database-url {hint}`')
    elif url.get_backend_name() == 'postgresql' and 'connect_timeout' not in url.query:
        url_text = url.update_query_dict({'connect_timeout': str(_PG_CONNECT_TIMEOUT)}).render_as_string(
            hide_password=False
        )
    try:
        return create_engine(url_text), _safe(url)
    except (sa_exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise _Fail(f'cannot use database {_safe(url)}: {_first_line(exc)}') from None


def _safe(url: sa.URL) -> str:
    return _mask(url.render_as_string(hide_password=True))


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, 'orig', None)
    text = str(original if original is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connection_failure(shown: str, exc: BaseException) -> _Fail:
    return _Fail(f'cannot reach database {shown}: {_first_line(exc)}')


# --- reading the ledger -------------------------------------------------------------------------


def _require_ledger(engine: sa.Engine, shown: str, given: str | None, command: str) -> None:
    """Fail (exit 2) when the database is unreachable or has no `token_usage` table; never create it."""
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    from .table import TOKEN_USAGE

    try:
        with engine.connect() as conn:
            exists = sa.inspect(conn).has_table(TOKEN_USAGE.name)
    except sa_exc.SQLAlchemyError as exc:
        raise _connection_failure(shown, exc) from None
    if not exists:
        # Never echo a password: with one in the URL, the hint shows it masked.
        url = given if given is None or sa.make_url(given).password is None else shown
        hint = f'{_PROG} migrate' + (f' --database-url {url}' if url else '')
        raise _Fail(f'no `{TOKEN_USAGE.name}` table in {shown}; create it with `{hint}` ({command} never creates it)')


@contextlib.contextmanager
def _reading_ledger(given: str | None, command: str) -> Generator[sa.Engine]:
    """An engine on the existing ledger at `given`, disposed afterwards; a failed read fails with one line."""
    from sqlalchemy import exc as sa_exc

    from .table import TOKEN_USAGE

    engine, shown = _open(given, must_exist=True)
    try:
        _require_ledger(engine, shown, given, command)
        try:
            yield engine
        except sa_exc.SQLAlchemyError as exc:
            raise _Fail(f'cannot read {TOKEN_USAGE.name} in {shown}: {_first_line(exc)}') from None
    finally:
        engine.dispose()


# --- summary ------------------------------------------------------------------------------------

_SORT_MEASURES = ('cost', 'events', 'tokens', 'input', 'output', 'unpriced', 'errors')
"""Columns `--sort` orders by, largest first (besides the `--by` dimensions)."""


def _summary(args: argparse.Namespace) -> int:
    from .export import format_daily_costs
    from .summary import query_summary

    group_by = _group_by(args.by)
    if args.focus and args.format != 'csv':
        raise _Fail('--focus applies to --format csv only')
    if args.wide and args.format != 'table':
        raise _Fail('--wide applies to --format table only')
    if args.sort is not None and args.sort not in (*group_by, *_SORT_MEASURES):
        raise _Fail(f'--sort: cannot sort by {args.sort!r}; choose from {",".join((*group_by, *_SORT_MEASURES))}')
    start, end = _time_range(args.since, args.until, now=datetime.now(UTC))
    with _reading_ledger(args.database_url, 'summary') as engine:
        summary = query_summary(engine, start, end, organization_id=args.org, user_id=args.user, group_by=group_by)
    rows = _sorted_rows(summary, args.sort)
    shown, omitted = (rows, []) if args.top is None else (rows[: args.top], rows[args.top :])
    if args.format == 'json':
        _print_json(summary, shown, len(omitted), sys.stdout)
    elif args.format == 'csv':
        (_print_focus_csv if args.focus else _print_csv)(summary, shown, sys.stdout)
    else:
        width = None if args.wide else _table_width()
        _print_table(summary, shown, omitted, sys.stdout, wide=args.wide, width=width)
        if 'day' in summary.group_by and summary.rows:
            sys.stdout.write(f'\n{format_daily_costs(_used_days(summary))}\n')
    return 0


def _table_width() -> int:
    """`_TABLE_WIDTH`, or the terminal's width when it is narrower (`$COLUMNS` counts, as for every tool)."""
    import shutil

    return max(40, min(_TABLE_WIDTH, shutil.get_terminal_size((_TABLE_WIDTH, 24)).columns))


def _is_output(bucket: str) -> bool:
    return bucket.startswith('output') or bucket == 'reasoning_tokens'


def _input_tokens(totals: UsageTotals) -> int:
    """Every input token: uncached, cache reads and writes, audio."""
    from .usage import TOKEN_BUCKETS

    return sum(getattr(totals, name) for name in TOKEN_BUCKETS if not _is_output(name))


def _output_tokens(totals: UsageTotals) -> int:
    """Every output token: text, reasoning, audio, image."""
    from .usage import TOKEN_BUCKETS

    return sum(getattr(totals, name) for name in TOKEN_BUCKETS if _is_output(name))


def _measure(totals: UsageTotals, column: str) -> tuple[int, Decimal | int]:
    if column == 'cost':  # groups without any known price sort below every priced group, even one of $0
        return (0, Decimal(0)) if _known_cost(totals) is None else (1, totals.cost_usd)
    value = {
        'events': totals.events,
        'tokens': totals.total_tokens,
        'input': _input_tokens(totals),
        'output': _output_tokens(totals),
        'unpriced': totals.unpriced_events,
        'errors': totals.error_events,
    }[column]
    return (1, value)


def _sorted_rows(summary: UsageSummary, sort: str | None) -> list[SummaryRow]:
    """The rows in natural order of their labels (`u2` before `u10`, empty last), then by `sort` if given.

    Python's sort is stable, so rows equal in `sort` keep their natural order.
    """
    from ._format import natural_key

    rows = sorted(summary.rows, key=lambda row: tuple(natural_key(row.group[g]) for g in summary.group_by))
    if sort is None:
        return rows
    if sort in summary.group_by:
        return sorted(rows, key=lambda row: natural_key(row.group[sort]))
    return sorted(rows, key=lambda row: _measure(row.totals, sort), reverse=True)


def _used_days(summary: UsageSummary) -> UsageSummary:
    """The summary with its range cut to the days from the first to the last with usage, for the chart.

    A range of years (`--since 2020-01-01`) would otherwise draw a line for every day of it.
    """
    import dataclasses

    days = [date.fromisoformat(day) for row in summary.rows if (day := row.group['day']) is not None]
    if not days:
        return summary
    first = datetime.combine(min(days), datetime.min.time(), UTC)
    last = datetime.combine(max(days), datetime.min.time(), UTC) + timedelta(days=1)
    return dataclasses.replace(summary, start=max(summary.start, first), end=min(summary.end, last))


def _group_by(value: str) -> tuple[GroupBy, ...]:
    from typing import cast

    names = [name.strip() for name in value.split(',') if name.strip()]
    unknown = [name for name in names if name not in _GROUP_BY_DIMENSIONS]
    if unknown:
        raise _Fail(f'cannot group by {", ".join(map(repr, unknown))}; choose from {",".join(_GROUP_BY_DIMENSIONS)}')
    return tuple(dict.fromkeys(cast('list[GroupBy]', names)))


def _parse_moment(option: str, value: str) -> tuple[datetime, bool]:
    """The moment `value` names, and whether it was a bare date."""
    try:
        return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC), True
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Fail(f'{option}: {value!r} is not a date (YYYY-MM-DD) or an ISO datetime') from None
    try:
        return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)), False
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00: before the first moment a datetime holds in UTC
        raise _Fail(f'{option}: {value!r} is out of range') from None


def _time_range(since: str | None, until: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """`[start, end)` from the options: the current UTC month by default; a bare `--until` date is inclusive."""
    from .summary import month_bounds

    month_start, month_end = month_bounds(now)
    end = month_end
    try:
        if until is not None:
            end, is_date = _parse_moment('--until', until)
            if is_date:
                end += timedelta(days=1)
        if since is not None:
            start, _ = _parse_moment('--since', since)
        else:
            start = month_start if until is None else month_bounds(end - timedelta(microseconds=1))[0]
    except OverflowError:  # the day or month after 9999-12-31
        raise _Fail(f'--until: {until!r} is out of range (the last day a range can end on is 9999-12-30)') from None
    _check_range(start, end)
    return start, end


def _check_range(start: datetime, end: datetime | None) -> None:
    if end is not None and start >= end:
        raise _Fail(f'the range is empty: --since {start.isoformat()} is not before the end {end.isoformat()}')


def _known_cost(totals: UsageTotals) -> str | None:
    """The group's known cost (exact), or None when no event of the group has a price (unknown is not zero)."""
    from ._format import exact_usd

    return None if totals.events and totals.unpriced_events == totals.events else exact_usd(totals.cost_usd)


def _totals_dict(totals: UsageTotals) -> dict[str, Any]:
    from .usage import TOKEN_BUCKETS

    return {
        'events': totals.events,
        'unpriced_events': totals.unpriced_events,
        'error_events': totals.error_events,
        'cost_usd': _known_cost(totals),
        **{name: getattr(totals, name) for name in TOKEN_BUCKETS},
        'total_tokens': totals.total_tokens,
    }


def _print_json(summary: UsageSummary, rows: list[SummaryRow], omitted: int, out: TextIO) -> None:
    import json

    from ._format import exact_usd

    totals = _totals_dict(summary.totals)
    document: dict[str, Any] = {
        'start': summary.start.isoformat(),
        'end': summary.end.isoformat(),
        'organization_id': summary.organization_id,
        'user_id': summary.user_id,
        'group_by': list(summary.group_by),
        'total_cost_usd': exact_usd(summary.totals.cost_usd),
        **{k: v for k, v in totals.items() if k != 'cost_usd'},
        'rows': [{**row.group, **_totals_dict(row.totals)} for row in rows],
        'omitted_rows': omitted,
    }
    json.dump(document, out, indent=2)
    out.write('\n')


def _print_csv(summary: UsageSummary, rows: list[SummaryRow], out: TextIO) -> None:
    import csv

    from .summary import UsageTotals

    writer = csv.writer(out, lineterminator='\n')
    columns = list(_totals_dict(UsageTotals()))
    writer.writerow([*summary.group_by, *columns])
    for row in rows:
        values = _totals_dict(row.totals)
        writer.writerow([*(row.group[g] for g in summary.group_by), *(values[c] for c in columns)])


def _print_focus_csv(summary: UsageSummary, rows: list[SummaryRow], out: TextIO) -> None:
    """CSV under FinOps FOCUS names where the meaning is the same; our names for the rest."""
    import csv

    from .summary import UsageTotals

    writer = csv.writer(out, lineterminator='\n')
    dims = [g for g in summary.group_by if g not in ('day', 'month')]
    columns = [c for c in _totals_dict(UsageTotals()) if c != 'cost_usd']
    writer.writerow(
        [
            'ChargePeriodStart',
            'ChargePeriodEnd',
            *(_FOCUS_DIMENSIONS.get(g, g) for g in dims),
            'BilledCost',
            'EffectiveCost',
            'BillingCurrency',
            *columns,
        ]
    )
    for row in rows:
        start, end = _charge_period(summary, row.group)
        values = _totals_dict(row.totals)
        cost = values['cost_usd']
        writer.writerow(
            [
                start.isoformat(),
                end.isoformat(),
                *(row.group[g] for g in dims),
                cost,
                cost,  # no discounts or commitments: what is billed is what is effectively paid
                'USD',
                *(values[c] for c in columns),
            ]
        )


def _charge_period(summary: UsageSummary, group: dict[str, str | None]) -> tuple[datetime, datetime]:
    """The row's day or month when grouped by one (within the summary's range), else the summary's range."""
    from .summary import month_bounds

    day, month = group.get('day'), group.get('month')
    if day is not None:
        start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
        end = start + timedelta(days=1)
    elif month is not None:
        start, end = month_bounds(datetime.combine(date.fromisoformat(f'{month}-01'), datetime.min.time(), UTC))
    else:
        return summary.start, summary.end
    return max(start, summary.start), min(end, summary.end)


def _plural(count: int, noun: str) -> str:
    return f'{count:,} {noun}' + ('' if count == 1 else 's')


def _print_table(
    summary: UsageSummary,
    rows: list[SummaryRow],
    omitted: list[SummaryRow],
    out: TextIO,
    *,
    wide: bool,
    width: int | None,
) -> None:
    """The terminal table: at most `width` columns (None: as wide as it takes, every bucket exact)."""
    import textwrap
    from collections.abc import Callable
    from typing import cast

    from ._format import Align, abbreviate_count, format_usd, render_table
    from .usage import TOKEN_BUCKETS

    def exact(value: int) -> str:
        return f'{value:,}'

    count = exact if wide else abbreviate_count
    measures: list[tuple[str, Callable[[UsageTotals], str]]] = [('events', lambda t: count(t.events))]
    if wide or any(row.totals.unpriced_events for row in summary.rows):
        measures.append(('unpriced', lambda t: count(t.unpriced_events)))
    if wide or any(row.totals.error_events for row in summary.rows):
        measures.append(('errors', lambda t: count(t.error_events)))
    if wide:
        for bucket in TOKEN_BUCKETS:
            if bucket in ('input_tokens', 'output_tokens') or any(getattr(r.totals, bucket) for r in summary.rows):
                measures.append((bucket, lambda t, bucket=bucket: exact(getattr(t, bucket))))
        measures.append(('tokens', lambda t: exact(t.total_tokens)))
    else:
        measures.append(('input', lambda t: count(_input_tokens(t))))
        measures.append(('output', lambda t: count(_output_tokens(t))))
    measures.append(('cost', lambda t: 'unpriced' if _known_cost(t) is None else format_usd(t.cost_usd)))

    dims = summary.group_by
    headers = [*dims, *(name for name, _ in measures)]
    body = [
        ['-' if row.group[g] is None else str(row.group[g]) for g in dims] + [cell(row.totals) for _, cell in measures]
        for row in rows
    ]

    def wrap(text: str) -> str:
        return '\n'.join(textwrap.wrap(text, width, subsequent_indent='  ')) if width else text

    scope = [f'{summary.start:%Y-%m-%d %H:%M} to {summary.end:%Y-%m-%d %H:%M} UTC (end exclusive)']
    if summary.organization_id is not None:
        scope.append(f'organization {summary.organization_id}')
    if summary.user_id is not None:
        scope.append(f'user {summary.user_id}')
    out.write(wrap('Usage ' + ', '.join(scope)) + '\n\n')
    if body:
        lines = render_table(
            headers,
            body,
            cast('list[Align]', ['left'] * len(dims) + ['right'] * len(measures)),
            max_width=width,
            shrinkable=[True] * len(dims) + [False] * len(measures),
        )
        out.write('\n'.join(lines) + '\n')
        if omitted:
            rest = sum((row.totals for row in omitted[1:]), omitted[0].totals)
            out.write(
                wrap(
                    f'\u2026 and {_plural(len(omitted), "more row")}: {format_usd(rest.cost_usd)}'
                    f' over {_plural(rest.events, "event")}'
                )
                + '\n'
            )
        out.write('\n')
    else:
        out.write('No usage in this range.\n\n')
    t = summary.totals
    out.write(
        wrap(
            f'Total: {format_usd(t.cost_usd)} over {_plural(t.events, "event")}'
            f' ({t.unpriced_events:,} unpriced, not in the cost), {t.total_tokens:,} tokens'
        )
        + '\n'
    )


# --- export -------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from .export import export_rows, write_csv, write_jsonl

    start, end = _time_range(args.since, args.until, now=datetime.now(UTC))
    write = write_csv if args.format == 'csv' else write_jsonl
    progress = _show_progress if sys.stderr.isatty() else None
    with _reading_ledger(args.database_url, 'export') as engine:
        rows = export_rows(engine, start, end, organization_id=args.org, user_id=args.user)
        with contextlib.closing(rows), _output(args.output) as out:
            count = write(rows, out, focus=args.focus, progress=progress, progress_every=_PROGRESS_EVERY)
    if progress is not None:
        if not count or count % _PROGRESS_EVERY:
            progress(count)  # the final count, unless it was just shown
        sys.stderr.write('\n')
    return 0


def _show_progress(count: int) -> None:
    sys.stderr.write(f'\r{count:,} rows')
    sys.stderr.flush()


@contextlib.contextmanager
def _output(path: str | None) -> Generator[TextIO]:
    """Stdout, or a file that appears complete or not at all (written to `FILE.partial`, then renamed)."""
    from pathlib import Path

    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    partial = target.with_name(f'{target.name}.partial')
    try:
        out = partial.open('w', encoding='utf-8', newline='')
    except OSError as exc:
        raise _Fail(f'cannot write {str(target)!r}: {exc.strerror or exc}') from None
    try:
        with out:
            yield out
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise _Fail(f'cannot write {str(target)!r}: {exc.strerror or exc}') from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- budgets ------------------------------------------------------------------------------------


def _budgets(args: argparse.Namespace) -> int:
    from .budgets import budget_report, format_budgets  # imports pydantic-ai: only for this command

    budgets = _budgets_from_options(args)
    with _reading_ledger(args.database_url, 'budgets') as engine:
        statuses = budget_report(engine, budgets)
    print(format_budgets(statuses))
    return 1 if any(status.exceeded for status in statuses) else 0


def _budgets_from_options(args: argparse.Namespace) -> list[Budget]:
    from pathlib import Path

    from .budgets import Budget, budgets_from_json

    if args.file is not None:
        if args.period is not None or args.org is not None or args.timezone is not None:
            raise _Fail('--period, --timezone and --org go with --limit; a budgets file sets its own')
        try:
            text = Path(args.file).read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise _Fail(f'cannot read budgets file {args.file!r}: {reason}') from None
        try:
            return budgets_from_json(text)
        except ValueError as exc:
            raise _Fail(f'bad budgets file {args.file!r}: {exc}') from None
    if args.limit is None:
        raise _Fail('give --limit USD (with --period and --org), or --file FILE')
    try:
        limit = Decimal(args.limit.removeprefix('$'))
    except ArithmeticError:
        limit = None
    if limit is None or not limit.is_finite() or limit < 0:
        raise _Fail(f'--limit: {args.limit!r} is not an amount in USD (a non-negative number, e.g. 100 or 2.50)')
    try:
        period, timezone = args.period or 'month', args.timezone or 'UTC'
        return [Budget(limit_usd=limit, period=period, timezone=timezone, organization_id=args.org)]
    except ValueError as exc:
        raise _Fail(f'bad budget: {exc}') from None


# --- migrate ------------------------------------------------------------------------------------


def _migrate(args: argparse.Namespace) -> int:
    from sqlalchemy import exc as sa_exc

    from .migrate import MigrationError, applied_migrations, migrate

    engine, shown = _open(args.database_url, must_exist=False)
    try:
        try:
            applied = migrate(engine)
            versions = applied_migrations(engine)
        except MigrationError as exc:
            raise _Fail(str(exc)) from None
        except sa_exc.OperationalError as exc:
            raise _connection_failure(shown, exc) from None
        except sa_exc.SQLAlchemyError as exc:
            raise _Fail(f'migrating {shown} failed: {_first_line(exc)}') from None
    finally:
        engine.dispose()
    for name in applied:
        print(f'applied {name}')
    if not applied:
        print(f'{shown} is up to date (version {versions[-1] if versions else "none"})')
    return 0


# --- prices -------------------------------------------------------------------------------------


def _prices(args: argparse.Namespace) -> int:
    from .pricing import effective_price, get_price_table

    try:
        table = get_price_table()
    except ValueError as exc:
        raise _Fail(str(exc)) from None
    if args.model is None:
        _print_table_prices(table)
        return 0
    model, provider, prefix = _split_model_string(args.model, args.provider)
    price = effective_price(model, provider, table=table)
    _print_effective_price(price, prefix)
    return 0 if price.source != 'none' else 1


def _split_model_string(model: str, provider: str | None) -> tuple[str, str | None, str | None]:
    """`(model, provider, pydantic-ai prefix)` for a model name or a pydantic-ai `provider:model` string.

    The prefix maps to the genai-prices provider id (`google-gla` is `google`); an explicit `--provider` wins.
    A name whose text before `:` is no known provider (`anthropic.claude-v2:1` on Bedrock) stays whole.
    """
    prefix, sep, name = model.partition(':')
    gateway = prefix.removeprefix('gateway/')
    if not sep or not name or gateway not in _PYDANTIC_AI_PREFIXES:
        return model, provider, None
    return name, provider or _PYDANTIC_AI_PROVIDERS.get(gateway, gateway), prefix


def _print_table_prices(table: PriceTable) -> None:
    from .pricing import DEFAULT_UNIT_PRICES, GENAI_PRICES_SOURCE

    path = os.environ.get(_PRICES_ENV_VAR)
    print(f'Our price table: {f"${_PRICES_ENV_VAR}={path}" if path else "built-in defaults"}')
    print(f'Token prices of every other model come from {GENAI_PRICES_SOURCE}, offline.')
    print('\nUnit prices (USD per unit; first match wins):')
    for unit in table.units:
        default = '  (default)' if unit in DEFAULT_UNIT_PRICES else ''
        print(f'  {unit.provider}/{unit.model}  {unit.unit_type}  ${_plain(unit.usd_per_unit)}{default}')
    print('\nToken price overrides (USD per million tokens):')
    if not table.tokens:
        print('  none')
    for token in table.tokens:
        fields = {
            'input': token.input_mtok,
            'output': token.output_mtok,
            'cache_read': token.cache_read_mtok,
            'cache_write': token.cache_write_mtok,
            'output_image': token.output_image_mtok,
        }
        shown = ', '.join(f'{k} ${_plain(v)}' for k, v in fields.items() if v is not None)
        print(f'  {token.provider}/{token.model}  {shown}')


def _print_effective_price(price: EffectivePrice, prefix: str | None) -> None:
    print(f'model:    {price.model}')
    print(f'provider: {price.provider or "-"}' + (f' (pydantic-ai `{prefix}:`)' if prefix else ''))
    if price.source == 'none':
        print('source:   none: no price known; usage is recorded with cost_usd NULL and pricing_status unpriced')
        print(f'          add it to a price file named by ${_PRICES_ENV_VAR} (see docs/pricing.md)')
        return
    print(f'source:   {price.price_source}')
    if price.token_prices:
        print('token prices (USD per million tokens):')
        width = max(len(name) for name in price.token_prices)
        for name, value in price.token_prices.items():
            tiers = ''.join(
                f'; ${_plain(tier_price)} from {start:,} input tokens'
                for start, tier_price in price.token_tiers.get(name, ())
            )
            print(f'  {name.removesuffix("_mtok").ljust(width - 5)}  ${_plain(value)}{tiers}')
    if price.unit_prices:
        print('unit prices (USD per unit, config):')
        for unit_type, value in price.unit_prices.items():
            print(f'  {unit_type}  ${_plain(value)}')


def _plain(value: Decimal) -> str:
    return format(value.normalize(), 'f')


# --- reprice ------------------------------------------------------------------------------------


def _reprice(args: argparse.Namespace) -> int:
    """`pai-usage reprice`: a dry run unless `--apply`."""
    from sqlalchemy import exc as sa_exc

    from .migrate import migrate
    from .pricing import get_price_table
    from .reprice import format_reprice, reprice

    # `--until` is exclusive here, a date or a moment: unlike `summary`'s, a bare date is not widened to its end.
    since, _ = _parse_moment('--since', args.since)
    until = _parse_moment('--until', args.until)[0] if args.until is not None else None
    _check_range(since, until)
    try:
        table = get_price_table()
    except ValueError as exc:
        raise _Fail(str(exc)) from None
    engine, shown = _open(args.database_url, must_exist=True)
    try:
        _require_ledger(engine, shown, args.database_url, 'reprice')
        if args.apply:
            # The rows are read with today's columns (`service_tier`, migration 0003) and the changes logged in
            # `token_usage_reprice`: an older ledger is brought up to date first. A dry run changes nothing.
            migrate(engine)
        result = reprice(
            engine, since=since, until=until, organization_id=args.org, model=args.model, apply=args.apply, table=table
        )
    except sa_exc.OperationalError as exc:
        raise _connection_failure(shown, exc) from None
    except sa_exc.SQLAlchemyError as exc:
        raise _Fail(f'cannot reprice {shown}: {_first_line(exc)}') from None
    finally:
        engine.dispose()
    print(format_reprice(result))
    return 0
