"""The floor plan: which package may import which, read from the code itself (ast).

ground    headwater/                  settings, events, errors, tokens, progress, topics, runtime
middle    producers/ index/ models/   stack/ (the local broker and Milvus Lite server)
upper     consumers/ trainer/
top       service/ bench/             CLI, gateway, up, demo, benchmarks

An import may only go down a floor (or stay within its own package); nothing imports the top
but the top; the package graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {
    "headwater": 0,
    "producers": 1, "index": 1, "models": 1, "stack": 1,
    "consumers": 2, "trainer": 2,
    "service": 3, "bench": 3,
}  # fmt: skip


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of our packages."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in FLOORS]
    return found


def package_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, target in imports(path):
                if target != package:
                    edges.setdefault((package, target), []).append(
                        f"{path.relative_to(REPO)}:{line}"
                    )
    return edges


def test_imports_only_go_down():
    upward = {
        f"{a} -> {b}": where[:3]
        for (a, b), where in package_edges().items()
        if FLOORS[b] > FLOORS[a] or (FLOORS[b] == FLOORS[a] and FLOORS[a] < 3)
    }
    assert not upward, upward


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [a for a in graph if reaches(a, a, {a})]
    assert not cycles, cycles


def test_one_module_builds_kafka_clients():
    builders = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}
    found = []
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in builders:
                    found.append(str(path.relative_to(REPO)))
    assert set(found) == {"headwater/runtime/clients.py"}, found


def test_producers_hold_no_consuming_code():
    reading = ("headwater.runtime.reader", "headwater.runtime.member", "headwater.runtime.batches",
               "headwater.runtime.pool", "kafka.consumer")  # fmt: skip
    offenders = []
    for path in sorted((REPO / "producers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            module = getattr(node, "module", None) or ""
            names = [a.name for a in getattr(node, "names", [])]
            used = [m for m in [module, *names] if m.startswith(reading)]
            calls_poll = isinstance(node, ast.Attribute) and node.attr in ("poll", "subscribe")
            if used or calls_poll:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_every_error_class_lives_in_one_module():
    """One hierarchy (headwater.errors): no other module defines an exception of its own."""
    defined = []
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "headwater" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", "").endswith(("Error", "Exception")) for b in node.bases
                ):
                    defined.append(f"{path.relative_to(REPO)}:{node.name}")
    assert not defined, defined
