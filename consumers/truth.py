"""The truth: every valid event on the (compacted) documents topic, read to its end now."""

from __future__ import annotations

from consumers.intake import Intake
from headwater.errors import EventError, NoChange
from headwater.events import DocumentEvent
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings


def read_documents_topic(settings: Settings, timeout_s: float = 300.0) -> list[DocumentEvent]:
    """The events the indexer accepts, from the beginning of its topics to their end.

    That is the documents topic and the Debezium topics. Invalid events were dead-lettered by
    the indexer, and records that ask for nothing were skipped: neither is part of the truth.
    """
    intake = Intake(settings)
    events = []
    for topic in [settings.documents_topic, *settings.debezium_topics]:
        for record in read_to_end(settings, topic, timeout_s=timeout_s,
                                  client_id="headwater-verify"):  # fmt: skip
            try:
                events.append(intake(record))
            except (EventError, NoChange):
                continue
    return events
