"""FolderWatcher: real files, real inotify events (watchdog), real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import TopicPartition

from consumers.truth import published_by
from headwater.events import DocumentEvent, parse_document
from headwater.runtime import clients
from headwater.settings import Settings
from producers.publisher import DocumentPublisher
from producers.watch import FolderWatcher, text_digest, watch_source

WAIT_S = 20.0


class TopicTail:
    """Reads the documents topic as it grows (one consumer for the whole test)."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = clients.consumer(settings)
        parts = [TopicPartition(settings.documents_topic, p) for p in range(settings.partitions)]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.events: list[DocumentEvent] = []
        self.positions: list[tuple[int, int]] = []  # (partition, offset) of each event

    def wait_for(self, done: Callable[[list[DocumentEvent]], bool]) -> list[DocumentEvent]:
        deadline = time.monotonic() + WAIT_S
        while not done(self.events):
            assert time.monotonic() < deadline, f"events so far: {self.summary()}"
            for batch in self.consumer.poll(timeout_ms=100).values():
                self.events.extend(parse_document(r.value) for r in batch)
                self.positions.extend((r.partition, r.offset) for r in batch)
        return self.events

    def drain(self) -> None:
        """Read up to the current end of every partition."""
        parts = list(self.consumer.assignment())
        end = self.consumer.end_offsets(parts)
        self.wait_for(lambda ev: all(self.consumer.position(tp) >= end[tp] for tp in parts))

    def summary(self) -> list[tuple[str, str]]:
        return [(e.op, e.doc_id) for e in self.events]

    def count(self, op: str, doc_id: str) -> int:
        return sum(1 for e in self.events if (e.op, e.doc_id) == (op, doc_id))

    def latest(self, doc_id: str) -> DocumentEvent:
        """The document's last event in the log (its events share one partition)."""
        mine = [(pos, e) for pos, e in zip(self.positions, self.events, strict=True)
                if e.doc_id == doc_id]  # fmt: skip
        assert len({p for (p, _), _ in mine}) == 1, "one document's events on two partitions"
        return max(mine, key=lambda pe: pe[0])[1]


@pytest.fixture
def watching(settings: Settings, tmp_path: Path) -> Iterator[tuple[Path, FolderWatcher, TopicTail]]:
    folder = tmp_path / "docs"
    (folder / "guide").mkdir(parents=True)
    (folder / "a.md").write_text("# A\n\nfirst", encoding="utf-8")
    (folder / "guide" / "b.txt").write_text("B text", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG not a document")
    (folder / "binary.md").write_bytes(b"looks like text\x00but is not")
    (folder / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (folder / ".draft.md").write_text("hidden", encoding="utf-8")
    (folder / "big.md").write_text("x" * 5_000, encoding="utf-8")
    small = settings.model_copy(update={"max_text_bytes": 4_000})
    stop = threading.Event()
    tail = TopicTail(settings)
    with DocumentPublisher(small) as pub:
        watcher = FolderWatcher(pub, folder, tenant="default", debounce_s=0.2)
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        try:
            assert watcher.ready.wait(WAIT_S), "initial scan did not finish"
            yield folder, watcher, tail
        finally:
            stop.set()
            thread.join(WAIT_S)
            tail.consumer.close()
    assert not thread.is_alive()


def test_initial_scan_publishes_matching_readable_files(watching) -> None:
    _, watcher, tail = watching
    events = tail.wait_for(lambda ev: len(ev) >= 2)
    assert sorted((e.op, e.doc_id, e.text) for e in events) == [
        ("upsert", "a.md", "# A\n\nfirst"),
        ("upsert", "guide/b.txt", "B text"),
    ]
    assert all(e.source == f"watch:{watcher.folder}" and e.tenant == "default" for e in events)
    assert all(e.version is None for e in events)  # ordered by the log, not by a clock
    # binary.md, latin1.md and big.md are reported and skipped; hidden and *.png ignored.
    assert watcher.stats["skipped"] == 3
    assert watcher.published == {"a.md", "guide/b.txt"}


def test_create_modify_delete_and_move_become_events(watching) -> None:
    folder, watcher, tail = watching
    tail.wait_for(lambda ev: len(ev) >= 2)

    (folder / "new.md").write_text("brand new", encoding="utf-8")
    tail.wait_for(lambda ev: tail.count("upsert", "new.md") == 1)
    assert tail.latest("new.md").text == "brand new"

    (folder / "a.md").write_text("# A\n\nsecond", encoding="utf-8")
    tail.wait_for(lambda ev: tail.count("upsert", "a.md") == 2)
    assert tail.latest("a.md").text == "# A\n\nsecond"

    (folder / "guide" / "b.txt").unlink()
    tail.wait_for(lambda ev: tail.count("delete", "guide/b.txt") == 1)

    (folder / "new.md").rename(folder / "guide" / "moved.md")
    tail.wait_for(
        lambda ev: (
            tail.count("delete", "new.md") == 1 and tail.count("upsert", "guide/moved.md") == 1
        )
    )
    assert tail.latest("guide/moved.md").text == "brand new"

    # A folder moved in brings its files along.
    outside = folder.parent / "incoming"
    outside.mkdir()
    (outside / "c.md").write_text("from outside", encoding="utf-8")
    outside.rename(folder / "incoming")
    tail.wait_for(lambda ev: tail.count("upsert", "incoming/c.md") == 1)

    # A burst of writes is debounced into far fewer events, ending at the last content.
    before = tail.count("upsert", "a.md")
    for i in range(20):
        (folder / "a.md").write_text(f"# A\n\nburst {i}", encoding="utf-8")
    tail.wait_for(lambda ev: tail.latest("a.md").text == "# A\n\nburst 19")
    assert tail.count("upsert", "a.md") - before < 20

    # Each document's events share one partition; a delete never carries text.
    for doc_id in {e.doc_id for e in tail.events}:
        tail.latest(doc_id)
    assert all(e.text is None for e in tail.events if e.op == "delete")
    assert watcher.published == {"a.md", "guide/moved.md", "incoming/c.md"}


def test_unchanged_content_and_skipped_files_publish_nothing(watching) -> None:
    folder, watcher, tail = watching
    tail.wait_for(lambda ev: len(ev) >= 2)
    (folder / "a.md").write_text("# A\n\nfirst", encoding="utf-8")  # same text again
    (folder / "other.bin.md").write_bytes(b"\x00\x01")  # binary: skipped
    # Dirty paths are synced in name order once quiet: seeing the last one means all are done.
    (folder / "zz-marker.md").write_text("marker", encoding="utf-8")
    tail.wait_for(lambda ev: tail.count("upsert", "zz-marker.md") == 1)
    tail.drain()
    assert tail.count("upsert", "a.md") == 1
    assert "other.bin.md" not in {e.doc_id for e in tail.events}
    assert watcher.stats["skipped"] >= 4  # reported, and the watcher kept going


def test_a_burst_is_published_once_after_it_goes_quiet(settings: Settings, tmp_path: Path) -> None:
    # No observer here: marks stand in for filesystem events, so nothing depends on timing.
    folder = tmp_path / "docs"
    folder.mkdir()
    tail = TopicTail(settings)
    with DocumentPublisher(settings) as pub:
        watcher = FolderWatcher(pub, folder, tenant="default", debounce_s=60)
        for i in range(5):
            (folder / "a.md").write_text(f"version {i}", encoding="utf-8")
            watcher.mark(folder / "a.md")
            watcher.mark(folder / "ignored.png")
            watcher.process_due()
        assert watcher.stats["upsert"] == 0  # still inside the quiet period
        watcher.process_due(force=True)
        (folder / "a.md").unlink()
        watcher.mark(folder / "a.md")
        watcher.process_due(force=True)
    tail.wait_for(lambda ev: len(ev) >= 2)
    tail.drain()
    tail.consumer.close()
    assert [(e.op, e.doc_id, e.text) for e in tail.events] == [
        ("upsert", "a.md", "version 4"),
        ("delete", "a.md", None),
    ]


def test_links_out_of_the_folder_are_never_followed(settings: Settings, tmp_path: Path) -> None:
    secret = tmp_path / "credentials.txt"
    secret.write_text("aws_secret_access_key = hunter2", encoding="utf-8")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "keys.md").write_text("ssh private key", encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "real.md").write_text("a real document", encoding="utf-8")
    (folder / "creds.txt").symlink_to(secret)
    (folder / "escape.md").symlink_to("../credentials.txt")
    (folder / "private").symlink_to(tmp_path / "private", target_is_directory=True)
    (folder / "alias.md").symlink_to("real.md")  # a link inside the folder is fine
    tail = TopicTail(settings)
    with DocumentPublisher(settings) as pub:
        watcher = FolderWatcher(pub, folder, tenant="default", debounce_s=60)
        watcher.scan()
        # A file that later becomes a link out (editors, attackers) is not read either.
        (folder / "real.md").unlink()
        (folder / "real.md").symlink_to(secret)
        watcher.mark(folder / "real.md")
        watcher.mark(folder / "private" / "keys.md")
        watcher.process_due(force=True)
    tail.drain()
    tail.consumer.close()
    assert tail.summary() == [("upsert", "alias.md"), ("upsert", "real.md"), ("delete", "real.md")]
    assert not any("hunter2" in (e.text or "") or "ssh" in (e.text or "") for e in tail.events)
    assert watcher.stats["skipped"] >= 2


def recalled(settings: Settings, folder: Path) -> dict[str, str]:
    """What earlier watchers of `folder` published, read back from the topic (as the CLI does)."""
    return published_by(settings, "default", watch_source(folder.resolve()), text_digest)


def test_deletes_made_while_stopped_are_published_at_the_next_start(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("keep.md", "gone.md", "edited.md"):
        (folder / name).write_text(f"{name} v1", encoding="utf-8")
    other = tmp_path / "other"  # another folder of the same tenant: never touched
    other.mkdir()
    (other / "theirs.md").write_text("their document", encoding="utf-8")
    tail = TopicTail(settings)
    with DocumentPublisher(settings) as pub:
        for where in (folder, other):
            FolderWatcher(pub, where, tenant="default", published=recalled(settings, where)).scan()
    tail.drain()
    assert len(tail.events) == 4
    # Stopped: one file deleted, one edited. A new watcher knows only what the topic says.
    (folder / "gone.md").unlink()
    (folder / "edited.md").write_text("edited.md v2", encoding="utf-8")
    with DocumentPublisher(settings) as pub:
        second = FolderWatcher(pub, folder, tenant="default", published=recalled(settings, folder))
        assert second.published == {"keep.md", "gone.md", "edited.md"}
        second.scan()
    tail.drain()
    tail.consumer.close()
    assert tail.summary()[4:] == [("delete", "gone.md"), ("upsert", "edited.md")]
    assert second.published == {"keep.md", "edited.md"}
