"""Event sinks: each drains its own bounded queue in a background task."""

from __future__ import annotations

from ..config import Settings
from ..metrics import Metrics
from .alertmanager import AlertmanagerSink
from .queue import QueuedSink
from .redis_stream import RedisStreamSink
from .webhook import WebhookSink


def build_sinks(settings: Settings, metrics: Metrics) -> list[QueuedSink]:
    """One sink per configured target: Redis, each webhook URL, Alertmanager."""
    s = settings
    sinks: list[QueuedSink] = []
    if s.redis_url:
        sinks.append(
            RedisStreamSink(
                s.redis_url,
                stream=s.redis_stream,
                maxlen=s.redis_maxlen,
                capacity=s.event_buffer,
                metrics=metrics,
            )
        )
    for url in s.webhook_urls:
        sinks.append(
            WebhookSink(
                url,
                fmt=s.webhook_format,
                secret=s.webhook_secret.get_secret_value(),
                capacity=s.event_buffer,
                metrics=metrics,
            )
        )
    if s.alertmanager_url:
        sinks.append(AlertmanagerSink(s.alertmanager_url, capacity=s.event_buffer, metrics=metrics))
    return sinks
