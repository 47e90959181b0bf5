"""Where adapters live on disk, what makes one complete, how one is named, and how one travels
as records.

Every tenant has its own adapters, and a shared "house style" adapter (scope `_house`) may sit
beneath them. Layout under `data_dir/adapters`: one folder per scope (a tenant id or `_house`),
in it one folder per finished version (`v0003-20261124T1530`, ids sort by their number and count
per scope) holding peft's files and `headwater.json`, `.tmp-<version>` while a run writes one,
and the scope's `registry.json`. The trainer's registry writes this layout; the query consumers
read it.

An adapter's name is `<scope>/<version>`: unique across scopes, and what a query consumer loads
it under. Announcements carry a scope and a version, never a path: both are checked here and the
folder is derived from them, so an announcement cannot point anywhere else.

No disk is shared between hosts: a promoted version's files travel on the compacted adapters
topic as chunk records (`<scope>/<version>/chunk/<file>/<n>`, at most `CHUNK_BYTES` each)
followed by a manifest (`<scope>/<version>/manifest`: every file's size and sha256, and each
chunk's sha256). A query consumer rebuilds the folder in its own data dir from them (`unpack`),
checking every hash before a file is renamed into place; nothing is ever read from a path a
record names. A scope's announcement is keyed `current/<scope>` (two parts: never a record of a
version, which has at least four).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from headwater.errors import AdapterMismatch
from headwater.events import HOUSE, SCOPE_RE
from headwater.settings import Settings

__all__ = ["HOUSE"]

METADATA = "headwater.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")
VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}T\d{4}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCOPE = re.compile(SCOPE_RE)
# Under Kafka's default 1 MiB record limit, so the adapters topic needs no special sizing.
CHUNK_BYTES = 512 * 1024
MAX_FILES = 32
MAX_ADAPTER_BYTES = 1 << 30  # what a query consumer accepts to rebuild (a LoRA is MBs)


def valid_version(version: str) -> bool:
    """A version id the registry could have made (never a path: announcements are input)."""
    return bool(VERSION_RE.fullmatch(version))


def valid_scope(scope: str) -> bool:
    """A tenant id or `_house` (never a path either)."""
    return bool(_SCOPE.fullmatch(scope))


def adapters_root(settings: Settings) -> Path:
    return settings.data_dir / "adapters"


def scope_root(settings: Settings, scope: str) -> Path:
    """Folder of one scope's versions and registry."""
    if not valid_scope(scope):
        raise ValueError(f"not an adapter scope: {scope[:80]!r}")
    return adapters_root(settings) / scope


def adapter_path(settings: Settings, scope: str, version: str) -> Path:
    """Folder of an adapter version (what peft `load_adapter` takes)."""
    if not valid_version(version):
        raise ValueError(f"not an adapter version: {version[:80]!r}")
    return scope_root(settings, scope) / version


def adapter_name(scope: str, version: str) -> str:
    """`<scope>/<version>`: the name an adapter is loaded and reported under."""
    return f"{scope}/{version}"


def parse_name(name: str) -> tuple[str, str]:
    """(scope, version) of an adapter name; ValueError when it is not one."""
    scope, _, version = name.partition("/")
    if not (valid_scope(scope) and valid_version(version)):
        raise ValueError(f"not an adapter name: {name[:80]!r}")
    return scope, version


def announcement_key(scope: str) -> bytes:
    """Kafka key of a scope's announcements: compaction keeps the latest one per scope."""
    return f"current/{scope}".encode()


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*WEIGHTS, METADATA))


# -- adapters as records -----------------------------------------------------------------------


class ShippedFile(BaseModel):
    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunks: list[str] = Field(description="sha256 of each chunk, in order")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not FILE_RE.fullmatch(name):
            raise ValueError(f"not a plain file name: {name[:80]!r}")
        return name


class Manifest(BaseModel):
    """What one version's chunk records add up to; published after all of them."""

    tenant: str = Field(description='The scope: a tenant, or "_house".')
    version: str
    chunk_bytes: int = Field(ge=1, le=8 << 20)
    files: list[ShippedFile] = Field(max_length=MAX_FILES)

    @field_validator("tenant")
    @classmethod
    def _scope(cls, scope: str) -> str:
        if not valid_scope(scope):
            raise ValueError(f"not an adapter scope: {scope[:80]!r}")
        return scope

    @field_validator("version")
    @classmethod
    def _version(cls, version: str) -> str:
        if not valid_version(version):
            raise ValueError(f"not an adapter version: {version[:80]!r}")
        return version

    @property
    def name(self) -> str:
        return adapter_name(self.tenant, self.version)

    def record_keys(self) -> list[bytes]:
        """Every record key of this version, manifest first (the order of retirement)."""
        chunks = [chunk_key(self.tenant, self.version, f.name, i) for f in self.files
                  for i in range(len(f.chunks))]  # fmt: skip
        return [manifest_key(self.tenant, self.version), *chunks]

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def manifest_key(scope: str, version: str) -> bytes:
    return f"{scope}/{version}/manifest".encode()


def chunk_key(scope: str, version: str, name: str, index: int) -> bytes:
    # Compaction keeps the latest record per key: the key holds scope, version, file and chunk.
    return f"{scope}/{version}/chunk/{name}/{index:05d}".encode()


def name_of(key: bytes | None) -> str | None:
    """The adapter name (`<scope>/<version>`) a chunk or manifest key belongs to; None for any
    other key (an announcement's `current/<scope>` included)."""
    if not key:
        return None
    try:
        parts = key.decode().split("/")
    except UnicodeDecodeError:
        return None
    if len(parts) < 3 or parts[2] not in ("manifest", "chunk"):
        return None
    scope, version = parts[0], parts[1]
    return adapter_name(scope, version) if valid_scope(scope) and valid_version(version) else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(
    folder: Path, scope: str, version: str, chunk_bytes: int = CHUNK_BYTES
) -> tuple[list[tuple[bytes, bytes]], Manifest]:
    """A version folder as `(chunk records [(key, bytes)], manifest)`; files in name order."""
    records: list[tuple[bytes, bytes]] = []
    files = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not FILE_RE.fullmatch(path.name):
            continue
        data = path.read_bytes()
        parts = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
        for i, part in enumerate(parts):
            records.append((chunk_key(scope, version, path.name, i), part))
        files.append(ShippedFile(name=path.name, size=len(data), sha256=sha256(data),
                                 chunks=[sha256(p) for p in parts]))  # fmt: skip
    manifest = Manifest(tenant=scope, version=version, chunk_bytes=chunk_bytes, files=files)
    return records, manifest


def matches(folder: Path, manifest: Manifest) -> bool:
    """Whether `folder` holds exactly the manifest's files (sizes and hashes)."""
    for f in manifest.files:
        path = folder / f.name
        if not path.is_file() or path.stat().st_size != f.size:
            return False
        if sha256(path.read_bytes()) != f.sha256:
            return False
    return True


def unpack(manifest: Manifest, chunks: Mapping[bytes, bytes | None], root: Path) -> Path:
    """Rebuild the version's folder under `root` (its scope's folder) from its chunks, checking
    every hash.

    The files are written to `root/.fetch-<version>` and the folder renamed into place only
    when all of them matched; AdapterMismatch (nothing left behind) otherwise.
    """
    total = sum(f.size for f in manifest.files)
    name = manifest.name
    if total > MAX_ADAPTER_BYTES:
        raise AdapterMismatch(f"{name}: {total} bytes is over the limit")
    if len({f.name for f in manifest.files}) != len(manifest.files):
        raise AdapterMismatch(f"{name}: a file is listed twice")
    final = root / manifest.version
    tmp = root / f".fetch-{manifest.version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in manifest.files:
            digest = hashlib.sha256()
            size = 0
            with open(tmp / f.name, "wb") as out:
                for i, expected in enumerate(f.chunks):
                    part = chunks.get(chunk_key(manifest.tenant, manifest.version, f.name, i))
                    if part is None:
                        raise AdapterMismatch(f"{name}: {f.name} chunk {i} missing")
                    if sha256(part) != expected:
                        raise AdapterMismatch(f"{name}: {f.name} chunk {i} corrupt")
                    digest.update(part)
                    size += len(part)
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            if size != f.size or digest.hexdigest() != f.sha256:
                raise AdapterMismatch(f"{name}: {f.name} does not match its hash")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
