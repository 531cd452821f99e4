"""`GeminiService`: a reference service for direct Gemini calls, tracked by `GeminiUsageMixin`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import types

from ..context import UsageContext
from ..deps import HasUsageAttribution
from ..tracker import UsageTracker
from ._mixin import Contents, GeminiUsageMixin

__all__ = (
    'DEFAULT_IMAGE_MODEL',
    'DEFAULT_TEXT_MODEL',
    'DEFAULT_VIDEO_MODEL',
    'GeminiService',
    'GeneratedImage',
)

DEFAULT_TEXT_MODEL = 'gemini-2.5-flash'
"""Model for `analyze_text`, `analyze_image`, `review_image` and `generate_content` unless given."""
DEFAULT_IMAGE_MODEL = 'gemini-2.5-flash-image'
"""Model for `generate_image` unless given: a Gemini image model (tokens) or an `imagen-*` model (per image)."""
DEFAULT_VIDEO_MODEL = 'veo-3.0-generate-001'
"""Model for `generate_video` unless given."""

_REVIEW_PROMPT = (
    'Review this image against the brief below. Say whether it meets the brief, list concrete problems, '
    'and end with a score from 1 to 10.\n\nBrief: {brief}'
)


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One generated image."""

    data: bytes
    """The encoded image."""
    mime_type: str
    """Its MIME type, e.g. `image/png`."""


def _text(response: types.GenerateContentResponse) -> str:
    # `response.text` warns when non-text parts are present; join the text parts ourselves.
    parts = response.candidates[0].content.parts if response.candidates and response.candidates[0].content else None
    return ''.join(p.text for p in parts or [] if p.text and not p.thought)


def _inline_images(response: types.GenerateContentResponse) -> list[GeneratedImage]:
    images: list[GeneratedImage] = []
    for candidate in response.candidates or []:
        for part in candidate.content.parts or [] if candidate.content else []:
            blob = part.inline_data
            if blob is not None and blob.data and (blob.mime_type or '').startswith('image/'):
                images.append(GeneratedImage(blob.data, blob.mime_type or 'image/png'))
    return images


def _imagen_images(response: types.GenerateImagesResponse) -> list[GeneratedImage]:
    return [
        GeneratedImage(g.image.image_bytes, g.image.mime_type or 'image/png')
        for g in response.generated_images or []
        if g.image is not None and g.image.image_bytes
    ]


def _image_part(image: bytes, mime_type: str) -> types.Part:
    return types.Part.from_bytes(data=image, mime_type=mime_type)


class GeminiService(GeminiUsageMixin):
    """Direct Gemini calls for an app, each recorded in the usage ledger (one row per API call).

    ```python
    service = GeminiService(genai.Client(), deps=UsageDeps(user_id='u1', organization_id='acme'))
    description = service.analyze_image(png_bytes)
    ```

    Inside an agent run with the `TrackUsage` capability, `deps` can be left out: the run's user, organization
    and run id are used. Every method has an async twin prefixed with `a` (`agenerate_image`, ...) that uses
    `client.aio`. Errors from the SDK reach the caller unchanged.
    """

    def __init__(
        self,
        client: genai.Client | None = None,
        *,
        deps: Any = None,
        usage_context: UsageContext | HasUsageAttribution | None = None,
        tracker: UsageTracker | None = None,
        text_model: str = DEFAULT_TEXT_MODEL,
        image_model: str = DEFAULT_IMAGE_MODEL,
        video_model: str = DEFAULT_VIDEO_MODEL,
    ) -> None:
        """Create the service.

        Args:
            client: The SDK client; defaults to `genai.Client()` (reads `GEMINI_API_KEY` / Vertex settings).
            deps: Explicit attribution: any object with `user_id` and `organization_id`, e.g. `UsageDeps`.
            usage_context: Explicit attribution as a `UsageContext` (or deps, as for `usage_context()`).
            tracker: Tracker to record to (default: the deps', the context's, then `get_tracker()`).
            text_model: Default model for text and vision calls.
            image_model: Default model for `generate_image`.
            video_model: Default model for `generate_video`.
        """
        super().__init__(deps=deps, usage_context=usage_context, tracker=tracker)
        self.client = client if client is not None else genai.Client()
        self.text_model = text_model
        """Default model for text and vision calls."""
        self.image_model = image_model
        """Default model for `generate_image`."""
        self.video_model = video_model
        """Default model for `generate_video`."""

    # --- generate_image --------------------------------------------------------------------------------------

    def generate_image(
        self, prompt: str, *, model: str | None = None, number_of_images: int = 1, aspect_ratio: str | None = None
    ) -> list[GeneratedImage]:
        """Generate images from a prompt.

        `imagen-*` models are billed per image (the price table's `image` unit); Gemini image models
        (e.g. `gemini-2.5-flash-image`) by tokens, image output tokens included, priced by genai-prices.
        """
        model = model or self.image_model
        if _is_imagen(model):
            response = self.tracked_generate_images(
                model=model, prompt=prompt, config=_imagen_config(number_of_images, aspect_ratio)
            )
            return _imagen_images(response)
        images: list[GeneratedImage] = []
        for _ in range(number_of_images):
            response = self.tracked_generate_content(
                model=model, contents=prompt, config=_image_config(aspect_ratio), operation='generate_image'
            )
            images.extend(_inline_images(response))
        return images

    async def agenerate_image(
        self, prompt: str, *, model: str | None = None, number_of_images: int = 1, aspect_ratio: str | None = None
    ) -> list[GeneratedImage]:
        """Async `generate_image`."""
        model = model or self.image_model
        if _is_imagen(model):
            response = await self.atracked_generate_images(
                model=model, prompt=prompt, config=_imagen_config(number_of_images, aspect_ratio)
            )
            return _imagen_images(response)
        images: list[GeneratedImage] = []
        for _ in range(number_of_images):
            response = await self.atracked_generate_content(
                model=model, contents=prompt, config=_image_config(aspect_ratio), operation='generate_image'
            )
            images.extend(_inline_images(response))
        return images

    # --- analyze_image / review_image ------------------------------------------------------------------------

    def analyze_image(
        self,
        image: bytes,
        prompt: str = 'Describe this product image for an advertiser: the product, its style and its selling points.',
        *,
        mime_type: str = 'image/png',
        model: str | None = None,
    ) -> str:
        """Describe an image (vision input, billed by tokens)."""
        response = self.tracked_generate_content(
            model=model or self.text_model, contents=[_image_part(image, mime_type), prompt], operation='analyze_image'
        )
        return _text(response)

    async def aanalyze_image(
        self,
        image: bytes,
        prompt: str = 'Describe this product image for an advertiser: the product, its style and its selling points.',
        *,
        mime_type: str = 'image/png',
        model: str | None = None,
    ) -> str:
        """Async `analyze_image`."""
        response = await self.atracked_generate_content(
            model=model or self.text_model, contents=[_image_part(image, mime_type), prompt], operation='analyze_image'
        )
        return _text(response)

    def review_image(self, image: bytes, brief: str, *, mime_type: str = 'image/png', model: str | None = None) -> str:
        """Review an image against a creative brief."""
        response = self.tracked_generate_content(
            model=model or self.text_model,
            contents=[_image_part(image, mime_type), _REVIEW_PROMPT.format(brief=brief)],
            operation='review_image',
        )
        return _text(response)

    async def areview_image(
        self, image: bytes, brief: str, *, mime_type: str = 'image/png', model: str | None = None
    ) -> str:
        """Async `review_image`."""
        response = await self.atracked_generate_content(
            model=model or self.text_model,
            contents=[_image_part(image, mime_type), _REVIEW_PROMPT.format(brief=brief)],
            operation='review_image',
        )
        return _text(response)

    # --- analyze_text ----------------------------------------------------------------------------------------

    def analyze_text(self, text: str, instruction: str | None = None, *, model: str | None = None) -> str:
        """Answer `instruction` about `text` (or just answer `text` when no instruction is given)."""
        response = self.tracked_generate_content(
            model=model or self.text_model, contents=_text_prompt(text, instruction), operation='analyze_text'
        )
        return _text(response)

    async def aanalyze_text(self, text: str, instruction: str | None = None, *, model: str | None = None) -> str:
        """Async `analyze_text`."""
        response = await self.atracked_generate_content(
            model=model or self.text_model, contents=_text_prompt(text, instruction), operation='analyze_text'
        )
        return _text(response)

    # --- generate_content ------------------------------------------------------------------------------------

    def generate_content(
        self,
        contents: Contents,
        *,
        model: str | None = None,
        config: types.GenerateContentConfigOrDict | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateContentResponse:
        """`client.models.generate_content`, tracked; returns the SDK's response."""
        return self.tracked_generate_content(
            model=model or self.text_model, contents=contents, config=config, metadata=metadata
        )

    async def agenerate_content(
        self,
        contents: Contents,
        *,
        model: str | None = None,
        config: types.GenerateContentConfigOrDict | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> types.GenerateContentResponse:
        """Async `generate_content`."""
        return await self.atracked_generate_content(
            model=model or self.text_model, contents=contents, config=config, metadata=metadata
        )

    def generate_content_stream(
        self,
        contents: Contents,
        *,
        model: str | None = None,
        config: types.GenerateContentConfigOrDict | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Generator[types.GenerateContentResponse]:
        """`client.models.generate_content_stream`, tracked once the stream ends (last chunk's usage)."""
        return self.tracked_generate_content_stream(
            model=model or self.text_model, contents=contents, config=config, metadata=metadata
        )

    def agenerate_content_stream(
        self,
        contents: Contents,
        *,
        model: str | None = None,
        config: types.GenerateContentConfigOrDict | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[types.GenerateContentResponse]:
        """Async `generate_content_stream`: `async for chunk in service.agenerate_content_stream(...)`."""
        return self.atracked_generate_content_stream(
            model=model or self.text_model, contents=contents, config=config, metadata=metadata
        )

    # --- generate_video --------------------------------------------------------------------------------------

    def generate_video(
        self,
        prompt: str,
        *,
        model: str | None = None,
        duration_seconds: int | None = None,
        number_of_videos: int = 1,
        poll_interval: float = 10.0,
        timeout: float | None = 600.0,
        generate_audio: bool | None = None,
    ) -> list[types.Video]:
        """Generate videos with Veo (needs a Vertex AI client), billed per second of video.

        The unit is `video_second_audio` when the video has sound (Veo 3, unless `generate_audio=False`).
        """
        op = self.tracked_generate_videos(
            model=model or self.video_model,
            source=types.GenerateVideosSource(prompt=prompt),
            config=types.GenerateVideosConfig(
                duration_seconds=duration_seconds, number_of_videos=number_of_videos, generate_audio=generate_audio
            ),
            poll_interval=poll_interval,
            timeout=timeout,
        )
        return _videos(op)

    async def agenerate_video(
        self,
        prompt: str,
        *,
        model: str | None = None,
        duration_seconds: int | None = None,
        number_of_videos: int = 1,
        poll_interval: float = 10.0,
        timeout: float | None = 600.0,
        generate_audio: bool | None = None,
    ) -> list[types.Video]:
        """Async `generate_video`."""
        op = await self.atracked_generate_videos(
            model=model or self.video_model,
            source=types.GenerateVideosSource(prompt=prompt),
            config=types.GenerateVideosConfig(
                duration_seconds=duration_seconds, number_of_videos=number_of_videos, generate_audio=generate_audio
            ),
            poll_interval=poll_interval,
            timeout=timeout,
        )
        return _videos(op)


def _is_imagen(model: str) -> bool:
    return model.rsplit('/', 1)[-1].startswith('imagen')


def _imagen_config(number_of_images: int, aspect_ratio: str | None) -> types.GenerateImagesConfig:
    return types.GenerateImagesConfig(number_of_images=number_of_images, aspect_ratio=aspect_ratio)


def _image_config(aspect_ratio: str | None) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(
        response_modalities=['TEXT', 'IMAGE'],
        image_config=types.ImageConfig(aspect_ratio=aspect_ratio) if aspect_ratio else None,
    )


def _text_prompt(text: str, instruction: str | None) -> str:
    return text if instruction is None else f'{instruction}\n\n{text}'


def _videos(op: types.GenerateVideosOperation) -> list[types.Video]:
    result = op.result
    return [g.video for g in (result.generated_videos or []) if g.video is not None] if result else []
