"""Style/behavior examples: intake onto the examples topic, the local log, the held-out split."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from headwater.errors import EventError, ExampleError
from headwater.events import ExampleEvent, parse_example
from headwater.runtime.clients import producer
from headwater.settings import Settings


def make_example(
    settings: Settings,
    prompt: str,
    response: str,
    tenant: str | None = None,
    weight: float = 1.0,
    source: str = "cli",
    example_id: str | None = None,
    shared: bool = False,
) -> ExampleEvent:
    """A validated example for a known tenant (ExampleError otherwise); `shared` examples teach
    the house-style adapter every tenant without its own adapter gets."""
    tenant = tenant or settings.default_tenant
    if not settings.tenant_known(tenant):
        raise ExampleError(f"unknown tenant {tenant!r} (known: {', '.join(settings.tenants)})")
    fields: dict[str, object] = {
        "tenant": tenant,
        "prompt": prompt,
        "response": response,
        "weight": weight,
        "source": source,
        "shared": shared,
    }
    if example_id is not None:
        fields["example_id"] = example_id
    try:
        return parse_example(json.dumps(fields).encode())
    except EventError as exc:
        raise ExampleError(str(exc)) from exc


def read_examples_file(settings: Settings, path: Path) -> list[ExampleEvent]:
    """Examples from a JSONL file of {prompt, response[, tenant, weight, source, example_id,
    shared]}.

    The whole file is checked before anything is published: one bad line rejects the file.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExampleError(f"cannot read {path}: {exc}") from exc
    examples = []
    allowed = {"prompt", "response", "tenant", "weight", "source", "example_id", "shared"}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExampleError(f"{path}:{n}: not JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise ExampleError(f"{path}:{n}: expected a JSON object")
        extra = set(row) - allowed
        if extra:
            raise ExampleError(f"{path}:{n}: unknown field(s) {', '.join(sorted(extra))}")
        missing = [k for k in ("prompt", "response") if not isinstance(row.get(k), str)]
        if missing:
            raise ExampleError(f"{path}:{n}: missing text field(s) {', '.join(missing)}")
        try:
            examples.append(
                make_example(
                    settings,
                    row["prompt"],
                    row["response"],
                    tenant=row.get("tenant"),
                    weight=row.get("weight", 1.0),
                    source=row.get("source", "file"),
                    example_id=row.get("example_id"),
                    shared=row.get("shared", False),
                )
            )
        except ExampleError as exc:
            raise ExampleError(f"{path}:{n}: {exc}") from exc
    if not examples:
        raise ExampleError(f"{path}: no examples")
    return examples


def publish_examples(settings: Settings, examples: Iterable[ExampleEvent]) -> int:
    """Put examples on the examples topic; returns how many the broker acknowledged."""
    p = producer(settings, client_id="headwater-examples")
    try:
        futures = [
            p.send(settings.examples_topic, key=e.tenant.encode(), value=e.to_bytes())
            for e in examples
        ]
        for f in futures:
            f.get(timeout=60)
        return len(futures)
    finally:
        p.close()


def is_heldout(example_id: str, fraction: float) -> bool:
    """Deterministic split by id hash: the same example is held out in every run, forever."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ExampleLog:
    """Append-only JSONL of every example consumed, addressed by byte offsets.

    The drift state records how many bytes are committed; bytes past that (appended before a
    crash, with the topic offsets not yet saved) are cut off on open and consumed again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, committed: int) -> None:
        if self.size() > committed:
            with self.path.open("r+b") as f:
                f.truncate(committed)

    def append(self, examples: list[ExampleEvent]) -> int:
        """Append and fsync; returns the new size."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            for e in examples:
                f.write(e.to_bytes() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return self.size()

    def read(self, start: int = 0, end: int | None = None) -> list[ExampleEvent]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
        return [parse_example(line) for line in data.splitlines() if line.strip()]
