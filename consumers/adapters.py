"""Following the adapters topic: every query consumer serves the version announced last.

The compacted topic is read from the beginning without a group, so every process applies the
latest announcement on start (during catch-up only the last one is loaded) and each one after
it. A version that fails to load is logged and skipped: the previous adapter keeps serving. The
reader survives broker outages (the runtime's `Tail`) and resumes where it was.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from consumers.generation import Generator
from headwater.events import AdapterAnnouncement
from headwater.runtime.reader import Tail
from headwater.settings import Settings
from models.adapters import adapter_path, valid_version

log = logging.getLogger(__name__)

KEY = b"current"


def parse_announcement(raw: bytes | None) -> AdapterAnnouncement:
    """Decode an announcement; ValueError (one line) when it is not a valid one."""
    if raw is None:
        raise ValueError("empty announcement")
    try:
        announcement = AdapterAnnouncement.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    if announcement.version is not None and not valid_version(announcement.version):
        raise ValueError(f"not an adapter version: {announcement.version[:80]!r}")
    return announcement


def adapter_location(settings: Settings, announcement: AdapterAnnouncement) -> Path:
    """Where an announced adapter lives: its folder in this process's adapter registry."""
    assert announcement.version is not None
    return adapter_path(settings, announcement.version)


class AdapterFollower:
    """Hot-swaps the generator to the latest announced adapter; `run(stop)` in a thread."""

    def __init__(self, settings: Settings, generator: Generator) -> None:
        self.settings = settings
        self.generator = generator
        self.applied: AdapterAnnouncement | None = None
        self.ready = threading.Event()  # set once the topic's backlog was applied

    def run(self, stop: threading.Event) -> None:
        latest: AdapterAnnouncement | None = None
        with Tail(self.settings, self.settings.adapters_topic, start="beginning",
                  client_id="headwater-adapters") as tail:  # fmt: skip
            while not stop.is_set() and not self.ready.is_set():
                try:  # during catch-up only the last announcement matters
                    for record in tail.read_to_end(timeout_s=30.0):
                        latest = self._parse(record) or latest
                except Exception as exc:  # the broker is away: catch up once it is back
                    log.warning("adapters topic not read to its end (%s); retrying", exc)
                    stop.wait(1.0)
                    continue
                if latest is not None:
                    self.apply(latest)
                self.ready.set()
            while not stop.is_set():
                for record in tail.poll(0.5):
                    announcement = self._parse(record)
                    if announcement is not None:
                        self.apply(announcement)

    def _parse(self, record: ConsumerRecord) -> AdapterAnnouncement | None:
        if record.key != KEY:
            return None
        try:
            return parse_announcement(record.value)
        except ValueError as exc:
            log.warning("ignoring a bad adapter announcement: %s", exc)
            return None

    def apply(self, announcement: AdapterAnnouncement) -> None:
        version = announcement.version
        try:
            if version is not None:
                self.generator.load_adapter(version, adapter_location(self.settings, announcement))
            self.generator.set_current(version)
            self.applied = announcement
        except Exception as exc:
            log.error(
                "keeping adapter %s: cannot switch to %s: %s",
                self.generator.current or "<base>", version, exc,
            )  # fmt: skip
