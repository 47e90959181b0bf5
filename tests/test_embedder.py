"""Embedder backends: the exported ONNX model against sentence-transformers on real text.

The session `embedder` is the default (onnx, int8 per channel); the torch fp32 reference is
loaded here once. Speed is the ingest benchmark's business, not these tests'.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from headwater.errors import EmbedderError
from headwater.settings import DEFAULT_EMBEDDER, Settings
from index import onnxmodel
from index.embedder import Embedder, model_path, variant_id

PAGES = {
    "tar": "tar: archive utility. Extract an archive into the current directory with tar xf "
    "source.tar, create a gzipped archive of a folder with tar czf target.tar.gz folder.",
    "git-reset": "git reset: undo commits or unstage changes. Undo the last commit but keep its "
    "changes in the working tree: git reset --soft HEAD~1.",
    "ssh-keygen": "ssh-keygen: generate SSH keys for authentication. Create a new ed25519 key "
    "pair with ssh-keygen -t ed25519 and add a comment to identify it.",
    "rsync": "rsync: transfer files to and from remote hosts, copying only differences. Sync a "
    "folder to a server over SSH with rsync -avz folder/ user@host:path/.",
    "kubectl": "kubectl: control Kubernetes clusters. List all pods in every namespace with "
    "kubectl get pods --all-namespaces and show their logs with kubectl logs.",
    "ffmpeg": "ffmpeg: convert audio and video. Extract the sound of a video into an mp3 file "
    "with ffmpeg -i video.mp4 -vn sound.mp3.",
}
QUERIES = {
    "tar": "how do I unpack a tarball",
    "git-reset": "revert my most recent commit",
    "ssh-keygen": "make a new key for logging into servers",
    "rsync": "copy a directory to a remote machine efficiently",
    "kubectl": "show the pods running in my cluster",
    "ffmpeg": "get the audio track out of a movie file",
}


@pytest.fixture(scope="module")
def reference() -> Embedder:
    return Embedder(DEFAULT_EMBEDDER, backend="torch", precision="fp32")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_default_int8_onnx_stays_close_to_torch_fp32(embedder, reference):
    assert embedder.variant == "onnx/int8"
    texts = list(PAGES.values()) + list(QUERIES.values())
    got, want = embedder.encode(texts), reference.encode(texts)
    assert got.shape == want.shape == (len(texts), reference.dim)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cos = _cosines(got, want)
    # Per-channel int8 measured ~0.993 mean on tldr pages; per-tensor int8 would be ~0.94.
    assert cos.mean() >= 0.98 and cos.min() >= 0.95, cos
    assert not np.allclose(got, want, atol=1e-4)  # it really is another variant
    # Retrieval is unchanged: every query finds its page first with both.
    for vectors in (got, want):
        pages, queries = vectors[: len(PAGES)], vectors[len(PAGES) :]
        assert list(np.argmax(queries @ pages.T, axis=1)) == list(range(len(PAGES)))


def test_fp32_is_the_same_on_every_exported_backend(embedder, reference):
    texts = list(PAGES.values())
    want = reference.encode(texts)
    cache = Settings().cache_dir  # the export the session embedder made (or found)
    for backend in ("onnx", "openvino"):
        try:
            other = Embedder(DEFAULT_EMBEDDER, backend=backend, precision="fp32", cache_dir=cache)
        except EmbedderError as exc:
            if backend == "openvino" and "pip install" in str(exc):
                continue  # an optional extra
            raise
        assert other.model_id == reference.model_id  # same vectors, same collection
        assert _cosines(other.encode(texts), want).min() >= 0.9999


def test_the_collection_name_follows_the_vectors():
    base = Settings()
    ids = {
        (b, p): variant_id(base.model_copy(update={"embed_backend": b, "embed_precision": p}))
        for b in ("torch", "onnx", "openvino")
        for p in ("fp32", "int8")
    }
    assert ids["torch", "fp32"] == ids["onnx", "fp32"] == ids["openvino", "fp32"]
    assert len({ids[b, "int8"] for b in ("torch", "onnx", "openvino")} | {ids["onnx", "fp32"]}) == 4


@pytest.mark.slow  # two real exports (~15 s each on an idle machine)
def test_export_runs_once_under_concurrency_and_an_unfinished_one_is_redone(tmp_path, monkeypatch):
    real_export = onnxmodel.export
    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(str(args[1]))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(onnxmodel, "export", counted)
    source = model_path(DEFAULT_EMBEDDER)
    found: list[onnxmodel.Exported] = []
    workers = [
        threading.Thread(
            target=lambda: found.append(onnxmodel.resolve_onnx(DEFAULT_EMBEDDER, source, tmp_path))
        )
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert len(found) == 2 and found[0] == found[1] and len(calls) == 1
    folder = found[0].folder
    assert (folder / onnxmodel.COMPLETE_MARK).exists()
    assert found[0].model_file("int8").stat().st_size < found[0].model_file("fp32").stat().st_size
    # A folder without its completion mark (an export killed half-way) is not trusted.
    (folder / onnxmodel.COMPLETE_MARK).unlink()
    again = onnxmodel.resolve_onnx(DEFAULT_EMBEDDER, source, tmp_path)
    assert len(calls) == 2 and again == found[0]
    assert not list(tmp_path.glob("models/.*"))  # no temp folder left behind
