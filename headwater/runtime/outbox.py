"""Records produced while handling input records, tracked until the broker acknowledged each.

kafka-python's `flush()` returns without raising when a send failed, so a loop that flushes and
then commits can lose what it produced. An `Outbox` keeps every send's future, the record it was
produced for (its origin) and its payload: `settle()` waits for all of them and reports the ones
the broker refused for good, per origin, so the runtime can dead-letter that input record
instead of committing past it; transient failures are sent again by the next `settle()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from headwater.runtime.clients import is_final

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 130.0  # a little over the producer's delivery timeout (120 s)

# Called with the final error of a send; it may send a replacement through the same outbox.
OnRefused = Callable[[KafkaError], None]


@dataclass
class _Entry:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    origin: ConsumerRecord | None
    on_refused: OnRefused | None
    future: Any = None
    error: KafkaError | None = field(default=None)


class Outbox:
    """Sends through one producer on behalf of input records; thread-safe."""

    def __init__(self, producer: KafkaProducer, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        self.producer = producer
        self.timeout_s = timeout_s
        self._entries: list[_Entry] = []
        self._refused: list[tuple[ConsumerRecord | None, KafkaError]] = []
        self._lock = threading.Lock()

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        origin: ConsumerRecord | None = None,
        on_refused: OnRefused | None = None,
    ) -> None:
        """Send one record; its outcome is known only after `settle()`."""
        entry = _Entry(topic, key, value, headers, origin, on_refused)
        self._start(entry)
        with self._lock:
            self._entries.append(entry)

    def _start(self, entry: _Entry) -> None:
        entry.error = None
        try:
            entry.future = self.producer.send(
                entry.topic, key=entry.key, value=entry.value, headers=entry.headers
            )
        except KafkaError as exc:  # refused before sending (too large, producer closed)
            entry.future, entry.error = None, exc

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    def settle(self) -> list[tuple[ConsumerRecord | None, KafkaError]]:
        """Wait until every record is acknowledged; returns the final refusals by origin.

        A refusal with an `on_refused` fallback calls it instead (it may send a replacement,
        which is settled too). Raises the first transient error after waiting for all: the
        failed records are sent again by the next call, the acknowledged ones are not.
        """
        while True:
            with self._lock:
                entries, self._entries = self._entries, []
                if not entries:
                    refused, self._refused = self._refused, []
                    return refused
            for entry in entries:
                if entry.future is None and entry.error is not None and not is_final(entry.error):
                    self._start(entry)  # failed transiently last time: send it again now
            retry: list[_Entry] = []
            transient: KafkaError | None = None
            for entry in entries:
                if entry.future is not None:
                    try:
                        entry.future.get(timeout=self.timeout_s)
                        continue
                    except KafkaError as exc:
                        entry.error = exc
                assert entry.error is not None
                if not is_final(entry.error):
                    transient = transient or entry.error
                    entry.future = None
                    retry.append(entry)
                elif entry.on_refused is not None:
                    entry.on_refused(entry.error)  # may add entries: the loop settles them
                else:
                    with self._lock:
                        self._refused.append((entry.origin, entry.error))
            if transient is not None:
                with self._lock:
                    self._entries = retry + self._entries
                raise transient
