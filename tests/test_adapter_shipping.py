"""Adapters travel on the adapters topic, not a shared disk: packed, checksummed, rebuilt, swapped.

The trainer's registry and the query consumer's follower run with separate data dirs, as on two
hosts; the broker is the real one.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from consumers.adapters import AdapterFollower
from headwater.errors import AdapterMismatch
from headwater.events import AdapterAnnouncement
from headwater.runtime.clients import producer
from headwater.runtime.reader import read_to_end
from headwater.settings import Settings
from models.adapters import (
    Manifest,
    adapter_path,
    adapters_root,
    announcement_key,
    chunk_key,
    manifest_key,
    matches,
    name_of,
    pack,
    sha256,
    unpack,
)
from tests.test_generation import tiny_adapters, tiny_generator
from trainer.registry import Registry

V1, V2, V3 = "v0001-20260101T0000", "v0002-20260101T0000", "v0003-20260101T0000"
T = "default"  # the tenant whose adapters travel here


def _folder(tmp_path, files: dict[str, bytes]):
    folder = tmp_path / V1
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_pack_and_unpack_round_trip_checking_every_hash(tmp_path):
    big = bytes(range(256)) * 5000  # 1.28 MB: three chunks of 512 KiB
    folder = _folder(tmp_path, {"adapter_model.safetensors": big, "adapter_config.json": b"{}"})
    (folder / "sub").mkdir()  # not a plain file: not shipped
    records, manifest = pack(folder, T, V1)
    assert [f.name for f in manifest.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert [len(f.chunks) for f in manifest.files] == [1, 3]
    assert manifest.record_keys()[0] == manifest_key(T, V1)
    assert {name_of(k) for k, _ in records} == {f"{T}/{V1}"}
    table = dict(records)
    out = unpack(manifest, table, tmp_path / "other")
    assert (out / "adapter_model.safetensors").read_bytes() == big and matches(out, manifest)

    corrupt = dict(table)
    key = chunk_key(T, V1, "adapter_model.safetensors", 1)
    corrupt[key] = b"x" + corrupt[key][1:]
    with pytest.raises(AdapterMismatch, match="chunk 1 corrupt"):
        unpack(manifest, corrupt, tmp_path / "third")
    del corrupt[key]
    with pytest.raises(AdapterMismatch, match="chunk 1 missing"):
        unpack(manifest, corrupt, tmp_path / "third")
    assert not (tmp_path / "third" / V1).exists()  # nothing half-written is left in place
    assert list((tmp_path / "third").iterdir()) == []

    (out / "adapter_config.json").write_bytes(b"{ }")
    assert not matches(out, manifest)


def test_a_manifest_names_only_plain_files_of_a_real_version():
    entry = {"name": "../../etc/passwd", "size": 1, "sha256": "0" * 64, "chunks": []}
    with pytest.raises(ValueError, match="not a plain file name"):
        Manifest.model_validate({"tenant": T, "version": V1, "chunk_bytes": 10, "files": [entry]})
    with pytest.raises(ValueError, match="not an adapter version"):
        Manifest.model_validate({"tenant": T, "version": "../x", "chunk_bytes": 10, "files": []})
    with pytest.raises(ValueError, match="not an adapter scope"):
        Manifest.model_validate({"tenant": "..", "version": V1, "chunk_bytes": 10, "files": []})
    assert name_of(b"current") is None and name_of(b"../x/manifest") is None
    assert name_of(b"current/acme") is None and name_of(b"../v0001-20260101T0000/manifest") is None
    assert name_of(manifest_key("acme", V1)) == f"acme/{V1}"


def _version(settings: Settings, registry: Registry, tok, seed_name: str) -> str:
    version = registry.begin(parent=None, trigger="test")
    tiny_adapters(adapters_root(settings) / registry.scope, tok, versions=(version,))
    (adapter_path(settings, registry.scope, version) / "headwater.json").write_text(
        json.dumps({"v": seed_name})
    )
    registry.finish(version, "accepted", "test")
    return version


def _until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _live_keys(settings: Settings) -> set[bytes]:
    live: dict[bytes, bool] = {}
    for r in read_to_end(settings, settings.adapters_topic):
        live[r.key] = r.value is not None
    return {k for k, alive in live.items() if alive}


def test_a_promoted_adapter_reaches_a_consumer_with_its_own_data_dir(settings, tmp_path):
    trainer = settings.model_copy(update={"data_dir": tmp_path / "trainer-host"})
    answerer = settings.model_copy(update={"data_dir": tmp_path / "answerer-host"})
    registry = Registry(trainer, T)
    generator = tiny_generator(max_new_tokens=4)
    first = _version(trainer, registry, generator.tokenizer, "first")
    announced = registry.promote(first)
    assert announced.uri is None and announced.manifest_sha256

    follower = AdapterFollower(answerer, generator)
    stop = threading.Event()
    thread = threading.Thread(target=follower.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert follower.ready.wait(60) and generator.current(T) == f"{T}/{first}"
        fetched = adapter_path(answerer, T, first)
        original = adapter_path(trainer, T, first)
        assert fetched != original
        for path in original.iterdir():  # byte-identical, including headwater.json
            assert (fetched / path.name).read_bytes() == path.read_bytes()

        other = Registry(trainer, "acme")  # another tenant's adapter, with its own v0001
        theirs = _version(trainer, other, generator.tokenizer, "acme's")
        other.promote(theirs)
        second = _version(trainer, registry, generator.tokenizer, "second")
        registry.promote(second)
        assert _until(lambda: generator.current(T) == f"{T}/{second}"), "the follower did not swap"
        keys = _live_keys(settings)
        # The first version is retired; the other tenant's, of the same id, is not touched.
        assert theirs == first
        assert {name_of(k) for k in keys} == {f"{T}/{second}", f"acme/{theirs}", None}
        assert generator.current("acme") == f"acme/{theirs}"

        # A forged version: a chunk that does not match the manifest never loads.
        records, manifest = pack(adapter_path(trainer, T, second), T, V3)
        p = producer(settings)
        for key, value in records:
            p.send(settings.adapters_topic, key=key, value=value[:-1] + b"!").get(30)
        p.send(settings.adapters_topic, key=manifest_key(T, V3), value=manifest.to_bytes()).get(30)
        ann = AdapterAnnouncement(tenant=T, version=V3, base_model="tiny",
                                  manifest_sha256=sha256(manifest.to_bytes()))  # fmt: skip
        p.send(settings.adapters_topic, key=announcement_key(T), value=ann.to_bytes()).get(30)
        # The announcement naming a path is ignored: the manifest's hash does not match.
        wrong = AdapterAnnouncement(tenant=T, version=V3, base_model="tiny", uri="file:///etc",
                                    manifest_sha256="0" * 64)  # fmt: skip
        p.send(settings.adapters_topic, key=announcement_key(T), value=wrong.to_bytes()).get(30)
        p.close()
        time.sleep(2.0)
        assert generator.current(T) == f"{T}/{second}"
        assert not adapter_path(answerer, T, V3).exists()

        # Rollback re-ships the first version (it was retired) and the follower serves it.
        current, _ = registry.rollback()
        assert current == first
        assert _until(lambda: generator.current(T) == f"{T}/{first}")
    finally:
        stop.set()
        thread.join(10)
