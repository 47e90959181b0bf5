"""Where adapter versions live on disk, what makes one complete, and how one travels as records.

Layout under `data_dir/adapters`: one folder per finished version (`v0003-20261124T1530`, ids
sort by their number) holding peft's files and `headwater.json`; `.tmp-<version>` while a run
writes one. The trainer's registry writes this layout; the query consumers read it.

No disk is shared between hosts: a promoted version's files travel on the compacted adapters
topic as chunk records (`<version>/chunk/<file>/<n>`, at most `CHUNK_BYTES` each) followed by
a manifest (`<version>/manifest`: every file's size and sha256, and each chunk's sha256). A query
consumer rebuilds the folder in its own data dir from them (`unpack`), checking every hash
before a file is renamed into place; nothing is ever read from a path a record names.
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
from headwater.settings import Settings

METADATA = "headwater.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_config.json")
VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}T\d{4}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Under Kafka's default 1 MiB record limit, so the adapters topic needs no special sizing.
CHUNK_BYTES = 512 * 1024
MAX_FILES = 32
MAX_ADAPTER_BYTES = 1 << 30  # what a query consumer accepts to rebuild (a LoRA is MBs)


def adapters_root(settings: Settings) -> Path:
    return settings.data_dir / "adapters"


def adapter_path(settings: Settings, version: str) -> Path:
    """Folder of an adapter version (what peft `load_adapter` takes)."""
    return adapters_root(settings) / version


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*WEIGHTS, METADATA))


def valid_version(version: str) -> bool:
    """A version id the registry could have made (never a path: announcements are input)."""
    return bool(VERSION_RE.fullmatch(version))


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

    version: str
    chunk_bytes: int = Field(ge=1, le=8 << 20)
    files: list[ShippedFile] = Field(max_length=MAX_FILES)

    @field_validator("version")
    @classmethod
    def _version(cls, version: str) -> str:
        if not valid_version(version):
            raise ValueError(f"not an adapter version: {version[:80]!r}")
        return version

    def record_keys(self) -> list[bytes]:
        """Every record key of this version, manifest first (the order of retirement)."""
        chunks = [chunk_key(self.version, f.name, i) for f in self.files
                  for i in range(len(f.chunks))]  # fmt: skip
        return [manifest_key(self.version), *chunks]

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def manifest_key(version: str) -> bytes:
    return f"{version}/manifest".encode()


def chunk_key(version: str, name: str, index: int) -> bytes:
    # Compaction keeps the latest record per key: the key holds version, file and chunk number.
    return f"{version}/chunk/{name}/{index:05d}".encode()


def version_of(key: bytes | None) -> str | None:
    """The version a chunk or manifest key belongs to (None for any other key)."""
    if not key:
        return None
    head, sep, _ = key.partition(b"/")
    try:
        version = head.decode()
    except UnicodeDecodeError:
        return None
    return version if sep and valid_version(version) else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(
    folder: Path, version: str, chunk_bytes: int = CHUNK_BYTES
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
            records.append((chunk_key(version, path.name, i), part))
        files.append(ShippedFile(name=path.name, size=len(data), sha256=sha256(data),
                                 chunks=[sha256(p) for p in parts]))  # fmt: skip
    return records, Manifest(version=version, chunk_bytes=chunk_bytes, files=files)


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
    """Rebuild the version's folder under `root` from its chunks, checking every hash.

    The files are written to `root/.fetch-<version>` and the folder renamed into place only
    when all of them matched; AdapterMismatch (nothing left behind) otherwise.
    """
    total = sum(f.size for f in manifest.files)
    if total > MAX_ADAPTER_BYTES:
        raise AdapterMismatch(f"{manifest.version}: {total} bytes is over the limit")
    if len({f.name for f in manifest.files}) != len(manifest.files):
        raise AdapterMismatch(f"{manifest.version}: a file is listed twice")
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
                    part = chunks.get(chunk_key(manifest.version, f.name, i))
                    if part is None:
                        raise AdapterMismatch(f"{manifest.version}: {f.name} chunk {i} missing")
                    if sha256(part) != expected:
                        raise AdapterMismatch(f"{manifest.version}: {f.name} chunk {i} corrupt")
                    digest.update(part)
                    size += len(part)
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            if size != f.size or digest.hexdigest() != f.sha256:
                raise AdapterMismatch(f"{manifest.version}: {f.name} does not match its hash")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
