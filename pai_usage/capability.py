"""`TrackUsage`: a PydanticAI capability that records every model request of a run in the ledger.

```python
pai_usage.configure('postgresql://...')
agent = Agent('openai:gpt-4o', deps_type=UsageDeps, capabilities=[TrackUsage()])
await agent.run('Hi', deps=UsageDeps(user_id='u1', organization_id='org1'))
```

Rows written for a run (all with `source='agent'`, the run's `run_id` and attribution):

- `agent_request`: one per model response, from `after_model_request`, with the response's own model,
  provider, provider response id, tokens and pydantic-ai's cost. Attempts a `FallbackModel` (or the
  `ModelFallback` capability) moved on from get a row each with `status='error'`.
- `agent_run_remainder`: usage pydantic-ai counted in the run's `RunUsage` that no row recorded, e.g. that of
  a delegated sub-agent without this capability. Written when the run ends, so the rows of a run (and of the
  sub-agents sharing its usage) add up to `result.usage`, each token once.
- `agent_run`: a zero-token marker with `status='error'` and the exception type in `metadata`, written only
  when the run fails (tool error, usage limit, exhausted retries, timeout, cancellation).

The capability never raises into the run and never waits on I/O: it only calls `UsageTracker.track()`.
"""

from __future__ import annotations

import dataclasses
import threading
from copy import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from time import perf_counter
from typing import Any, ClassVar, cast

import genai_prices
import pydantic_ai
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import WrapModelRequestHandler, WrapRunHandler
from pydantic_ai.messages import ModelRequestAttempt, ModelResponse
from pydantic_ai.models import ModelRequestContext
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage, RunUsage

from ._log import RateLimitedLog
from ._warnings import MissingAttributionWarning, PaiUsageWarning, warn_once
from .context import UsageContext, current_usage_context, usage_context
from .tracker import UsageTracker, get_tracker
from .usage import TokenCounts

__all__ = ('PYDANTIC_AI_PRICE_SOURCE', 'TrackUsage')

PYDANTIC_AI_PRICE_SOURCE = f'pydantic-ai {pydantic_ai.__version__} / genai-prices {genai_prices.__version__}'
"""`price_source` of rows whose cost pydantic-ai computed (`response.usage.cost`)."""

_log = RateLimitedLog()
_once = RateLimitedLog(interval=float('inf'))

# Attributes of a usage object that are not token counts (or are mapped explicitly).
_NOT_EXTRA = frozenset(f.name for f in dataclasses.fields(RunUsage)) | {'requests', 'tool_calls', 'cost'}
# Counts `_token_columns` can map without `TokenCounts` (anything else takes the general path).
_PLAIN_TEXT_COUNTS = frozenset(
    {'input_tokens', 'cache_read_tokens', 'cache_write_tokens', 'output_tokens', 'output_reasoning_tokens'}
    | {'details', 'cost', 'requests', 'tool_calls', 'unmeasured_requests'}
)
# Attributes of a `RunUsage` that are not usage to reconcile.
_NOT_COUNTS = frozenset({'requests', 'tool_calls', 'details', 'cost', 'unmeasured_requests'})


@dataclass(eq=False)
class _Shared:
    """One `RunUsage` object and what the tracked runs using it recorded.

    Delegated runs share their caller's `RunUsage` (`usage=ctx.usage`), so each sees the others' usage in it.
    The last tracked run to finish with it reconciles: whatever the object gained since the first one started
    that no tracked run recorded (untracked sub-agents, responses no hook saw) becomes its remainder row.
    """

    usage: RunUsage
    start: RunUsage
    recorded: RunUsage = field(default_factory=RunUsage)
    runs: int = 0


_shared: dict[int, _Shared] = {}
_active_runs: set[str | None] = set()
_shared_lock = threading.Lock()


@dataclass(eq=False)
class _Run:
    """Per-run state of a `TrackUsage`."""

    tracker: UsageTracker
    base: dict[str, Any]
    """The fields every row of the run shares."""
    context: UsageContext
    """The usage context current while the run is active."""
    shared: _Shared
    pending: list[ModelResponse] = field(default_factory=list[ModelResponse])


@dataclass
class TrackUsage(AbstractCapability[Any]):
    """Record each model request of an agent run as a `token_usage` row.

    Attribution comes from the run's deps (`UsageDeps`, or anything with `user_id` / `organization_id`), else
    from the enclosing `pai_usage.usage_context` (e.g. the parent run of a delegated sub-agent). Rows go to
    `deps.tracker`, else this capability's `tracker`, else the ambient context's, else `pai_usage.get_tracker()`.
    While the run is active, it is the current `UsageContext`, so sub-agents and direct Gemini calls made in
    its tools are attributed to the same organization and user and linked to the run.
    """

    tracker: UsageTracker | None = None
    """Tracker to record to when the deps name none."""
    metadata: dict[str, Any] | None = field(default=None, kw_only=True)
    """Extra JSON metadata stored on every row this capability writes."""

    errors: ClassVar[int] = 0
    """How many times tracking failed inside a run (logged, never raised). Process-wide."""

    # Per-run state, by run id. Not a `for_run` copy: pydantic-ai re-extracts a replaced capability's
    # configuration on every run, which costs more than everything this capability does (~100 us a run).
    _runs: dict[str | None, _Run] = field(default_factory=dict[str | None, _Run], init=False, repr=False, compare=False)

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        """Make the run the current `UsageContext`; when it ends, however it ends, record the remainder and marker."""
        run: _Run | None = self._guard(self._start, ctx)
        if run is None:
            return await handler()
        self._runs[ctx.run_id] = run
        try:
            with usage_context(run.context):
                result = await handler()
        except BaseException as exc:
            self._guard(self._finish, run, exc)
            raise
        self._guard(self._finish, run, None)
        return result

    async def wrap_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, handler: WrapModelRequestHandler
    ) -> ModelResponse:
        """Time the request; record its responses and failed attempts once it is settled."""
        run = self._runs.get(ctx.run_id)
        if run is None:
            return await handler(request_context)
        start = perf_counter()
        try:
            response = await handler(request_context)
        except BaseException as exc:
            self._guard(self._settle, run, None, start, exc)
            raise
        self._guard(self._settle, run, response, start, None)
        return response

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: ModelResponse
    ) -> ModelResponse:
        """Note the response, unchanged; it is recorded when its request is settled."""
        run = self._runs.get(ctx.run_id)
        if run is not None:
            # Recorded when `wrap_model_request` returns: only then is it known whether a later hook or a
            # fallback rejected this response, and how long the request took.
            run.pending.append(response)
        return response

    # --- internals ---

    def _guard(self, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except PaiUsageWarning:
            raise  # a developer mistake, raised because strict mode or a warning filter asks for it
        except Exception as exc:
            TrackUsage.errors += 1
            _log.error('capability', 'pai-usage: TrackUsage failed, usage may be incomplete: %r', exc, exc_info=True)
            return None

    def _start(self, ctx: RunContext[Any]) -> _Run | None:
        if ctx.run_id in _active_runs:
            # Two `TrackUsage` on one run (the agent's and the run's): the outer one records it.
            return None
        deps = ctx.deps
        outer = current_usage_context()
        organization_id = _label(getattr(deps, 'organization_id', None))
        user_id = _label(getattr(deps, 'user_id', None))
        if outer is not None:
            organization_id = organization_id or outer.organization_id
            user_id = user_id or outer.user_id
        if (
            organization_id is None
            and user_id is None
            and not (hasattr(deps, 'organization_id') or hasattr(deps, 'user_id'))
        ):
            deps_type = type(cast(object, deps))
            kind = deps_type.__qualname__
            _once.warning(
                f'attribution:{kind}:{id(deps_type)}',
                'pai-usage: deps of type `%s` have no `user_id` / `organization_id`; usage of runs with them is '
                'recorded with NULL attribution. Use `pai_usage.UsageDeps` or add those attributes.',
                kind,
            )
            warn_once(
                f'attribution:{kind}:{id(deps_type)}',
                f'pai-usage: deps of type `{kind}` have no `user_id` / `organization_id`; usage of runs with them '
                'is recorded with NULL attribution. Use `pai_usage.UsageDeps` or add those attributes.',
                MissingAttributionWarning,
                stacklevel=4,
            )
        deps_tracker = getattr(deps, 'tracker', None)
        tracker = (
            deps_tracker
            if isinstance(deps_tracker, UsageTracker)
            else self.tracker or (outer.tracker if outer is not None else None) or get_tracker()
        )
        agent = ctx.agent
        agent_name = agent.name if agent is not None else None
        parent_run_id = outer.run_id if outer is not None and outer.run_id != ctx.run_id else None
        metadata = (
            {**(outer.metadata or {}), **(self.metadata or {})} if outer is not None else dict(self.metadata or {})
        )
        usage = ctx.usage
        base = {
            'organization_id': organization_id,
            'user_id': user_id,
            'source': 'agent',
            'run_id': ctx.run_id,
            'parent_run_id': parent_run_id,
            'agent_name': agent_name,
            'metadata': metadata,
        }
        context = UsageContext(
            organization_id=organization_id,
            user_id=user_id,
            run_id=ctx.run_id,
            agent_name=agent_name,
            tracker=tracker,
            metadata=metadata or None,
        )
        with _shared_lock:
            shared = _shared.get(id(usage))
            if shared is None or shared.usage is not usage:
                shared = _shared[id(usage)] = _Shared(usage, copy(usage))
            shared.runs += 1
            _active_runs.add(ctx.run_id)
        return _Run(tracker=tracker, base=base, context=context, shared=shared)

    def _settle(self, run: _Run, final: ModelResponse | None, start: float, error: BaseException | None) -> None:
        """Record the responses and failed attempts of one request step."""
        pending, run.pending = run.pending, []
        elapsed_ms = (perf_counter() - start) * 1000
        attempts: list[ModelRequestAttempt] = list(
            final.failed_attempts or () if final is not None else getattr(error, 'attempts', ()) or ()
        )
        for attempt in attempts:
            elapsed_ms -= attempt.duration.total_seconds() * 1000
            usage = attempt.usage
            seen = next((r for r in pending if usage is not None and r.usage is usage), None)
            if seen is not None:
                # A hook rejected a response we already saw: one row for it, as the failed attempt it became.
                pending.remove(seen)
            self._record_attempt(run, attempt, seen)
        for response in pending:
            self._record_response(run, response, 'ok', elapsed_ms if response is pending[-1] else None)

    def _record_response(
        self, run: _Run, response: ModelResponse, status: str, duration_ms: float | None, **extra: Any
    ) -> None:
        usage = response.usage
        fields = self._row(run, 'agent_request', usage, response.provider_name, response.model_name, status)
        fields['request_id'] = response.provider_response_id
        fields['created_at'] = _aware(response.timestamp)
        if duration_ms is not None:
            fields['duration_ms'] = max(round(duration_ms), 0)
        if response.state != 'complete':
            extra['response_state'] = response.state  # e.g. `interrupted`: a stream stopped early
        if extra:
            fields['metadata'] = {**fields['metadata'], **extra}
        run.tracker.track(**fields)
        _add(run.shared.recorded, usage)

    def _record_attempt(self, run: _Run, attempt: ModelRequestAttempt, seen: ModelResponse | None) -> None:
        extra: dict[str, Any] = {'attempt_outcome': attempt.outcome}
        if attempt.error:
            # Only the exception type: provider error messages may quote the prompt.
            extra['error_type'] = attempt.error.split(':', 1)[0]
        duration_ms = attempt.duration.total_seconds() * 1000
        if seen is not None:
            self._record_response(run, seen, 'error', duration_ms, **extra)
            return
        usage = attempt.usage or RequestUsage()
        fields = self._row(run, 'agent_request', usage, attempt.provider_name, attempt.model_name, 'error')
        fields['created_at'] = _aware(attempt.timestamp)
        fields['duration_ms'] = max(round(duration_ms), 0)
        fields['metadata'] = {**fields['metadata'], **extra}
        run.tracker.track(**fields)
        if attempt.usage is not None:
            _add(run.shared.recorded, attempt.usage)

    def _row(
        self,
        run: _Run,
        operation: str,
        usage: RequestUsage | RunUsage,
        provider: str | None,
        model: str | None,
        status: str,
    ) -> dict[str, Any]:
        fields = {
            **run.base,
            'operation': operation,
            'provider': provider,
            'model': model,
            'status': status,
            **_token_columns(usage),
        }
        if usage.audio_seconds:
            fields['units'] = Decimal(str(usage.audio_seconds))
            fields['unit_type'] = 'audio_second'
        if usage.cost is not None:
            fields['cost_usd'] = usage.cost
            fields['pricing_status'] = 'priced'
            fields['price_source'] = PYDANTIC_AI_PRICE_SOURCE
        return fields

    def _finish(self, run: _Run, error: BaseException | None) -> None:
        """Record what the run's responses did not show, and the failure marker; release shared state."""
        self._runs.pop(run.base['run_id'], None)
        with _shared_lock:
            _active_runs.discard(run.base['run_id'])
        status = 'ok' if error is None else 'error'
        if run.pending:  # seen by `after_model_request` outside any `wrap_model_request` (defensive)
            pending, run.pending = run.pending, []
            for response in pending:
                self._guard(self._record_response, run, response, 'ok', None)
        remainder = _release(run.shared)
        if remainder is not None:
            # Which model spent it is unknown (an untracked sub-agent may use any): NULL model, and
            # pydantic-ai's cost of those requests when it had one, else unpriced.
            run.tracker.track(**self._row(run, 'agent_run_remainder', remainder, None, None, status))
        if error is not None:
            fields = self._row(run, 'agent_run', RequestUsage(), None, None, 'error')
            fields['metadata'] = {**fields['metadata'], 'error_type': type(error).__name__}
            fields['cost_usd'] = Decimal(0)
            fields['pricing_status'] = 'priced'
            run.tracker.track(**fields)


def _release(shared: _Shared) -> RunUsage | None:
    """Let go of `shared`; the last run to do so gets the usage no tracked run recorded, if any."""
    with _shared_lock:
        shared.runs -= 1
        if shared.runs:
            return None
        if _shared.get(id(shared.usage)) is shared:
            del _shared[id(shared.usage)]
    now, start, recorded = shared.usage.__dict__, shared.start.__dict__, shared.recorded.__dict__
    remainder = RunUsage()
    found = False
    for key, value in now.items():
        if key not in _NOT_COUNTS and type(value) in (int, float):
            value = value - start.get(key, 0) - recorded.get(key, 0)
            if value > 0:
                setattr(remainder, key, value)
                found = True
    if not found:
        return None
    now_details, start_details = shared.usage.details, shared.start.details
    recorded_details = shared.recorded.details
    for key, value in now_details.items():
        value = value - start_details.get(key, 0) - recorded_details.get(key, 0)
        if value > 0:
            remainder.details[key] = value
    cost = (shared.usage.cost or 0) - (shared.start.cost or 0) - (shared.recorded.cost or 0)
    remainder.cost = Decimal(cost) if cost > 0 else None
    return remainder


def _add(total: RunUsage, usage: RequestUsage | RunUsage) -> None:
    """`total.incr(usage)` for what the reconciliation needs, looking only at the counts `usage` has."""
    counts = total.__dict__
    for key, value in usage.__dict__.items():
        if key not in _NOT_COUNTS and type(value) in (int, float):
            counts[key] = counts.get(key, 0) + value
    if usage.details:
        details = total.details
        for key, value in usage.details.items():
            if type(value) is int:
                details[key] = details.get(key, 0) + value
    if usage.cost is not None:
        total.cost = (total.cost or 0) + usage.cost


def _token_columns(usage: RequestUsage | RunUsage) -> dict[str, Any]:
    """pydantic-ai's inclusive counts as the ledger's non-overlapping bucket columns."""
    if not usage.details and usage.__dict__.keys() <= _PLAIN_TEXT_COUNTS:
        # The common case (text in and out, maybe cached or reasoning), without building a `TokenCounts`;
        # `from_inclusive` below gives the same columns.
        plain_input = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
        plain_output = usage.output_tokens - usage.output_reasoning_tokens
        if plain_input >= 0 and plain_output >= 0:
            return {
                'input_tokens': plain_input,
                'cache_read_tokens': usage.cache_read_tokens,
                'cache_write_tokens': usage.cache_write_tokens,
                'input_audio_tokens': 0,
                'output_tokens': plain_output,
                'reasoning_tokens': usage.output_reasoning_tokens,
                'output_audio_tokens': 0,
                'output_image_tokens': 0,
                'details': {},
            }
    extra: dict[str, int] = {
        k: v for k, v in usage.__dict__.items() if k not in _NOT_EXTRA and type(v) is int and v > 0
    }
    output_image_tokens = extra.pop('output_image_tokens', 0)
    details = {k: v for k, v in usage.details.items() if type(v) is int and v > 0}
    details.update(extra)
    if usage.cache_write_1h_tokens:
        details['cache_write_1h_tokens'] = usage.cache_write_1h_tokens
    return TokenCounts.from_inclusive(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        input_audio_tokens=usage.input_audio_tokens,
        cache_audio_read_tokens=usage.cache_audio_read_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.output_reasoning_tokens,
        output_audio_tokens=usage.output_audio_tokens,
        output_image_tokens=output_image_tokens,
        details=details,
    ).as_columns()


def _label(value: object) -> str | None:
    return None if value is None or value == '' else str(value)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
