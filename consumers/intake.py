"""What the indexer accepts from the documents topic: one record → one document event.

The indexer and the truth checker both decode through here, so a dead-lettered record is never
expected in the index.
"""

from __future__ import annotations

from kafka.consumer.fetcher import ConsumerRecord

from headwater.errors import EventError
from headwater.events import DocumentEvent, Limits, parse_document
from headwater.settings import Settings

INT64_MAX = 2**63 - 1  # Milvus stores versions as INT64


class Intake:
    """Decodes document records with the settings' limits and tenants; EventError says why not."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits.from_settings(settings)

    def __call__(self, record: ConsumerRecord) -> DocumentEvent:
        event = parse_document(record.value, self.limits)
        check_event(event, record.key, self.settings)
        return event


def check_event(event: DocumentEvent, key: bytes | None, settings: Settings) -> None:
    """Intake rules beyond the event schema; raises EventError (the dead-letter reason)."""
    if not settings.tenant_known(event.tenant):
        raise EventError(f"unknown tenant {event.tenant!r}")
    if key is not None and key != event.key:
        raise EventError("Kafka key does not match tenant/doc_id of the event")
    if event.version > INT64_MAX:
        # Milvus would refuse the write on every retry and block the partition for good.
        raise EventError(f"version {event.version} is larger than {INT64_MAX} (int64)")
