from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint

from pai_usage import UsageRecord, UsageTracker
from pai_usage.otel import OTelExporter, instrument

NOW = datetime.now(UTC)

RECORDS = [
    UsageRecord(
        organization_id='acme',
        user_id='u1',
        provider='openai',
        model='gpt-4o',
        operation='agent_run',
        source='agent',
        input_tokens=100,
        cache_read_tokens=50,
        output_tokens=20,
        reasoning_tokens=7,
        cost_usd=Decimal('0.5'),
        pricing_status='priced',
    ),
    UsageRecord(
        organization_id='acme',
        user_id='u2',
        provider='openai',
        model='gpt-4o',
        operation='agent_run',
        source='agent',
        input_tokens=10,
        output_tokens=3,
        cost_usd=Decimal('0.25'),
        pricing_status='priced',
    ),
    UsageRecord(
        organization_id='globex',
        provider='google-gla',
        model='gemini-2.5-flash-image',
        operation='generate_image',
        input_tokens=5,
        output_image_tokens=1290,
        cost_usd=Decimal('0.125'),
        pricing_status='priced',
    ),
]


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    reader.provider = provider  # type: ignore[attr-defined]
    yield reader
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    found: list[tuple[dict[str, Any], Any]] = []
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                assert scope.scope.name == 'pai_usage'
                for point in metric.data.data_points:
                    found.append((dict(point.attributes or {}), point))
    return found


def exporter_for(reader: InMemoryMetricReader, **options: Any) -> OTelExporter:
    return OTelExporter(meter_provider=reader.provider, **options)  # type: ignore[attr-defined]


def test_through_tracker(database_url: str, reader: InMemoryMetricReader) -> None:
    with UsageTracker(database_url, flush_interval=0.01, listeners=[exporter_for(reader)]) as tracker:
        for record in RECORDS:
            tracker.track(record)
        assert tracker.flush()
    tracker.engine.dispose()

    histogram = points(reader, 'gen_ai.client.token.usage')
    by_type: dict[str, list[HistogramDataPoint]] = {}
    for attributes, point in histogram:
        by_type.setdefault(attributes['gen_ai.token.type'], []).append(point)
    # Inclusive counts, as the semantic conventions define them: input includes cache reads, output reasoning.
    assert sum(p.sum for p in by_type['input']) == sum(r.total_tokens - _output(r) for r in RECORDS)
    assert sum(p.sum for p in by_type['output']) == sum(_output(r) for r in RECORDS)
    assert sum(p.count for p in by_type['input']) == len(RECORDS)

    acme_input = [
        p for a, p in histogram if a.get('pai_usage.organization_id') == 'acme' and a['gen_ai.token.type'] == 'input'
    ]
    assert len(acme_input) == 1
    assert acme_input[0].sum == 100 + 50 + 10
    assert acme_input[0].max == 150

    buckets = {(a['pai_usage.token.bucket'], a['pai_usage.organization_id']): p.value for a, p in _sums(reader)}
    assert buckets[('cache_read', 'acme')] == 50
    assert buckets[('reasoning', 'acme')] == 7
    assert buckets[('output_image', 'globex')] == 1290
    assert ('cache_write', 'acme') not in buckets  # zero counts add no series
    assert sum(buckets.values()) == sum(r.total_tokens for r in RECORDS)

    cost = {a['pai_usage.organization_id']: p.value for a, p in points(reader, 'pai_usage.cost')}
    assert cost == {'acme': pytest.approx(0.75), 'globex': pytest.approx(0.125)}
    attributes = next(a for a, _ in points(reader, 'pai_usage.cost') if a['pai_usage.organization_id'] == 'globex')
    assert attributes == {
        'gen_ai.operation.name': 'generate_image',
        'gen_ai.provider.name': 'google-gla',
        'gen_ai.response.model': 'gemini-2.5-flash-image',
        'pai_usage.source': 'direct',
        'pai_usage.organization_id': 'globex',
    }


def _output(record: UsageRecord) -> int:
    return record.output_tokens + record.reasoning_tokens + record.output_audio_tokens + record.output_image_tokens


def _sums(reader: InMemoryMetricReader) -> list[tuple[dict[str, Any], NumberDataPoint]]:
    return points(reader, 'pai_usage.token.usage')


def test_unpriced_and_invalid_records(sqlite_url: str, reader: InMemoryMetricReader) -> None:
    with UsageTracker(sqlite_url, flush_interval=0.01, listeners=[exporter_for(reader)]) as tracker:
        tracker.track(provider='nobody', model='no-such-model', organization_id='acme', input_tokens=10)
        tracker.track(organization_id='acme', input_tokens=-1)  # invalid: never written, never exported
        assert tracker.flush()
        assert tracker.stats().invalid == 1
    tracker.engine.dispose()

    assert points(reader, 'pai_usage.cost') == []
    events = points(reader, 'pai_usage.events')
    assert [(a['pai_usage.pricing_status'], a['pai_usage.status'], p.value) for a, p in events] == [
        ('unpriced', 'ok', 1)
    ]
    assert [p.value for _, p in _sums(reader)] == [10]


def test_attribute_options(reader: InMemoryMetricReader) -> None:
    exporter = exporter_for(
        reader,
        include_organization=False,
        include_user=True,
        token_usage_metric=None,
        extra_attributes=lambda r: {'team': str(r.metadata.get('team'))},
    )
    exporter(RECORDS[0].model_copy(update={'metadata': {'team': 'search'}}))

    assert points(reader, 'gen_ai.client.token.usage') == []
    [(attributes, _)] = points(reader, 'pai_usage.cost')
    assert 'pai_usage.organization_id' not in attributes
    assert attributes['pai_usage.user_id'] == 'u1'
    assert attributes['team'] == 'search'


def test_global_meter_provider(reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `logfire.configure()` does: install a global provider; the exporter then needs no argument.
    monkeypatch.setattr('opentelemetry.metrics._internal.get_meter_provider', lambda: reader.provider)  # type: ignore[attr-defined]
    OTelExporter()(RECORDS[1])
    assert [p.value for _, p in points(reader, 'pai_usage.cost')] == [0.25]


def test_instrument_existing_tracker(sqlite_url: str, reader: InMemoryMetricReader) -> None:
    with UsageTracker(sqlite_url, flush_interval=0.01) as tracker:
        tracker.track(RECORDS[0])
        assert tracker.flush()
        instrument(tracker, exporter_for(reader))
        tracker.track(RECORDS[1])
        assert tracker.flush()
    tracker.engine.dispose()

    # Only the record written after instrumenting is exported.
    assert [p.value for _, p in points(reader, 'pai_usage.cost')] == [0.25]
