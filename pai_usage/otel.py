"""Mirror the ledger as OpenTelemetry metrics, for Logfire or any OTel backend.

`OTelExporter` is a tracker listener: the writer calls it with each record once the record is in the
database, so the metrics count exactly what the ledger holds (never a record that failed validation).

```python
tracker = UsageTracker(url, listeners=[OTelExporter()])
```

It needs the `[logfire]` extra (`opentelemetry-api`; the SDK or Logfire to actually export).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

try:
    from opentelemetry import metrics
    from opentelemetry.util.types import AttributeValue
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('`pai_usage.otel` needs OpenTelemetry: `pip install "pai-usage[logfire]"`') from _exc

from .record import UsageRecord

if TYPE_CHECKING:
    from .tracker import UsageTracker

__all__ = (
    'BUCKET_ATTRIBUTE',
    'COST_METRIC',
    'EVENTS_METRIC',
    'TOKEN_BUCKETS_METRIC',
    'TOKEN_USAGE_METRIC',
    'OTelExporter',
    'instrument',
)

TOKEN_USAGE_METRIC = 'gen_ai.client.token.usage'
"""The OTel GenAI histogram: one value per event and `gen_ai.token.type` (`input`, `output`), inclusive counts."""
TOKEN_BUCKETS_METRIC = 'pai_usage.token.usage'
"""A counter of tokens by the ledger's non-overlapping bucket (`pai_usage.token.bucket`); its sum counts each once."""
COST_METRIC = 'pai_usage.cost'
"""A counter of known cost in USD."""
EVENTS_METRIC = 'pai_usage.events'
"""A counter of events, with `pai_usage.pricing_status` and `pai_usage.status`: alert on unpriced events here."""
BUCKET_ATTRIBUTE = 'pai_usage.token.bucket'
"""The attribute naming the bucket on `pai_usage.token.usage` (`input`, `cache_read`, `reasoning`, ...)."""

# Same boundaries as pydantic-ai's own `gen_ai.client.token.usage` (the semconv advice).
_TOKEN_BOUNDARIES = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_BUCKETS = (
    ('input_tokens', 'input', 'input'),
    ('cache_read_tokens', 'cache_read', 'input'),
    ('cache_write_tokens', 'cache_write', 'input'),
    ('input_audio_tokens', 'input_audio', 'input'),
    ('output_tokens', 'output', 'output'),
    ('reasoning_tokens', 'reasoning', 'output'),
    ('output_audio_tokens', 'output_audio', 'output'),
    ('output_image_tokens', 'output_image', 'output'),
)
"""(record field, bucket attribute value, `gen_ai.token.type` it belongs to)."""


@dataclass
class OTelExporter:
    """A tracker listener that records each written usage event as OpenTelemetry metrics.

    Metrics, all with `gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.response.model`,
    `pai_usage.source` and (unless disabled) `pai_usage.organization_id`:

    - `gen_ai.client.token.usage` (histogram, `{token}`): input and output tokens per event by
      `gen_ai.token.type`, inclusive of cache, reasoning, audio and image tokens, as the GenAI semantic
      conventions define them.
    - `pai_usage.token.usage` (counter, `{token}`): tokens by the ledger's bucket (`pai_usage.token.bucket`,
      with `gen_ai.token.type` too), each token once.
    - `pai_usage.cost` (counter, `USD`): known cost; unpriced events add nothing.
    - `pai_usage.events` (counter): events by `pai_usage.pricing_status` and `pai_usage.status`.

    If pydantic-ai's own instrumentation is on too (e.g. `logfire.instrument_pydantic_ai()`), it already emits
    `gen_ai.client.token.usage` for agent requests: filter one out by instrumentation scope (`pai_usage`) or
    pass `token_usage_metric=None`.
    """

    _: KW_ONLY
    meter_provider: metrics.MeterProvider | None = None
    """Where to create the instruments; the global provider when None (Logfire's after `logfire.configure()`)."""
    include_organization: bool = True
    """Add `pai_usage.organization_id`. Turn off when organizations are too many for a metrics backend."""
    include_user: bool = False
    """Add `pai_usage.user_id`. Off by default: users are usually too many for metric attributes."""
    token_usage_metric: str | None = TOKEN_USAGE_METRIC
    """Name of the semconv token histogram, or None to skip it."""
    extra_attributes: Callable[[UsageRecord], Mapping[str, AttributeValue]] | None = None
    """Adds attributes derived from the record (e.g. from `metadata`) to every measurement."""

    _token_histogram: metrics.Histogram | None = field(init=False, repr=False, default=None)
    _bucket_counter: metrics.Counter = field(init=False, repr=False)
    _cost_counter: metrics.Counter = field(init=False, repr=False)
    _event_counter: metrics.Counter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from importlib.metadata import version

        meter = metrics.get_meter('pai_usage', version('pai-usage'), meter_provider=self.meter_provider)
        if self.token_usage_metric is not None:
            self._token_histogram = meter.create_histogram(
                self.token_usage_metric,
                unit='{token}',
                description='Measures number of input and output tokens used',
                explicit_bucket_boundaries_advisory=list(_TOKEN_BOUNDARIES),
            )
        self._bucket_counter = meter.create_counter(
            TOKEN_BUCKETS_METRIC, unit='{token}', description='Tokens by non-overlapping ledger bucket'
        )
        self._cost_counter = meter.create_counter(COST_METRIC, unit='USD', description='Known cost of usage events')
        self._event_counter = meter.create_counter(EVENTS_METRIC, unit='{event}', description='Usage events written')

    def attributes(self, record: UsageRecord) -> dict[str, AttributeValue]:
        """The attributes every measurement of `record` carries."""
        attributes: dict[str, AttributeValue] = {
            'gen_ai.operation.name': record.operation,
            'pai_usage.source': record.source,
        }
        if record.provider is not None:
            attributes['gen_ai.provider.name'] = record.provider
        if record.model is not None:
            attributes['gen_ai.response.model'] = record.model
        if self.include_organization and record.organization_id is not None:
            attributes['pai_usage.organization_id'] = record.organization_id
        if self.include_user and record.user_id is not None:
            attributes['pai_usage.user_id'] = record.user_id
        if self.extra_attributes is not None:
            attributes.update(self.extra_attributes(record))
        return attributes

    def __call__(self, record: UsageRecord) -> None:
        """Record one written usage event (called by the tracker's writer thread)."""
        attributes = self.attributes(record)
        totals = {'input': 0, 'output': 0}
        for name, bucket, token_type in _BUCKETS:
            count: int = getattr(record, name)
            totals[token_type] += count
            if count:
                self._bucket_counter.add(
                    count, {**attributes, BUCKET_ATTRIBUTE: bucket, 'gen_ai.token.type': token_type}
                )
        if self._token_histogram is not None:
            for token_type, count in totals.items():
                if count:
                    self._token_histogram.record(count, {**attributes, 'gen_ai.token.type': token_type})
        if record.cost_usd is not None and record.cost_usd > 0:
            self._cost_counter.add(float(record.cost_usd), attributes)
        self._event_counter.add(
            1,
            {
                **attributes,
                'pai_usage.pricing_status': record.pricing_status or 'unpriced',
                'pai_usage.status': record.status,
            },
        )


def instrument(tracker: UsageTracker, exporter: OTelExporter | None = None) -> OTelExporter:
    """Add an `OTelExporter` (a new one by default) to an existing tracker's listeners, and return it."""
    exporter = exporter or OTelExporter()
    tracker.add_listener(exporter)
    return exporter
