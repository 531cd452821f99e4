"""Testing an application that uses pai-usage: a pytest plugin, an in-memory ledger and assertion helpers.

Installed with pai-usage and registered as a pytest plugin (entry point `pai_usage`), it does three things:

- **The `usage_ledger` fixture** captures every record tracked during the test, by any `UsageTracker`, in memory:
  validated and priced on the calling thread as the writer would, with no database and no thread.

  ```python
  async def test_ad_costs(usage_ledger):
      result = await agent.run('Hi', deps=UsageDeps(user_id='u1', organization_id='acme'))
      usage_ledger.assert_every_request_recorded(result)
      assert usage_ledger.total_cost(org='acme') == Decimal('0.000025')
      assert [r.model for r in usage_ledger.rows(source='agent')] == ['gpt-4o']
  ```

- **A safe default**: while the plugin is active, the default tracker (`get_tracker()`, used when nothing names a
  tracker) is an in-memory SQLite one, never `./pai_usage.db` nor `$PAI_USAGE_DATABASE_URL`, which may name the real
  ledger. Trackers the code creates with an explicit database are left alone (outside `usage_ledger`).
- **Each test sees its own mistakes**: pai-usage's once-per-process warnings (`pai_usage.PaiUsageWarning`) are
  given again in every test.

Turn tracking off altogether with `PAI_USAGE_DISABLED=1` or `pai_usage.configure(enabled=False)`; disable the plugin
with `-p no:pai_usage`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from . import tracker as _tracker
from ._log import reset_rate_limits as _reset_rate_limits
from ._warnings import emit_pending, has_pending
from ._warnings import reset as _reset_warnings
from .pricing import PriceTable, price_usage, stored_price_context
from .record import UsageRecord
from .tracker import UsageTracker
from .usage import TokenCounts

__all__ = ('UsageLedger', 'assert_every_request_recorded', 'capture_usage', 'memory_tracker', 'usage_ledger')

_FILTERS = {
    'org': 'organization_id',
    'organization': 'organization_id',
    'user': 'user_id',
}


@dataclass
class UsageLedger:
    """The usage records of one test, in memory, in the order they were tracked."""

    records: list[UsageRecord] = field(default_factory=list[UsageRecord])
    """Every valid record, priced."""
    invalid: list[str] = field(default_factory=list[str])
    """Why each rejected record was invalid: field names and messages only, never the values."""

    def rows(self, **filters: Any) -> list[UsageRecord]:
        """The records whose fields equal the filters, e.g. `rows(model='gpt-4o', org='acme', status='ok')`.

        Filters are `UsageRecord` field names; `org`/`organization` and `user` stand for `organization_id` and
        `user_id`.
        """
        wanted = {_FILTERS.get(name, name): value for name, value in filters.items()}
        for name in wanted:
            if name not in UsageRecord.model_fields:
                raise TypeError(f'`{name}` is not a `UsageRecord` field')
        return [r for r in self.records if all(getattr(r, k) == v for k, v in wanted.items())]

    def total_cost(self, **filters: Any) -> Decimal:
        """Sum of `cost_usd` over `rows(**filters)`; raises `AssertionError` if one of them is unpriced."""
        rows = self.rows(**filters)
        unpriced = [r for r in rows if r.cost_usd is None]
        if unpriced:
            models = sorted({f'{r.provider}/{r.model}' for r in unpriced})
            raise AssertionError(f'{len(unpriced)} of the rows have no cost (unpriced: {", ".join(models)})')
        return sum((r.cost_usd for r in rows if r.cost_usd is not None), Decimal(0))

    def total_tokens(self, **filters: Any) -> int:
        """Sum of `total_tokens` over `rows(**filters)`."""
        return sum(r.total_tokens for r in self.rows(**filters))

    def clear(self) -> None:
        """Forget what was captured so far."""
        self.records.clear()
        self.invalid.clear()

    def assert_every_request_recorded(self, result: Any) -> None:
        """Assert that each model request of an agent run got its own row, and that the rows add up to its usage.

        `result` is what `agent.run()` (or `run_sync`, or a finished stream) returned. The run's rows, and those of
        sub-agents linked to it by `parent_run_id`, must hold exactly `result.usage`'s input and output tokens,
        with nothing left to an `agent_run_remainder` row (usage no request row accounted for).
        """
        usage = result.usage  # a property in pydantic-ai 2.x (calling it is deprecated)
        run_ids = self._run_tree(str(result.run_id))
        rows = [r for r in self.records if r.run_id in run_ids]
        if usage.requests and not [r for r in rows if r.operation == 'agent_request']:
            raise AssertionError(f'run {result.run_id!r} made {usage.requests} request(s) and recorded none')
        remainder = [r for r in rows if r.operation == 'agent_run_remainder' and r.total_tokens]
        if remainder:
            tokens = sum(r.total_tokens for r in remainder)
            raise AssertionError(f'{tokens} tokens of run {result.run_id!r} were recorded by no request row')
        input_tokens = sum(
            r.input_tokens + r.cache_read_tokens + r.cache_write_tokens + r.input_audio_tokens for r in rows
        )
        output_tokens = sum(
            r.output_tokens + r.reasoning_tokens + r.output_audio_tokens + r.output_image_tokens for r in rows
        )
        if (input_tokens, output_tokens) != (usage.input_tokens, usage.output_tokens):
            raise AssertionError(
                f'rows of run {result.run_id!r} hold {input_tokens} input / {output_tokens} output tokens; '
                f'the run used {usage.input_tokens} / {usage.output_tokens}'
            )

    def _run_tree(self, run_id: str) -> set[str | None]:
        found: set[str | None] = {run_id}
        while True:
            children = {r.run_id for r in self.records if r.parent_run_id in found} - found
            if not children:
                return found
            found |= children

    def _capture(self, tracker: UsageTracker, item: UsageRecord | dict[str, Any]) -> None:
        # Called by `UsageTracker.track()` on the caller's thread instead of queuing for the writer.
        try:
            record = item if isinstance(item, UsageRecord) else UsageRecord.model_validate(item)
        except ValidationError as exc:
            self.invalid.extend(f'{".".join(map(str, e["loc"]))}: {e["msg"]}' for e in exc.errors())
            return
        writer = getattr(tracker, '_writer', None)
        record = _price(record, getattr(writer, 'price_table', None))
        self.records.append(record)
        for listener in getattr(writer, 'listeners', ()):
            listener(record)


def _price(record: UsageRecord, table: PriceTable | None) -> UsageRecord:
    # The writer's rules: a caller's cost stands unless our price table overrides the model.
    override = table is not None and table.token_price(record.provider, record.model) is not None
    if record.pricing_status is not None and not override:
        return record
    if record.cost_usd is not None and not override:
        return record.model_copy(update={'pricing_status': 'priced'})
    priced = price_usage(
        provider=record.provider,
        model=record.model,
        tokens=TokenCounts.from_columns(record.__dict__),
        units=record.units,
        unit_type=record.unit_type,
        timestamp=record.created_at,
        service_tier=record.service_tier,
        context=stored_price_context(record.metadata),
        table=table,
    )
    return record.model_copy(
        update={
            'cost_usd': priced.cost_usd,
            'pricing_status': priced.pricing_status,
            'price_source': priced.price_source,
        }
    )


_active: list[UsageLedger] = []


def capture_usage() -> _Capture:
    """A context manager capturing every record tracked inside it (by any tracker) in a `UsageLedger`.

    What the `usage_ledger` fixture uses; nestable (the innermost capture gets the records).
    """
    return _Capture()


class _Capture:
    def __init__(self) -> None:
        self.ledger = UsageLedger()
        self._previous: Callable[[UsageTracker, UsageRecord | dict[str, Any]], None] | None = None

    def __enter__(self) -> UsageLedger:
        self._previous = _tracker._sink  # pyright: ignore[reportPrivateUsage]
        _tracker._sink = self.ledger._capture  # pyright: ignore[reportPrivateUsage]
        _active.append(self.ledger)
        return self.ledger

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        _tracker._sink = self._previous  # pyright: ignore[reportPrivateUsage]
        _active.remove(self.ledger)
        # What the capability found (an unpriced model) is reported here at the latest: its own calls never raise.
        if exc_type is None and has_pending():
            emit_pending(stacklevel=2)


def assert_every_request_recorded(result: Any, ledger: UsageLedger | None = None) -> None:
    """`UsageLedger.assert_every_request_recorded` on `ledger`, by default the active `usage_ledger`."""
    if ledger is None:
        if not _active:
            raise RuntimeError('no usage is being captured: use the `usage_ledger` fixture or `capture_usage()`')
        ledger = _active[-1]
    ledger.assert_every_request_recorded(result)


def memory_tracker(**options: Any) -> UsageTracker:
    """A tracker on a private in-memory SQLite database: real writer and summaries, nothing on disk."""
    settings: Mapping[str, Any] = {'spill': False, 'handle_sigterm': False, 'flush_interval': 0.01, **options}
    return UsageTracker('sqlite:///:memory:', **settings)


@pytest.fixture
def usage_ledger() -> Iterator[UsageLedger]:
    """Every usage record tracked during the test, captured in memory instead of written anywhere."""
    with capture_usage() as ledger:
        yield ledger


# --- plugin hooks --------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Make the default tracker of the test session an in-memory one."""
    config.stash[_previous_factory] = _tracker._default_factory  # pyright: ignore[reportPrivateUsage]
    _tracker._default_factory = memory_tracker  # pyright: ignore[reportPrivateUsage]


def pytest_unconfigure(config: pytest.Config) -> None:
    """Restore the default tracker's factory."""
    _tracker._default_factory = config.stash.get(_previous_factory, None)  # pyright: ignore[reportPrivateUsage]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Give pai-usage's once-per-process warnings and rate-limited log messages again in each test."""
    _reset_warnings()
    _reset_rate_limits()


_previous_factory = pytest.StashKey[Callable[[], UsageTracker] | None]()
