"""The Ad Creator: an orchestrator agent delegates to an `ad_creation_agent`; their tools call Gemini directly.

Every model request of both agents (`source='agent'`, via `TrackUsage`) and every direct Gemini call made in
their tools (`source='direct'`, via `GeminiService`) lands in the same `token_usage` table, attributed to the
user and organization in `UsageDeps` and linked to the run that made it. At the end it prints
`pai-usage summary`.

Offline by default: the agents run on `FunctionModel`s that report realistic usage under real model names (so
costs are real prices), and the Gemini calls go to an in-process fake of the Gemini REST API, through the real
google-genai SDK. With `GEMINI_API_KEY` set (and `--offline` not given), it uses real Gemini models and the real API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import types
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import UsageDeps, UsageTracker
from pai_usage.capability import TrackUsage
from pai_usage.gemini import GeminiService
from pai_usage.tracker import DATABASE_URL_ENV_VAR, DEFAULT_DATABASE_URL

__all__ = ('AdDeps', 'ad_creation_agent', 'build_agents', 'main', 'orchestrator', 'run_ad_creator')

ORGANIZATION_ID = 'demo-org'
USER_ID = 'demo-user'
REAL_MODEL_ENV_VAR = 'AD_CREATOR_MODEL'
"""Model for both agents in online mode (default `google-gla:gemini-2.5-flash`)."""


@dataclass
class AdDeps(UsageDeps):
    """Who is billed (`UsageDeps`), plus what the tools need."""

    gemini: genai.Client | None = None
    """The SDK client the tools' `GeminiService` uses."""
    product_image: bytes = b''
    """The product photo to advertise."""
    ad_model: Model | str | None = None
    """Model of the delegated `ad_creation_agent`."""
    images: list[bytes] = field(default_factory=list[bytes])
    """Images generated so far."""


def build_agents() -> tuple[Agent[AdDeps, str], Agent[AdDeps, str]]:
    """The orchestrator and the `ad_creation_agent`, each recording its own requests with `TrackUsage`."""
    ad_agent = Agent[AdDeps, str](
        None,
        deps_type=AdDeps,
        name='ad_creation_agent',
        instructions='Write the ad copy, generate the ad image, review it, then summarize the finished ad.',
        capabilities=[TrackUsage()],
    )

    @ad_agent.tool
    async def write_copy(ctx: RunContext[AdDeps], brief: str) -> str:
        """Write the headline and body copy for the ad."""
        # No deps given: the service attributes the call to the current run (user, organization, run id).
        service = GeminiService(ctx.deps.gemini)
        return await service.aanalyze_text(brief, 'Write a headline and two sentences of ad copy for this brief.')

    @ad_agent.tool
    async def generate_image(ctx: RunContext[AdDeps], prompt: str) -> str:
        """Generate the ad image."""
        images = await GeminiService(ctx.deps.gemini).agenerate_image(prompt)
        ctx.deps.images.extend(image.data for image in images)
        return f'Generated {len(images)} image(s), {sum(len(i.data) for i in images)} bytes.'

    @ad_agent.tool
    async def review_image(ctx: RunContext[AdDeps], brief: str) -> str:
        """Review the latest generated image against the brief."""
        if not ctx.deps.images:
            return 'No image to review yet.'
        return await GeminiService(ctx.deps.gemini).areview_image(ctx.deps.images[-1], brief)

    boss = Agent[AdDeps, str](
        None,
        deps_type=AdDeps,
        name='orchestrator',
        instructions='Analyze the product photo, then delegate the ad to the ad creation agent.',
        capabilities=[TrackUsage()],
    )

    @boss.tool
    async def analyze_product(ctx: RunContext[AdDeps]) -> str:
        """Describe the product in the photo."""
        return await GeminiService(ctx.deps.gemini).aanalyze_image(ctx.deps.product_image)

    @boss.tool
    async def create_ad(ctx: RunContext[AdDeps], brief: str) -> str:
        """Delegate the ad to the ad creation agent."""
        # `usage=ctx.usage`: the sub-agent's usage counts toward this run's; its own `TrackUsage` records its
        # requests, linked to this run as `parent_run_id`.
        result = await ad_agent.run(brief, deps=ctx.deps, usage=ctx.usage, model=ctx.deps.ad_model)
        return result.output

    return boss, ad_agent


orchestrator, ad_creation_agent = build_agents()


# --- offline models --------------------------------------------------------------------------------------------


def _step(messages: list[ModelMessage]) -> int:
    return sum(isinstance(m, ModelResponse) for m in messages)


def _last_tool_return(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        for part in getattr(message, 'parts', []):
            if isinstance(part, ToolReturnPart):
                return str(part.content)
    return ''


def _response(
    part: TextPart | ToolCallPart, *, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0
) -> ModelResponse:
    usage = RequestUsage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read_tokens)
    return ModelResponse(parts=[part], usage=usage, provider_name='google-gla')


def _orchestrator_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    step = _step(messages)
    if step == 0:
        return _response(ToolCallPart('analyze_product', {}), input_tokens=1_240, output_tokens=18)
    if step == 1:
        brief = f'Instagram ad for this product: {_last_tool_return(messages)}'
        return _response(ToolCallPart('create_ad', {'brief': brief}), input_tokens=1_420, output_tokens=95)
    return _response(
        TextPart(f'The ad is ready.\n{_last_tool_return(messages)}'),
        input_tokens=1_980,
        cache_read_tokens=1_024,
        output_tokens=120,
    )


def _ad_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    step = _step(messages)
    brief = next(
        (
            str(p.content)
            for m in messages
            for p in getattr(m, 'parts', [])
            if getattr(p, 'part_kind', '') == 'user-prompt'
        ),
        '',
    )
    if step == 0:
        return _response(ToolCallPart('write_copy', {'brief': brief}), input_tokens=860, output_tokens=60)
    if step == 1:
        prompt = f'A bright, summery lifestyle photo for this ad: {_last_tool_return(messages)}'
        return _response(ToolCallPart('generate_image', {'prompt': prompt}), input_tokens=1_010, output_tokens=75)
    if step == 2:
        return _response(ToolCallPart('review_image', {'brief': brief}), input_tokens=1_090, output_tokens=40)
    return _response(
        TextPart(f'Copy written, image generated and reviewed: {_last_tool_return(messages)}'),
        input_tokens=1_350,
        output_tokens=90,
    )


# The direct Gemini calls' answers, in call order. Usage is computed by the fake from the request (258 tokens per
# input image, 1290 per generated image, ~4 characters per text token) plus these thinking tokens.
_OFFLINE_REPLIES: list[dict[str, Any]] = [
    {
        'text': 'A red canvas sneaker with a white rubber sole on a plain background. Casual, retro style. '
        'Selling points: lightweight, classic silhouette, bold color.',
        'thoughts': 420,
    },
    {
        'text': 'Step Into Summer. Our classic red canvas sneaker goes wherever the sun does. '
        'Lightweight, bold, and made for long days.',
        'thoughts': 250,
    },
    {'text': 'Here is the ad image.'},
    {
        'text': 'Meets the brief: yes. The sneaker is the clear focal point and the colors read as summer. '
        'Problems: the logo is small. Score: 8/10.',
        'thoughts': 310,
    },
]


def product_png(width: int = 64, height: int = 40) -> bytes:
    """A tiny 'product photo' (a red sneaker-ish shape on white), encoded as PNG without any imaging library."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            sole = y >= height * 0.75 and 6 <= x < width - 6
            upper = height * 0.35 <= y < height * 0.75 and 8 <= x < width * 0.55 + (y - height * 0.35) * 0.8
            rows.extend((245, 245, 245) if sole else (200, 30, 40) if upper else (255, 255, 255))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(bytes(rows))) + chunk(b'IEND', b'')
    )


# --- running -----------------------------------------------------------------------------------------------------


async def run_ad_creator(
    tracker: UsageTracker,
    *,
    offline: bool = True,
    image: bytes | None = None,
    prompt: str = 'Create an Instagram ad for this product.',
) -> str:
    """Run the Ad Creator once, recording to `tracker`; returns the orchestrator's answer."""
    deps = AdDeps(
        user_id=USER_ID, organization_id=ORGANIZATION_ID, tracker=tracker, product_image=image or product_png()
    )
    if offline:
        from tests.fake_gemini import FakeGemini, Reply

        with FakeGemini() as fake:
            for reply in _OFFLINE_REPLIES:
                fake.reply(Reply(**reply))
            deps.gemini = genai.Client(
                api_key='offline', vertexai=False, http_options=types.HttpOptions(base_url=fake.base_url)
            )
            deps.ad_model = FunctionModel(_ad_model, model_name='gemini-2.5-flash')
            try:
                result = await orchestrator.run(
                    prompt, deps=deps, model=FunctionModel(_orchestrator_model, model_name='gemini-2.5-pro')
                )
            finally:
                deps.gemini.close()
                await deps.gemini.aio.aclose()
    else:
        model = os.environ.get(REAL_MODEL_ENV_VAR, 'google-gla:gemini-2.5-flash')
        deps.gemini = genai.Client()
        deps.ad_model = model
        result = await orchestrator.run(prompt, deps=deps, model=model)
    return result.output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m examples.ad_creator', description=(__doc__ or '').splitlines()[0])
    parser.add_argument(
        '--database-url', help=f'ledger database (default: ${DATABASE_URL_ENV_VAR}, else {DEFAULT_DATABASE_URL})'
    )
    parser.add_argument('--image', help='product photo (PNG); default: a drawn placeholder')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--offline', action='store_true', default=None, help='fake models and fake Gemini (default)')
    mode.add_argument('--online', dest='offline', action='store_false', help='real Gemini (needs GEMINI_API_KEY)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Ad Creator, then print `pai-usage summary` for the demo organization."""
    args = _parser().parse_args(argv)
    offline = args.offline if args.offline is not None else not os.environ.get('GEMINI_API_KEY')
    if not offline and not (os.environ.get('GEMINI_API_KEY') or os.environ.get('GOOGLE_API_KEY')):
        print(
            '--online needs GEMINI_API_KEY (or GOOGLE_API_KEY); run without it for the offline demo.', file=sys.stderr
        )
        return 2
    database_url = args.database_url or os.environ.get(DATABASE_URL_ENV_VAR) or DEFAULT_DATABASE_URL
    image = open(args.image, 'rb').read() if args.image else None  # noqa: SIM115
    with UsageTracker(database_url) as tracker:
        answer = asyncio.run(run_ad_creator(tracker, offline=offline, image=image))
        tracker.flush()
    print(f'Ad Creator ({"offline: fake models, fake Gemini" if offline else "online"}):\n{answer}\n')
    print('$ pai-usage summary --by source,operation,model --org demo-org\n')
    from pai_usage._cli import cli_logic

    return cli_logic(
        ['summary', '--database-url', database_url, '--by', 'source,operation,model', '--org', ORGANIZATION_ID]
    )


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
