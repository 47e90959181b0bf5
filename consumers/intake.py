"""What the indexer accepts: one record → one document event, whatever format it came in.

Records of the documents topic are headwater's JSON events, CloudEvents (binary mode: `ce_*`
headers; structured mode: a JSON object with `specversion`), or null values (a delete of the
document the key `tenant/doc_id` names); the topic is compacted, so every record has a key, and
it must be `tenant/doc_id`. Records of the Debezium topics are change events of a
database table. The indexer and the truth checker both decode through here, so a dead-lettered
record is never expected in the index. Events apply in log order
(`headwater.versions`): a record carries a version only when its source has one.
"""

from __future__ import annotations

from kafka.consumer.fetcher import ConsumerRecord

from headwater.errors import EventError
from headwater.events import DocumentEvent, Limits, Logged, document_from
from headwater.formats import Change, cloudevents, debezium, json_object
from headwater.settings import Settings


class Intake:
    """Decodes records with the settings' limits and tenants; EventError says why not.

    A record that asks for nothing (a Debezium tombstone naming no document) raises NoChange.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits.from_settings(settings)
        self.debezium_topics = frozenset(settings.debezium_topics)
        self.columns = debezium.Columns.from_settings(settings)

    def __call__(self, record: ConsumerRecord) -> Logged:
        if record.topic in self.debezium_topics:
            event = self._foreign(debezium.from_record(record.key, record.value, self.columns))
        else:
            event = self._documents_topic(record)
            # Whatever the format: one document's records share a key (doc ids in NFC), so they
            # share a partition, whose order is the document's (`headwater.versions`).
            if record.key is not None and record.key != event.key:
                raise EventError(
                    "Kafka key does not match tenant/doc_id of the event (doc_id in NFC)"
                )
        check_event(event, self.settings)
        return Logged(event, record.partition, record.offset)

    def _documents_topic(self, record: ConsumerRecord) -> DocumentEvent:
        headers = cloudevents.kafka_headers(record.headers)
        if cloudevents.is_binary(headers):
            return self._foreign(cloudevents.from_kafka_binary(headers, record.value))
        if record.value is None:
            return self._tombstone(record)
        data = json_object(record.value, "the record")
        if cloudevents.is_structured(data):
            return self._foreign(cloudevents.structured(data))
        return document_from(data, self.limits)

    def _tombstone(self, record: ConsumerRecord) -> DocumentEvent:
        """A null value deletes the document its key names (the ecosystem's delete)."""
        tenant, sep, doc_id = (record.key or b"").decode("utf-8", "replace").partition("/")
        if not sep or not doc_id:
            raise EventError("a null value whose key is not tenant/doc_id")
        return Change(op="delete", doc_id=doc_id, source="tombstone").event(
            tenant=tenant, version=None, limits=self.limits
        )

    def _foreign(self, change: Change) -> DocumentEvent:
        # A source without versions is ordered by the log, like every unversioned event.
        tenant = change.tenant or self.settings.default_tenant
        return change.event(tenant=tenant, version=change.version, limits=self.limits)


def check_event(event: DocumentEvent, settings: Settings) -> None:
    """Intake rules beyond the event schema; raises EventError (the dead-letter reason)."""
    if not settings.tenant_known(event.tenant):
        raise EventError(f"unknown tenant {event.tenant!r}")
