"""A loopback fake of the Gemini REST API, for driving the real google-genai SDK offline.

It speaks the wire protocol the SDK speaks (camelCase JSON):

- Gemini API: `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.
- Vertex AI: the same generate-content paths under `/v1beta1/...`, Imagen `:predict`, and Veo
  `:predictLongRunning` + `:fetchPredictOperation`.

Each answer carries a `usageMetadata` computed from the request (or scripted with `FakeGemini.reply`), and any
request can be made to fail with an HTTP error (`FakeGemini.fail`). Every request is recorded.

Used by the tests (fixtures `fake_gemini`, `gemini_client`, `vertex_client`) and by the offline Ad Creator example,
so it lives outside `conftest.py` and imports nothing from pytest unless the fixtures are used.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = (
    'DEFAULT',
    'IMAGE_INPUT_TOKENS',
    'IMAGE_OUTPUT_TOKENS',
    'MP4_BYTES',
    'PNG_1X1',
    'FakeGemini',
    'RecordedRequest',
    'Reply',
    'clean_google_env',
    'fake_gemini',
    'gemini_client',
    'vertex_client',
)

PNG_1X1 = base64.b64decode(
    'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='
)
"""A valid one-pixel PNG, sent as 'generated' image bytes and usable as an input image."""
MP4_BYTES = b'\x00\x00\x00\x18ftypmp42fake-video'
"""Bytes returned as a 'generated' video."""
IMAGE_INPUT_TOKENS = 258
"""What Gemini counts for one input image up to 384px."""
IMAGE_OUTPUT_TOKENS = 1290
"""What Gemini counts for one generated 1024px image."""


class _Default:
    def __repr__(self) -> str:
        return 'DEFAULT'


DEFAULT: Any = _Default()
"""Marker: compute this part of the reply from the request."""


@dataclass
class Reply:
    """A scripted answer for the next generate-content request."""

    text: str = 'A fake answer from the loopback Gemini.'
    """Text of the answer (split across chunks when streamed)."""
    usage: dict[str, Any] | None = DEFAULT
    """The final `usageMetadata` (camelCase); None sends none; DEFAULT computes it from the request."""
    image: bool | None = None
    """Whether to answer with an inline PNG; None follows the request's `responseModalities`."""
    thoughts: int = 0
    """Thinking tokens to report (`thoughtsTokenCount`) in the computed usage."""
    chunks: int = 3
    """Number of SSE events when streamed."""
    chunk_usage: list[dict[str, Any] | None] | None = None
    """Per-chunk `usageMetadata` when streamed; default: running totals ending at `usage`."""
    cut_after: int | None = None
    """When streamed, drop the connection after this many chunks (a network failure mid-stream)."""
    model_version: str | None = None
    """`modelVersion` of the answer (the model that served an alias); default: the model requested."""
    service_tier: str | None = None
    """Sent as the `x-gemini-service-tier` response header, as the Gemini API reports the tier served."""
    function_call: dict[str, Any] | None = None
    """Answer with this `functionCall` part (`{'name': ..., 'args': {...}}`) instead of text."""


@dataclass
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    query: str
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def action(self) -> str:
        """`generateContent`, `streamGenerateContent`, `predict`, `predictLongRunning`, `fetchPredictOperation`."""
        return self.path.rsplit(':', 1)[-1]

    @property
    def model(self) -> str:
        """The model named in the path."""
        return self.path.rsplit(':', 1)[0].rsplit('/models/', 1)[-1].split('/')[0]


@dataclass
class _Failure:
    code: int
    status: str
    message: str


_STATUS = {
    400: 'INVALID_ARGUMENT',
    403: 'PERMISSION_DENIED',
    404: 'NOT_FOUND',
    429: 'RESOURCE_EXHAUSTED',
    500: 'INTERNAL',
    503: 'UNAVAILABLE',
}


@dataclass
class FakeGemini:
    """The fake server. Start it with `start()` (or use it as a context manager) and point `base_url` at it."""

    host: str = '127.0.0.1'
    port: int = 0
    """0 picks a free port."""
    polls_before_done: int = 0
    """How many `fetchPredictOperation` calls answer `done: false` before the video is ready."""
    filtered_videos: int = 0
    """How many of the requested videos Veo 'filters for safety' (not delivered, `raiMediaFilteredCount`)."""
    video_error: dict[str, Any] | None = None
    """When set, Veo operations finish with this `error` (`{'code': ..., 'message': ...}`) instead of videos."""
    requests: list[RecordedRequest] = field(default_factory=list[RecordedRequest])
    """Every request received, in order."""
    _replies: deque[Reply] = field(default_factory=deque[Reply])
    _failures: deque[_Failure] = field(default_factory=deque[_Failure])
    _operations: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _headers: dict[str, str] = field(default_factory=dict[str, str])
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The URL to give `types.HttpOptions(base_url=...)`."""
        return f'http://{self.host}:{self.port}'

    def reply(self, reply: Reply | None = None, /, **fields: Any) -> None:
        """Script the answer to the next generate-content request (FIFO)."""
        with self._lock:
            self._replies.append(reply or Reply(**fields))

    def fail(self, code: int, message: str = 'Injected failure.', *, times: int = 1) -> None:
        """Make the next `times` requests (of any kind) fail with HTTP `code`."""
        with self._lock:
            for _ in range(times):
                self._failures.append(_Failure(code, _STATUS.get(code, 'UNKNOWN'), message))

    def start(self) -> FakeGemini:
        """Serve on a daemon thread."""
        self._server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.01), name='fake-gemini', daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- answers -----------------------------------------------------------------------------------------------

    def _next_failure(self) -> _Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else Reply()

    def handle(self, request: RecordedRequest) -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        with self._lock:
            self.requests.append(request)
        failure = self._next_failure()
        if failure is not None:
            body = {'error': {'code': failure.code, 'message': failure.message, 'status': failure.status}}
            return failure.code, 'application/json', json.dumps(body).encode()
        action = request.action
        if action == 'generateContent':
            reply = self._next_reply()
            self._set_headers(reply)
            return 200, 'application/json', json.dumps(self._generate(request, reply)).encode()
        if action == 'streamGenerateContent':
            reply = self._next_reply()
            self._set_headers(reply)
            chunks = list(self._stream(request, reply))
            events = ''.join(f'data: {json.dumps(chunk)}\r\n\r\n' for chunk in chunks[: reply.cut_after])
            if reply.cut_after is not None:
                # Promise more bytes than are sent, then hang up: the client sees the connection drop.
                return 200, 'text/event-stream', events.encode() + _CUT
            return 200, 'text/event-stream', events.encode()
        if action == 'predict':
            return 200, 'application/json', json.dumps(self._imagen(request)).encode()
        if action == 'predictLongRunning':
            return 200, 'application/json', json.dumps(self._start_video(request)).encode()
        if action == 'fetchPredictOperation':
            return 200, 'application/json', json.dumps(self._fetch_video(request)).encode()
        body = {'error': {'code': 404, 'message': f'fake Gemini has no {request.path!r}', 'status': 'NOT_FOUND'}}
        return 404, 'application/json', json.dumps(body).encode()

    def _set_headers(self, reply: Reply) -> None:
        with self._lock:
            self._headers = {'x-gemini-service-tier': reply.service_tier} if reply.service_tier else {}

    def take_headers(self) -> dict[str, str]:
        """Extra headers for the answer being sent (set by its `Reply`), once."""
        with self._lock:
            headers, self._headers = self._headers, {}
        return headers

    def _wants_image(self, request: RecordedRequest, reply: Reply) -> bool:
        if reply.image is not None:
            return reply.image
        modalities: list[Any] = request.body.get('generationConfig', {}).get('responseModalities') or []
        return 'IMAGE' in [str(m).upper() for m in modalities]

    def default_usage(self, request: RecordedRequest, text: str, image: bool, thoughts: int = 0) -> dict[str, Any]:
        """Plausible usage for a request: ~4 characters per text token, 258 per input image, 1290 per output image."""
        text_in = 0
        images_in = 0
        for content in request.body.get('contents', []):
            for part in content.get('parts', []):
                if 'text' in part:
                    text_in += max(len(part['text']) // 4, 1)
                elif 'inlineData' in part or 'fileData' in part:
                    images_in += IMAGE_INPUT_TOKENS
        for part in request.body.get('systemInstruction', {}).get('parts', []):
            text_in += max(len(part.get('text', '')) // 4, 1)
        text_out = max(len(text) // 4, 1)
        prompt_details = [{'modality': 'TEXT', 'tokenCount': text_in}]
        if images_in:
            prompt_details.append({'modality': 'IMAGE', 'tokenCount': images_in})
        candidate_details = [{'modality': 'TEXT', 'tokenCount': text_out}]
        if image:
            candidate_details.append({'modality': 'IMAGE', 'tokenCount': IMAGE_OUTPUT_TOKENS})
        candidates = text_out + (IMAGE_OUTPUT_TOKENS if image else 0)
        usage: dict[str, Any] = {
            'promptTokenCount': text_in + images_in,
            'candidatesTokenCount': candidates,
            'totalTokenCount': text_in + images_in + candidates + thoughts,
            'promptTokensDetails': prompt_details,
            'candidatesTokensDetails': candidate_details,
        }
        if thoughts:
            usage['thoughtsTokenCount'] = thoughts
        return usage

    def _usage(self, request: RecordedRequest, reply: Reply, image: bool) -> dict[str, Any] | None:
        if isinstance(reply.usage, _Default):
            return self.default_usage(request, reply.text, image, reply.thoughts)
        return reply.usage

    def _generate(self, request: RecordedRequest, reply: Reply) -> dict[str, Any]:
        image = self._wants_image(request, reply)
        parts: list[dict[str, Any]] = [{'text': reply.text}]
        if reply.function_call is not None:
            parts = [{'functionCall': reply.function_call}]
        if image:
            parts.append({'inlineData': {'mimeType': 'image/png', 'data': base64.b64encode(PNG_1X1).decode()}})
        body: dict[str, Any] = {
            'candidates': [{'content': {'role': 'model', 'parts': parts}, 'finishReason': 'STOP', 'index': 0}],
            'modelVersion': reply.model_version or request.model,
            'responseId': uuid.uuid4().hex[:20],
        }
        usage = self._usage(request, reply, image)
        if usage is not None:
            body['usageMetadata'] = usage
        return body

    def _stream(self, request: RecordedRequest, reply: Reply) -> Iterator[dict[str, Any]]:
        n = max(reply.chunks, 1) if reply.function_call is None else 1
        size = -(-len(reply.text) // n)
        pieces = [reply.text[i * size : (i + 1) * size] for i in range(n)]
        final = self._usage(request, reply, False)
        response_id = uuid.uuid4().hex[:20]
        for i, piece in enumerate(pieces):
            last = i == n - 1
            part = {'text': piece} if reply.function_call is None else {'functionCall': reply.function_call}
            chunk: dict[str, Any] = {
                'candidates': [{'content': {'role': 'model', 'parts': [part]}, 'index': 0}],
                'modelVersion': reply.model_version or request.model,
                'responseId': response_id,
            }
            if last:
                chunk['candidates'][0]['finishReason'] = 'STOP'
            if reply.chunk_usage is not None:
                usage = reply.chunk_usage[i] if i < len(reply.chunk_usage) else None
            elif final is None or last:
                usage = final
            else:
                # Running totals, as Gemini sends them: the prompt in full, the candidates so far.
                usage = {k: v for k, v in final.items() if k not in ('candidatesTokensDetails', 'thoughtsTokenCount')}
                usage['candidatesTokenCount'] = max(final.get('candidatesTokenCount', 0) * (i + 1) // n, 1)
                usage['totalTokenCount'] = final.get('promptTokenCount', 0) + usage['candidatesTokenCount']
            if usage is not None:
                chunk['usageMetadata'] = usage
            yield chunk

    def _imagen(self, request: RecordedRequest) -> dict[str, Any]:
        count = int(request.body.get('parameters', {}).get('sampleCount') or 1)
        image = {'bytesBase64Encoded': base64.b64encode(PNG_1X1).decode(), 'mimeType': 'image/png'}
        return {'predictions': [dict(image) for _ in range(count)]}

    def _start_video(self, request: RecordedRequest) -> dict[str, Any]:
        parameters = request.body.get('parameters', {})
        count = int(parameters.get('sampleCount') or 1)
        filtered = min(self.filtered_videos, count)
        name = f'projects/fake/locations/us-central1/publishers/google/models/{request.model}/operations/{uuid.uuid4()}'
        video = {'bytesBase64Encoded': base64.b64encode(MP4_BYTES).decode(), 'mimeType': 'video/mp4'}
        response: dict[str, Any] = {
            '@type': 'type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse',
            'videos': [dict(video) for _ in range(count - filtered)],
        }
        if filtered:
            response['raiMediaFilteredCount'] = filtered
            response['raiMediaFilteredReasons'] = ['Filtered by the fake.'] * filtered
        with self._lock:
            self._operations[name] = {'polls': self.polls_before_done, 'response': response, 'error': self.video_error}
        return {'name': name}

    def _fetch_video(self, request: RecordedRequest) -> dict[str, Any]:
        name = str(request.body.get('operationName', ''))
        with self._lock:
            operation = self._operations.get(name)
            if operation is None:
                return {'name': name, 'done': True, 'error': {'code': 404, 'message': 'unknown operation'}}
            if operation['polls'] > 0:
                operation['polls'] -= 1
                return {'name': name, 'done': False}
        if operation['error'] is not None:
            return {'name': name, 'done': True, 'error': operation['error']}
        return {'name': name, 'done': True, 'response': operation['response']}


_CUT = b'\x00cut'
"""Marks a body whose connection must drop before it is complete."""


def _handler(fake: FakeGemini) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def do_POST(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get('Content-Length') or 0)
            raw = self.rfile.read(length) if length else b''
            try:
                body: Any = json.loads(raw) if raw else {}
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            url = urlsplit(self.path)
            request = RecordedRequest(self.command, url.path, url.query, cast(dict[str, Any], body), dict(self.headers))
            status, content_type, payload = fake.handle(request)
            cut = payload.endswith(_CUT)
            if cut:
                payload = payload.removesuffix(_CUT)
            self.send_response(status)
            self.send_header('Content-Type', content_type)
            for name, value in fake.take_headers().items():
                self.send_header(name, value)
            self.send_header('Content-Length', str(len(payload) + (1000 if cut else 0)))
            self.end_headers()
            self.wfile.write(payload)
            if cut:
                self.wfile.flush()
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# --- pytest fixtures (import them into a test module) ------------------------------------------------------------

_GOOGLE_ENV_PREFIXES = ('GOOGLE_', 'GEMINI_')


def clean_google_env(monkeypatch: Any) -> None:
    """Remove every `GOOGLE_*`/`GEMINI_*` variable and keep loopback traffic off any proxy."""
    import os

    for name in list(os.environ):
        if name.startswith(_GOOGLE_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')


try:
    import pytest
except ImportError:  # pragma: no cover - the example runs without pytest
    pass
else:

    @pytest.fixture
    def fake_gemini(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
        """A started fake server, with the environment cleaned of real Google credentials."""
        clean_google_env(monkeypatch)
        with FakeGemini() as fake:
            yield fake

    @pytest.fixture
    async def gemini_client(fake_gemini: FakeGemini) -> AsyncIterator[Any]:
        """A real `genai.Client` for the Gemini API (`google-gla`), talking to the fake, with no retries."""
        async for client in _client(fake_gemini, vertexai=False):
            yield client

    @pytest.fixture
    async def vertex_client(fake_gemini: FakeGemini) -> AsyncIterator[Any]:
        """A real Vertex AI `genai.Client` (`google-vertex`, needed for Imagen and Veo), talking to the fake."""
        async for client in _client(fake_gemini, vertexai=True):
            yield client

    async def _client(fake: FakeGemini, *, vertexai: bool) -> AsyncIterator[Any]:
        from google import genai
        from google.genai import types

        client = genai.Client(api_key='test', vertexai=vertexai, http_options=types.HttpOptions(base_url=fake.base_url))
        try:
            yield client
        finally:
            # Close both connection pools, or pytest reports their sockets as unclosed.
            client.close()
            await client.aio.aclose()
