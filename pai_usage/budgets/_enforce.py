"""`EnforceBudgets`: count spend at settle, reserve an estimate per request in flight, refuse past the limit."""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast
from uuid import UUID, uuid4

import genai_prices
import sqlalchemy as sa
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import WrapModelRequestHandler, WrapRunHandler
from pydantic_ai.messages import ModelResponse
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import AgentDepsT, RunContext
from sqlalchemy.exc import SQLAlchemyError

from .._locks import ForkSafeLock, sqlite_gate
from .._log import RateLimitedLog
from .._validate import stored_fields
from ..context import current_usage_context, inherited_payer, payer_label, read_attribute
from ..pricing import price_fields
from ..record import UsageRecord, normalize_label
from ..summary import query_summary
from . import _hard  # pyright: ignore[reportPrivateUsage]
from ._model import (
    Budget,
    BudgetExceeded,
    BudgetMode,
    BudgetStatus,
    BudgetWarning,
    Dimension,
    period_name,
    scope_name,
    usd,
)
from ._periods import period_bounds

if TYPE_CHECKING:
    from pydantic_ai.models import ModelRequestContext

    from ..tracker import UsageTracker

__all__ = (
    'REFUSED_SOURCE',
    'WARNING_EVENT',
    'BudgetHold',
    'EnforceBudgets',
    'Estimate',
    'budget_report',
    'format_budgets',
    'reserve_direct',
)

Estimate = Literal['previous', 'max_tokens'] | Decimal
"""What a request reserves before it starts: the cost of the previous request of the same run (or, for direct
calls, of the same model), `max_tokens` times the model's output price (else `previous`), or a fixed amount."""

REFUSED_SOURCE = 'not billed: refused by budget'
"""`price_source` of the zero-cost `status='refused'` rows recorded for refused requests."""
WARNING_EVENT = 'pai_usage.budget.warning'
"""Name of the OpenTelemetry event a soft limit (`Budget.warn_at`) fires on the current span."""

_log = RateLimitedLog()
_RECENT_CAP = 200_000  # unwritten records remembered for counters made later; more means the writer is far behind

# In-process counter key: (dimension, key, period and time zone, period start; None for rolling windows).
_Key = tuple[Dimension, str | None, Any, datetime | None]
_Target = tuple[Budget, Dimension, str | None]


def _utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(eq=False)
class _Seen:
    """A settled record the writer has not written yet: new counters count it, the ledger does not have it."""

    cost: Decimal
    organization_id: str | None
    user_id: str | None
    created_at: datetime


@dataclass(eq=False)
class _Counter:
    """Spend and reservations of one key over one period, in this process."""

    dim: Dimension
    key: str | None
    budget: Budget
    """The first budget that made this counter: its period and time zone are the counter's."""
    start: datetime | None
    end: datetime | None
    hard_key: _hard.CounterKey | None
    budgets: list[Budget] = field(default_factory=list[Budget])
    db_usd: Decimal = Decimal(0)
    """The ledger's spend at the last read."""
    fetched_at: datetime | None = None
    replayed: int = 0
    """The writer's count of replayed records when the last read began: more since, and the read is stale."""
    local: dict[UUID, Decimal] = field(default_factory=dict[UUID, Decimal])
    """Records settled in this process that the last read may not have seen."""
    written: set[UUID] = field(default_factory=set[UUID])
    """Those of `local` the writer has written since: the next read sees them, and they leave `local`."""
    local_usd: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    """Estimates held by this process's requests in flight."""
    warned: set[tuple[int, float]] = field(default_factory=set[tuple[int, float]])
    refresh_lock: threading.Lock = field(default_factory=threading.Lock)
    spent_delta: Decimal = Decimal(0)
    """Hard mode: spend settled here and not sent to the counter row yet."""
    released: Decimal = Decimal(0)
    """Hard mode: reservations released here and not sent to the counter row yet."""
    hard_seen: tuple[Decimal, Decimal] | None = None
    """Hard mode: the row's spent and reserved after this process's last statement."""
    send_lock: ForkSafeLock = field(default_factory=ForkSafeLock)
    """Hard mode: held from taking `spent_delta` and `released` until the statement carrying them has committed
    or rolled back. Without it, another of this process's statements (a reservation carrying nothing, since the
    deltas were taken) could commit first, on a row without spend this process settled before it asked."""

    def contains(self, moment: datetime) -> bool:
        if self.start is None:
            return True  # a rolling window: a record settled now is in it
        assert self.end is not None
        return self.start <= moment < self.end

    @property
    def spent(self) -> Decimal:
        total = self.db_usd + self.local_usd
        if self.hard_seen is not None:
            total = max(total, self.hard_seen[0] + self.spent_delta)
        return total

    @property
    def held(self) -> Decimal:
        if self.hard_seen is not None:
            return max(self.hard_seen[1] - self.released, self.reserved, Decimal(0))
        return self.reserved


class BudgetHold:
    """Estimates reserved for one request in flight; `release()` (or leaving the `with` block) gives them back.

    Returned by `EnforceBudgets.reserve()` for calls that are not model requests of an agent run (direct API
    calls). Release it once the call's record has been given to the tracker.
    """

    def __init__(self, owner: EnforceBudgets[Any], counters: list[_Counter], estimate: Decimal, in_db: bool) -> None:
        self._owner = owner
        self._counters = counters
        self._in_db = in_db
        self.estimate_usd = estimate
        """What the hold reserved on each of its budgets."""
        self._released = False

    def release(self) -> None:
        """Give the reservation back (idempotent)."""
        if self._released:
            return
        self._released = True
        self._owner._release(self._counters, self.estimate_usd, in_db=self._in_db)  # pyright: ignore[reportPrivateUsage]

    def __enter__(self) -> BudgetHold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextmanager
def _sending(counters: Iterable[_Counter]) -> Generator[list[_Counter]]:
    """Hold the send locks of `counters`, taken in one order for every thread; yields the counters in it.

    Statements then lock the counter rows in the same order, so every process and thread takes them alike.
    """
    order = sorted(counters, key=lambda c: repr(c.hard_key))
    with ExitStack() as held:
        for counter in order:
            held.enter_context(counter.send_lock)
        yield order


@dataclass
class _Handoff:
    """Who gives back a reservation made in a worker thread: the thread once it ends, if its run was cancelled."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcome: bool | BaseException | None = None
    abandoned: bool = False


# Enforcers by tracker, for hooks that only know the tracker (direct Gemini calls).
# Keyed by `id()`: capabilities are dataclasses that compare by value, so they are not hashable.
_Registry = weakref.WeakValueDictionary[int, 'EnforceBudgets[Any]']
_enforcers: weakref.WeakKeyDictionary[UsageTracker, _Registry] = weakref.WeakKeyDictionary()
_enforcers_lock = ForkSafeLock()


@dataclass
class EnforceBudgets(AbstractCapability[AgentDepsT]):
    """A PydanticAI capability that reserves budget for each model request and refuses it past the limit.

    Spend counts the moment a request settles: the tracker calls this capability (an observer) from
    `track()`, before its writer has the row. Before each request, the capability reserves an `estimate` on
    every budget that applies, refuses the request (`BudgetExceeded`, and a zero-cost `status='refused'` row)
    when spent + reserved + estimate would pass the limit, and releases the estimate when the request ends.
    In one process, spend then exceeds a limit by at most one request per concurrent run. The ledger stays the
    source of truth: each (key, period) is re-read every `refresh_interval` seconds for other processes' spend;
    `hard=True` also keeps one counter row per (key, period) in the database, so that many processes together
    keep the same bound (see `docs/budgets.md`).

    Combine it with `TrackUsage`, which records the spend; it orders itself outside `TrackUsage`. The run's
    organization and user come from its deps (`organization_id`, `user_id` attributes), else from the ambient
    `UsageContext`.
    """

    tracker: UsageTracker
    """The tracker whose records count as spend and whose database holds the ledger."""
    _: KW_ONLY
    budgets: Sequence[Budget] = ()
    """The budgets to enforce; every one that applies to a run is checked."""
    mode: BudgetMode = 'raise'
    """`raise` (refuse the request) or `warn` (emit a `BudgetWarning` and go on)."""
    estimate: Estimate = 'previous'
    """What each request reserves before it starts (see `Estimate`)."""
    hard: bool = False
    """Keep atomic counters in the database (PostgreSQL or SQLite), shared by every process: costs one short
    transaction per request. Calendar periods only."""
    refresh_interval: float = 60.0
    """Seconds a ledger read is trusted before it is read again."""
    clock: Callable[[], datetime] = _utcnow
    """Returns the current time (timezone-aware): injectable for tests."""
    fail_open: bool = True
    """When the database cannot be read (or, in hard mode, written), allow requests on what this process knows
    and log an error, rather than fail every run. False raises the database error instead."""
    on_warning: Callable[[BudgetStatus, float], None] | None = None
    """Called with the status and the fraction when spend first reaches one of a budget's `warn_at` fractions
    in a period (once per threshold, period and key), on the thread that settled the request."""
    record_refusals: bool = True
    """Record each refused request as a zero-cost `status='refused'` row."""
    hold_ttl: float = 120.0
    """Hard mode: seconds after which the reservations of a process that stopped heartbeating (killed
    mid-request) are given back to the counters. A live process heartbeats every `hold_ttl / 4` seconds."""

    _cache: dict[_Key, _Counter] = field(default_factory=dict[_Key, _Counter], init=False, repr=False)
    _by_target: dict[tuple[Dimension, str | None], list[_Counter]] = field(
        default_factory=dict[tuple[Dimension, str | None], list[_Counter]], init=False, repr=False
    )
    _recent: dict[UUID, _Seen] = field(default_factory=dict[UUID, _Seen], init=False, repr=False)
    _runs: dict[str | None, Decimal | None] = field(
        default_factory=dict[str | None, Decimal | None], init=False, repr=False
    )
    _spent_in_request: dict[str | None, Decimal] = field(
        default_factory=dict[str | None, Decimal], init=False, repr=False
    )
    _last_direct: dict[str | None, Decimal] = field(default_factory=dict[str | None, Decimal], init=False, repr=False)
    _price_cache: dict[tuple[str | None, str, int], Decimal | None] = field(
        default_factory=dict[tuple[str | None, str, int], Decimal | None], init=False, repr=False
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _dirty: set[_Counter] = field(default_factory=set[_Counter], init=False, repr=False)
    _sync_wake: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _sync_thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _hard_ready: bool = field(default=False, init=False, repr=False)
    _holder_pid: int = field(default=0, init=False, repr=False)
    _holder_name: str = field(default='', init=False, repr=False)
    _next_heartbeat: float = field(default=0.0, init=False, repr=False)
    _last_reclaim: float = field(default=float('-inf'), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ('raise', 'warn'):
            raise ValueError(f"`mode` must be 'raise' or 'warn', not {self.mode!r}")
        if not (self.estimate in ('previous', 'max_tokens') or isinstance(self.estimate, Decimal)):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"`estimate` must be 'previous', 'max_tokens' or a Decimal, not {self.estimate!r}")
        if not self.hold_ttl > 0:
            raise ValueError(f'`hold_ttl` must be a positive number of seconds, not {self.hold_ttl!r}')
        if self.hard and any(b.rolling for b in self.budgets):
            raise ValueError('hard mode keeps counters per calendar period: rolling windows are in-process only')
        # Weak references: the tracker outlives enforcers, and must not keep discarded ones (and caches) alive.
        observe = weakref.WeakMethod(self._observe)
        written = weakref.WeakMethod(self._written)

        def observer(record: UsageRecord | dict[str, Any]) -> None:
            method = observe()
            if method is not None:
                method(record)

        def listener(record: UsageRecord) -> None:
            method = written()
            if method is not None:
                method(record)

        self.tracker.add_observer(observer)
        self.tracker.add_listener(listener)
        with _enforcers_lock:
            _enforcers.setdefault(self.tracker, weakref.WeakValueDictionary())[id(self)] = self

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # takes a tracker and callables: not spec-serializable

    # --- agent hooks ---------------------------------------------------------------------------------------

    async def wrap_run(self, ctx: RunContext[AgentDepsT], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        """Remember the run's previous request cost (the `previous` estimate) while it runs."""
        run_id = ctx.run_id
        with self._lock:
            self._runs[run_id] = None
            self._spent_in_request[run_id] = Decimal(0)
        try:
            return await handler()
        finally:
            with self._lock:
                self._runs.pop(run_id, None)
                self._spent_in_request.pop(run_id, None)

    async def wrap_model_request(
        self,
        ctx: RunContext[AgentDepsT],
        *,
        request_context: ModelRequestContext,
        handler: WrapModelRequestHandler,
    ) -> ModelResponse:
        """Reserve the request's estimate on every applicable budget (or refuse it); release it when it ends."""
        organization_id, user_id = _attribution(ctx.deps)
        targets = self._targets(ctx.deps, organization_id, user_id)
        if not targets:
            return await handler(request_context)
        model = request_context.model
        estimate = self._estimate_request(ctx.run_id, model.system, model.model_name, request_context)
        with self._lock:
            if ctx.run_id in self._spent_in_request:
                self._spent_in_request[ctx.run_id] = Decimal(0)  # what settles from now on is this request's
        now = self.clock()
        counters = self._counters(targets, now)
        stale = [c for c in counters if self._is_stale(c, now)]
        if stale:
            await asyncio.to_thread(self._refresh_all, stale, now)
        try:
            admitted = self._admit_local(targets, counters, estimate, now)
            in_db = self.hard and await self._admit_in_thread(
                partial(self._admit_hard, targets, counters, estimate, now, admitted), admitted, estimate
            )
        except BudgetExceeded as exc:
            self._record_refusal(
                exc,
                organization_id=organization_id,
                user_id=user_id,
                provider=model.system,
                model=model.model_name,
                operation='agent_request',
                source='agent',
                run_id=ctx.run_id,
                agent_name=ctx.agent.name if ctx.agent is not None else None,
            )
            raise
        try:
            return await handler(request_context)
        finally:
            self._release(admitted, estimate, in_db=in_db)

    async def _admit_in_thread(self, admit: Callable[[], bool], admitted: list[_Counter], estimate: Decimal) -> bool:
        """Run `admit` (`_admit_hard`) in a worker thread; if the run is cancelled meanwhile, its outcome is given back.

        A cancelled `await` does not stop the thread: its reservation may still commit on the counter rows, and
        released as a local hold only it would stay there, heartbeated, until the process exits. The thread
        does the release itself, not a callback on the event loop, which may be closing by then.
        """
        handoff = _Handoff()

        def in_thread() -> bool:
            outcome: bool | BaseException
            try:
                outcome = admit()
            except BaseException as exc:
                outcome = exc
            with handoff.lock:
                handoff.outcome = outcome
                abandoned = handoff.abandoned
            if abandoned:
                self._give_back(outcome, admitted, estimate)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        try:
            return await asyncio.to_thread(in_thread)
        except asyncio.CancelledError:
            with handoff.lock:
                handoff.abandoned = True
                outcome = handoff.outcome
            if outcome is not None:  # it ended as the run was cancelled: the thread left it to us
                self._give_back(outcome, admitted, estimate)
            raise
        except BaseException as exc:  # refused, or the database failed
            self._give_back(exc, admitted, estimate)
            raise

    def _give_back(self, outcome: bool | BaseException, admitted: list[_Counter], estimate: Decimal) -> None:
        """Release the hold of an `_admit_hard` whose caller will not: on the counter rows too if it got there."""
        if outcome is True:
            self._release(admitted, estimate, in_db=True)
        elif not isinstance(outcome, BudgetExceeded):  # a refusal gave its hold back itself
            self._release(admitted, estimate, in_db=False)

    # --- outside agent runs ---------------------------------------------------------------------------------

    def reserve(
        self,
        deps: Any = None,
        *,
        organization_id: str | None = None,
        user_id: str | None = None,
        estimate: Decimal = Decimal(0),
    ) -> BudgetHold:
        """Reserve `estimate` on every applicable budget for one call, or raise `BudgetExceeded`. May block.

        For calls that are not model requests of an agent run; release the hold once the call's record has
        been given to the tracker. Does not record refusals (`reserve_direct` does).
        """
        targets = self._targets(deps, *_given_or_ambient(deps, organization_id, user_id))
        now = self.clock()
        counters = self._counters(targets, now)
        self._refresh_all([c for c in counters if self._is_stale(c, now)], now)
        admitted = self._admit_local(targets, counters, estimate, now)
        try:
            in_db = self.hard and self._admit_hard(targets, counters, estimate, now, admitted)
        except SQLAlchemyError:
            self._release(admitted, estimate, in_db=False)
            raise
        return BudgetHold(self, admitted, estimate, in_db)

    def check(self, deps: Any = None, *, organization_id: str | None = None, user_id: str | None = None) -> None:
        """Raise `BudgetExceeded` (or warn) if a budget that applies is spent. May block on a refresh."""
        self.reserve(deps, organization_id=organization_id, user_id=user_id).release()

    def statuses(
        self, deps: Any = None, *, organization_id: str | None = None, user_id: str | None = None
    ) -> list[BudgetStatus]:
        """The budgets that apply to this attribution, with their spend and reservations (refreshed if stale)."""
        targets = self._targets(deps, *_given_or_ambient(deps, organization_id, user_id))
        now = self.clock()
        counters = self._counters(targets, now)
        self._refresh_all([c for c in counters if self._is_stale(c, now)], now)
        if self.hard:
            self.sync()
            found = _hard.read(self.tracker.engine, [c.hard_key for c in counters if c.hard_key is not None])
            with self._lock:
                for counter in counters:
                    if counter.hard_key in found:
                        counter.hard_seen = found[counter.hard_key]
        return [self._status(budget, counter, now) for (budget, _, _), counter in zip(targets, counters, strict=True)]

    def sync(self) -> None:
        """Hard mode: send settled spend and released reservations to the counter rows now (blocking)."""
        with self._lock:
            dirty = list(self._dirty)
        if not dirty:
            return
        with _sending(dirty) as order:
            deltas = self._take_deltas(order)
            try:
                missing = _hard.apply_deltas(
                    self.tracker.engine, [(c.hard_key, s, r) for c, s, r in deltas if c.hard_key], self._holder()
                )
            except BaseException:
                self._put_back(deltas)  # rolled back: sent with the next statement instead, never lost
                raise
            if missing:
                # No row yet: kept for this process's next reservation (not dirty: the sync would only find no
                # row again). A row another process makes meanwhile starts from its ledger read, without them.
                self._put_back([t for t in deltas if t[0].hard_key in missing], dirty=False)

    def close(self) -> None:
        """Stop the hard-mode sync thread after a last sync; the enforcer keeps working without it."""
        self._closed = True
        self._sync_wake.set()
        thread = self._sync_thread
        if thread is not None:
            thread.join(5)
        if self.hard:
            try:
                self.sync()
            except SQLAlchemyError as exc:
                _log.error('budget-sync', 'pai-usage: could not send budget counters at close: %r', exc)

    # --- accounting -----------------------------------------------------------------------------------------

    def _observe(self, record: UsageRecord | dict[str, Any]) -> None:
        """Tracker observer, inside `track()`: count a settled record's cost at once."""
        if isinstance(record, dict):
            # Validated as the writer validates it: a record the ledger will reject (a NaN or negative cost,
            # negative tokens) counts nothing, instead of poisoning or lowering the spend.
            stored = stored_fields(record)
            if stored is None:
                return
            fields: Mapping[str, Any] = stored
        else:
            fields = record.__dict__
        get = fields.get
        # The cost the ledger will store: the writer prices with the same function and the same table.
        cost = price_fields(fields, self.tracker.price_table).cost_usd
        if cost is None:
            self._warn_unpriced(fields)
            return
        if not cost.is_finite() or cost < 0:
            return
        run_id = get('run_id')
        record_id = get('id')
        created_at = get('created_at')
        if isinstance(record_id, str):
            # `track()` stamps raw fields with a UUIDv7 as 32 hex digits; written records carry it as a `UUID`.
            try:
                record_id = UUID(record_id)
            except ValueError:
                return
        if not isinstance(record_id, UUID) or not isinstance(created_at, datetime):
            return
        organization_id = normalize_label(get('organization_id'))
        user_id = normalize_label(get('user_id'))
        crossed: list[tuple[BudgetStatus, float]] = []
        wake = False
        with self._lock:
            if get('source') == 'direct':
                # The next direct call's estimate, inside a run too: a tool's parallel calls each reserve it. A
                # refused or failed call is no guide to what the next one costs.
                if get('status', 'ok') == 'ok':
                    self._last_direct[get('model')] = cost
            elif run_id in self._runs:
                # Every attempt of one request (a fallback chain bills each): the next request's estimate.
                spent = self._spent_in_request.get(run_id, Decimal(0)) + cost
                self._spent_in_request[run_id] = spent
                self._runs[run_id] = spent
            if not cost:
                return
            if len(self._recent) >= _RECENT_CAP:
                self._recent.pop(next(iter(self._recent)))
            self._recent[record_id] = _Seen(cost, organization_id, user_id, created_at)
            for target in _record_targets(organization_id, user_id):
                for counter in self._by_target.get(target, ()):
                    if counter.contains(created_at) and record_id not in counter.local:
                        counter.local[record_id] = cost
                        counter.local_usd += cost
                        if counter.hard_key is not None:
                            counter.spent_delta += cost
                            self._dirty.add(counter)
                            wake = True
                        crossed.extend(self._crossed(counter))
        if wake:
            self._wake_sync()
        self._fire(crossed)

    def _warn_unpriced(self, fields: Mapping[str, Any]) -> None:
        """Say (rate-limited) that a budget cannot count usage no price is known for: it is not counted."""
        get = fields.get
        targets = _record_targets(normalize_label(get('organization_id')), normalize_label(get('user_id')))
        if any(self._by_target.get(target) for target in targets):
            provider, model = get('provider'), get('model')
            _log.warning(
                f'budget-unpriced:{provider}:{model}',
                'pai-usage: a budget applies to usage of %s/%s but no price is known for it: not counted (add a'
                ' TokenPrice or UnitPrice to the price table to count it)',
                provider,
                model,
            )

    def _written(self, record: UsageRecord) -> None:
        """Tracker listener: the writer wrote this record, so ledger reads from now on include it."""
        with self._lock:
            seen = self._recent.pop(record.id, None)
            # Said per counter, not inferred from `_recent` (which forgets its oldest past `_RECENT_CAP`): a record
            # the writer has not written yet stays counted however far behind the writer is. The payer as it was
            # counted, when still known.
            payer = (
                (seen.organization_id, seen.user_id) if seen is not None else (record.organization_id, record.user_id)
            )
            for target in _record_targets(*payer):
                for counter in self._by_target.get(target, ()):
                    if record.id in counter.local:
                        counter.written.add(record.id)

    def _targets(self, deps: Any, organization_id: str | None, user_id: str | None) -> list[_Target]:
        targets: list[_Target] = []
        for budget in self.budgets:
            try:
                dim, key = budget.target(organization_id, user_id, deps)
            except LookupError:
                continue
            targets.append((budget, dim, key))
        return targets

    def _counters(self, targets: Sequence[_Target], now: datetime) -> list[_Counter]:
        counters: list[_Counter] = []
        with self._lock:
            for budget, dim, key in targets:
                period_id = budget.period if budget.rolling else (budget.period, budget.timezone)
                if budget.rolling:
                    start = end = None
                else:
                    start, end = period_bounds(budget.period, now, budget.timezone)
                cache_key: _Key = (dim, key, period_id, start)
                counter = self._cache.get(cache_key)
                if counter is None:
                    # A new period for this key: forget its previous periods.
                    siblings = self._by_target.setdefault((dim, key), [])
                    same = (budget.period, budget.timezone)
                    for old in [c for c in siblings if (c.budget.period, c.budget.timezone) == same]:
                        siblings.remove(old)
                        self._cache.pop((dim, key, period_id, old.start), None)
                    hard_key = (
                        (scope_name(dim, key), period_name(budget.period, budget.timezone), start)
                        if self.hard and start is not None
                        else None
                    )
                    counter = self._cache[cache_key] = _Counter(dim, key, budget, start, end, hard_key)
                    siblings.append(counter)
                if budget not in counter.budgets:
                    counter.budgets.append(budget)
                counters.append(counter)
        return counters

    def _is_stale(self, counter: _Counter, now: datetime) -> bool:
        if counter.fetched_at is None:
            return True
        age = (now - counter.fetched_at).total_seconds()
        # Replayed records (spilled or journalled by a process that stopped or died, perhaps an earlier run of
        # this one) are spend the last read could not see: a restart after an outage would otherwise let a
        # second limit through until the next interval.
        return age >= self.refresh_interval or age < 0 or self._replayed() != counter.replayed

    def _replayed(self) -> int:
        return self.tracker._writer.stats.replayed  # pyright: ignore[reportPrivateUsage]

    def _refresh_all(self, counters: Iterable[_Counter], now: datetime) -> None:
        # Often in a worker thread (`asyncio.to_thread`): a fork must wait for it to leave SQLite.
        with sqlite_gate(self.tracker.engine.dialect.name):
            for counter in dict.fromkeys(counters):
                self._refresh(counter, now)

    def _refresh(self, counter: _Counter, now: datetime) -> None:
        with counter.refresh_lock:
            if not self._is_stale(counter, now):
                return  # another caller refreshed it while we waited
            if counter.start is None:
                window = cast(timedelta, counter.budget.period)
                start, end = now - window, now + window  # a little future: records stamped by a skewed clock
            else:
                assert counter.end is not None
                start, end = counter.start, counter.end
            replayed = self._replayed()  # before the read: a replay during it makes the next read due
            with self._lock:
                # Written before the read begins: in its result. Settled but unwritten: not, so they stay local
                # (a record written during the read may be counted twice until the next read: the safe side).
                written = list(counter.written)
                first = counter.fetched_at is None
                unwritten = (
                    {
                        rid: seen.cost
                        for rid, seen in self._recent.items()
                        if (counter.dim, counter.key) in _record_targets(seen.organization_id, seen.user_id)
                        and start <= seen.created_at < end
                    }
                    if first
                    else {}
                )
            try:
                total = _spend(self.tracker.engine, counter.dim, counter.key, start, end)
            except SQLAlchemyError as exc:
                if not _has_ledger(self.tracker.engine):
                    total = Decimal(0)  # nothing tracked yet: the writer creates the table on its first write
                elif self.fail_open:
                    _log.error('budget-read', 'pai-usage: could not read spend for budgets, allowing: %r', exc)
                    with self._lock:
                        counter.fetched_at = now  # keep what is known; try again next interval
                        counter.replayed = replayed
                    return
                else:
                    raise
            with self._lock:
                counter.db_usd = total
                counter.fetched_at = now
                counter.replayed = replayed
                for rid in written:
                    counter.local_usd -= counter.local.pop(rid, Decimal(0))
                    counter.written.discard(rid)
                if counter.start is None:
                    for rid in [r for r in counter.local if r in self._recent and self._recent[r].created_at < start]:
                        counter.local_usd -= counter.local.pop(rid)
                        counter.written.discard(rid)
                for rid, cost in unwritten.items():
                    if rid not in counter.local:
                        counter.local[rid] = cost
                        counter.local_usd += cost
                crossed = self._crossed(counter)
            if counter.hard_key is not None and counter.hard_seen is not None:
                try:
                    _hard.raise_to(self.tracker.engine, counter.hard_key, total)
                except SQLAlchemyError as exc:
                    _log.error('budget-sync', 'pai-usage: could not update a budget counter: %r', exc)
        self._fire(crossed)

    def _status(self, budget: Budget, counter: _Counter, now: datetime) -> BudgetStatus:
        with self._lock:
            spent, held = counter.spent, counter.held
        if counter.start is None:
            start, end = period_bounds(budget.period, now)
        else:
            assert counter.end is not None
            start, end = counter.start, counter.end
        return BudgetStatus(budget=budget, key=counter.key, start=start, end=end, spend_usd=spent, reserved_usd=held)

    def _admit_local(
        self, targets: Sequence[_Target], counters: Sequence[_Counter], estimate: Decimal, now: datetime
    ) -> list[_Counter]:
        """Check every budget and reserve `estimate` on each counter, atomically in this process."""
        refusal: tuple[Budget, _Counter] | None = None
        with self._lock:
            for (budget, _, _), counter in zip(targets, counters, strict=True):
                # Only this process's reservations: in hard mode the counter row, asked next, has everyone's. What
                # the row said at the last statement may be stale (released since), and would refuse forever.
                spent, held = counter.spent, counter.reserved
                limit = budget.limit_usd
                if spent + held >= limit or spent + held + estimate > limit:
                    refusal = (budget, counter)
                    break
            if refusal is None or self.mode == 'warn':
                unique = list(dict.fromkeys(counters))
                for counter in unique:
                    counter.reserved += estimate
            else:
                unique = []
        if refusal is not None:
            self._refuse(*refusal, estimate, now)
        return unique

    def _admit_hard(
        self,
        targets: Sequence[_Target],
        counters: Sequence[_Counter],
        estimate: Decimal,
        now: datetime,
        admitted: list[_Counter],
    ) -> bool:
        """Reserve on the database counters too (True: reserved there); undo the local reservation on refusal."""
        with sqlite_gate(self.tracker.engine.dialect.name):  # often in a worker thread, like `_refresh_all`
            limits: dict[_Counter, Decimal] = {}
            for (budget, _, _), counter in zip(targets, counters, strict=True):
                if counter.hard_key is not None:
                    limits[counter] = min(limits.get(counter, budget.limit_usd), budget.limit_usd)
            if not limits:
                return False
            with _sending(limits) as order:
                answer = self._send_reservation(order, limits, estimate)
            if answer is None:
                return False  # fail open: enforced in-process
            refused, crossed = answer
            self._fire(crossed)  # outside the send locks: a callback may reserve
            if refused is None:
                self._start_sync()  # heartbeats this process's holds while its requests run
                return True
            counter = order[refused]
            budget = next(
                b
                for (b, _, _), c in zip(targets, counters, strict=True)
                if c is counter and b.limit_usd == limits[counter]
            )
            if self.mode == 'raise':
                self._release(admitted, estimate, in_db=False)
            self._refuse(budget, counter, estimate, now)  # raises, or warns and goes on
            return False

    def _send_reservation(
        self, order: list[_Counter], limits: Mapping[_Counter, Decimal], estimate: Decimal
    ) -> tuple[int | None, list[tuple[BudgetStatus, float]]] | None:
        """Send the deltas and reserve, in one transaction, with `order`'s send locks held.

        Returns the refusing counter's index (None: reserved) and the soft limits crossed, or None when the
        counters are unavailable and `fail_open`.
        """
        ops: list[_hard.HardOp] = []
        taken: list[tuple[_Counter, Decimal, Decimal]] = []
        with self._lock:
            for counter in order:
                assert counter.hard_key is not None
                fresh = counter.hard_seen is None
                ops.append(
                    _hard.HardOp(
                        key=counter.hard_key,
                        limit=limits[counter],
                        spent_delta=counter.spent_delta,
                        released=counter.released,
                        estimate=estimate,
                        seed=counter.db_usd + counter.local_usd if fresh else Decimal(0),
                    )
                )
                taken.append((counter, counter.spent_delta, counter.released))
                counter.spent_delta = counter.released = Decimal(0)
        try:
            if not self._hard_ready:
                _hard.ensure_table(self.tracker.engine)
                self._hard_ready = True
            refused, seen = _hard.reserve(self.tracker.engine, ops, self._holder())
        except BaseException as exc:
            # Rolled back (or cancelled before the statement): the deltas go with the next statement instead.
            self._put_back(taken)
            if isinstance(exc, SQLAlchemyError) and self.fail_open:
                _log.error('budget-hard', 'pai-usage: budget counters unavailable, enforcing in-process: %r', exc)
                return None
            raise  # the caller gives the local hold back
        if refused is not None:
            try:
                if self._reclaim_stale(on_refusal=True):
                    # A dead process's reservations were in the way. The deltas are sent: ask again without them.
                    for op in ops:
                        op.spent_delta = op.released = Decimal(0)
                    refused, seen = _hard.reserve(self.tracker.engine, ops, self._holder())
            except SQLAlchemyError as exc:  # the first answer stands
                _log.error('budget-reclaim', 'pai-usage: could not reclaim stale budget reservations: %r', exc)
        with self._lock:
            for counter, row in zip(order, seen, strict=True):
                counter.hard_seen = row
            crossed = [w for counter in order for w in self._crossed(counter)]
        return refused, crossed

    def _refuse(self, budget: Budget, counter: _Counter, estimate: Decimal, now: datetime) -> None:
        status = self._status(budget, counter, now)
        if self.mode == 'raise':
            raise BudgetExceeded(status, estimate)
        warnings.warn(status.message, BudgetWarning, stacklevel=4)

    def _release(self, counters: Sequence[_Counter], estimate: Decimal, *, in_db: bool) -> None:
        if not counters or not estimate:
            return
        wake = False
        with self._lock:
            for counter in counters:
                counter.reserved -= estimate
                if in_db and counter.hard_key is not None:
                    counter.released += estimate
                    self._dirty.add(counter)
                    wake = True
        if wake:
            self._wake_sync()

    def _crossed(self, counter: _Counter) -> list[tuple[BudgetStatus, float]]:
        """Soft limits this counter's spend has just reached (call with `_lock` held)."""
        crossed: list[tuple[BudgetStatus, float]] = []
        spent = counter.spent
        for budget in counter.budgets:
            if not budget.warn_at or not budget.limit_usd:
                continue
            used = spent / budget.limit_usd
            for fraction in budget.warn_at:
                mark = (id(budget), fraction)
                if used >= Decimal(str(fraction)) and mark not in counter.warned:
                    counter.warned.add(mark)
                    start = counter.start or (counter.fetched_at or _utcnow()) - cast(timedelta, budget.period)
                    end = counter.end or start + cast(timedelta, budget.period)
                    status = BudgetStatus(
                        budget=budget, key=counter.key, start=start, end=end, spend_usd=spent, reserved_usd=counter.held
                    )
                    crossed.append((status, fraction))
        return crossed

    def _fire(self, crossed: Sequence[tuple[BudgetStatus, float]]) -> None:
        for status, fraction in crossed:
            _log.warning(
                f'budget-warn:{status.budget.label}:{status.key}:{fraction}',
                'pai-usage: budget `%s`%s reached %s%% of $%s: spent $%s',
                status.budget.label,
                f' for {status.key!r}' if status.key else '',
                f'{fraction * 100:g}',
                usd(status.budget.limit_usd),
                usd(status.spend_usd),
            )
            _otel_event(status, fraction)
            if self.on_warning is not None:
                try:
                    self.on_warning(status, fraction)
                except Exception as exc:
                    _log.error('budget-callback', 'pai-usage: a budget `on_warning` callback failed: %r', exc)

    # --- estimates ------------------------------------------------------------------------------------------

    def _estimate_request(
        self, run_id: str | None, provider: str | None, model: str, request_context: ModelRequestContext
    ) -> Decimal:
        if isinstance(self.estimate, Decimal):
            return self.estimate
        if self.estimate == 'max_tokens':
            settings = request_context.model_settings or request_context.model.settings or {}
            max_tokens = cast(dict[str, Any], settings).get('max_tokens')
            if isinstance(max_tokens, int):
                priced = self._max_tokens_price(provider, model, max_tokens)
                if priced is not None:
                    return priced
        with self._lock:
            return self._runs.get(run_id) or Decimal(0)

    def _estimate_direct(self, model: str | None, provider: str | None, max_tokens: int | None) -> Decimal:
        if isinstance(self.estimate, Decimal):
            return self.estimate
        if self.estimate == 'max_tokens' and max_tokens is not None and model is not None:
            priced = self._max_tokens_price(provider, model, max_tokens)
            if priced is not None:
                return priced
        with self._lock:
            return self._last_direct.get(model) or Decimal(0)

    def _max_tokens_price(self, provider: str | None, model: str, max_tokens: int) -> Decimal | None:
        cache_key = (provider, model, max_tokens)
        if cache_key not in self._price_cache:
            usage = genai_prices.Usage(output_tokens=max_tokens)
            price = None
            # The model's `system` may not be a genai-prices provider (a wrapper, a test model): then by name only.
            for provider_id in dict.fromkeys((provider, None)):
                try:
                    price = genai_prices.calc_price(usage, model, provider_id=provider_id).total_price
                    break
                except (LookupError, ValueError):
                    continue
            self._price_cache[cache_key] = price
        return self._price_cache[cache_key]

    # --- hard-mode sync -------------------------------------------------------------------------------------

    def _take_deltas(self, counters: Sequence[_Counter]) -> list[tuple[_Counter, Decimal, Decimal]]:
        """Take the deltas of `counters` (their send locks held) to send; counters dirtied since stay dirty."""
        with self._lock:
            taken = [(c, c.spent_delta, c.released) for c in counters if c.spent_delta or c.released]
            for counter in counters:
                self._dirty.discard(counter)
                counter.spent_delta = counter.released = Decimal(0)
        return taken

    def _put_back(self, taken: Iterable[tuple[_Counter, Decimal, Decimal]], *, dirty: bool = True) -> None:
        """Return deltas a statement took but did not apply, to go with the next one."""
        with self._lock:
            for counter, spent_delta, released in taken:
                counter.spent_delta += spent_delta
                counter.released += released
                if dirty and (spent_delta or released):
                    self._dirty.add(counter)

    def _wake_sync(self) -> None:
        self._start_sync()
        self._sync_wake.set()

    def _start_sync(self) -> None:
        self._holder()  # a forked child starts its own thread
        if self._sync_thread is None and not self._closed:
            with self._lock:
                if self._sync_thread is None:
                    self._sync_thread = threading.Thread(
                        target=_sync_loop, args=(weakref.ref(self),), name='pai-usage-budgets', daemon=True
                    )
                    self._sync_thread.start()

    def _holder(self) -> str:
        """This process's name on the hold rows: one per enforcer and process (a forked child gets its own)."""
        pid = os.getpid()
        if self._holder_pid != pid:
            if self._holder_pid:
                self._sync_thread = None  # the parent's thread did not survive the fork
            self._holder_pid = pid
            self._holder_name = f'{socket.gethostname()[:100]}-{pid}-{uuid4().hex[:12]}'
        return self._holder_name

    def _keep_holds(self) -> None:
        """From the sync thread: heartbeat this process's holds, and now and then reclaim dead processes' holds."""
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.hold_ttl / 4
            _hard.heartbeat(self.tracker.engine, self._holder())
        if now >= self._last_reclaim + self.hold_ttl / 2:
            self._reclaim_stale(on_refusal=False)

    def _reclaim_stale(self, *, on_refusal: bool) -> bool:
        """Give back the holds of processes silent for `hold_ttl` (at most every `hold_ttl / 4` s on refusals)."""
        now = time.monotonic()
        if on_refusal and now < self._last_reclaim + self.hold_ttl / 4:
            return False
        self._last_reclaim = now
        freed = _hard.reclaim(self.tracker.engine, datetime.now(UTC) - timedelta(seconds=self.hold_ttl))
        if freed:
            _log.warning(
                'budget-reclaim',
                'pai-usage: gave back $%s of budget reservations held by processes silent for %gs (killed?)',
                usd(freed),
                self.hold_ttl,
            )
        return freed > 0

    def _record_refusal(self, exc: BudgetExceeded, **fields: Any) -> None:
        if not self.record_refusals:
            return
        # Like the capability's own rows: never raises (a held warning would replace the `BudgetExceeded`).
        self.tracker._track(  # pyright: ignore[reportPrivateUsage]
            None,
            {
                **fields,
                'status': 'refused',
                'cost_usd': Decimal(0),
                'pricing_status': 'priced',
                'price_source': REFUSED_SOURCE,
                'metadata': {
                    'budget': exc.budget.label,
                    'budget_scope': exc.scope,
                    'budget_spent_usd': usd(exc.spend_usd),
                    'budget_reserved_usd': usd(exc.reserved_usd),
                    'budget_limit_usd': usd(exc.limit_usd),
                },
            },
        )


def _sync_loop(ref: weakref.ref[EnforceBudgets[Any]]) -> None:
    """Send hard-mode deltas shortly after they appear; a failing database is retried with backoff."""
    backoff = 0.0
    while True:
        enforcer = ref()
        if enforcer is None:
            return
        wake = enforcer._sync_wake  # pyright: ignore[reportPrivateUsage]
        closed = enforcer._closed  # pyright: ignore[reportPrivateUsage]
        interval = enforcer.hold_ttl / 4  # the heartbeat's: never sleep past it
        del enforcer  # never hold the enforcer while waiting
        if closed:
            return
        wake.wait(max(backoff, min(1.0, interval)))
        wake.clear()
        enforcer = ref()
        if enforcer is None:
            return
        try:
            with sqlite_gate(enforcer.tracker.engine.dialect.name):
                enforcer.sync()
                enforcer._keep_holds()  # pyright: ignore[reportPrivateUsage]
            backoff = 0.0
        except SQLAlchemyError as exc:
            _log.error('budget-sync', 'pai-usage: could not send budget counters, retrying: %r', exc)
            backoff = min(max(backoff * 2, 0.1), 10.0)
            wake.wait(backoff)
        del enforcer


def _close_all() -> None:
    """At exit: send every hard-mode enforcer's last settled spend and releases to its counters."""
    with _enforcers_lock:
        enforcers = [e for registry in list(_enforcers.values()) for e in list(registry.values())]
    for enforcer in enforcers:
        if enforcer.hard and not enforcer._closed:  # pyright: ignore[reportPrivateUsage]
            enforcer.close()


atexit.register(_close_all)


def reserve_direct(
    tracker: UsageTracker,
    *,
    organization_id: str | None,
    user_id: str | None,
    provider: str | None,
    model: str | None,
    operation: str,
    run_id: str | None = None,
    agent_name: str | None = None,
    max_tokens: int | None = None,
) -> list[BudgetHold]:
    """Reserve budget for one direct API call recorded through `tracker` (the Gemini mixin's hook).

    Every `EnforceBudgets` of the tracker reserves its estimate; a refusal is recorded as a `status='refused'`
    row and raised as `BudgetExceeded` (after releasing what other enforcers reserved). Release the holds once
    the call's record has been tracked.
    """
    with _enforcers_lock:
        registered = _enforcers.get(tracker)
        enforcers = list(registered.values()) if registered is not None else []
    holds: list[BudgetHold] = []
    organization_id, user_id = normalize_label(organization_id), normalize_label(user_id)
    for enforcer in enforcers:
        estimate = enforcer._estimate_direct(model, provider, max_tokens)  # pyright: ignore[reportPrivateUsage]
        try:
            holds.append(enforcer.reserve(organization_id=organization_id, user_id=user_id, estimate=estimate))
        except BudgetExceeded as exc:
            for hold in holds:
                hold.release()
            enforcer._record_refusal(  # pyright: ignore[reportPrivateUsage]
                exc,
                organization_id=organization_id,
                user_id=user_id,
                provider=provider,
                model=model,
                operation=operation,
                source='direct',
                run_id=run_id,
                agent_name=agent_name,
            )
            raise
    return holds


def _record_targets(organization_id: str | None, user_id: str | None) -> tuple[tuple[Dimension, str | None], ...]:
    targets: list[tuple[Dimension, str | None]] = [('all', None)]
    if organization_id is not None:
        targets.append(('organization', organization_id))
    if user_id is not None:
        targets.append(('user', user_id))
    return tuple(targets)


def _otel_event(status: BudgetStatus, fraction: float) -> None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - the `[logfire]` extra is not installed
        return
    trace.get_current_span().add_event(
        WARNING_EVENT,
        {
            'pai_usage.budget': status.budget.label,
            'pai_usage.budget.scope': status.scope,
            'pai_usage.budget.threshold': fraction,
            'pai_usage.budget.limit_usd': float(status.budget.limit_usd),
            'pai_usage.budget.spent_usd': float(status.spend_usd),
            'pai_usage.budget.period_start': status.start.isoformat(),
        },
    )


def _attribution(deps: Any) -> tuple[str | None, str | None]:
    """Who pays for a run with `deps`, as `TrackUsage` attributes its rows: the budgets that apply are its payer's."""
    organization_id = payer_label(read_attribute(deps, 'organization_id'))
    user_id = payer_label(read_attribute(deps, 'user_id'))
    context = current_usage_context()
    if context is not None:
        organization_id, user_id = inherited_payer(context, organization_id, user_id)
    return normalize_label(organization_id), normalize_label(user_id)


def _given_or_ambient(deps: Any, organization_id: str | None, user_id: str | None) -> tuple[str | None, str | None]:
    if organization_id is None and user_id is None:
        return _attribution(deps)
    return normalize_label(organization_id), normalize_label(user_id)


def _has_ledger(engine: sa.Engine) -> bool:
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).has_table('token_usage')
    except SQLAlchemyError:
        return True  # unreachable: report the original error


def _spend(engine: sa.Engine, dim: Dimension, key: str | None, start: datetime, end: datetime) -> Decimal:
    summary = query_summary(
        engine,
        start,
        end,
        organization_id=key if dim == 'organization' else None,
        user_id=key if dim == 'user' else None,
        group_by=(),
    )
    return summary.totals.cost_usd


def budget_report(engine: sa.Engine, budgets: Sequence[Budget], *, now: datetime | None = None) -> list[BudgetStatus]:
    """Spend and reservations against every budget for the current period; per-tenant budgets list each key.

    What `pai-usage budgets` prints (through `format_budgets`), computed as `EnforceBudgets` does: the same
    periods, the same ledger sums, and the hard-mode counters where they exist (their spend when higher than
    the ledger's, since it includes settled requests the writers have not written yet, and their reservations).
    """
    now = now or _utcnow()
    rows: list[tuple[Budget, Dimension, str | None, datetime, datetime, Decimal]] = []
    for budget in budgets:
        start, end = period_bounds(budget.period, now, budget.timezone)
        read_end = now + cast(timedelta, budget.period) if budget.rolling else end
        if budget.scope is None:
            dim: Dimension = (
                'organization' if budget.organization_id is not None else 'user' if budget.user_id else 'all'
            )
            key = budget.organization_id if dim == 'organization' else budget.user_id
            rows.append((budget, dim, key, start, end, _spend(engine, dim, key, start, read_end)))
            continue
        kind = budget.scope if isinstance(budget.scope, str) else budget.scope_kind
        group: Literal['organization', 'user'] = 'organization' if kind == 'organization' else 'user'
        summary = query_summary(engine, start, read_end, group_by=(group,))
        for row in summary.rows:
            key = row.group[group]
            if key is not None:
                rows.append((budget, group, key, start, end, row.totals.cost_usd))
    keys = [
        (scope_name(dim, key), period_name(budget.period, budget.timezone), start)
        for budget, dim, key, start, _, _ in rows
        if not budget.rolling
    ]
    counters = _hard.read(engine, keys)
    statuses: list[BudgetStatus] = []
    for budget, dim, key, start, end, spent in rows:
        reserved = Decimal(0)
        found = counters.get((scope_name(dim, key), period_name(budget.period, budget.timezone), start))
        if found is not None:
            spent, reserved = max(spent, found[0]), found[1]
        statuses.append(
            BudgetStatus(budget=budget, key=key, start=start, end=end, spend_usd=spent, reserved_usd=reserved)
        )
    return statuses


def format_budgets(statuses: Iterable[BudgetStatus]) -> str:
    """A plain-text table of spend, reservations and what remains against each limit (`pai-usage budgets`).

    Money in the one format of every pai-usage table (`$1,234.5678`); it fits 100 columns.
    """
    from .._format import format_usd

    lines = [
        f'{"budget":<16} {"key":<10} {"spend":>11} {"reserved":>9} {"remaining":>11} {"limit":>10} {"used":>5} '
        f'{"resets (UTC)":<10}'
    ]
    for status in statuses:
        limit = status.budget.limit_usd
        used = status.spend_usd / limit if limit else Decimal(1 if status.spend_usd else 0)
        flag = ' EXCEEDED' if status.exceeded else ''
        resets = status.resets_at
        if resets is None:
            shown = 'rolling'
        elif (resets.hour, resets.minute, resets.second, resets.microsecond) == (0, 0, 0, 0):
            shown = f'{resets:%Y-%m-%d}'
        else:
            shown = f'{resets:%Y-%m-%d %H:%M}'
        lines.append(
            f'{_shorten(status.budget.label, 16):<16} {_shorten(status.key or "-", 10):<10} '
            f'{format_usd(status.spend_usd):>11} {format_usd(status.reserved_usd):>9} '
            f'{format_usd(status.remaining_usd):>11} {format_usd(limit):>10} {used:>5.0%} {shown:<10}{flag}'
        )
    return '\n'.join(line.rstrip() for line in lines)


def _shorten(text: str, width: int) -> str:
    from .._format import visible

    text = visible(text)  # escaped before it is cut: never half an escape sequence
    return text if len(text) <= width else text[: width - 1] + '\u2026'
