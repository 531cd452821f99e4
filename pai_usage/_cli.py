"""The `pai-usage` command: `summary`, `export`, `budgets`, `migrate` and `prices`.

`cli()` is the console script; `cli_logic(args)` does the work and returns the exit code, for tests.
Expected failures (a bad date, an unreachable database, a missing table, a bad price file) print one
line to stderr and exit with code 2, never a traceback. `budgets` exits with code 1 when a budget is exceeded.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Generator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from . import __version__
from .export import export_rows, format_daily_costs, write_csv, write_jsonl
from .migrate import MigrationError, applied_migrations, migrate
from .pricing import (
    DEFAULT_UNIT_PRICES,
    GENAI_PRICES_SOURCE,
    PRICES_ENV_VAR,
    EffectivePrice,
    PriceTable,
    effective_price,
    get_price_table,
)
from .summary import GROUP_BY_DIMENSIONS, GroupBy, UsageSummary, UsageTotals, month_bounds, query_summary
from .table import COST_SCALE, TOKEN_USAGE
from .tracker import (
    DATABASE_URL_ENV_VAR,
    DEFAULT_DATABASE_URL,
    create_engine,
)
from .usage import TOKEN_BUCKETS

if TYPE_CHECKING:
    from .budgets import Budget

__all__ = ('cli', 'cli_logic')

_PROG = 'pai-usage'
_COST_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
_PG_CONNECT_TIMEOUT = 10
"""Seconds to wait for PostgreSQL before reporting it unreachable (when the URL sets no `connect_timeout`)."""
# Buckets always shown in the terminal table; the others only when some row uses them.
_ALWAYS_SHOWN = ('input_tokens', 'output_tokens')
_PROGRESS_EVERY = 10_000
"""Rows between two progress updates of `export` (on a terminal)."""
# FinOps FOCUS names for the summary's group dimensions where the meaning is the same; `day` and `month`
# become `ChargePeriodStart`/`ChargePeriodEnd`, and the other dimensions keep our names.
_FOCUS_DIMENSIONS = {'organization': 'SubAccountId', 'provider': 'ProviderName'}


class _Fail(Exception):
    """An expected failure: its message is printed as one line and the exit code is 2."""


def cli() -> NoReturn:  # pragma: no cover - exercised through `cli_logic`
    """Run the `pai-usage` command line and exit with its status."""
    sys.exit(cli_logic())


def cli_logic(args: Sequence[str] | None = None) -> int:
    """Run the command line with `args` (default: `sys.argv[1:]`) and return the exit code."""
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description='The usage-and-cost ledger for PydanticAI apps and direct Gemini calls.'
    )
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    commands = parser.add_subparsers(title='commands', required=True, metavar='COMMAND')
    # Every command that opens the database takes `--database-url` first.
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        '--database-url',
        metavar='URL',
        help=f'database URL (default: ${DATABASE_URL_ENV_VAR}, else {DEFAULT_DATABASE_URL})',
    )

    summary = commands.add_parser(
        'summary',
        parents=[database],
        help='show usage and cost over a time range',
        description='Show usage and cost over a time range (default: the current UTC month).',
    )
    _add_range_options(
        summary,
        since_help='start, inclusive: YYYY-MM-DD or an ISO datetime (UTC unless it says)',
        until_help='end: YYYY-MM-DD includes that whole day; an ISO datetime is an exclusive bound',
    )
    summary.add_argument(
        '--by', metavar='DIMS', default='model', help=f'comma-separated, from {",".join(GROUP_BY_DIMENSIONS)}'
    )
    summary.add_argument('--format', choices=('table', 'json', 'csv'), default='table', help='output format')
    summary.add_argument(
        '--focus', action='store_true', help='with --format csv: FinOps FOCUS column names where they fit'
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
    budgets.add_argument('--org', metavar='ID', help='with --limit: only this organization (default: all usage)')
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
        f'configured unit prices and token overrides (${PRICES_ENV_VAR}).',
    )
    prices.add_argument('model', nargs='?', metavar='MODEL', help='model name, e.g. gpt-4o')
    prices.add_argument('--provider', metavar='P', help='provider id, e.g. openai, google-vertex, elevenlabs')
    prices.set_defaults(command=_prices)
    return parser


def _add_range_options(command: argparse.ArgumentParser, *, since_help: str, until_help: str) -> None:
    """`--since`, `--until`, `--org` and `--user`: the rows a command reads (see `_time_range`)."""
    command.add_argument('--since', metavar='DATE', help=since_help)
    command.add_argument('--until', metavar='DATE', help=until_help)
    command.add_argument('--org', metavar='ID', help='only this organization')
    command.add_argument('--user', metavar='ID', help='only this user')


def _error(message: str) -> None:
    print(f'{_PROG}: error: {message}', file=sys.stderr)


# --- database -----------------------------------------------------------------------------------


def _database_url(given: str | None) -> str:
    return given or os.environ.get(DATABASE_URL_ENV_VAR) or DEFAULT_DATABASE_URL


def _open(given: str | None, *, must_exist: bool) -> tuple[sa.Engine, str]:
    """An engine for the URL and the URL to show; with `must_exist`, refuse to create a missing SQLite file."""
    url_text = _database_url(given)
    try:
        url = sa.make_url(url_text)
    except sa_exc.ArgumentError:
        raise _Fail(f'invalid database URL {url_text!r}') from None
    if url.get_backend_name() == 'sqlite':
        path = url.database
        if must_exist and path and path != ':memory:' and not path.startswith('file:') and not Path(path).exists():
            raise _Fail(f'no SQLite database at {path!r}; create it with `{_PROG} migrate --database-url {url_text}`')
    elif url.get_backend_name() == 'postgresql' and 'connect_timeout' not in url.query:
        url_text = url.update_query_dict({'connect_timeout': str(_PG_CONNECT_TIMEOUT)}).render_as_string(
            hide_password=False
        )
    try:
        return create_engine(url_text), _safe(url)
    except (sa_exc.SQLAlchemyError, ImportError) as exc:
        raise _Fail(f'cannot use database {_safe(url)}: {_first_line(exc)}') from None


def _safe(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, 'orig', None)
    text = str(original if original is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connection_failure(shown: str, exc: BaseException) -> _Fail:
    return _Fail(f'cannot reach database {shown}: {_first_line(exc)}')


# --- reading the ledger -------------------------------------------------------------------------


def _require_ledger(engine: sa.Engine, shown: str, given: str | None, command: str) -> None:
    """Fail (exit 2) when the database is unreachable or has no `token_usage` table; never create it."""
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


def _summary(args: argparse.Namespace) -> int:
    group_by = _group_by(args.by)
    if args.focus and args.format != 'csv':
        raise _Fail('--focus applies to --format csv only')
    start, end = _time_range(args.since, args.until, now=datetime.now(UTC))
    with _reading_ledger(args.database_url, 'summary') as engine:
        summary = query_summary(engine, start, end, organization_id=args.org, user_id=args.user, group_by=group_by)
    if args.format == 'json':
        _print_json(summary, sys.stdout)
    elif args.format == 'csv':
        (_print_focus_csv if args.focus else _print_csv)(summary, sys.stdout)
    else:
        _print_table(summary, sys.stdout)
        if 'day' in summary.group_by and summary.rows:
            sys.stdout.write(f'\n{format_daily_costs(_used_days(summary))}\n')
    return 0


def _used_days(summary: UsageSummary) -> UsageSummary:
    """The summary with its range cut to the days from the first to the last with usage, for the chart.

    A range of years (`--since 2020-01-01`) would otherwise draw a line for every day of it.
    """
    days = [date.fromisoformat(day) for row in summary.rows if (day := row.group['day']) is not None]
    if not days:
        return summary
    first = datetime.combine(min(days), datetime.min.time(), UTC)
    last = datetime.combine(max(days), datetime.min.time(), UTC) + timedelta(days=1)
    return dataclasses.replace(summary, start=max(summary.start, first), end=min(summary.end, last))


def _group_by(value: str) -> tuple[GroupBy, ...]:
    names = [name.strip() for name in value.split(',') if name.strip()]
    unknown = [name for name in names if name not in GROUP_BY_DIMENSIONS]
    if unknown:
        raise _Fail(f'cannot group by {", ".join(map(repr, unknown))}; choose from {",".join(GROUP_BY_DIMENSIONS)}')
    return tuple(dict.fromkeys(cast(list[GroupBy], names)))


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
    return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)), False


def _time_range(since: str | None, until: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """`[start, end)` from the options: the current UTC month by default; a bare `--until` date is inclusive."""
    month_start, month_end = month_bounds(now)
    end = month_end
    if until is not None:
        end, is_date = _parse_moment('--until', until)
        if is_date:
            end += timedelta(days=1)
    if since is not None:
        start, _ = _parse_moment('--since', since)
    else:
        start = month_start if until is None else month_bounds(end - timedelta(microseconds=1))[0]
    if start >= end:
        raise _Fail(f'the range is empty: --since {start.isoformat()} is not before the end {end.isoformat()}')
    return start, end


def _cost(value: Decimal) -> str:
    """An exact decimal string with the ledger's 12 places, the same on every backend."""
    return format(value.quantize(_COST_QUANTUM), 'f')


def _known_cost(totals: UsageTotals) -> str | None:
    """The group's known cost, or None when no event of the group has a price (unknown is not zero)."""
    return None if totals.events and totals.unpriced_events == totals.events else _cost(totals.cost_usd)


def _totals_dict(totals: UsageTotals) -> dict[str, Any]:
    return {
        'events': totals.events,
        'unpriced_events': totals.unpriced_events,
        'error_events': totals.error_events,
        'cost_usd': _known_cost(totals),
        **{name: getattr(totals, name) for name in TOKEN_BUCKETS},
        'total_tokens': totals.total_tokens,
    }


def _print_json(summary: UsageSummary, out: TextIO) -> None:
    totals = _totals_dict(summary.totals)
    document: dict[str, Any] = {
        'start': summary.start.isoformat(),
        'end': summary.end.isoformat(),
        'organization_id': summary.organization_id,
        'user_id': summary.user_id,
        'group_by': list(summary.group_by),
        'total_cost_usd': _cost(summary.totals.cost_usd),
        **{k: v for k, v in totals.items() if k != 'cost_usd'},
        'rows': [{**row.group, **_totals_dict(row.totals)} for row in summary.rows],
    }
    json.dump(document, out, indent=2)
    out.write('\n')


def _print_csv(summary: UsageSummary, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator='\n')
    columns = list(_totals_dict(UsageTotals()))
    writer.writerow([*summary.group_by, *columns])
    for row in summary.rows:
        values = _totals_dict(row.totals)
        writer.writerow([*(row.group[g] for g in summary.group_by), *(values[c] for c in columns)])


def _print_focus_csv(summary: UsageSummary, out: TextIO) -> None:
    """CSV under FinOps FOCUS names where the meaning is the same; our names for the rest."""
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
    for row in summary.rows:
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
    day, month = group.get('day'), group.get('month')
    if day is not None:
        start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
        end = start + timedelta(days=1)
    elif month is not None:
        start, end = month_bounds(datetime.combine(date.fromisoformat(f'{month}-01'), datetime.min.time(), UTC))
    else:
        return summary.start, summary.end
    return max(start, summary.start), min(end, summary.end)


def _display_cost(value: Decimal) -> str:
    # Exact, without the trailing zeros of 12 fixed places, and never in exponent notation.
    text = format(value.normalize(), 'f')
    whole, _, fraction = text.partition('.')
    return f'${whole}.{fraction.ljust(2, "0")}'


def _print_table(summary: UsageSummary, out: TextIO) -> None:
    buckets = [
        name
        for name in TOKEN_BUCKETS
        if name in _ALWAYS_SHOWN or any(getattr(row.totals, name) for row in summary.rows)
    ]
    headers = [*summary.group_by, 'events', 'unpriced', *(b.removesuffix('_tokens') for b in buckets), 'tokens', 'cost']
    numeric_from = len(summary.group_by)

    def cells(group: list[str], totals: UsageTotals) -> list[str]:
        return [
            *group,
            f'{totals.events:,}',
            f'{totals.unpriced_events:,}',
            *(f'{getattr(totals, b):,}' for b in buckets),
            f'{totals.total_tokens:,}',
            'unpriced' if _known_cost(totals) is None else _display_cost(totals.cost_usd),
        ]

    body = [
        cells(['-' if row.group[g] is None else str(row.group[g]) for g in summary.group_by], row.totals)
        for row in summary.rows
    ]
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def render(line: list[str]) -> str:
        return '  '.join(
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    scope = [f'{summary.start:%Y-%m-%d %H:%M} to {summary.end:%Y-%m-%d %H:%M} UTC (end exclusive)']
    if summary.organization_id is not None:
        scope.append(f'organization {summary.organization_id}')
    if summary.user_id is not None:
        scope.append(f'user {summary.user_id}')
    out.write(f'Usage {", ".join(scope)}\n\n')
    if body:
        out.write(render(headers) + '\n')
        out.write('  '.join('-' * width for width in widths) + '\n')
        for line in body:
            out.write(render(line) + '\n')
        out.write('\n')
    else:
        out.write('No usage in this range.\n\n')
    t = summary.totals
    out.write(
        f'Total: {_display_cost(t.cost_usd)} over {t.events:,} events'
        f' ({t.unpriced_events:,} unpriced, not in the cost), {t.total_tokens:,} tokens\n'
    )


# --- export -------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
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
    try:
        table = get_price_table()
    except ValueError as exc:
        raise _Fail(str(exc)) from None
    if args.model is None:
        _print_table_prices(table)
        return 0
    price = effective_price(args.model, args.provider, table=table)
    _print_effective_price(price)
    return 0 if price.source != 'none' else 1


def _print_table_prices(table: PriceTable) -> None:
    path = os.environ.get(PRICES_ENV_VAR)
    print(f'Our price table: {f"${PRICES_ENV_VAR}={path}" if path else "built-in defaults"}')
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


def _print_effective_price(price: EffectivePrice) -> None:
    print(f'model:    {price.model}')
    print(f'provider: {price.provider or "-"}')
    if price.source == 'none':
        print('source:   none: no price known; usage is recorded with cost_usd NULL and pricing_status unpriced')
        print(f'          add it to a price file named by ${PRICES_ENV_VAR} (see docs/pricing.md)')
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
