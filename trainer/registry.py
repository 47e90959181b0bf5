"""One scope's adapter versions, their gate decisions, and which one is current.

Each scope (a tenant, or `_house` for the shared house style) has its own registry: the folders
follow `models.adapters`' layout, and `registry.json` beside them (written atomically) lists
every version with its status and metrics, `current`, and the history of promotions that
`rollback` walks back. A folder is complete only with its weights and `headwater.json`; nothing
else can be promoted. Promotions and rollbacks are announced on the adapters topic under the
scope's key, so the query consumers switch that scope, and only that scope.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from filelock import FileLock
from kafka import KafkaProducer
from pydantic import BaseModel, Field

from headwater.errors import RegistryError
from headwater.events import AdapterAnnouncement
from headwater.runtime.clients import producer
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings
from models.adapters import (
    VERSION_RE,
    Manifest,
    adapter_name,
    adapter_path,
    adapters_root,
    announcement_key,
    is_complete,
    manifest_key,
    name_of,
    pack,
    scope_root,
    sha256,
    valid_scope,
)
from trainer.drift import atomic_write_json

log = logging.getLogger(__name__)

Status = Literal["training", "accepted", "rejected", "failed"]
PROMOTABLE = ("accepted", "rejected")  # a rejected version can still be promoted by hand


class VersionRecord(BaseModel):
    version: str
    status: Status
    created: datetime
    finished: datetime | None = None
    parent: str | None = None
    trigger: str = ""
    data_mark: str = ""  # which data the run saw (example log length, chunk sequence)
    reason: str = ""
    metrics: dict[str, object] = Field(default_factory=dict)


class RegistryState(BaseModel):
    versions: list[VersionRecord] = Field(default_factory=list)
    current: str | None = None
    history: list[str] = Field(default_factory=list)  # promotions, oldest first

    def get(self, version: str) -> VersionRecord | None:
        return next((v for v in self.versions if v.version == version), None)


class Registry:
    """The registry of one scope (a tenant id, or `_house`)."""

    def __init__(self, settings: Settings, scope: str) -> None:
        self.settings = settings
        self.scope = scope
        self.root = scope_root(settings, scope)  # ValueError unless a tenant id or _house
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "registry.json"
        self._lock = FileLock(str(self.root / "registry.lock"), timeout=120)

    def folder(self, version: str) -> Path:
        return adapter_path(self.settings, self.scope, version)

    @staticmethod
    def scopes(settings: Settings) -> list[str]:
        """Every scope that has a registry, sorted."""
        root = adapters_root(settings)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "registry.json").is_file()
                      and valid_scope(p.name))  # fmt: skip

    def load(self) -> RegistryState:
        if not self.path.exists():
            return RegistryState()
        return RegistryState.model_validate_json(self.path.read_text(encoding="utf-8"))

    def _save(self, state: RegistryState) -> None:
        atomic_write_json(self.path, state.model_dump(mode="json"))

    def current(self) -> str | None:
        return self.load().current

    def last_run_time(self) -> datetime | None:
        last = self.last_run()
        return last.created if last else None

    def last_run(self) -> VersionRecord | None:
        return max(self.load().versions, key=lambda v: v.created, default=None)

    def begin(
        self, parent: str | None, trigger: str, now: datetime | None = None, data_mark: str = ""
    ) -> str:
        """Allocate the next version id and record it as training."""
        now = now or datetime.now(UTC)
        with self._lock:
            state = self.load()
            numbers = [int(m.group(1)) for m in map(VERSION_RE.match, self._names(state)) if m]
            version = f"v{max(numbers, default=0) + 1:04d}-{now:%Y%m%dT%H%M}"
            record = VersionRecord(
                version=version,
                status="training",
                created=now,
                parent=parent,
                trigger=trigger,
                data_mark=data_mark,
            )
            state.versions.append(record)
            self._save(state)
            return version

    def _names(self, state: RegistryState) -> list[str]:
        # Folders count too: an id is never reused, even one whose record was lost.
        on_disk = [p.name.removeprefix(".tmp-") for p in self.root.iterdir() if p.is_dir()]
        return [v.version for v in state.versions] + on_disk

    def finish(
        self, version: str, status: Status, reason: str, metrics: dict[str, object] | None = None
    ) -> VersionRecord:
        with self._lock:
            state = self.load()
            record = state.get(version)
            if record is None:
                raise RegistryError(f"unknown version {version}")
            if status in PROMOTABLE and not is_complete(self.folder(version)):
                status, reason = "failed", f"adapter files incomplete ({reason})"
            record.status = status
            record.reason = reason
            record.finished = datetime.now(UTC)
            if metrics is not None:
                record.metrics = metrics
            self._save(state)
        if status == "failed":
            self._remove(version)
        return record

    def _remove(self, version: str) -> None:
        for folder in (self.folder(version), self.root / f".tmp-{version}"):
            shutil.rmtree(folder, ignore_errors=True)

    def cleanup(self) -> list[str]:
        """After a crash: runs still marked training become failed, half-written folders go.

        Call only while no run is in progress (the trainer holds its run lock).
        """
        failed = []
        with self._lock:
            state = self.load()
            for record in state.versions:
                if record.status == "training":
                    record.status, record.reason = "failed", "run interrupted"
                    record.finished = datetime.now(UTC)
                    failed.append(record.version)
            known = {v.version for v in state.versions if v.status in PROMOTABLE}
            for folder in self.root.iterdir():
                if folder.is_dir() and folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
            self._save(state)
        return failed

    def promote(self, version: str) -> AdapterAnnouncement:
        """Make `version` current (atomic registry write), then announce it."""
        self.make_current(version)
        return announce(self.settings, self.scope, version)

    def make_current(self, version: str) -> None:
        """The registry half of `promote`: one atomic write, no announcement."""
        with self._lock:
            state = self.load()
            record = state.get(version)
            if record is None:
                raise RegistryError(f"unknown version {version}")
            if record.status not in PROMOTABLE:
                raise RegistryError(f"{version} is {record.status}: only a finished run promotes")
            if not is_complete(self.folder(version)):
                raise RegistryError(f"{version}: adapter files are missing")
            state.current = version
            state.history.append(version)
            self._save(state)

    def rollback(self) -> tuple[str | None, AdapterAnnouncement]:
        """Back to the previously promoted version (or the bare base model)."""
        with self._lock:
            state = self.load()
            if state.current is None:
                raise RegistryError("no current adapter to roll back")
            if state.history and state.history[-1] == state.current:
                state.history.pop()
            state.current = state.history[-1] if state.history else None
            self._save(state)
        return state.current, announce(self.settings, self.scope, state.current)

    def listing(self) -> dict[str, object]:
        """`headwater adapters list --json`: {"tenant", "versions": [...], "current"}."""
        state = self.load()
        return {
            "tenant": self.scope,
            "versions": [
                {**v.model_dump(mode="json"), "current": v.version == state.current}
                for v in sorted(state.versions, key=lambda v: v.version)
            ],
            "current": state.current,
        }


def announce(settings: Settings, scope: str, version: str | None) -> AdapterAnnouncement:
    """Ship a scope's `version` on the compacted adapters topic, announce it, retire the scope's
    other versions.

    In order, on the topic's single partition: the version's chunk records (unless a complete
    copy is live there already), its manifest once every chunk was acknowledged, the
    announcement (key `current/<scope>`, with the manifest's hash), then tombstones for every
    other version of this scope (manifest first, so no reader finds a manifest whose chunks are
    going). Other scopes' records are never touched. Query consumers on any host rebuild the
    folder from these records: no disk is shared.
    """
    live = _live_records(settings)
    manifest = None
    p = producer(settings, client_id="headwater-registry")
    try:
        if version is not None:
            manifest = _ship(settings, p, scope, version, live)
        event = AdapterAnnouncement(
            tenant=scope,
            version=version,
            base_model=settings.train_base_model,
            manifest_sha256=sha256(manifest.to_bytes()) if manifest else None,
        )
        p.send(settings.adapters_topic, key=announcement_key(scope), value=event.to_bytes()).get(
            timeout=60
        )
        retired = _retire(settings, p, live, scope, keep=version)
    finally:
        p.close()
    log.info("announced %s adapter %s%s", scope, version or "none",
             f"; retired {', '.join(retired)}" if retired else "")  # fmt: skip
    return event


def _live_records(settings: Settings) -> dict[bytes, bytes]:
    """The adapters topic as a table: the latest value of every key that has one."""
    table: dict[bytes, bytes] = {}
    for record in read_to_end(settings, settings.adapters_topic, client_id="headwater-registry"):
        if record.key is None:
            continue
        if record.value is None:
            table.pop(record.key, None)
        else:
            table[record.key] = record.value
    return table


def _ship(
    settings: Settings, p: KafkaProducer, scope: str, version: str, live: dict[bytes, bytes]
) -> Manifest:
    folder = adapter_path(settings, scope, version)
    if not is_complete(folder):
        raise RegistryError(f"{scope}/{version}: adapter files are missing")
    chunks, manifest = pack(folder, scope, version)
    raw = manifest.to_bytes()
    on_topic = live.get(manifest_key(scope, version))
    if (
        on_topic is not None
        and Manifest.model_validate_json(on_topic) == manifest
        and all(key in live for key in manifest.record_keys())
    ):
        return Manifest.model_validate_json(on_topic)  # a complete copy is there: announce it
    futures = [p.send(settings.adapters_topic, key=key, value=value) for key, value in chunks]
    for future in futures:  # every chunk acknowledged before the manifest that lists them
        future.get(timeout=120)
    p.send(settings.adapters_topic, key=manifest_key(scope, version), value=raw).get(timeout=60)
    log.info("shipped adapter %s: %d files, %d bytes in %d records", manifest.name,
             len(manifest.files), sum(f.size for f in manifest.files), len(chunks))  # fmt: skip
    return manifest


def _retire(
    settings: Settings, p: KafkaProducer, live: dict[bytes, bytes], scope: str, keep: str | None
) -> list[str]:
    """Tombstone the records of this scope's versions other than `keep` (only this scope's)."""
    kept = adapter_name(scope, keep) if keep else None
    mine = f"{scope}/"
    old = sorted({n for key in live if (n := name_of(key)) is not None
                  and n.startswith(mine) and n != kept})  # fmt: skip
    futures = []
    for name in old:
        keys = [k for k in live if name_of(k) == name]
        # The manifest goes first: a reader never holds a manifest whose chunks are gone.
        keys.sort(key=lambda k: not k.endswith(b"/manifest"))
        futures += [p.send(settings.adapters_topic, key=k, value=None) for k in keys]
    for future in futures:
        future.get(timeout=120)
    return old
