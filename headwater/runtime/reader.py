"""Reading a topic without a consumer group: to its end now, or following it.

`Tail` tracks its own positions, so when its client fails (the broker restarted, a topic was
not there yet) it is rebuilt and resumes exactly where it was: a reader never dies of an
outage and never skips or repeats a record because of one. `read_to_end` is the one way
headwater reads a topic from a start to the end it has now (the truth checker, drift, the
subscription list, the adapter announcements).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Literal

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from headwater.errors import KafkaUnavailable
from headwater.runtime import clients
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)

Start = Literal["beginning", "end"] | Mapping[int, int] | datetime
REOPEN_S = 1.0  # after a failure, wait this long before building a new client


class Tail:
    """Reads one topic (all partitions, or some) from `start`; `poll` never raises KafkaError.

    `start` is "beginning", "end", `{partition: next offset}` (others from the beginning), or a
    time (each partition from its first record at or after it, else from its end).
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        start: Start = "end",
        partitions: Iterable[int] | None = None,
        client_id: str = "headwater-reader",
        **overrides: object,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.start = start
        self.only = None if partitions is None else set(partitions)
        self.client_id = client_id
        self.overrides = overrides
        self.positions: dict[int, int] = {}  # next offset to read, per partition
        self.failure: str | None = None  # why the last open or poll failed (None: healthy)
        self._consumer: KafkaConsumer | None = None
        self._retry_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        """Connect and pin the start positions now; KafkaUnavailable when that cannot be done."""
        if self._consumer is not None:
            return
        consumer = clients.consumer(
            self.settings, group_id=None, client_id=self.client_id, **self.overrides
        )
        try:
            parts = consumer.partitions_for_topic(self.topic)
            if not parts:
                raise KafkaUnavailable(f"topic {self.topic} does not exist (yet)")
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)
                   if self.only is None or p in self.only]  # fmt: skip
            consumer.assign(tps)
            self._seek(consumer, tps)
            for tp in tps:  # resolves "end"/times now, before anything else happens
                self.positions[tp.partition] = consumer.position(tp)
        except KafkaError as exc:
            consumer.close()
            raise KafkaUnavailable(f"cannot read {self.topic}: {one_line(exc)}") from exc
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self.failure = None

    def _seek(self, consumer: KafkaConsumer, tps: list[TopicPartition]) -> None:
        known = {tp: self.positions[tp.partition] for tp in tps if tp.partition in self.positions}
        rest = [tp for tp in tps if tp not in known]
        for tp, offset in known.items():
            consumer.seek(tp, offset)
        if not rest:
            return
        start = self.start
        if start == "beginning":
            consumer.seek_to_beginning(*rest)
        elif start == "end":
            consumer.seek_to_end(*rest)
        elif isinstance(start, datetime):
            found = consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in rest})
            for tp in rest:
                hit = found.get(tp)
                if hit is None:
                    consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, hit.offset)
        else:
            begin = [tp for tp in rest if tp.partition not in start]
            for tp in rest:
                if tp.partition in start:
                    consumer.seek(tp, start[tp.partition])
            if begin:
                consumer.seek_to_beginning(*begin)

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except KafkaError as exc:
                log.debug("closing a reader of %s: %s", self.topic, exc)

    def __enter__(self) -> Tail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def poll(self, timeout_s: float, max_records: int | None = None) -> list[ConsumerRecord]:
        """Records that arrived within `timeout_s` (maybe none); an outage reads as none."""
        if self._consumer is None:
            if time.monotonic() < self._retry_at:
                time.sleep(min(timeout_s, self._retry_at - time.monotonic()))
                return []
            try:
                self.open()
            except KafkaUnavailable as exc:
                self._failed(str(exc))
                return []
        assert self._consumer is not None
        try:
            polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            self._failed(f"reading {self.topic}: {one_line(exc)}")
            self.close()
            return []
        records = [r for batch in polled.values() for r in batch]
        for r in records:
            self.positions[r.partition] = r.offset + 1
        for tp in self._consumer.assignment():  # skipped offsets (compaction, markers) count
            try:
                self.positions[tp.partition] = self._consumer.position(tp)
            except KafkaError:
                break
        return records

    def _failed(self, why: str) -> None:
        if why != self.failure:
            log.warning("%s (retrying)", why)
        self.failure = why
        self._retry_at = time.monotonic() + REOPEN_S

    def end_offsets(self) -> dict[int, int]:
        """`{partition: offset the next record will get}` now; KafkaUnavailable if unreachable."""
        self.open()
        assert self._consumer is not None
        tps = list(self._consumer.assignment())
        try:
            return {tp.partition: o for tp, o in self._consumer.end_offsets(tps).items()}
        except KafkaError as exc:
            self.close()
            raise KafkaUnavailable(f"cannot read the end of {self.topic}: {one_line(exc)}") from exc

    def reached(self, end: Mapping[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= o for p, o in end.items())

    def read_to_end(self, timeout_s: float = 30.0) -> Iterator[ConsumerRecord]:
        """Every record from the current positions up to (at least) the topic's end now.

        Records that arrive meanwhile may come too: every record polled is yielded, so
        `positions` never runs ahead of what the caller saw.
        """
        deadline = time.monotonic() + timeout_s
        end = self._retrying_end(deadline)
        while not self.reached(end):
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"reading {self.topic} to its end took longer than {timeout_s:g} s"
                    + (f" ({self.failure})" if self.failure else "")
                )
            yield from self.poll(0.2)

    def _retrying_end(self, deadline: float) -> dict[int, int]:
        while True:
            try:
                return self.end_offsets()
            except KafkaUnavailable as exc:
                if time.monotonic() > deadline:
                    raise
                self._failed(str(exc))
                time.sleep(REOPEN_S)


def read_to_end(
    settings: Settings,
    topic: str,
    *,
    start: Start = "beginning",
    timeout_s: float = 30.0,
    client_id: str = "headwater-reader",
) -> Iterator[ConsumerRecord]:
    """Every record of `topic` from `start` to its end as it is now (KafkaUnavailable if not)."""
    with Tail(settings, topic, start=start, client_id=client_id) as tail:
        yield from tail.read_to_end(timeout_s)
