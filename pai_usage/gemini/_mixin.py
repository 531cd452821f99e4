"""`GeminiUsageMixin`: usage tracking for any class that makes direct `google-genai` calls."""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import Enum
from types import TracebackType
from typing import Any, ParamSpec, Protocol, cast

from google import genai
from google.genai import errors, types

from .._log import RateLimitedLog
from ..context import UsageContext, attribution_fields, current_usage_context
from ..record import normalize_label
from ..tracker import UsageTracker, get_tracker
from ..usage import TokenCounts
from ._calls import SdkCall, sdk_calls
from ._usage import merge_usage_metadata, token_counts

__all__ = (
    'DEFAULT_VEO_DURATION_SECONDS',
    'GEMINI_API_PROVIDER',
    'NOT_BILLED_SOURCE',
    'VERTEX_PROVIDER',
    'Contents',
    'GeminiStats',
    'GeminiUsageMixin',
    'gemini_stats',
)

GEMINI_API_PROVIDER = 'google-gla'
"""genai-prices provider id for the Gemini Developer API (`vertexai=False`)."""
VERTEX_PROVIDER = 'google-vertex'
"""genai-prices provider id for Vertex AI (`vertexai=True`)."""
NOT_BILLED_SOURCE = 'not billed: call failed'
"""`price_source` of the zero-cost rows recorded for calls the API rejected."""
DEFAULT_VEO_DURATION_SECONDS = 8
"""Video length Veo generates when `duration_seconds` is not given."""

_log = RateLimitedLog()
# "One-time" warnings: an infinite interval logs the first and counts the rest.
_once = RateLimitedLog(interval=float('inf'))

_P = ParamSpec('_P')

Contents = Any
"""What `generate_content` accepts (`google.genai.types.ContentListUnionDict`: text, parts, contents, files or PIL
images). Spelled `Any` because the SDK's union is only partially typed (PIL is optional)."""


class _HasAttribution(Protocol):
    @property
    def user_id(self) -> str | None: ...

    @property
    def organization_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class GeminiStats:
    """Process-wide counters of the direct Gemini calls tracked by `GeminiUsageMixin`."""

    calls: int
    """Calls that returned (successfully or not) and were handed to a tracker."""
    errors: int
    """Calls that raised; each was recorded as a zero-cost `status='error'` row and re-raised unchanged."""
    missing_usage: int
    """Successful token-billed calls whose response carried no `usage_metadata` (recorded unpriced)."""
    tracking_failures: int
    """Times building a record failed (a bug, logged); the call itself was unaffected."""


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.errors = 0
        self.missing_usage = 0
        self.tracking_failures = 0

    def add(self, *, errors: int = 0, missing_usage: int = 0, tracking_failures: int = 0) -> None:
        with self.lock:
            self.calls += 1 - tracking_failures
            self.errors += errors
            self.missing_usage += missing_usage
            self.tracking_failures += tracking_failures


_counters = _Counters()


def gemini_stats() -> GeminiStats:
    """Counters of direct Gemini calls since the process started (see also `UsageTracker.stats()`)."""
    with _counters.lock:
        return GeminiStats(
            calls=_counters.calls,
            errors=_counters.errors,
            missing_usage=_counters.missing_usage,
            tracking_failures=_counters.tracking_failures,
        )


def _tracking_failed(exc: Exception) -> None:
    _counters.add(tracking_failures=1)
    _log.error('gemini:record', 'pai-usage: could not record a Gemini call: %r', exc, exc_info=True)


def _never_raises(func: Callable[_P, None]) -> Callable[_P, None]:
    """Tracking must never change the outcome of the call it tracks: failures are logged and counted."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            func(*args, **kwargs)
        except Exception as exc:
            _tracking_failed(exc)

    return wrapper


@dataclass(frozen=True, slots=True)
class _Attribution:
    organization_id: str | None
    user_id: str | None
    run_id: str | None
    agent_name: str | None
    tracker: UsageTracker
    metadata: Mapping[str, Any] | None


def _same_payer(a: UsageContext, b: UsageContext) -> bool:
    return normalize_label(a.organization_id) == normalize_label(b.organization_id) and normalize_label(
        a.user_id
    ) == normalize_label(b.user_id)


def _model_name(model: str) -> str:
    # The SDK accepts `models/x` and `publishers/google/models/x`; prices and summaries want `x`.
    return model.rsplit('/', 1)[-1]


def _error_metadata(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.APIError):
        return {'error_code': exc.code, 'error_status': exc.status, 'error_type': type(exc).__name__}
    return {'error_type': type(exc).__name__}


class GeminiUsageMixin:
    """Adds usage tracking to a class that holds a `google.genai.Client` as `self.client`.

    Attribution is resolved per call, in this order:

    1. the `deps=` (any object with `user_id` / `organization_id`, e.g. `UsageDeps`) or `usage_context=` given at
       construction;
    2. the current `UsageContext`, which the `TrackUsage` capability sets during an agent run; the row is then
       also linked to that run (`run_id`, `agent_name`);
    3. neither: the row is recorded with NULL attribution, and a warning is logged once per process.

    The `tracked_*` methods call the SDK, time the call, and hand one record per call to the tracker
    (fire-and-forget: no I/O on the caller's path). A call that raises is recorded as a zero-cost
    `status='error'` row and the exception reaches the caller unchanged. Tracking never changes a result.

    ```python
    class MyService(GeminiUsageMixin):
        def __init__(self, client: genai.Client, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.client = client
    ```
    """

    client: genai.Client
    """The SDK client the class calls; the mixin reads `client.vertexai` to pick the provider id."""

    def __init__(
        self,
        *,
        deps: _HasAttribution | None = None,
        usage_context: UsageContext | _HasAttribution | None = None,
        tracker: UsageTracker | None = None,
        **kwargs: Any,
    ) -> None:
        """Set explicit attribution (Option B: "set context on service initialization").

        Args:
            deps: An object with `user_id` and `organization_id` (and optionally `tracker`), e.g. `UsageDeps`.
            usage_context: A `UsageContext` (or deps, as for `usage_context()`); combined with `deps`, the deps'
                user and organization win.
            tracker: Tracker to record to. Defaults to the deps', the context's, the ambient context's, then
                `get_tracker()`.
            **kwargs: Passed on to the next class in the MRO.
        """
        super().__init__(**kwargs)
        explicit = usage_context
        if explicit is not None and not isinstance(explicit, UsageContext):  # deps given as the context
            explicit = UsageContext(**attribution_fields(explicit))
        if deps is not None:
            explicit = replace(explicit or UsageContext(), **attribution_fields(deps, strict=False))
        self.usage_context = explicit
        """Explicit attribution given at construction, or None to follow the current `UsageContext`."""
        self.usage_tracker = tracker
        """Explicit tracker, or None."""

    # --- attribution -----------------------------------------------------------------------------------------

    @property
    def usage_provider(self) -> str:
        """`google-vertex` for a Vertex AI client, else `google-gla`."""
        client = getattr(self, 'client', None)
        return VERTEX_PROVIDER if client is not None and client.vertexai else GEMINI_API_PROVIDER

    def _attribution(self) -> _Attribution:
        explicit: UsageContext | None = getattr(self, 'usage_context', None)
        ambient = current_usage_context()
        # Explicit attribution wins; explicit deps that name nobody fall back to the run's.
        chosen = explicit if explicit is not None and (explicit.organization_id or explicit.user_id) else ambient
        tracker = (
            getattr(self, 'usage_tracker', None)
            or (explicit.tracker if explicit else None)
            or (ambient.tracker if ambient else None)
            or get_tracker()
        )
        if chosen is None or (chosen.organization_id is None and chosen.user_id is None):
            _once.warning(
                'gemini:unattributed',
                'pai-usage: a direct Gemini call was made with no deps/usage_context and outside any agent run or '
                '`usage_context()`; recorded with organization_id=NULL and user_id=NULL. Pass `deps=` to %s.',
                type(self).__name__,
            )
        if chosen is None:
            return _Attribution(None, None, None, None, tracker, None)
        run_id, agent_name = chosen.run_id, chosen.agent_name
        if (
            chosen is explicit
            and explicit is not None
            and run_id is None
            and ambient
            and _same_payer(explicit, ambient)
        ):
            # `deps=ctx.deps` inside a tool: the run's own payer, so the call is the run's too.
            run_id, agent_name = ambient.run_id, ambient.agent_name
        return _Attribution(chosen.organization_id, chosen.user_id, run_id, agent_name, tracker, chosen.metadata)

    # --- budgets (pai_usage.budgets owns this hook: reserve before a call, refuse it past a limit) -------------

    def _attribution_at_start(self) -> _Attribution | None:
        """Who a call that starts now is billed to, read once, so that a stream ending elsewhere keeps it."""
        try:
            return self._attribution()
        except Exception as exc:  # the record will try again (and count the failure if it fails too)
            _tracking_failed(exc)
            return None

    def _reserve_budgets(self, operation: str, model: str, who: _Attribution | None = None) -> list[Any]:
        budgets = sys.modules.get('pai_usage.budgets')
        if budgets is None:
            return []  # no `EnforceBudgets` exists before its module is imported: nothing to reserve
        if who is None and (who := self._attribution_at_start()) is None:
            return []  # no attribution, no budget to check: the call goes ahead
        # Refusals (and, with `fail_open=False`, an unreachable counter) reach the caller: budgets decide that.
        return budgets.reserve_direct(
            who.tracker,
            organization_id=who.organization_id,
            user_id=who.user_id,
            provider=self.usage_provider,
            model=_model_name(model),
            operation=operation,
            run_id=who.run_id,
            agent_name=who.agent_name,
        )

    # --- recording -------------------------------------------------------------------------------------------

    def _record(
        self,
        *,
        operation: str,
        model: str,
        provider: str | None = None,
        tokens: TokenCounts | None = None,
        units: Decimal | int | None = None,
        unit_type: str | None = None,
        duration_ms: int | None = None,
        request_id: str | None = None,
        error: BaseException | None = None,
        metadata: Mapping[str, Any] | None = None,
        service_tier: str | None = None,
        who: _Attribution | None = None,
    ) -> None:
        try:
            who = who or self._attribution()
            meta: dict[str, Any] = {**(who.metadata or {}), **(metadata or {})}
            fields: dict[str, Any] = {
                'organization_id': who.organization_id,
                'user_id': who.user_id,
                'run_id': who.run_id,
                'agent_name': who.agent_name,
                'provider': provider or self.usage_provider,
                'model': _model_name(model),
                'operation': operation,
                'source': 'direct',
                'request_id': request_id,
                'duration_ms': duration_ms,
            }
            if service_tier is not None:
                fields['service_tier'] = service_tier
            missing = 0
            if error is not None:
                meta.update(_error_metadata(error))
                fields['status'] = 'error'
                if tokens is None and isinstance(error, errors.APIError):
                    # The API rejected the call: Google bills nothing for it.
                    fields.update(cost_usd=Decimal(0), pricing_status='priced', price_source=NOT_BILLED_SOURCE)
                elif tokens is None:
                    # A transport failure may or may not have been billed: say so rather than guess 0.
                    fields.update(pricing_status='unpriced')
                # With tokens (a stream that broke after output began), the tokens are priced as usual.
            if tokens is not None:
                fields.update(tokens.as_columns())
            elif error is None and unit_type is None:
                # Billed, but the response said nothing about how much: keep the call, leave the cost unknown.
                missing = 1
                meta['usage_missing'] = True
                fields['pricing_status'] = 'unpriced'
                _log.warning(
                    f'gemini:usage-missing:{model}',
                    'pai-usage: a %s response carried no usage_metadata; recorded unpriced with metadata.usage_missing',
                    model,
                )
            if unit_type is not None:
                fields['units'] = Decimal(units or 0)
                fields['unit_type'] = unit_type
            fields['metadata'] = meta
            who.tracker._track(None, fields)  # pyright: ignore[reportPrivateUsage]
        except Exception as exc:
            _tracking_failed(exc)
            return
        _counters.add(errors=1 if error is not None else 0, missing_usage=missing)

    @_never_raises
    def track_response(
        self,
        response: types.GenerateContentResponse,
        *,
        model: str,
        operation: str = 'generate_content',
        duration_ms: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        config: types.GenerateContentConfigOrDict | None = None,
    ) -> None:
        """Record a `generate_content` response you obtained yourself: tokens from its `usage_metadata`.

        The row names the model that served the call (`model_version`) when the response says, and keeps the
        requested name in `metadata.requested_model`; the service tier comes from the response, else `config`.
        """
        meta = dict(metadata or {})
        served = _served_model(model, response.model_version, meta)
        self._record(
            operation=operation,
            model=served,
            tokens=token_counts(response.usage_metadata),
            duration_ms=duration_ms,
            request_id=response.response_id,
            metadata=meta,
            service_tier=_service_tier(response, config),
        )

    @_never_raises
    def track_units(
        self,
        provider: str,
        model: str,
        operation: str,
        unit_type: str,
        units: Decimal | int | float,
        *,
        duration_ms: int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a non-token call priced per unit by the price table: ElevenLabs or Cloud TTS characters, ...

        Example: `service.track_units('elevenlabs', 'eleven_multilingual_v2', 'text_to_speech', 'character', 1200)`.
        """
        self._record(
            operation=operation,
            model=model,
            provider=provider,
            units=Decimal(str(units)) if isinstance(units, float) else units,
            unit_type=unit_type,
            duration_ms=duration_ms,
            request_id=request_id,
            metadata=metadata,
        )

    # --- generate_content ------------------------------------------------------------------------------------

    def tracked_generate_content(
        self,
        *,
        model: str,
        contents: Contents,
        config: types.GenerateContentConfigOrDict | None = None,
        operation: str = 'generate_content',
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateContentResponse:
        """`client.models.generate_content(...)`, recorded with its token usage: a row per model call it makes."""
        models = self.client.models
        with self._content_call(models, model=model, operation=operation, metadata=metadata, config=config) as done:
            response = done.response = models.generate_content(  # pyright: ignore[reportUnknownMemberType]
                model=model, contents=contents, config=config
            )
        return response

    async def atracked_generate_content(
        self,
        *,
        model: str,
        contents: Contents,
        config: types.GenerateContentConfigOrDict | None = None,
        operation: str = 'generate_content',
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateContentResponse:
        """`client.aio.models.generate_content(...)`, recorded like `tracked_generate_content`."""
        models = self.client.aio.models
        with self._content_call(models, model=model, operation=operation, metadata=metadata, config=config) as done:
            response = done.response = await models.generate_content(  # pyright: ignore[reportUnknownMemberType]
                model=model, contents=contents, config=config
            )
        return response

    @contextmanager
    def _content_call(
        self,
        models: object,
        *,
        model: str,
        operation: str,
        metadata: Mapping[str, Any] | None,
        config: types.GenerateContentConfigOrDict | None,
    ) -> Generator[_Done]:
        """Time, budget and record one `generate_content` through `models` (sync or async): set `.response`."""
        done = _Done()
        seen: list[SdkCall] | None = None
        try:
            with _TimedCall(self, operation, model) as call, sdk_calls(models) as seen:
                yield done
        except Exception:
            self._track_calls(seen, None, model=model, operation=operation, metadata=metadata, config=config)
            raise
        self._track_calls(
            seen, done.response, model=model, operation=operation, metadata=metadata, config=config, ms=call.ms
        )

    def _track_calls(
        self,
        calls: list[SdkCall] | None,
        response: types.GenerateContentResponse | None,
        *,
        model: str,
        operation: str,
        metadata: Mapping[str, Any] | None,
        config: types.GenerateContentConfigOrDict | None,
        ms: int | None = None,
    ) -> None:
        """One row per request the SDK sent, or the response's own row when it sent one.

        Automatic function calling sends several; each is billed, and the response shows only the last. Without
        `response` (the call failed), the requests that completed before the failure: billed too.
        """
        if response is not None and (calls is None or len(calls) <= 1):
            self.track_response(
                response, model=model, operation=operation, duration_ms=ms, metadata=metadata, config=config
            )
            return
        for i, sent in enumerate(calls or (), 1):
            self.track_response(
                sent.response,
                model=model,
                operation=operation,
                duration_ms=sent.duration_ms,
                metadata={**(metadata or {}), 'sdk_call': i, 'sdk_calls': len(calls or ())},
                config=config,
            )

    def tracked_generate_content_stream(
        self,
        *,
        model: str,
        contents: Contents,
        config: types.GenerateContentConfigOrDict | None = None,
        operation: str = 'generate_content_stream',
        metadata: Mapping[str, Any] | None = None,
    ) -> Generator[types.GenerateContentResponse]:
        """`client.models.generate_content_stream(...)`: yields the chunks, then records the last chunk's usage.

        Chunk usage is a running total, so the stream's usage is the last one seen, never a sum. A stream
        abandoned early is recorded with the usage seen so far and `metadata.stream_incomplete`.
        """
        with _StreamState(self, model, operation, metadata, config) as stream:
            chunks = self.client.models.generate_content_stream(  # pyright: ignore[reportUnknownMemberType]
                model=model, contents=contents, config=config
            )
            for chunk in chunks:
                stream.seen(chunk)
                yield chunk

    async def atracked_generate_content_stream(
        self,
        *,
        model: str,
        contents: Contents,
        config: types.GenerateContentConfigOrDict | None = None,
        operation: str = 'generate_content_stream',
        metadata: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[types.GenerateContentResponse]:
        """`client.aio.models.generate_content_stream(...)`, recorded like `tracked_generate_content_stream`."""
        with _StreamState(self, model, operation, metadata, config) as stream:
            chunks = await self.client.aio.models.generate_content_stream(  # pyright: ignore[reportUnknownMemberType]
                model=model, contents=contents, config=config
            )
            async for chunk in chunks:
                stream.seen(chunk)
                yield chunk

    # --- Imagen ----------------------------------------------------------------------------------------------

    @_never_raises
    def _track_images(
        self, response: types.GenerateImagesResponse, model: str, operation: str, ms: int, metadata: Any
    ) -> None:
        generated = response.generated_images or []
        delivered = sum(1 for g in generated if g.image is not None)
        meta = dict(metadata or {})
        if delivered < len(generated):
            meta['filtered_images'] = len(generated) - delivered
        self._record(
            operation=operation, model=model, units=delivered, unit_type='image', duration_ms=ms, metadata=meta
        )

    def tracked_generate_images(
        self,
        *,
        model: str,
        prompt: str,
        config: types.GenerateImagesConfigOrDict | None = None,
        operation: str = 'generate_image',
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateImagesResponse:
        """Imagen `client.models.generate_images(...)`: no token usage, recorded as `image` units (one per image)."""
        with _TimedCall(self, operation, model) as call:
            response = self.client.models.generate_images(model=model, prompt=prompt, config=config)
        self._track_images(response, model, operation, call.ms, metadata)
        return response

    async def atracked_generate_images(
        self,
        *,
        model: str,
        prompt: str,
        config: types.GenerateImagesConfigOrDict | None = None,
        operation: str = 'generate_image',
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateImagesResponse:
        """Async `tracked_generate_images`."""
        with _TimedCall(self, operation, model) as call:
            response = await self.client.aio.models.generate_images(model=model, prompt=prompt, config=config)
        self._track_images(response, model, operation, call.ms, metadata)
        return response

    # --- Veo -------------------------------------------------------------------------------------------------

    @_never_raises
    def _track_video(
        self,
        operation_result: types.GenerateVideosOperation,
        config: types.GenerateVideosConfig,
        model: str,
        operation: str,
        ms: int,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        meta = dict(metadata or {})
        seconds = config.duration_seconds
        if seconds is None:
            seconds = DEFAULT_VEO_DURATION_SECONDS
            meta['duration_seconds_assumed'] = True
        requested = config.number_of_videos or 1
        result = operation_result.result
        filtered = (result.rai_media_filtered_count or 0) if result is not None else 0
        if result is not None and result.generated_videos is not None:
            delivered = len(result.generated_videos)
        else:
            delivered = max(requested - filtered, 0)
        if filtered:
            meta['filtered_videos'] = filtered
        meta['videos'] = delivered
        meta['duration_seconds'] = seconds
        audio = config.generate_audio
        if audio is None:
            # Veo 3 generates sound unless told not to; Veo 2 has none. Priced per second, with or without audio.
            audio = _model_name(model).startswith('veo-3')
            meta['generate_audio_assumed'] = audio
        self._record(
            operation=operation,
            model=model,
            units=seconds * delivered,
            unit_type='video_second_audio' if audio else 'video_second',
            duration_ms=ms,
            request_id=operation_result.name,
            metadata=meta,
        )

    def tracked_generate_videos(
        self,
        *,
        model: str,
        source: types.GenerateVideosSourceOrDict,
        config: types.GenerateVideosConfigOrDict | None = None,
        operation: str = 'generate_video',
        poll_interval: float = 10.0,
        timeout: float | None = 600.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateVideosOperation:
        """Veo `generate_videos(...)`, polled until done, recorded as `video_second` units.

        Veo returns no usage: the seconds billed are the requested `duration_seconds` (default 8) times the
        videos delivered (requested `number_of_videos` minus those filtered for safety). A failed operation
        is recorded as an error row and raised as `google.genai.errors.APIError`.
        """
        cfg = _video_config(config)
        with _TimedCall(self, operation, model) as call:
            op = self.client.models.generate_videos(model=model, source=source, config=cfg)
            while call.polling(op, timeout):
                time.sleep(poll_interval)
                op = self.client.operations.get(op)
            _raise_for_operation(op)
        self._track_video(op, cfg, model, operation, call.ms, metadata)
        return op

    async def atracked_generate_videos(
        self,
        *,
        model: str,
        source: types.GenerateVideosSourceOrDict,
        config: types.GenerateVideosConfigOrDict | None = None,
        operation: str = 'generate_video',
        poll_interval: float = 10.0,
        timeout: float | None = 600.0,
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateVideosOperation:
        """Async `tracked_generate_videos`."""
        cfg = _video_config(config)
        with _TimedCall(self, operation, model) as call:
            op = await self.client.aio.models.generate_videos(model=model, source=source, config=cfg)
            while call.polling(op, timeout):
                await asyncio.sleep(poll_interval)
                op = await self.client.aio.operations.get(op)
            _raise_for_operation(op)
        self._track_video(op, cfg, model, operation, call.ms, metadata)
        return op


@dataclass
class _Done:
    """What a call inside `_content_call` returned."""

    response: types.GenerateContentResponse | None = None


class _TimedCall:
    """Times one SDK call (a Veo operation: until done) and records it as an error row if it raises.

    The success row is the caller's to record, with `ms`: only it knows what the result was.
    """

    def __init__(self, owner: GeminiUsageMixin, operation: str, model: str) -> None:
        self.owner = owner
        self.operation = operation
        self.model = model
        self.start = time.perf_counter()
        self.ms = 0
        self.holds: list[Any] = []

    def __enter__(self) -> _TimedCall:
        self.holds = self.owner._reserve_budgets(self.operation, self.model)  # pyright: ignore[reportPrivateUsage]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.ms = _ms(self.start)
        # Only a failed call is an error row: an interrupt or a cancellation (a `BaseException`) records nothing.
        if isinstance(exc, Exception):
            self.owner._record(  # pyright: ignore[reportPrivateUsage]
                operation=self.operation, model=self.model, error=exc, duration_ms=self.ms
            )
        for hold in self.holds:  # the call is over: its cost counts from its record (tracked next)
            hold.release()

    def polling(self, op: types.GenerateVideosOperation, timeout: float | None) -> bool:
        """Whether `op` needs another poll; `TimeoutError` once it has run for more than `timeout` seconds."""
        if op.done:
            return False
        if timeout is not None and time.perf_counter() - self.start > timeout:
            raise TimeoutError(f'Veo operation {op.name!r} not done after {timeout}s')
        return True


class _StreamState:
    """What a stream has shown so far; records exactly once, when the `with` block around the stream ends."""

    def __init__(
        self,
        owner: GeminiUsageMixin,
        model: str,
        operation: str,
        metadata: Mapping[str, Any] | None,
        config: types.GenerateContentConfigOrDict | None = None,
    ) -> None:
        self.owner = owner
        self.config = config
        self.model = model
        self.operation = operation
        self.metadata = dict(metadata or {})
        self.start = time.perf_counter()
        self.usage: types.GenerateContentResponseUsageMetadata | None = None
        self.last: types.GenerateContentResponse | None = None
        self.chunks = 0
        # Calls of the stream that ended before this one: automatic function calling streams one model call
        # after another (each with its own response id and running totals), and each is billed.
        self.calls: list[tuple[types.GenerateContentResponseUsageMetadata | None, types.GenerateContentResponse, int]]
        self.calls = []
        self.done = False
        self.holds: list[Any] = []
        self.who: _Attribution | None = None

    def __enter__(self) -> _StreamState:
        # Billed to whoever started the stream: it may be drained, or collected, under another context.
        owner = self.owner
        self.who = owner._attribution_at_start()  # pyright: ignore[reportPrivateUsage]
        self.holds = owner._reserve_budgets(self.operation, self.model, self.who)  # pyright: ignore[reportPrivateUsage]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.finish(None)
        elif isinstance(exc, Exception):
            self.finish(exc)
        else:
            # Closed early (`GeneratorExit`), cancelled or interrupted: what was seen so far, marked incomplete.
            self.finish(None, incomplete=True)
        for hold in self.holds:  # after `finish` tracked the stream's record: budgets count it
            hold.release()

    def seen(self, chunk: types.GenerateContentResponse) -> None:
        last = self.last
        if last is not None and chunk.response_id and last.response_id and chunk.response_id != last.response_id:
            self.calls.append((self.usage, last, self.chunks))
            self.usage, self.chunks = None, 0
        self.chunks += 1
        self.last = chunk
        self.usage = merge_usage_metadata(self.usage, chunk.usage_metadata)

    @_never_raises
    def finish(self, error: BaseException | None, *, incomplete: bool = False) -> None:
        if self.done:
            return
        self.done = True
        ms = _ms(self.start)
        n = len(self.calls) + 1
        for i, (usage, last, chunks) in enumerate(self.calls, 1):
            self._record_call(usage, last, {**self.metadata, 'chunks': chunks, 'sdk_call': i, 'sdk_calls': n})
        meta = {**self.metadata, 'chunks': self.chunks}
        if self.calls:
            meta.update(sdk_call=n, sdk_calls=n)
        if incomplete:
            meta['stream_incomplete'] = True
        served = _served_model(self.model, self.last.model_version if self.last is not None else None, meta)
        if error is not None and self.usage is not None:
            # Output was generated (and billed) before the stream broke: the row keeps its tokens.
            meta['stream_incomplete'] = True
        self.owner._record(  # pyright: ignore[reportPrivateUsage]
            operation=self.operation,
            model=served,
            service_tier=_service_tier(self.last, self.config),
            tokens=token_counts(self.usage),
            duration_ms=ms,
            request_id=self.last.response_id if self.last is not None else None,
            error=error,
            metadata=meta,
            who=self.who,
        )

    def _record_call(
        self,
        usage: types.GenerateContentResponseUsageMetadata | None,
        last: types.GenerateContentResponse,
        meta: dict[str, Any],
    ) -> None:
        """A call of the stream that completed before the next began (no duration: the stream's is shared)."""
        self.owner._record(  # pyright: ignore[reportPrivateUsage]
            operation=self.operation,
            model=_served_model(self.model, last.model_version, meta),
            service_tier=_service_tier(last, self.config),
            tokens=token_counts(usage),
            request_id=last.response_id,
            metadata=meta,
            who=self.who,
        )


def _served_model(requested: str, version: str | None, meta: dict[str, Any]) -> str:
    """The model to price: the one that served the call (`model_version`), the requested alias kept in `meta`."""
    if version and _model_name(version) != _model_name(requested):
        meta['requested_model'] = _model_name(requested)
        meta['model_version'] = version
        return version
    return requested


_TRAFFIC_TIERS = {'ON_DEMAND': 'standard', 'ON_DEMAND_PRIORITY': 'priority', 'ON_DEMAND_FLEX': 'flex'}
"""Vertex AI `usage_metadata.traffic_type` values that name a pay-as-you-go tier."""


def _service_tier(
    response: types.GenerateContentResponse | None, config: types.GenerateContentConfigOrDict | None
) -> str | None:
    """The tier the call was served at, lowercased: what the response says, else what the request asked for.

    The Gemini API reports it in the `x-gemini-service-tier` response header, Vertex AI in
    `usage_metadata.traffic_type`; the request's `config.service_tier` is the fallback.
    """
    if response is not None:
        http = response.sdk_http_response
        header = http.headers.get('x-gemini-service-tier') if http is not None and http.headers else None
        if header:
            return _tier_name(header)
        traffic = response.usage_metadata.traffic_type if response.usage_metadata is not None else None
        if traffic is not None and traffic.value in _TRAFFIC_TIERS:
            return _TRAFFIC_TIERS[traffic.value]
    requested: object = None
    if isinstance(config, types.GenerateContentConfig):
        requested = config.service_tier
    elif config is not None:
        requested = cast(Mapping[str, object], config).get('service_tier')
    return _tier_name(requested.value if isinstance(requested, Enum) else requested)


def _tier_name(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    name = value.lower()
    return None if name in ('', 'unspecified', 'service_tier_unspecified') else name


def _ms(start: float) -> int:
    return max(round((time.perf_counter() - start) * 1000), 0)


def _video_config(config: types.GenerateVideosConfigOrDict | None) -> types.GenerateVideosConfig:
    if config is None:
        return types.GenerateVideosConfig()
    if isinstance(config, types.GenerateVideosConfig):
        return config
    return types.GenerateVideosConfig.model_validate(config)


def _raise_for_operation(op: types.GenerateVideosOperation) -> None:
    if op.error:
        # Raised as the SDK's own error type, so callers handle one kind of failure.
        error = dict(op.error)
        code = error.get('code')
        raise errors.APIError(code if isinstance(code, int) else 500, {'error': error})
