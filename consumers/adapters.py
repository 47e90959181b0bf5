"""Following the adapters topic: every query consumer serves the version announced last.

The compacted topic is read from the beginning without a group, so every process applies the
latest announcement on start (during catch-up only the last one is loaded) and each one after
it. The topic also carries each shipped version's files (chunk records, then a manifest; see
`models.adapters`): the follower keeps them as a table and rebuilds the announced version in its
own data dir, checking the manifest against the announcement's hash and every file and chunk
against the manifest, then hot-swaps. A local copy is used only when it matches the manifest
(or, for a version announced without one, when it is there at all: one host, one data dir).
A version that cannot be fetched or loaded is logged and skipped: the previous adapter keeps
serving. The reader survives broker outages (the runtime's `Tail`) and resumes where it was.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from consumers.generation import Generator
from headwater.errors import AdapterMismatch
from headwater.events import AdapterAnnouncement
from headwater.runtime.reader import Tail
from headwater.settings import Settings
from models.adapters import (
    Manifest,
    adapter_path,
    adapters_root,
    manifest_key,
    matches,
    sha256,
    unpack,
    valid_version,
    version_of,
)

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
        self._records: dict[bytes, bytes] = {}  # live chunk and manifest records, by key

    def readiness(self) -> str:
        """Readiness check: the topic's backlog was applied (raises before)."""
        if not self.ready.is_set():
            raise RuntimeError("adapter announcements not caught up yet")
        return f"serving {self.generator.current or 'the base model'}"

    def run(self, stop: threading.Event) -> None:
        latest: AdapterAnnouncement | None = None
        with Tail(self.settings, self.settings.adapters_topic, start="beginning",
                  client_id="headwater-adapters") as tail:  # fmt: skip
            while not stop.is_set() and not self.ready.is_set():
                try:  # during catch-up only the last announcement matters
                    for record in tail.read_to_end(timeout_s=30.0):
                        latest = self._take(record) or latest
                except Exception as exc:  # the broker is away: catch up once it is back
                    log.warning("adapters topic not read to its end (%s); retrying", exc)
                    stop.wait(1.0)
                    continue
                if latest is not None:
                    self.apply(latest)
                self.ready.set()
            while not stop.is_set():
                for record in tail.poll(0.5):
                    announcement = self._take(record)
                    if announcement is not None:
                        self.apply(announcement)

    def _take(self, record: ConsumerRecord) -> AdapterAnnouncement | None:
        """Keep a version's records; return the announcement a record carries, if valid."""
        if record.key != KEY:
            if version_of(record.key) is not None:
                if record.value is None:  # a retired version's tombstone
                    self._records.pop(record.key, None)
                else:
                    self._records[record.key] = record.value
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
                folder = self.fetch(announcement)
                self.generator.load_adapter(version, folder)
            self.generator.set_current(version)
            self.applied = announcement
        except Exception as exc:
            log.error(
                "keeping adapter %s: cannot switch to %s: %s",
                self.generator.current or "<base>", version, exc,
            )  # fmt: skip

    def fetch(self, announcement: AdapterAnnouncement) -> Path:
        """The announced version's folder in this data dir, rebuilt from the topic if needed."""
        assert announcement.version is not None
        version = announcement.version
        folder = adapter_location(self.settings, announcement)
        raw = self._records.get(manifest_key(version))
        if raw is None:
            if announcement.manifest_sha256 is not None:
                raise AdapterMismatch(f"{version}: its manifest is not on the topic")
            return folder  # announced without shipped files: a copy on this host or nothing
        if announcement.manifest_sha256 not in (None, sha256(raw)):
            raise AdapterMismatch(f"{version}: the manifest does not match the announcement")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise AdapterMismatch(f"{version}: bad manifest: {exc.errors()[0]['msg']}") from exc
        if manifest.version != version:
            raise AdapterMismatch(f"{version}: the manifest is for {manifest.version}")
        if folder.is_dir() and matches(folder, manifest):
            return folder
        folder = unpack(manifest, self._records, adapters_root(self.settings))
        size = sum(f.size for f in manifest.files)
        log.info("fetched adapter %s from %s: %d files, %d bytes, checksums verified", version,
                 self.settings.adapters_topic, len(manifest.files), size)  # fmt: skip
        # The files are on disk now: the records of this version need not stay in memory.
        for key in manifest.record_keys()[1:]:
            self._records.pop(key, None)
        return folder
