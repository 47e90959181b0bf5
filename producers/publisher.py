"""Publishing document upserts and deletes to the documents topic.

Every event is validated exactly as the indexer will validate it before anything is sent, so a
bad document fails at the caller instead of landing in the dead-letter topic. A publish returns
once the broker acknowledged it (acks=all, idempotent producer) with a `FreshnessToken` that
searches can wait on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import ValidationError

from headwater.errors import (
    DeliveryError,
    DocumentTooLargeError,
    EventError,
    InvalidDocumentError,
    UnknownTenantError,
)
from headwater.events import (
    DocumentEvent,
    Limits,
    Scalar,
    check_doc_id,
    parse_document,
)
from headwater.runtime import clients
from headwater.settings import Settings
from headwater.tokens import FreshnessToken

log = logging.getLogger(__name__)

# How long connecting and fetching topic metadata may block, so a missing broker or topic
# fails a command promptly instead of after kafka-python's 30-60 s defaults.
CONNECT_TIMEOUT_MS = 10_000


ProgressFn = Callable[[int], None]


class DocumentPublisher:
    """Validates and publishes document events; thread-safe; one producer per publisher."""

    def __init__(self, settings: Settings, *, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self.topic = settings.documents_topic
        self.limits = Limits.from_settings(settings)
        self.timeout_s = settings.publish_timeout_s
        self._producer = producer
        self._owns_producer = producer is None
        self._lock = threading.Lock()
        self._closed = False

    # -- building events ------------------------------------------------------------------------

    def upsert(
        self,
        doc_id: str,
        text: str,
        *,
        tenant: str | None = None,
        metadata: dict[str, Scalar] | None = None,
        version: int | None = None,
        source: str = "api",
        ts: datetime | None = None,
    ) -> FreshnessToken:
        """Publish "document `doc_id` now has exactly `text`"; returns once acknowledged."""
        if not isinstance(text, str):
            raise InvalidDocumentError(f"text must be a string, not {type(text).__name__}")
        event = self.build(
            "upsert", doc_id, text=text, tenant=tenant, metadata=metadata, version=version,
            source=source, ts=ts,
        )  # fmt: skip
        return self.publish(event)

    def delete(
        self,
        doc_id: str,
        *,
        tenant: str | None = None,
        version: int | None = None,
        source: str = "api",
    ) -> FreshnessToken:
        """Publish "document `doc_id` is gone"; returns once acknowledged."""
        event = self.build("delete", doc_id, tenant=tenant, version=version, source=source)
        return self.publish(event)

    def build(
        self,
        op: str,
        doc_id: str,
        *,
        text: str | None = None,
        tenant: str | None = None,
        metadata: dict[str, Scalar] | None = None,
        version: int | None = None,
        source: str = "api",
        ts: datetime | None = None,
    ) -> DocumentEvent:
        """A validated event; nothing is sent.

        `version` is the source's own version, for sources that have one (a commit sequence);
        without it the event is ordered by where the broker puts it (`headwater.versions`), so
        no clock is ever asked. The doc id is normalized to NFC.
        """
        tenant = self.settings.default_tenant if tenant is None else tenant
        self._check_tenant(tenant)
        self._check_text(text)
        if not isinstance(doc_id, str):
            raise InvalidDocumentError(f"doc_id must be a string, not {type(doc_id).__name__}")
        try:
            check_doc_id(doc_id)
        except ValueError as exc:
            raise InvalidDocumentError(f"invalid doc_id {_shorten(doc_id)!r}: {exc}") from exc
        self._check_metadata(metadata)
        data: dict[str, Any] = {
            "tenant": tenant, "doc_id": doc_id, "op": op, "text": text, "source": source,
            "metadata": {} if metadata is None else metadata, "version": version,
        }  # fmt: skip
        if ts is not None:
            data["ts"] = ts
        try:
            event = DocumentEvent.model_validate(data, context={"limits": self.limits})
        except ValidationError as exc:
            raise InvalidDocumentError(_one_line(exc)) from exc
        return event

    # -- sending --------------------------------------------------------------------------------

    def publish(self, event: DocumentEvent) -> FreshnessToken:
        """Validate, send and wait for the broker's acknowledgement of one event."""
        return self.publish_many([event])

    def publish_many(
        self, events: Iterable[DocumentEvent], on_progress: ProgressFn | None = None
    ) -> FreshnessToken:
        """Validate all, send all, then wait for every acknowledgement.

        Nothing is sent when any event is invalid. `on_progress(n)` is called with the number of
        newly acknowledged events.
        """
        batch = [(event, self._checked_bytes(event)) for event in events]
        if not batch:
            return FreshnessToken()
        producer = self._ensure_producer()
        futures = []
        for event, raw in batch:
            try:
                futures.append(producer.send(self.topic, key=event.key, value=raw))
            except KafkaError as exc:
                raise DeliveryError(
                    f"could not send to {self.topic} on {self.settings.bootstrap}: "
                    f"{_kafka_reason(exc)} (is the topic created? `headwater kafka start`)"
                ) from exc
        return self._await(futures, on_progress)

    def flush(self) -> None:
        """Wait until everything sent so far is acknowledged (or the publish timeout passes)."""
        if self._producer is None:
            return
        try:
            self._producer.flush(timeout=self.timeout_s)
        except KafkaError as exc:
            raise DeliveryError(f"flush failed: {_kafka_reason(exc)}") from exc

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is None or not self._owns_producer:
            return
        try:
            producer.close(timeout=self.timeout_s)
        except KafkaError as exc:
            log.warning("closing the producer: %s", _kafka_reason(exc))
            producer.close(timeout=0)

    def __enter__(self) -> DocumentPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _check_tenant(self, tenant: object) -> None:
        if not isinstance(tenant, str) or not self.settings.tenant_known(tenant):
            known = ", ".join(self.settings.tenants)
            raise UnknownTenantError(f"unknown tenant {tenant!r} (known: {known})")

    def _check_metadata(self, metadata: object) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, dict):
            raise InvalidDocumentError(f"metadata must be an object, not {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str):
                raise InvalidDocumentError(f"metadata keys must be strings, not {key!r}")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise InvalidDocumentError(
                    f"metadata[{key!r}] must be a string, number, boolean or null, "
                    f"not {type(value).__name__}"
                )

    def _check_text(self, text: str | None) -> None:
        if text is None:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_text_bytes:
            raise DocumentTooLargeError(
                f"text is {size:,} bytes, larger than the limit of "
                f"{self.limits.max_text_bytes:,} bytes (HEADWATER_MAX_TEXT_BYTES)"
            )

    def _checked_bytes(self, event: DocumentEvent) -> bytes:
        """The bytes to send, parsed back exactly as the indexer will parse them."""
        if not isinstance(event, DocumentEvent):
            raise InvalidDocumentError(f"expected a DocumentEvent, not {type(event).__name__}")
        self._check_tenant(event.tenant)
        self._check_text(event.text)
        raw = event.to_bytes()
        try:
            parse_document(raw, self.limits)
        except EventError as exc:
            raise InvalidDocumentError(str(exc)) from exc
        return raw

    def _ensure_producer(self) -> KafkaProducer:
        with self._lock:
            if self._closed:
                raise DeliveryError("publisher is closed")
            if self._producer is None:
                try:
                    self._producer = clients.producer(
                        self.settings,
                        bootstrap_timeout_ms=CONNECT_TIMEOUT_MS,
                        max_block_ms=CONNECT_TIMEOUT_MS,
                    )
                except KafkaError as exc:
                    raise DeliveryError(
                        f"cannot reach Kafka at {self.settings.bootstrap}: {_kafka_reason(exc)} "
                        "(is it running? `headwater kafka start`)"
                    ) from exc
            return self._producer

    def _replace_if_broken(self) -> None:
        with self._lock:
            producer = self._producer
            if producer is None or not self._owns_producer or not clients.broken(producer):
                return
            self._producer = None  # the next publish builds a new one
        log.warning("the producer went fatal after a refused record; replacing it")
        producer.close(timeout=0)

    def _await(self, futures: list[Any], on_progress: ProgressFn | None) -> FreshnessToken:
        offsets: dict[int, int] = {}
        deadline = time.monotonic() + self.timeout_s
        unreported = 0
        for future in futures:
            try:
                meta = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except KafkaError as exc:
                self._replace_if_broken()
                raise DeliveryError(
                    f"not acknowledged by {self.settings.bootstrap} within {self.timeout_s:g} s: "
                    f"{_kafka_reason(exc)}"
                ) from exc
            if meta.offset > offsets.get(meta.partition, -1):
                offsets[meta.partition] = meta.offset
            # A sliding deadline: a large batch may take longer than one timeout in total.
            deadline = time.monotonic() + self.timeout_s
            unreported += 1
            if on_progress is not None and unreported >= 64:
                on_progress(unreported)
                unreported = 0
        if on_progress is not None and unreported:
            on_progress(unreported)
        return FreshnessToken(offsets)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "event"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts).replace("\n", " ")


def _kafka_reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _shorten(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["DocumentPublisher"]
