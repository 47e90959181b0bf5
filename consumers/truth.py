"""The truth: every valid event on the (compacted) documents topic, read to its end now."""

from __future__ import annotations

from collections.abc import Callable

from consumers.intake import Intake
from headwater.errors import EventError, NoChange
from headwater.events import Logged
from headwater.runtime.deadletter import DeadLetter
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings
from index.verify import latest_events


def read_documents_topic(
    settings: Settings, timeout_s: float = 300.0, *, tenant: str | None = None
) -> list[Logged]:
    """The events the indexer accepts, from the beginning of its topics to their end (only
    `tenant`'s, when given).

    That is the documents topic and the Debezium topics. Invalid events were dead-lettered by
    the indexer, and records that ask for nothing were skipped: neither is part of the truth;
    nor are valid ones it dead-lettered later (a document it could not chunk or embed), which
    the dead-letter topic names by position.
    """
    refused = dead_lettered(settings, timeout_s)
    intake = Intake(settings)
    prefix = None if tenant is None else f"{tenant}/".encode()
    events = []
    for topic in [settings.documents_topic, *settings.debezium_topics]:
        for record in read_to_end(settings, topic, timeout_s=timeout_s,
                                  client_id="headwater-verify"):  # fmt: skip
            if (topic, record.partition, record.offset) in refused:
                continue
            mine = prefix is None or topic != settings.documents_topic
            if not (mine or (record.key or b"").startswith(prefix)):
                continue  # another tenant's record: cheaper than decoding it
            try:
                logged = intake(record)
            except (EventError, NoChange):
                continue
            if tenant is None or logged.event.tenant == tenant:
                events.append(logged)
    return events


def dead_lettered(settings: Settings, timeout_s: float = 300.0) -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every record in the dead-letter topic."""
    out = set()
    for record in read_to_end(settings, settings.dlq_topic, timeout_s=timeout_s,
                              client_id="headwater-verify"):  # fmt: skip
        letter = DeadLetter.from_record(record)
        out.add((letter.topic, letter.partition, letter.offset))
    return out


def published_by(
    settings: Settings, tenant: str, source: str, fingerprint: Callable[[str], str]
) -> dict[str, str]:
    """`{doc_id: fingerprint(text)}` of the tenant's live documents whose latest event came
    from `source` (a folder watcher's memory, read back from the topic)."""
    return {
        logged.event.doc_id: fingerprint(logged.event.text or "")
        for logged in latest_events(read_documents_topic(settings, tenant=tenant)).values()
        if logged.event.op == "upsert" and logged.event.source == source
    }
