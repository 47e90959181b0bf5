"""Watching a folder of Markdown/text files and publishing their changes as document events.

Every filesystem event only marks a path as "dirty"; after a short quiet period (debounce) the
path's current state decides the event: a readable file is upserted, a missing one that was
published is deleted. So bursts of writes, editors' save-by-rename and moves all end up as one
correct event per path, and a file's unchanged content is never published twice.

What the watcher published comes from the documents topic when it starts (`published`, read by
`consumers.truth.published_by`: the topic is the truth, nothing is kept on local disk): the
documents of its tenant whose latest event came from this folder. A file deleted while no
watcher ran is therefore deleted at the next start, and an unchanged file is not published
again. Files are read only inside the folder: a symlink that
leads out of it (to a credentials file, say) is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from headwater.errors import DeliveryError, InvalidInput
from headwater.events import DocumentEvent
from headwater.tokens import FreshnessToken
from producers.publisher import DocumentPublisher

log = logging.getLogger(__name__)

SCAN_BATCH = 200
POLL_S = 0.05
RETRY_S = 2.0  # after a failed publish (broker away), try the path again this much later


class FolderWatcher:
    """Keeps the documents of one tenant in step with the files under `folder`.

    doc_id = the file's path relative to `folder`, POSIX style. Hidden files and folders
    (a leading ".") are ignored, as are names matching none of `patterns`. Events carry the
    source `watch:<folder>`, which is how a later watcher of the folder recognizes them.
    """

    def __init__(
        self,
        publisher: DocumentPublisher,
        folder: Path | str,
        *,
        tenant: str,
        patterns: Sequence[str] = ("*.md", "*.txt"),
        debounce_s: float = 0.3,
        published: Mapping[str, str] | None = None,
    ) -> None:
        self.publisher = publisher
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        self.tenant = tenant
        self.source = watch_source(self.folder)
        self.patterns = tuple(patterns)
        self.debounce_s = debounce_s
        # A path written continuously is still published at least this often.
        self.max_delay_s = max(10 * debounce_s, 1.0)
        self.token = FreshnessToken()
        self.stats: Counter[str] = Counter()
        # doc_id -> text_digest of the text last published (from the topic, at start)
        self._digests: dict[str, str] = dict(published or {})
        self._dirty: dict[str, tuple[float, float]] = {}  # doc_id -> (first seen, due)
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set once the initial scan is published

    # -- running ------------------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Scan once, then publish changes until `stop_event` is set."""
        observer = Observer()
        observer.schedule(_Handler(self), str(self.folder), recursive=True)
        # Watch before scanning: a change during the scan is then seen twice, never missed.
        observer.start()
        try:
            self.scan()
            self.ready.set()
            while not stop_event.is_set():
                self.process_due()
                stop_event.wait(POLL_S)
            self.process_due(force=True)
        finally:
            observer.stop()
            observer.join()

    def scan(self) -> None:
        """Publish every matching file (in batches), and delete the published ones that are
        gone; a broker failure here is raised."""
        batch: list[tuple[DocumentEvent, str]] = []
        present = self._walk(self.folder)
        inside = {_nfc(d) for d in present if self._inside(d)}
        for doc_id in sorted(set(self._digests) - inside):
            self.sync(doc_id)  # deleted while no watcher ran (or now a link out of the folder)
        for doc_id in present:
            text = self._read(doc_id)
            if text is None:
                continue
            digest = text_digest(text)
            if self._digests.get(_nfc(doc_id)) == digest:
                continue
            event = self._build("upsert", doc_id, text)
            if event is not None:
                batch.append((event, digest))
            if len(batch) >= SCAN_BATCH:
                self._publish_scanned(batch)
                batch = []
        self._publish_scanned(batch)

    def process_due(self, force: bool = False) -> None:
        """Publish the state of every dirty path whose quiet period is over."""
        now = time.monotonic()
        with self._lock:
            due = [p for p, (_, at) in self._dirty.items() if force or at <= now]
            for doc_id in due:
                del self._dirty[doc_id]
        for doc_id in sorted(due):
            try:
                self.sync(doc_id)
            except DeliveryError as exc:
                log.error("%s: %s; retrying in %.0f s", doc_id, exc, RETRY_S)
                self.stats["failed"] += 1
                with self._lock:
                    self._dirty.setdefault(doc_id, (now, time.monotonic() + RETRY_S))

    def sync(self, doc_id: str) -> None:
        """Publish what `doc_id` is now: upsert its text, or delete it when the file is gone."""
        path = self.folder / doc_id
        if self._inside(doc_id) and path.is_file():
            text = self._read(doc_id)
            if text is None:
                return
            digest = text_digest(text)
            if self._digests.get(_nfc(doc_id)) == digest:
                return
            event = self._build("upsert", doc_id, text)
            if event is not None:
                self._publish(event)
                self._digests[event.doc_id] = digest
        elif _nfc(doc_id) in self._digests and not (path.exists() and self._inside(doc_id)):
            event = self._build("delete", doc_id, None)
            if event is not None:
                self._publish(event)
                del self._digests[event.doc_id]

    @property
    def published(self) -> set[str]:
        """doc_ids this watcher has published and not deleted."""
        return set(self._digests)

    # -- filesystem events (watchdog's thread) ------------------------------------------------

    def mark(self, path: str | Path, *, gone_dir: bool = False, new_dir: bool = False) -> None:
        """Note that `path` changed; a folder marks the files under it."""
        doc_id = self._doc_id(Path(path))
        if doc_id is None:
            return
        if gone_dir:
            prefix = doc_id.rstrip("/") + "/"
            for known in [d for d in list(self._digests) if d.startswith(prefix)]:
                self._mark_one(known)
        elif new_dir:
            for found in self._walk(self.folder / doc_id):
                self._mark_one(found)
        elif self._matches(doc_id):
            self._mark_one(doc_id)

    def _mark_one(self, doc_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            first, _ = self._dirty.get(doc_id, (now, now))
            self._dirty[doc_id] = (first, min(now + self.debounce_s, first + self.max_delay_s))

    # -- internals ----------------------------------------------------------------------------

    def _doc_id(self, path: Path) -> str | None:
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.folder)
        except ValueError:
            return None  # moved out of the folder: only the source side matters
        return None if rel == Path(".") else rel.as_posix()

    def _matches(self, doc_id: str) -> bool:
        parts = PurePosixPath(doc_id).parts
        if any(part.startswith(".") for part in parts):
            return False
        return any(fnmatchcase(parts[-1], pattern) for pattern in self.patterns)

    def _walk(self, top: Path) -> list[str]:
        found = []
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                doc_id = self._doc_id(Path(root) / name)
                if doc_id is not None and self._matches(doc_id):
                    found.append(doc_id)
        return found

    def _inside(self, doc_id: str) -> bool:
        """Whether the path, its links followed, stays inside the folder."""
        try:
            return (self.folder / doc_id).resolve().is_relative_to(self.folder)
        except (OSError, RuntimeError):  # a link loop
            return False

    def _read(self, doc_id: str) -> str | None:
        """The file's text, or None (logged) when it cannot be a document."""
        limit = self.publisher.limits.max_text_bytes
        try:
            real = (self.folder / doc_id).resolve(strict=True)
            if not real.is_relative_to(self.folder):
                return self._skip(doc_id, "a link that leads out of the folder")
            # The resolved path has no link left; O_NOFOLLOW refuses one swapped in since.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                info = os.fstat(fh.fileno())
                if not stat.S_ISREG(info.st_mode):
                    return self._skip(doc_id, "not a regular file")
                if info.st_size > limit:
                    size = info.st_size
                    return self._skip(doc_id, f"{size:,} bytes is over the {limit:,} byte limit")
                data = fh.read(limit + 1)
        except OSError as exc:
            return self._skip(doc_id, f"unreadable ({exc.strerror or exc})")
        if len(data) > limit:
            return self._skip(doc_id, f"{len(data):,} bytes is over the {limit:,} byte limit")
        if b"\x00" in data:
            return self._skip(doc_id, "binary content")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return self._skip(doc_id, "not UTF-8 text")

    def _skip(self, doc_id: str, reason: str) -> None:
        log.warning("skipping %s: %s", doc_id, reason)
        self.stats["skipped"] += 1
        return None

    def _build(self, op: str, doc_id: str, text: str | None) -> DocumentEvent | None:
        try:
            return self.publisher.build(
                op, doc_id, text=text, tenant=self.tenant, source=self.source
            )
        except InvalidInput as exc:
            return self._skip(doc_id, str(exc))

    def _publish(self, event: DocumentEvent) -> None:
        token = self.publisher.publish(event)
        self.token = self.token.merge(token)
        self.stats[event.op] += 1
        log.info("%s %s (token %s)", event.op, event.doc_id, token)

    def _publish_scanned(self, batch: list[tuple[DocumentEvent, str]]) -> None:
        if not batch:
            return
        token = self.publisher.publish_many([event for event, _ in batch])
        self.token = self.token.merge(token)
        for event, digest in batch:
            self._digests[event.doc_id] = digest
        self.stats["upsert"] += len(batch)
        log.info("published %d files from %s (token %s)", len(batch), self.folder, token)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE):
            return
        src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path)
        if event.is_directory:
            if event.event_type in (EVENT_TYPE_DELETED, EVENT_TYPE_MOVED):
                self.watcher.mark(src, gone_dir=True)
            # A folder created or moved in brings files that get no events of their own.
            # (Folder "modified" events only echo changes to files inside: those have their own.)
            if event.event_type == EVENT_TYPE_MOVED:
                self.watcher.mark(dest, new_dir=True)
            elif event.event_type == EVENT_TYPE_CREATED:
                self.watcher.mark(src, new_dir=True)
            return
        self.watcher.mark(src)
        if event.event_type == EVENT_TYPE_MOVED:
            self.watcher.mark(dest)


def text_digest(text: str) -> str:
    """What tells two versions of a file apart (sha256 of the text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _nfc(doc_id: str) -> str:
    # File names may be decomposed on disk (macOS); document ids are always NFC.
    return unicodedata.normalize("NFC", doc_id)


def watch_source(folder: Path) -> str:
    """The source of a folder's events: `watch:<folder>` (hashed when the path is long)."""
    name = f"watch:{folder}"
    if len(name) > 200:
        name = f"watch:{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}"
    return name
