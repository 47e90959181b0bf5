"""Following the adapters topic: every query consumer serves each scope's announced adapter.

The compacted topic holds one announcement per scope (a tenant, or `_house` for the shared
house adapter) under the key `current/<scope>`. It is read from the beginning without a group,
so every process applies each scope's latest announcement on start (during catch-up only the
last one per scope counts) and each one after it. The topic also carries each shipped version's
files (chunk records, then a manifest; see `models.adapters`): the follower keeps them as a
table and rebuilds an announced version in its own data dir, checking the manifest against the
announcement's hash and every file and chunk against the manifest. A local copy is used only
when it matches the manifest (or, for a version announced without one, when it is there at all:
one host, one data dir).

An announcement only tells the generator where a scope's adapter is: it loads on first use. A
scope whose adapter is loaded right now (hot) gets the new version loaded before the switch, so
its next answer does not wait for it. A version that cannot be fetched or loaded is logged and
skipped: the previous one keeps serving. Nothing one scope's announcement does touches another
scope. The reader survives broker outages (the runtime's `Tail`) and resumes where it was.
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
    adapter_name,
    adapter_path,
    announcement_key,
    is_complete,
    manifest_key,
    matches,
    name_of,
    scope_root,
    sha256,
    unpack,
    valid_version,
)

log = logging.getLogger(__name__)


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
    """Where an announced adapter lives: its folder in this process's adapter layout (the
    announcement's uri is never followed)."""
    assert announcement.version is not None
    return adapter_path(settings, announcement.tenant, announcement.version)


class AdapterFollower:
    """Keeps the generator's adapter per scope on the latest announcement; `run(stop)`."""

    def __init__(self, settings: Settings, generator: Generator) -> None:
        self.settings = settings
        self.generator = generator
        self.applied: dict[str, AdapterAnnouncement] = {}  # scope -> last applied
        self.ready = threading.Event()  # set once the topic's backlog was applied
        self._records: dict[bytes, bytes] = {}  # live chunk and manifest records, by key

    def readiness(self) -> str:
        """Readiness check: the topic's backlog was applied (raises before)."""
        if not self.ready.is_set():
            raise RuntimeError("adapter announcements not caught up yet")
        serving = sum(a.version is not None for a in self.applied.values())
        return f"following {len(self.applied)} scopes, {serving} with an adapter"

    def run(self, stop: threading.Event) -> None:
        latest: dict[str, AdapterAnnouncement] = {}
        with Tail(self.settings, self.settings.adapters_topic, start="beginning",
                  client_id="headwater-adapters") as tail:  # fmt: skip
            while not stop.is_set() and not self.ready.is_set():
                try:  # during catch-up only each scope's last announcement matters
                    for record in tail.read_to_end(timeout_s=30.0):
                        announcement = self._take(record)
                        if announcement is not None:
                            latest[announcement.tenant] = announcement
                except Exception as exc:  # the broker is away: catch up once it is back
                    log.warning("adapters topic not read to its end (%s); retrying", exc)
                    stop.wait(1.0)
                    continue
                for announcement in latest.values():
                    self.apply(announcement)
                self.ready.set()
            while not stop.is_set():
                for record in tail.poll(0.5):
                    announcement = self._take(record)
                    if announcement is not None:
                        self.apply(announcement)

    def _take(self, record: ConsumerRecord) -> AdapterAnnouncement | None:
        """Keep a version's records; return the announcement a record carries, if valid."""
        key = record.key
        if key is None:
            return None
        if name_of(key) is not None:
            if record.value is None:  # a retired version's tombstone
                self._records.pop(key, None)
            else:
                self._records[key] = record.value
            return None
        if not key.startswith(b"current/"):
            return None  # not ours
        try:
            announcement = parse_announcement(record.value)
        except ValueError as exc:
            log.warning("ignoring a bad adapter announcement: %s", exc)
            return None
        if key != announcement_key(announcement.tenant):
            log.warning("ignoring an announcement for %r under key %r", announcement.tenant,
                        key[:80])  # fmt: skip
            return None
        return announcement

    def apply(self, announcement: AdapterAnnouncement) -> None:
        scope, version = announcement.tenant, announcement.version
        gen = self.generator
        previous = gen.current(scope)
        try:
            if version is None:
                gen.set_current(scope, None)
            else:
                name = adapter_name(scope, version)
                path = self.fetch(announcement)
                if not is_complete(path):
                    raise FileNotFoundError(f"{path} is missing or incomplete")
                if previous is not None and previous in gen.loaded:
                    gen.load_adapter(name, path)  # hot: have it ready before the switch
                else:
                    gen.offer(name, path)  # cold: it loads when this scope is next asked
                gen.set_current(scope, name)
            self.applied[scope] = announcement
        except Exception as exc:
            log.error(
                "%s: keeping adapter %s: cannot switch to %s: %s",
                scope, previous or "<none>", version, exc,
            )  # fmt: skip

    def fetch(self, announcement: AdapterAnnouncement) -> Path:
        """The announced version's folder in this data dir, rebuilt from the topic if needed."""
        assert announcement.version is not None
        scope, version = announcement.tenant, announcement.version
        name = adapter_name(scope, version)
        folder = adapter_location(self.settings, announcement)
        raw = self._records.get(manifest_key(scope, version))
        if raw is None:
            if announcement.manifest_sha256 is not None:
                raise AdapterMismatch(f"{name}: its manifest is not on the topic")
            return folder  # announced without shipped files: a copy on this host or nothing
        if announcement.manifest_sha256 not in (None, sha256(raw)):
            raise AdapterMismatch(f"{name}: the manifest does not match the announcement")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise AdapterMismatch(f"{name}: bad manifest: {exc.errors()[0]['msg']}") from exc
        if manifest.name != name:
            raise AdapterMismatch(f"{name}: the manifest is for {manifest.name}")
        if folder.is_dir() and matches(folder, manifest):
            return folder
        folder = unpack(manifest, self._records, scope_root(self.settings, scope))
        size = sum(f.size for f in manifest.files)
        log.info("fetched adapter %s from %s: %d files, %d bytes, checksums verified", name,
                 self.settings.adapters_topic, len(manifest.files), size)  # fmt: skip
        # The files are on disk now: the records of this version need not stay in memory.
        for key in manifest.record_keys()[1:]:
            self._records.pop(key, None)
        return folder
