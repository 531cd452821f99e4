"""`TrackUsage`: a PydanticAI capability that records every model request of a run in the ledger.

```python
pai_usage.configure('postgresql://...')
agent = Agent('openai:gpt-4o', deps_type=UsageDeps, capabilities=[TrackUsage()])
await agent.run('Hi', deps=UsageDeps(user_id='u1', organization_id='org1'))
```

Rows written for a run (all with `source='agent'`, the run's `run_id` and attribution):

- `agent_request`: one per model response, with the response's own model, provider, provider response id,
  tokens and pydantic-ai's cost, and what it priced the response with: the `service_tier`, and the rest of the
  price context (Anthropic's fast mode) in `metadata.price_context`, so that a reprice gives the same. Attempts
  a `FallbackModel` (or the `ModelFallback` capability, or any hook raising `RetryModelRequest`) moved on from
  get a row each with `status='error'`, also when the request then fails, times out or is cancelled. A stream
  that ends early, fails or times out is a row of what it billed, with its `response_state` in `metadata`.
- `agent_run_remainder`: usage pydantic-ai counted in the run's `RunUsage` that no row recorded, e.g. that of
  a delegated sub-agent without this capability. Written when the run ends and every request in flight has
  settled, so the rows of a run (and of the sub-agents sharing its usage) add up to `result.usage`, each token
  once.
- `agent_run`: a zero-token marker with `status='error'` and the exception type in `metadata`, written only
  when the run fails (tool error, usage limit, exhausted retries, timeout, cancellation).

How it hooks in, chosen for cost: pydantic-ai copies the run context for every hook of every capability,
so the capability overrides as few hooks as it can. `wrap_run` opens and closes the run's books and makes the
run the current `UsageContext`; `get_wrapper_model` wraps the model serving each attempt, which sees every
request, stream, error and the attempts a model carries; `after_model_request` (the capability sorts itself
outermost, so its hook runs after every other's) is where a response is known to be accepted.

The capability never raises into the run and never waits on I/O: it only calls `UsageTracker.track()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from copy import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar, Self, cast

import genai_prices
import pydantic_ai
from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
from pydantic_ai.capabilities.abstract import WrapRunHandler
from pydantic_ai.messages import ModelMessage, ModelRequestAttempt, ModelResponse
from pydantic_ai.models import Model, ModelRequestContext, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.run import AgentRunResult
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage, RunUsage

from ._locks import ForkSafeLock
from ._log import RateLimitedLog, logger
from ._warnings import MissingAttributionWarning, PaiUsageWarning, emit, first_for_type
from .context import UsageContext, current_usage_context, has_attribute, inherited_payer, payer_label, read_attribute
from .context import _current as _current_context  # pyright: ignore[reportPrivateUsage]
from .pricing import PRICE_CONTEXT_KEY, response_price_context
from .tracker import UsageTracker, get_tracker
from .usage import TokenCounts

try:  # The reader of the attempts pydantic-ai 2.68+ carries on an error that ends a request.
    from pydantic_ai._model_request_attempts import carried_attempts as _carried_attempts
except ImportError:  # pragma: no cover - older or newer pydantic-ai: read the attribute it is stored in

    def _carried_attempts(error: BaseException) -> list[ModelRequestAttempt]:
        return list(getattr(error, '_pydantic_ai_failed_attempts', None) or ())


try:  # pydantic-ai's own pricing of a response, for the partial response of a stream that ended early.
    from pydantic_ai._genai_prices import fill_response_cost as _fill_response_cost
except ImportError:  # pragma: no cover - the tracker prices the row itself, with genai-prices too

    def _fill_response_cost(response: ModelResponse) -> None:
        pass


try:  # The run context pydantic-ai sets around each model call (`model_request` / `model_request_stream`).
    from pydantic_ai._run_context import get_current_run_context as _current_run_context
except ImportError:  # pragma: no cover

    def _current_run_context() -> RunContext[Any] | None:
        return None


__all__ = ('PYDANTIC_AI_PRICE_SOURCE', 'TrackUsage')

PYDANTIC_AI_PRICE_SOURCE = f'pydantic-ai {pydantic_ai.__version__} / genai-prices {genai_prices.__version__}'
"""`price_source` of rows whose cost pydantic-ai computed (`response.usage.cost`)."""

_log = RateLimitedLog()


def _warn_unattributed(deps_type: type) -> None:
    """Log and warn once per deps type that carries no attribution."""
    if not first_for_type('attribution', deps_type):
        return
    message = (
        f'pai-usage: deps of type `{deps_type.__qualname__}` have no `user_id` / `organization_id`; usage of runs '
        'with them is recorded with NULL attribution. Use `pai_usage.UsageDeps` or add those attributes.'
    )
    logger.warning('%s', message)
    emit(
        message,
        MissingAttributionWarning,
        stacklevel=5,
    )


# Attributes of a usage object that are not token counts (or are mapped explicitly).
_NOT_EXTRA = frozenset(f.name for f in dataclasses.fields(RunUsage)) | {'requests', 'tool_calls', 'cost'}
# Counts `_token_columns` can map without `TokenCounts` (anything else takes the general path).
_PLAIN_TEXT_COUNTS = frozenset(
    {'input_tokens', 'cache_read_tokens', 'cache_write_tokens', 'output_tokens', 'output_reasoning_tokens'}
    | {'details', 'cost', 'requests', 'tool_calls', 'unmeasured_requests'}
)
# Attributes of a `RunUsage` that are not usage to reconcile.
_NOT_COUNTS = frozenset({'requests', 'tool_calls', 'details', 'cost', 'unmeasured_requests'})
# Ways a request stops without failing: the consumer broke off, the run was cancelled or timed out.
_STOPPED = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)


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
_shared_lock = ForkSafeLock()


@dataclass(eq=False, slots=True)
class _Request:
    """One attempt at a model request, from the moment the wrapper sends it until its response is settled."""

    start: float
    """`perf_counter()` when it was sent."""
    step: int | None
    """The run step it belongs to: a later attempt in the same step means a hook rejected this one."""
    response: ModelResponse | None = None
    """What the model returned, until it is recorded."""
    duration_ms: float | None = None
    """Wall time of the call, set when the model returned."""
    streamed: bool = False
    """A stream that ended without an error: until `after_model_request` accepts it, it may have been cut short."""


@dataclass(eq=False, slots=True)
class _Run:
    """Per-run state of a `TrackUsage`: the run's books."""

    owner: TrackUsage
    """The capability recording this run (with two on one run, the outer one)."""
    tracker: UsageTracker
    base: dict[str, Any]
    """The fields every row of the run shares."""
    context: UsageContext
    """The usage context current while the run is active."""
    shared: _Shared
    current: _Request | None = None
    """The latest attempt whose response is not recorded yet."""
    inflight: int = 0
    """Attempts sent and not yet returned or failed: the books close only when this is 0."""
    ended: bool = False
    """`wrap_run` has returned or raised."""
    error: BaseException | None = None
    """What ended the run, if it failed."""
    closed: bool = False
    wrapper: _TrackedModel | None = None
    """The latest model wrapper, reused while the same model serves the run's attempts."""
    seen: set[int] = field(default_factory=set[int])
    """`id()`s of the usage objects and attempts recorded, so that each is recorded once."""
    keep: list[object] = field(default_factory=list[object])
    """The objects `seen` refers to, kept alive so that their ids are not reused during the run."""


# The run being recorded, for the model wrapper: set in `wrap_run`, which pydantic-ai propagates to the run body.
_current_run: ContextVar[_Run | None] = ContextVar('pai_usage_agent_run', default=None)


class _TrackedModel(WrapperModel):
    """The model serving one attempt, wrapped to record what it billed, however the attempt ends.

    `TrackUsage`'s companion: it reports to the capability's private lifecycle methods.
    """

    def __init__(self, wrapped: Model, run: _Run) -> None:
        super().__init__(wrapped)
        self._run = run

    # pydantic-ai wraps each model class's `request` / `request_stream` to restore special tokens and to budget
    # file downloads at the model boundary; the wrapped model's own methods already do both, so not twice here.
    @classmethod
    def _restore_special_tokens_at_the_model_boundary(cls) -> None:
        pass

    @classmethod
    def _budget_downloads_at_the_model_boundary(cls) -> None:
        pass

    # Only ever a capability's serving wrapper, whose scope leaves the wrapped model to its owner to enter and exit.
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> bool | None:
        return None

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        run = self._run
        owner = run.owner
        request = owner._guard(owner._begin, run)  # pyright: ignore[reportPrivateUsage]
        try:
            response = await self.wrapped.request(messages, model_settings, model_request_parameters)
        except BaseException as exc:
            owner._guard(owner._returned, run, request, None, exc)  # pyright: ignore[reportPrivateUsage]
            raise
        owner._guard(owner._returned, run, request, response, None)  # pyright: ignore[reportPrivateUsage]
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        run = self._run
        owner = run.owner
        request = owner._guard(owner._begin, run)  # pyright: ignore[reportPrivateUsage]
        stream: StreamedResponse | None = None
        try:
            async with self.wrapped.request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as stream:
                yield stream
        except BaseException as exc:
            owner._guard(owner._stream_ended, run, request, stream, exc)  # pyright: ignore[reportPrivateUsage]
            raise
        owner._guard(owner._stream_ended, run, request, stream, None)  # pyright: ignore[reportPrivateUsage]


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

    # Per-run state lives in `_Run`, found through `_current_run`. Not a `for_run` copy: pydantic-ai
    # re-extracts a replaced capability's configuration on every run, which costs more than everything this
    # capability does (~100 us a run).

    def get_ordering(self) -> CapabilityOrdering:
        """Outermost: its `after_model_request` runs after every other capability's has accepted the response."""
        return CapabilityOrdering(position='outermost')

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        """Open the run's books and make it the current `UsageContext`; close them once it ended and settled."""
        run: _Run | None = self._guard(self._start, ctx)
        if run is None:
            return await handler()
        token = _current_run.set(run)
        # `usage_context(run.context)` without its generator: the context is complete, nothing to inherit.
        context_token = _current_context.set(run.context)
        try:
            try:
                result = await handler()
            finally:
                _current_context.reset(context_token)
        except BaseException as exc:
            self._guard(self._end, run, exc)
            raise
        finally:
            _current_run.reset(token)
        self._guard(self._end, run, None)
        return result

    def get_wrapper_model(self, model: Model) -> Model | None:
        """Wrap the model serving each attempt of a run this capability records."""
        run = _current_run.get()
        if run is None or run.owner is not self or run.closed:
            return None
        wrapper = run.wrapper
        if wrapper is None or wrapper.wrapped is not model:
            # The wrapper holds no per-attempt state (its scope is a no-op), so a run's attempts on one model share it.
            wrapper = run.wrapper = _TrackedModel(model, run)
        return wrapper

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: ModelResponse
    ) -> ModelResponse:
        """Record the response, unchanged: the hooks that ran before this one accepted it."""
        run = _current_run.get()
        if run is not None and run.owner is self and run.base['run_id'] == ctx.run_id:
            self._guard(self._accepted, run, response)
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
            active = _current_run.get()
            if active is not None and self.tracker is not None and self.tracker is not active.tracker:
                _log.warning(
                    'capability:second-tracker',
                    'pai-usage: a second TrackUsage on one run names another tracker; the run is recorded once, '
                    'by the outer TrackUsage, to its tracker',
                )
            return None
        deps = ctx.deps
        outer = current_usage_context()
        organization_id = payer_label(_read(deps, 'organization_id'))
        user_id = payer_label(_read(deps, 'user_id'))
        if outer is not None:
            organization_id, user_id = inherited_payer(outer, organization_id, user_id)
        if (
            organization_id is None
            and user_id is None
            and not (has_attribute(deps, 'organization_id') or has_attribute(deps, 'user_id'))
        ):
            _warn_unattributed(type(cast(object, deps)))
        deps_tracker = _read(deps, 'tracker')
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
        # Only fields with a value: the record's defaults stand for the rest, and each key costs `track()` and the
        # writer's validation (an empty `metadata` would still go through `safe_metadata`).
        base: dict[str, Any] = {
            'organization_id': organization_id,
            'user_id': user_id,
            'source': 'agent',
            'run_id': ctx.run_id,
            'agent_name': agent_name,
        }
        if parent_run_id is not None:
            base['parent_run_id'] = parent_run_id
        if metadata:
            base['metadata'] = metadata
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
                shared = _shared[id(usage)] = _Shared(usage, cast(RunUsage, usage.__copy__()))
            shared.runs += 1
            _active_runs.add(ctx.run_id)
        return _Run(owner=self, tracker=tracker, base=base, context=context, shared=shared)

    # An attempt's life: `_begin` when the wrapper sends it; `_returned` (or `_stream_ended`) when the model
    # returns or fails; `_accepted` when the outermost `after_model_request` sees its response. A response
    # no `after_model_request` saw is settled by whatever comes next: another attempt (`_begin`) or the end
    # of the run (`_close`).

    def _begin(self, run: _Run) -> _Request:
        run.inflight += 1
        run_context = _current_run_context()
        step = run_context.run_step if run_context is not None else None
        previous = run.current
        if previous is not None and previous.response is not None and previous.response.state == 'suspended':
            # A continuation of the same response (e.g. Anthropic `pause_turn`): the merged response carries the
            # segments' usage when it is accepted; if the chain fails, the run's remainder does.
            run.current = None
        elif previous is not None and previous.response is not None:
            # Its response was never accepted by `after_model_request`: a hook rejected it to make this attempt
            # (same step), or one retried the step with `ModelRetry`, keeping it (a later step).
            run.current = None
            if previous.step is not None and previous.step == step:
                self._record_rejected(run, previous.response, previous.duration_ms)
            else:
                self._record_response(run, previous.response, 'ok', previous.duration_ms)
        request = run.current = _Request(start=perf_counter(), step=step)
        return request

    def _returned(
        self, run: _Run, request: _Request | None, response: ModelResponse | None, error: BaseException | None
    ) -> None:
        """The model returned `response` or raised `error`: record the attempts it made before, keep the response."""
        try:
            if request is None:
                return
            elapsed_ms = (perf_counter() - request.start) * 1000
            if response is not None:
                if response.failed_attempts:
                    # Attempts a `FallbackModel` moved on from are final: record them now, not when the response is.
                    elapsed_ms -= self._record_attempts(run, response.failed_attempts)
                request.response = response
                request.duration_ms = elapsed_ms
            else:
                self._record_attempts(run, _error_attempts(error))
                if run.current is request:
                    run.current = None
        finally:
            self._settled(run)

    def _stream_ended(
        self, run: _Run, request: _Request | None, stream: StreamedResponse | None, error: BaseException | None
    ) -> None:
        """A stream's context exited: record what it billed unless `after_model_request` already did."""
        try:
            if request is None:
                return
            unsettled = run.current is request
            if unsettled and (error is not None or stream is None):
                run.current = None
            if error is not None:
                self._record_attempts(run, _error_attempts(error))
            if stream is None or not unsettled:
                return
            response = stream.get()
            elapsed_ms = (perf_counter() - request.start) * 1000 - self._record_attempts(run, response.failed_attempts)
            if error is None:
                # pydantic-ai exits the stream before `after_model_request` accepts its response: keep it, as
                # `_returned` does; if no hook accepts it (the caller stopped reading), `_close` records this.
                request.response = _priced_copy(response)
                request.duration_ms = elapsed_ms
                request.streamed = True
                return
            run.current = None
            if not (response.usage.has_values() or response.usage.cost) or not self._first_time(run, response.usage):
                return
            status = 'ok' if isinstance(error, _STOPPED) else 'error'
            self._record_cut(run, _priced_copy(response), elapsed_ms, status, error_type=type(error).__name__)
        finally:
            self._settled(run)

    def _accepted(self, run: _Run, response: ModelResponse) -> None:
        request = run.current
        duration_ms = None
        if request is not None:
            run.current = None
            duration_ms = (
                request.duration_ms if request.duration_ms is not None else (perf_counter() - request.start) * 1000
            )
        if response.failed_attempts:
            # Attempts hooks or a `FallbackModel` moved on from before this response: most were recorded already,
            # when the model returned or the next attempt began; their time is not in `duration_ms`.
            self._record_attempts(run, response.failed_attempts)
        self._record_response(run, response, 'ok', duration_ms)

    def _settled(self, run: _Run) -> None:
        run.inflight -= 1
        if run.ended and not run.inflight and not run.closed:
            self._close(run)

    def _end(self, run: _Run, error: BaseException | None) -> None:
        """`wrap_run` is done; a cancelled run's requests may still be unwinding, and close the books when settled."""
        run.ended = True
        run.error = error
        with _shared_lock:
            _active_runs.discard(run.base['run_id'])
        if not run.inflight:
            self._close(run)

    def _close(self, run: _Run) -> None:
        """Record what the run's responses did not show, and the failure marker; release shared state."""
        run.closed = True
        run.wrapper = None  # it refers back to the run: let both go without waiting for the cycle collector
        error = run.error
        try:
            error_attempts = _error_attempts(error) if error is not None else []
            request, run.current = run.current, None
            if request is not None and request.response is not None:
                response = request.response
                if any(a.usage is response.usage for a in error_attempts):
                    self._guard(self._record_rejected, run, response, request.duration_ms)
                elif request.streamed:
                    # A stream no hook accepted: the caller stopped reading it (billed all the same).
                    if response.usage.has_values() or response.usage.cost:
                        self._guard(self._record_cut, run, response, request.duration_ms)
                else:
                    self._guard(self._record_response, run, response, 'ok', request.duration_ms)
            if error_attempts:
                self._guard(self._record_attempts, run, error_attempts)
        finally:
            self._reconcile(run)

    def _reconcile(self, run: _Run) -> None:
        error = run.error
        status = 'ok' if error is None else 'error'
        remainder = _release(run.shared)
        if remainder is not None:
            # Which model spent it is unknown (an untracked sub-agent may use any): NULL model, and
            # pydantic-ai's cost of those requests when it had one, else unpriced.
            run.tracker._track(None, self._row(run, 'agent_run_remainder', remainder, None, None, status))  # pyright: ignore[reportPrivateUsage]
        if error is not None:
            fields = self._row(run, 'agent_run', RequestUsage(), None, None, 'error')
            fields['metadata'] = {**fields.get('metadata', {}), 'error_type': type(error).__name__}
            fields['cost_usd'] = Decimal(0)
            fields['pricing_status'] = 'priced'
            run.tracker._track(None, fields)  # pyright: ignore[reportPrivateUsage]

    def _first_time(self, run: _Run, obj: object) -> bool:
        key = id(obj)
        if key in run.seen:
            return False
        run.seen.add(key)
        run.keep.append(obj)
        return True

    def _record_attempts(self, run: _Run, attempts: list[ModelRequestAttempt] | None) -> float:
        """Record each attempt not recorded yet; return their total duration in ms."""
        total_ms = 0.0
        for attempt in attempts or ():
            total_ms += attempt.duration.total_seconds() * 1000
            if self._first_time(run, attempt) and (attempt.usage is None or self._first_time(run, attempt.usage)):
                self._record_attempt(run, attempt)
        return total_ms

    def _record_rejected(self, run: _Run, response: ModelResponse, duration_ms: float | None) -> None:
        self._record_response(run, response, 'error', duration_ms, attempt_outcome='rejected')

    def _record_response(
        self, run: _Run, response: ModelResponse, status: str, duration_ms: float | None, **extra: Any
    ) -> None:
        usage = response.usage
        if not self._first_time(run, usage):
            return
        fields = self._row(run, 'agent_request', usage, response.provider_name, response.model_name, status)
        fields['request_id'] = response.provider_response_id
        tier = _service_tier(response.provider_details)
        if tier is not None:
            fields['service_tier'] = tier  # what pydantic-ai priced it at: a reprice must price the same tier
        if (context := response_price_context(response.provider_details, tier)) is not None:
            # The rest of pydantic-ai's price context (Anthropic's fast mode, an OpenRouter route): kept on the
            # row so that a reprice prices it as pydantic-ai did, not at the context-free price.
            extra[PRICE_CONTEXT_KEY] = context
        if usage.unmeasured_requests and usage.cost is None:
            # The response omitted its usage: its zero counts say nothing, so no priced zero either.
            fields['pricing_status'] = 'unpriced'
            extra['usage_missing'] = True
        fields['created_at'] = _aware(response.timestamp)
        if duration_ms is not None:
            fields['duration_ms'] = max(round(duration_ms), 0)
        if response.state != 'complete' and 'response_state' not in extra:
            extra['response_state'] = response.state  # e.g. `interrupted`: a stream stopped early
        if extra:
            fields['metadata'] = {**fields.get('metadata', {}), **extra}
        run.tracker._track(None, fields)  # pyright: ignore[reportPrivateUsage]
        _add(run.shared.recorded, usage)

    def _record_cut(
        self, run: _Run, response: ModelResponse, duration_ms: float | None, status: str = 'ok', **extra: Any
    ) -> None:
        """A stream that ended before `after_model_request` saw it: billed for what it streamed, marked so."""
        state = response.state if response.state != 'complete' else 'interrupted'
        self._record_response(run, response, status, duration_ms, response_state=state, **extra)

    def _record_attempt(self, run: _Run, attempt: ModelRequestAttempt) -> None:
        extra: dict[str, Any] = {'attempt_outcome': attempt.outcome}
        if attempt.error:
            # Only the exception type: provider error messages may quote the prompt.
            extra['error_type'] = attempt.error.split(':', 1)[0]
        usage = attempt.usage or RequestUsage()
        fields = self._row(run, 'agent_request', usage, attempt.provider_name, attempt.model_name, 'error')
        fields['created_at'] = _aware(attempt.timestamp)
        fields['duration_ms'] = max(round(attempt.duration.total_seconds() * 1000), 0)
        fields['metadata'] = {**fields.get('metadata', {}), **extra}
        run.tracker._track(None, fields)  # pyright: ignore[reportPrivateUsage]
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


def _priced_copy(response: ModelResponse) -> ModelResponse:
    """Priced as pydantic-ai prices what it bills for it, on a copy: a stream's usage object is the stream's own."""
    response = dataclasses.replace(response, usage=copy(response.usage))
    _fill_response_cost(response)
    return response


def _service_tier(details: Mapping[str, Any] | None) -> str | None:
    """The tier a response's `provider_details` name (pydantic-ai passes them to genai-prices as its price context)."""
    if not details:
        return None
    if details.get('processing') == 'batch':
        return 'batch'
    tier = details.get('service_tier')
    return tier if isinstance(tier, str) and tier else None


def _error_attempts(error: BaseException | None) -> list[ModelRequestAttempt]:
    """The failed attempts an error that ended a request lists: a `FallbackExceptionGroup`'s, or those carried."""
    if error is None:
        return []
    listed: list[ModelRequestAttempt] = list(getattr(error, 'attempts', None) or ())
    return [*listed, *(a for a in _carried_attempts(error) if a not in listed)]


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
        # Most counts are 0: test that first, it is the cheapest.
        if value and key not in _NOT_COUNTS and type(value) in (int, float):
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
        if value and key not in _NOT_COUNTS and type(value) in (int, float):
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
            # Zero buckets and empty details left out: they are the record's defaults.
            columns: dict[str, Any] = {'input_tokens': plain_input, 'output_tokens': plain_output}
            if usage.cache_read_tokens:
                columns['cache_read_tokens'] = usage.cache_read_tokens
            if usage.cache_write_tokens:
                columns['cache_write_tokens'] = usage.cache_write_tokens
            if usage.output_reasoning_tokens:
                columns['reasoning_tokens'] = usage.output_reasoning_tokens
            return columns
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


def _read(deps: object, name: str) -> Any:
    """`deps.name`, or None if reading it fails (an ORM's lazy attribute): the run is still recorded."""
    return read_attribute(deps, name, _count_error)


def _count_error() -> None:
    TrackUsage.errors += 1


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
