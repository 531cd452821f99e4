"""Direct Gemini calls: the real google-genai SDK against a loopback fake of the Gemini REST API."""

# ruff: noqa: F811  (the fake server's fixtures are imported, then named as test arguments)

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from google.genai import Client, errors, types
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import PriceTable, UsageContext, UsageDeps, UsageTracker, usage_context
from pai_usage._format import format_usd
from pai_usage._log import RateLimitedLog
from pai_usage.capability import TrackUsage
from pai_usage.gemini import GeminiService, GeminiUsageMixin, gemini_stats, token_counts
from pai_usage.gemini import _mixin as mixin_module
from pai_usage.usage import TokenCounts
from tests._helpers import LazyDeps, token_usage_rows
from tests.fake_gemini import (  # noqa: F401 - fixtures
    IMAGE_OUTPUT_TOKENS,
    PNG_1X1,
    FakeGemini,
    Reply,
    fake_gemini,
    gemini_client,
    vertex_client,
)

pytestmark = pytest.mark.anyio

ORG = UsageDeps(user_id='u1', organization_id='acme')
# The SDK deprecates Imagen's `generate_images` in favour of Gemini image models, but it is still served and billed.
IMAGEN_DEPRECATED = pytest.mark.filterwarnings('ignore:The generate_images method is deprecated')


@pytest.fixture
def ledger(sqlite_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(sqlite_url, flush_interval=0.01) as tracker:
        yield tracker
    tracker.engine.dispose()


@pytest.fixture
def service(gemini_client: Client, ledger: UsageTracker) -> GeminiService:
    return GeminiService(gemini_client, deps=ORG, tracker=ledger)


@pytest.fixture
def vertex_service(vertex_client: Client, ledger: UsageTracker) -> GeminiService:
    return GeminiService(vertex_client, deps=ORG, tracker=ledger)


def rows(tracker: UsageTracker) -> list[dict[str, Any]]:
    assert tracker.flush()
    return token_usage_rows(tracker.engine)


def only_row(tracker: UsageTracker) -> dict[str, Any]:
    (row,) = rows(tracker)
    return row


def buckets(row: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in TokenCounts.from_columns(row).as_columns().items() if k != 'details' and v}


def price(model: str, provider: str = 'google-gla', **inclusive: int) -> Decimal:
    """What genai-prices charges for the inclusive counts, at the ledger's 12 decimal places."""
    total = genai_prices.calc_price(genai_prices.Usage(**inclusive), model, provider_id=provider).total_price
    return total.quantize(Decimal('1e-12'))


def unit_cost(provider: str, model: str, unit_type: str, units: int) -> Decimal:
    """What the shipped unit table charges (genai-prices has no price for these models)."""
    entry = PriceTable().unit_price(provider, model, unit_type)
    assert entry is not None and entry.source and entry.as_of  # every shipped figure says where it came from
    return units * entry.usd_per_unit


def usage(**counts: Any) -> dict[str, Any]:
    """Gemini `usageMetadata` (camelCase) with a consistent `totalTokenCount`."""
    total = sum(counts.get(k, 0) for k in ('promptTokenCount', 'candidatesTokenCount', 'thoughtsTokenCount'))
    return {**counts, 'totalTokenCount': total + counts.get('toolUsePromptTokenCount', 0)}


# --- tokens ------------------------------------------------------------------------------------------------------


async def test_analyze_text_sync_and_async(service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker):
    fake_gemini.reply(text='Positive.', usage=usage(promptTokenCount=1200, candidatesTokenCount=300))
    fake_gemini.reply(text='Negative.', usage=usage(promptTokenCount=50, candidatesTokenCount=7))

    assert service.analyze_text('I love it', 'Sentiment?') == 'Positive.'
    assert await service.aanalyze_text('I hate it', 'Sentiment?') == 'Negative.'

    first, second = rows(ledger)
    assert buckets(first) == {'input_tokens': 1200, 'output_tokens': 300}
    assert first['cost_usd'] == price('gemini-2.5-flash', input_tokens=1200, output_tokens=300)
    assert buckets(second) == {'input_tokens': 50, 'output_tokens': 7}
    assert second['cost_usd'] == price('gemini-2.5-flash', input_tokens=50, output_tokens=7)
    for row in (first, second):
        assert row['pricing_status'] == 'priced'
        assert (row['provider'], row['model'], row['operation'], row['source'], row['status']) == (
            'google-gla',
            'gemini-2.5-flash',
            'analyze_text',
            'direct',
            'ok',
        )
        assert (row['organization_id'], row['user_id'], row['run_id']) == ('acme', 'u1', None)
        assert row['duration_ms'] is not None and row['request_id']
    assert fake_gemini.requests[0].body['contents'][0]['parts'][0]['text'] == 'Sentiment?\n\nI love it'


@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_image_in(service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str):
    fake_gemini.reply(
        text='A red sneaker.',
        usage=usage(
            promptTokenCount=258 + 20,
            candidatesTokenCount=40,
            promptTokensDetails=[{'modality': 'IMAGE', 'tokenCount': 258}, {'modality': 'TEXT', 'tokenCount': 20}],
        ),
    )
    if mode == 'sync':
        text = service.analyze_image(PNG_1X1)
    else:
        text = await service.aanalyze_image(PNG_1X1)

    assert text == 'A red sneaker.'
    part = fake_gemini.requests[0].body['contents'][0]['parts'][0]
    assert part['inlineData']['mime_type'] == 'image/png'
    row = only_row(ledger)
    assert row['operation'] == 'analyze_image'
    assert buckets(row) == {'input_tokens': 278, 'output_tokens': 40}  # image input tokens are input tokens
    assert row['cost_usd'] == price('gemini-2.5-flash', input_tokens=278, output_tokens=40)


@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_image_out_inline(service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str):
    if mode == 'sync':
        images = service.generate_image('A sneaker on a beach')
    else:
        images = await service.agenerate_image('A sneaker on a beach')

    assert [(i.data, i.mime_type) for i in images] == [(PNG_1X1, 'image/png')]
    request = fake_gemini.requests[0]
    assert request.model == 'gemini-2.5-flash-image'
    assert request.body['generationConfig']['responseModalities'] == ['TEXT', 'IMAGE']
    row = only_row(ledger)
    text_out = len(Reply().text) // 4
    assert row['operation'] == 'generate_image'
    assert row['output_image_tokens'] == IMAGE_OUTPUT_TOKENS
    assert row['output_tokens'] == text_out  # the text remainder of candidates, image tokens not counted twice
    assert row['cost_usd'] == price(
        'gemini-2.5-flash-image',
        input_tokens=row['input_tokens'],
        output_tokens=text_out + IMAGE_OUTPUT_TOKENS,
        output_image_tokens=IMAGE_OUTPUT_TOKENS,
    )
    assert row['cost_usd'] > Decimal('0.0387')  # the image dominates: 1290 tokens at $30/M


async def test_cached_thinking_and_tool_use_tokens(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    fake_gemini.reply(
        usage=usage(
            promptTokenCount=10_000,  # includes the 8000 cached
            cachedContentTokenCount=8_000,
            toolUsePromptTokenCount=100,
            thoughtsTokenCount=500,  # billed as output, not part of candidates
            candidatesTokenCount=200,
        )
    )
    service.generate_content('Summarize the cached report')

    row = only_row(ledger)
    assert buckets(row) == {
        'input_tokens': 2_100,
        'cache_read_tokens': 8_000,
        'reasoning_tokens': 500,
        'output_tokens': 200,
    }
    assert row['details'] == {'input_tool_tokens': 100}  # part of `input_tokens`, under genai-prices' name
    assert row['cost_usd'] == price(
        'gemini-2.5-flash',
        input_tokens=10_100,
        input_tool_tokens=100,
        cache_read_tokens=8_000,
        output_tokens=700,
        output_reasoning_tokens=500,
    )
    # Counting the cache twice or leaving thoughts out would both give a different price.
    assert row['cost_usd'] != price('gemini-2.5-flash', input_tokens=18_100, cache_read_tokens=8_000, output_tokens=700)
    assert row['cost_usd'] != price('gemini-2.5-flash', input_tokens=10_100, cache_read_tokens=8_000, output_tokens=200)


def test_token_counts_audio_and_vertex_shapes():
    metadata = types.GenerateContentResponseUsageMetadata(
        prompt_token_count=1_000,
        cached_content_token_count=400,
        prompt_tokens_details=[types.ModalityTokenCount(modality=types.MediaModality.AUDIO, token_count=600)],
        cache_tokens_details=[types.ModalityTokenCount(modality=types.MediaModality.AUDIO, token_count=300)],
        candidates_token_count=250,
        candidates_tokens_details=[
            types.ModalityTokenCount(modality=types.MediaModality.AUDIO, token_count=200),
            types.ModalityTokenCount(modality=types.MediaModality.TEXT, token_count=50),
        ],
    )
    counts = token_counts(metadata)
    assert counts is not None
    assert counts == TokenCounts(
        input_tokens=300,
        cache_read_tokens=400,
        input_audio_tokens=300,
        output_tokens=50,
        output_audio_tokens=200,
        details={'cache_audio_read_tokens': 300, 'output_text_tokens': 50},
    )
    assert counts.total_tokens == 1_000 + 250
    assert token_counts(None) is None


# --- streaming ---------------------------------------------------------------------------------------------------

STREAM_FINAL = usage(promptTokenCount=900, cachedContentTokenCount=600, candidatesTokenCount=120, thoughtsTokenCount=80)


@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_stream_keeps_the_last_running_total(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str
):
    fake_gemini.reply(
        text='abcdef',
        chunks=3,
        chunk_usage=[
            usage(promptTokenCount=900, cachedContentTokenCount=600, candidatesTokenCount=40),
            usage(promptTokenCount=900, candidatesTokenCount=80),  # a gateway dropped the cache count here
            STREAM_FINAL,
        ],
    )
    if mode == 'sync':
        text = ''.join(chunk.text or '' for chunk in service.generate_content_stream('Write'))
    else:
        text = ''.join([chunk.text or '' async for chunk in service.agenerate_content_stream('Write')])

    assert text == 'abcdef'
    assert fake_gemini.requests[0].query == 'alt=sse'
    row = only_row(ledger)
    assert row['operation'] == 'generate_content_stream'
    assert buckets(row) == {'input_tokens': 300, 'cache_read_tokens': 600, 'output_tokens': 120, 'reasoning_tokens': 80}
    assert row['cost_usd'] == price('gemini-2.5-flash', input_tokens=900, cache_read_tokens=600, output_tokens=200)
    assert row['metadata'] == {'chunks': 3}


async def test_stream_abandoned_early_records_what_was_seen(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    fake_gemini.reply(text='abcdef', chunks=3)
    stream = service.generate_content_stream('Write')
    first = next(stream)
    assert first.text
    stream.close()

    row = only_row(ledger)
    assert row['metadata'] == {'chunks': 1, 'stream_incomplete': True}
    assert row['input_tokens'] > 0 and row['cost_usd'] is not None


@pytest.mark.parametrize('mode', ['sync', 'async', 'sync-stream', 'async-stream'])
@pytest.mark.parametrize('second', ['answers', 'fails'])
async def test_automatic_function_calling_records_every_call(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str, second: str
):
    """The SDK calls the model, runs the function, calls again: Google bills both, the response shows the last."""
    first_usage = usage(promptTokenCount=5000, candidatesTokenCount=20)
    fake_gemini.reply(function_call={'name': 'get_weather', 'args': {'city': 'Paris'}}, usage=first_usage)
    fake_gemini.reply(text='Sunny in Paris.', usage=usage(promptTokenCount=5100, candidatesTokenCount=30))

    def get_weather(city: str) -> str:
        """The weather in a city."""
        if second == 'fails':
            fake_gemini.fail(400)  # the SDK's second call is refused
        return f'sunny in {city}'

    config = types.GenerateContentConfig(tools=[get_weather])
    call = dict(model='gemini-2.0-flash', contents='Weather in Paris?', config=config)
    try:
        if mode == 'sync':
            text = service.tracked_generate_content(**call).text
        elif mode == 'async':
            text = (await service.atracked_generate_content(**call)).text
        elif mode == 'sync-stream':
            text = ''.join(c.text or '' for c in service.tracked_generate_content_stream(**call))
        else:
            text = ''.join([c.text or '' async for c in service.atracked_generate_content_stream(**call)])
    except errors.ClientError:
        assert second == 'fails'
    else:
        assert second == 'answers' and text == 'Sunny in Paris.'
    assert len(fake_gemini.requests) == 2
    got = rows(ledger)
    billed = [(5000, 20), (5100, 30)] if second == 'answers' else [(5000, 20)]
    charged = [r for r in got if r['input_tokens']]
    assert [(r['input_tokens'], r['output_tokens']) for r in charged] == billed
    assert [r['cost_usd'] for r in charged] == [
        price('gemini-2.0-flash', input_tokens=i, output_tokens=o) for i, o in billed
    ]
    if second == 'answers':
        assert got == charged and [(r['metadata']['sdk_call'], r['metadata']['sdk_calls']) for r in got] == [
            (1, 2),
            (2, 2),
        ]
    else:  # and the failure is on record
        assert [r['status'] for r in got].count('error') == 1


@pytest.mark.parametrize('mode', ['sync', 'async'])
@pytest.mark.parametrize('end', ['drained', 'abandoned'])
async def test_a_stream_is_billed_to_whoever_started_it(
    gemini_client: Client, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str, end: str
):
    """Started under one tenant, read or dropped under another (a streaming HTTP response outlives its block)."""
    fake_gemini.reply(text='abcdef', chunks=3)
    service = GeminiService(gemini_client, tracker=ledger)  # attribution from the context, as inside a tool
    with usage_context(organization_id='org-a', user_id='alice'):
        stream = (
            service.generate_content_stream('Write') if mode == 'sync' else service.agenerate_content_stream('Write')
        )
        first = next(stream) if isinstance(stream, Iterator) else await anext(stream)
    assert first.text
    with usage_context(organization_id='org-b', user_id='bob'):
        if isinstance(stream, Iterator):
            _ = [*stream] if end == 'drained' else stream.close()
        else:
            _ = [c async for c in stream] if end == 'drained' else await stream.aclose()
    row = only_row(ledger)
    assert (row['organization_id'], row['user_id']) == ('org-a', 'alice')
    assert row['metadata'].get('stream_incomplete', False) == (end == 'abandoned')


@pytest.mark.parametrize(
    'sent',
    [None, {}, {'totalTokenCount': 5000}, {'totalTokenCount': 5000, 'trafficType': 'ON_DEMAND'}],
    ids=['absent', 'empty', 'total-only', 'total-and-traffic'],
)
async def test_missing_usage_metadata(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, sent: dict[str, Any] | None
):
    """No usage, `usageMetadata: {}` or a total alone (no split into input and output, which are priced apart):
    the call is kept, its cost unknown, never a priced 0."""
    before = gemini_stats()
    fake_gemini.reply(usage=sent)
    response = service.generate_content('Hi')
    assert (response.usage_metadata is None) == (sent is None)

    row = only_row(ledger)
    assert buckets(row) == {}
    assert (row['cost_usd'], row['pricing_status'], row['status']) == (None, 'unpriced', 'ok')
    assert row['metadata'] == {'usage_missing': True}
    assert gemini_stats().missing_usage == before.missing_usage + 1


async def test_negative_counts_are_unpriced(service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker):
    fake_gemini.reply(usage=usage(promptTokenCount=-1000, candidatesTokenCount=50))
    service.generate_content('Hi')
    row = only_row(ledger)
    assert (row['cost_usd'], row['pricing_status']) == (None, 'unpriced')
    assert row['price_source'].startswith('unpriced: genai-prices: Invalid usage value for input_tokens')


# --- units -------------------------------------------------------------------------------------------------------


@IMAGEN_DEPRECATED
@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_imagen_per_image(
    vertex_service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str
):
    if mode == 'sync':
        images = vertex_service.generate_image('A sneaker', model='imagen-4.0-generate-001', number_of_images=3)
    else:
        images = await vertex_service.agenerate_image('A sneaker', model='imagen-4.0-generate-001', number_of_images=3)

    assert len(images) == 3
    assert fake_gemini.requests[0].action == 'predict'
    assert fake_gemini.requests[0].body['parameters']['sampleCount'] == 3
    row = only_row(ledger)
    assert (row['provider'], row['model'], row['operation']) == (
        'google-vertex',
        'imagen-4.0-generate-001',
        'generate_image',
    )
    assert (row['units'], row['unit_type'], buckets(row)) == (Decimal(3), 'image', {})
    assert (row['cost_usd'], row['pricing_status'], row['price_source']) == (
        unit_cost('google-vertex', 'imagen-4.0-generate-001', 'image', 3),
        'override',
        'config: units google*/imagen-4.0-generate-*',
    )


@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_veo_video_seconds(
    vertex_service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, mode: str
):
    fake_gemini.polls_before_done = 2
    fake_gemini.filtered_videos = 1
    kwargs: dict[str, Any] = dict(duration_seconds=6, number_of_videos=3, poll_interval=0)
    if mode == 'sync':
        videos = vertex_service.generate_video('A sneaker ad', **kwargs)
    else:
        videos = await vertex_service.agenerate_video('A sneaker ad', **kwargs)

    assert len(videos) == 2
    assert [r.action for r in fake_gemini.requests] == ['predictLongRunning'] + ['fetchPredictOperation'] * 3
    row = only_row(ledger)
    assert (row['model'], row['operation'], row['unit_type']) == (
        'veo-3.0-generate-001',
        'generate_video',
        'video_second_audio',  # Veo 3 makes sound unless `generate_audio=False`
    )
    assert row['units'] == Decimal(12)  # 6 s x (3 requested - 1 filtered)
    assert row['cost_usd'] == unit_cost('google-vertex', 'veo-3.0-generate-001', 'video_second_audio', 12)
    assert row['metadata'] == {
        'filtered_videos': 1,
        'videos': 2,
        'duration_seconds': 6,
        'generate_audio_assumed': True,
    }


async def test_track_units_elevenlabs(service: GeminiService, ledger: UsageTracker):
    service.track_units('elevenlabs', 'eleven_multilingual_v2', 'text_to_speech', 'character', 1_200)
    row = only_row(ledger)
    assert (row['provider'], row['units'], row['unit_type']) == ('elevenlabs', Decimal(1200), 'character')
    assert row['cost_usd'] == unit_cost('elevenlabs', 'eleven_multilingual_v2', 'character', 1_200)
    assert (row['organization_id'], row['user_id']) == ('acme', 'u1')


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(('code', 'error_type'), [(429, errors.ClientError), (500, errors.ServerError)])
@pytest.mark.parametrize('mode', ['sync', 'async'])
async def test_api_errors_reach_the_caller_and_are_counted(
    service: GeminiService,
    fake_gemini: FakeGemini,
    ledger: UsageTracker,
    code: int,
    error_type: type[errors.APIError],
    mode: str,
):
    before = gemini_stats()
    fake_gemini.fail(code, 'Quota exceeded.' if code == 429 else 'Boom.')
    with pytest.raises(error_type) as raised:
        if mode == 'sync':
            service.analyze_text('Hi')
        else:
            await service.aanalyze_text('Hi')

    assert raised.value.code == code
    assert len(fake_gemini.requests) == 1  # no retries configured: one call, one row
    row = only_row(ledger)
    assert (row['status'], row['cost_usd'], row['pricing_status']) == ('error', Decimal(0), 'priced')
    assert buckets(row) == {}
    assert row['metadata']['error_code'] == code
    assert row['metadata']['error_type'] == error_type.__name__
    assert gemini_stats().errors == before.errors + 1
    assert (ledger.stats().errors, ledger.stats().invalid) == (1, 0)


async def test_stream_error_before_output(service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker):
    fake_gemini.fail(503)
    with pytest.raises(errors.ServerError):
        list(service.generate_content_stream('Hi'))
    row = only_row(ledger)
    assert (row['status'], row['cost_usd'], row['metadata']['error_code']) == ('error', Decimal(0), 503)


async def test_sdk_retries_are_one_row_per_call(fake_gemini: FakeGemini, ledger: UsageTracker):
    client = Client(
        api_key='test',
        vertexai=False,
        http_options=types.HttpOptions(
            base_url=fake_gemini.base_url, retry_options=types.HttpRetryOptions(attempts=3, initial_delay=0, jitter=0)
        ),
    )
    fake_gemini.fail(429, times=2)
    GeminiService(client, deps=ORG, tracker=ledger).analyze_text('Hi')
    assert len(fake_gemini.requests) == 3
    assert [r['status'] for r in rows(ledger)] == ['ok']


async def test_tracking_failure_never_breaks_the_call(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, monkeypatch: pytest.MonkeyPatch
):
    def broken(_: Any) -> None:
        raise RuntimeError('bug')

    monkeypatch.setattr(mixin_module, 'token_counts', broken)
    before = gemini_stats()
    assert service.analyze_text('Hi') == Reply().text
    assert gemini_stats().tracking_failures == before.tracking_failures + 1
    assert ledger.stats().enqueued == 0


# --- attribution -------------------------------------------------------------------------------------------------


def tool_then_answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    usage = RequestUsage(input_tokens=500, output_tokens=30)
    if any(isinstance(p, ToolReturnPart) for m in messages for p in getattr(m, 'parts', [])):
        return ModelResponse(parts=[TextPart('Done.')], usage=usage)
    return ModelResponse(parts=[ToolCallPart('describe', {'text': 'sneaker'})], usage=usage)


@pytest.mark.parametrize('attribution', ['from-the-run', 'deps=ctx.deps'])
async def test_direct_call_in_agent_tool_joins_the_run(gemini_client: Client, ledger: UsageTracker, attribution: str):
    agent = Agent(
        FunctionModel(tool_then_answer, model_name='gemini-2.5-flash'),
        deps_type=UsageDeps,
        name='copywriter',
        capabilities=[TrackUsage()],
    )

    @agent.tool
    async def describe(ctx: RunContext[UsageDeps], text: str) -> str:
        # The run's own deps, given explicitly, name the run's payer: the call is still the run's.
        deps = ctx.deps if attribution == 'deps=ctx.deps' else None
        return await GeminiService(gemini_client, deps=deps).aanalyze_text(text, 'Describe')

    result = await agent.run('Go', deps=UsageDeps(user_id='u7', organization_id='org7', tracker=ledger))

    all_rows = rows(ledger)
    direct = [r for r in all_rows if r['source'] == 'direct']
    agent_rows = [r for r in all_rows if r['source'] == 'agent']
    assert len(direct) == 1 and len(agent_rows) == 2
    (row,) = direct
    assert (row['organization_id'], row['user_id']) == ('org7', 'u7')
    assert row['run_id'] == result.run_id == agent_rows[0]['run_id']
    assert row['agent_name'] == 'copywriter'
    assert row['operation'] == 'analyze_text'


async def test_explicit_deps_at_construction_win(gemini_client: Client, ledger: UsageTracker):
    with usage_context(UsageContext(organization_id='ambient-org', user_id='ambient', run_id='run-1', tracker=ledger)):
        GeminiService(gemini_client, deps=UsageDeps(user_id='u2', organization_id='org2')).analyze_text('Hi')
        GeminiService(gemini_client).analyze_text('Hi')

    explicit, ambient = rows(ledger)
    assert (explicit['organization_id'], explicit['user_id'], explicit['run_id']) == ('org2', 'u2', None)
    assert (ambient['organization_id'], ambient['user_id'], ambient['run_id']) == ('ambient-org', 'ambient', 'run-1')


async def test_deps_whose_attribute_fails_still_construct_and_record(
    gemini_client: Client, ledger: UsageTracker, caplog: pytest.LogCaptureFixture
):
    deps = LazyDeps('user_id', organization_id='acme')
    with caplog.at_level(logging.ERROR, logger='pai_usage'):
        GeminiService(gemini_client, deps=deps, tracker=ledger).analyze_text('Hi')
        GeminiService(gemini_client, usage_context=deps, tracker=ledger).analyze_text('Hi')

    assert [(r['organization_id'], r['user_id']) for r in rows(ledger)] == [('acme', None)] * 2
    assert 'deps.user_id' in caplog.text


async def test_no_attribution_records_null_and_warns_once(
    gemini_client: Client, ledger: UsageTracker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(mixin_module, '_once', RateLimitedLog(interval=float('inf')))
    service = GeminiService(gemini_client, tracker=ledger)
    with caplog.at_level(logging.WARNING, logger='pai_usage'):
        service.analyze_text('Hi')
        service.analyze_text('Again')

    assert [(r['organization_id'], r['user_id']) for r in rows(ledger)] == [(None, None), (None, None)]
    warnings = [r for r in caplog.records if 'no deps/usage_context' in r.getMessage()]
    assert len(warnings) == 1


async def test_custom_class_with_the_mixin(gemini_client: Client, ledger: UsageTracker):
    class Captioner(GeminiUsageMixin):
        def __init__(self, client: Client, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.client = client

        def caption(self, image: bytes) -> str:
            response = self.tracked_generate_content(
                model='models/gemini-2.0-flash',
                contents=[types.Part.from_bytes(data=image, mime_type='image/png'), 'Caption it'],
                operation='caption',
            )
            return response.text or ''

    assert Captioner(gemini_client, deps=ORG, tracker=ledger).caption(PNG_1X1)
    row = only_row(ledger)
    assert (row['model'], row['operation'], row['organization_id']) == ('gemini-2.0-flash', 'caption', 'acme')
    assert row['cost_usd'] == price(
        'gemini-2.0-flash', input_tokens=row['input_tokens'], output_tokens=row['output_tokens']
    )


def test_pai_usage_imports_without_google_genai():
    code = (
        'import sys; sys.modules["google.genai"] = None\n'
        'import pai_usage\n'
        'try:\n    import pai_usage.gemini\nexcept ImportError as e:\n    print(e)\n'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "pai-usage[gemini]"' in out


# --- the example -------------------------------------------------------------------------------------------------


def test_ad_creator_example(sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    from examples.ad_creator import main

    monkeypatch.delenv('GEMINI_API_KEY', raising=False)
    assert main(['--database-url', sqlite_url]) == 0
    out = capsys.readouterr().out

    engine = sa.create_engine(sqlite_url)
    all_rows = token_usage_rows(engine)
    engine.dispose()
    by_source = {s: [r for r in all_rows if r['source'] == s] for s in ('agent', 'direct')}
    assert len(by_source['agent']) == 7  # 3 orchestrator requests + 4 delegated ad_creation_agent requests
    assert sorted(r['operation'] for r in by_source['direct']) == [
        'analyze_image',
        'analyze_text',
        'generate_image',
        'review_image',
    ]
    assert {(r['organization_id'], r['user_id']) for r in all_rows} == {('demo-org', 'demo-user')}
    assert all(r['pricing_status'] == 'priced' and r['status'] == 'ok' for r in all_rows)
    # Each direct call is linked to the run whose tool made it; the sub-agent's run to the orchestrator's.
    runs = {r['agent_name']: r['run_id'] for r in by_source['agent']}
    assert {r['operation']: r['run_id'] for r in by_source['direct']} == {
        'analyze_image': runs['orchestrator'],
        'analyze_text': runs['ad_creation_agent'],
        'generate_image': runs['ad_creation_agent'],
        'review_image': runs['ad_creation_agent'],
    }
    assert {r['parent_run_id'] for r in by_source['agent'] if r['agent_name'] == 'ad_creation_agent'} == {
        runs['orchestrator']
    }
    # The printed summary shows both sources and a total equal to the sum of the rows.
    total = sum((r['cost_usd'] for r in all_rows), Decimal(0))
    assert f'Total: {format_usd(total)} over 11 events' in out
    lines = out.splitlines()
    summary = out.partition('$ pai-usage summary')[2].splitlines()
    assert summary and max(len(line) for line in summary) <= 100  # the demo's table fits a 100-column terminal
    assert any(line.startswith('agent ') for line in lines) and any(line.startswith('direct ') for line in lines)


async def test_stream_cut_mid_way_keeps_the_tokens_seen(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    fake_gemini.reply(
        text='abcdef',
        chunks=3,
        cut_after=2,
        chunk_usage=[
            usage(promptTokenCount=400, candidatesTokenCount=10),
            usage(promptTokenCount=400, candidatesTokenCount=20),
        ],
    )
    seen: list[str] = []
    with pytest.raises(Exception) as raised:
        for chunk in service.generate_content_stream('Write'):
            seen.append(chunk.text or '')
    assert not isinstance(raised.value, errors.APIError)  # a transport error, passed through unchanged
    assert len(seen) == 2
    row = only_row(ledger)
    assert row['status'] == 'error'
    assert buckets(row) == {'input_tokens': 400, 'output_tokens': 20}  # generated before the cut: billed
    assert row['cost_usd'] == price('gemini-2.5-flash', input_tokens=400, output_tokens=20)
    assert row['metadata']['stream_incomplete'] is True
    assert row['metadata']['error_type'] == type(raised.value).__name__


async def test_transport_error_is_recorded_unpriced(ledger: UsageTracker, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    with FakeGemini() as fake:
        port = fake.port  # free now, closed once the fake stops
    client = Client(api_key='test', vertexai=False, http_options=types.HttpOptions(base_url=f'http://127.0.0.1:{port}'))
    before = gemini_stats()
    with pytest.raises(Exception) as raised:
        await GeminiService(client, deps=ORG, tracker=ledger).aanalyze_text('Hi')
    await client.aio.aclose()
    client.close()
    assert not isinstance(raised.value, errors.APIError)
    row = only_row(ledger)
    assert (row['status'], row['cost_usd'], row['pricing_status']) == ('error', None, 'unpriced')
    assert gemini_stats().errors == before.errors + 1


async def test_veo_operation_error(vertex_service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker):
    fake_gemini.video_error = {'code': 400, 'message': 'Prompt rejected.'}
    with pytest.raises(errors.APIError) as raised:
        vertex_service.generate_video('A sneaker ad', poll_interval=0)
    assert raised.value.code == 400
    row = only_row(ledger)
    assert (row['status'], row['cost_usd'], row['units'], row['metadata']['error_code']) == (
        'error',
        Decimal(0),
        None,
        400,
    )


async def test_rows_on_every_backend(gemini_client: Client, fake_gemini: FakeGemini, tracker: UsageTracker):
    service = GeminiService(gemini_client, deps=ORG, tracker=tracker)
    fake_gemini.reply(usage=usage(promptTokenCount=3_000, cachedContentTokenCount=1_000, candidatesTokenCount=77))
    await service.agenerate_content('Hi')
    service.track_units('elevenlabs', 'eleven_multilingual_v2', 'text_to_speech', 'character', 333)

    text, speech = rows(tracker)
    assert buckets(text) == {'input_tokens': 2_000, 'cache_read_tokens': 1_000, 'output_tokens': 77}
    assert text['cost_usd'] == price('gemini-2.5-flash', input_tokens=3_000, cache_read_tokens=1_000, output_tokens=77)
    assert (speech['units'], speech['cost_usd']) == (
        Decimal(333),
        unit_cost('elevenlabs', 'eleven_multilingual_v2', 'character', 333),
    )


def test_example_online_needs_a_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from examples.ad_creator import main

    monkeypatch.delenv('GEMINI_API_KEY', raising=False)
    monkeypatch.delenv('GOOGLE_API_KEY', raising=False)
    assert main(['--online']) == 2
    assert 'GEMINI_API_KEY' in capsys.readouterr().err


async def test_cached_text_with_audio_input_is_priced(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    fake_gemini.reply(
        usage=usage(
            promptTokenCount=1_000,
            cachedContentTokenCount=600,
            promptTokensDetails=[{'modality': 'AUDIO', 'tokenCount': 300}, {'modality': 'TEXT', 'tokenCount': 700}],
            candidatesTokenCount=50,
        )
    )
    service.generate_content('Transcribe and summarize')
    row = only_row(ledger)
    assert buckets(row) == {
        'input_tokens': 100,
        'cache_read_tokens': 600,
        'input_audio_tokens': 300,
        'output_tokens': 50,
    }
    assert row['cost_usd'] == price(
        'gemini-2.5-flash',
        input_tokens=1_000,
        cache_read_tokens=600,
        input_audio_tokens=300,
        cache_audio_read_tokens=0,
        output_tokens=50,
    )


# --- issue 13: every Gemini cost equals genai-prices' price of the same REST body ----------------------------------


def body_price(body: dict[str, Any], *, tier: str | None = None) -> Decimal | None:
    """genai-prices' own reading of a `generateContent` body (its Google extractor), at 12 decimal places."""
    extracted = genai_prices.extract_usage(body, provider_id='google')
    context = {'service_tier': tier} if tier else None
    try:
        return extracted.calc_price(price_context=context).total_price.quantize(Decimal('1e-12'))
    except (LookupError, ValueError):
        return None


MODALITY_CASES = [
    pytest.param(
        'gemini-live-2.5-flash',
        usage(
            promptTokenCount=3_100,
            promptTokensDetails=[
                {'modality': 'TEXT', 'tokenCount': 100},
                {'modality': 'IMAGE', 'tokenCount': 1_000},
                {'modality': 'VIDEO', 'tokenCount': 2_000},
            ],
            candidatesTokenCount=300,
        ),
        id='image-and-video-input',
    ),
    pytest.param(
        'gemini-omni-flash-preview',
        usage(
            promptTokenCount=500,
            candidatesTokenCount=1_200,
            candidatesTokensDetails=[
                {'modality': 'TEXT', 'tokenCount': 200},
                {'modality': 'VIDEO', 'tokenCount': 1_000},
            ],
        ),
        id='video-output',
    ),
    pytest.param(
        'gemini-2.5-flash',
        usage(
            promptTokenCount=5_000,
            cachedContentTokenCount=3_000,
            promptTokensDetails=[{'modality': 'TEXT', 'tokenCount': 2_000}, {'modality': 'AUDIO', 'tokenCount': 3_000}],
            cacheTokensDetails=[{'modality': 'TEXT', 'tokenCount': 1_000}, {'modality': 'AUDIO', 'tokenCount': 2_000}],
            toolUsePromptTokenCount=400,
            toolUsePromptTokensDetails=[{'modality': 'TEXT', 'tokenCount': 400}],
            thoughtsTokenCount=600,
            candidatesTokenCount=100,
        ),
        id='cached-audio-tools-thoughts',
    ),
    pytest.param(
        'gemini-2.5-flash-image',
        usage(
            promptTokenCount=800,
            promptTokensDetails=[{'modality': 'TEXT', 'tokenCount': 300}, {'modality': 'IMAGE', 'tokenCount': 500}],
            candidatesTokenCount=1_400,
            candidatesTokensDetails=[
                {'modality': 'TEXT', 'tokenCount': 110},
                {'modality': 'IMAGE', 'tokenCount': 1_290},
            ],
        ),
        id='image-output',
    ),
]


@pytest.mark.parametrize(('model', 'metadata'), MODALITY_CASES)
async def test_every_modality_is_priced(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, model: str, metadata: dict[str, Any]
):
    fake_gemini.reply(usage=metadata, image=False)
    service.generate_content('Describe', model=model)
    row = only_row(ledger)
    expected = body_price({'modelVersion': model, 'usageMetadata': metadata})
    assert expected is not None and expected > 0
    assert (row['cost_usd'], row['pricing_status']) == (expected, 'priced')
    # Every token is in one bucket, so the row's total is Gemini's own total.
    assert sum(buckets(row).values()) == metadata['totalTokenCount']


async def test_an_alias_is_priced_as_the_model_that_served_it(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    metadata = usage(promptTokenCount=10_000, candidatesTokenCount=2_000)
    fake_gemini.reply(usage=metadata, model_version='gemini-2.5-flash')
    service.generate_content('Hi', model='gemini-flash-latest')
    row = only_row(ledger)
    assert row['model'] == 'gemini-2.5-flash'
    assert row['metadata']['requested_model'] == 'gemini-flash-latest'
    assert row['cost_usd'] == price('gemini-2.5-flash', input_tokens=10_000, output_tokens=2_000)
    assert row['cost_usd'] != price('gemini-flash-latest', input_tokens=10_000, output_tokens=2_000)


@pytest.mark.parametrize('tier', ['priority', 'flex'])
@pytest.mark.parametrize('stream', [False, True])
async def test_the_service_tier_served_is_priced(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, tier: str, stream: bool
):
    model = 'gemini-3.8-flash-tts'  # genai-prices has flex and priority prices for it
    metadata = usage(promptTokenCount=20_000, candidatesTokenCount=4_000)
    fake_gemini.reply(usage=metadata, service_tier=tier.upper(), chunk_usage=[metadata] * 3 if stream else None)
    if stream:
        assert ''.join(c.text or '' for c in service.generate_content_stream('Read this', model=model))
    else:
        service.generate_content('Read this', model=model)
    row = only_row(ledger)
    body = {'modelVersion': model, 'usageMetadata': metadata}
    assert row['service_tier'] == tier
    assert row['cost_usd'] == body_price(body, tier=tier)
    assert row['cost_usd'] != body_price(body)  # the standard price differs


async def test_the_requested_tier_is_used_when_the_response_says_none(
    service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker
):
    model = 'gemini-3.8-flash-tts'
    metadata = usage(promptTokenCount=20_000, candidatesTokenCount=4_000)
    fake_gemini.reply(usage=metadata)
    service.generate_content('Read this', model=model, config=types.GenerateContentConfig(service_tier='flex'))
    row = only_row(ledger)
    assert row['service_tier'] == 'flex'
    assert row['cost_usd'] == body_price({'modelVersion': model, 'usageMetadata': metadata}, tier='flex')


@pytest.mark.parametrize(('generate_audio', 'unit_type'), [(False, 'video_second'), (True, 'video_second_audio')])
async def test_veo_audio_is_priced_separately(
    vertex_service: GeminiService, fake_gemini: FakeGemini, ledger: UsageTracker, generate_audio: bool, unit_type: str
):
    vertex_service.generate_video(
        'A sneaker ad', model='veo-3.0-fast-generate-001', duration_seconds=4, poll_interval=0,
        generate_audio=generate_audio,
    )  # fmt: skip
    row = only_row(ledger)
    assert (row['unit_type'], row['units']) == (unit_type, Decimal(4))
    assert row['cost_usd'] == unit_cost('google-vertex', 'veo-3.0-fast-generate-001', unit_type, 4)
