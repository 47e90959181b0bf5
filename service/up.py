"""`headwater up`: the whole system in one process on the embedded default.

Indexer, query consumer, standing-query matcher and trainer scheduler run in threads; the HTTP
gateway runs in the main thread. Each loop gets its own Milvus connection and Kafka clients, as
it would in its own process; they share one loaded embedder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from headwater.health import Health
from headwater.runtime.shutdown import stop_on_signals
from headwater.settings import Settings
from headwater.threads import use_threads
from service.commands.stack import start_stack
from service.running import service

log = logging.getLogger("headwater.up")


def _thread(
    name: str, run: Callable[[threading.Event], None], stop: threading.Event
) -> threading.Thread:
    def guarded(stop: threading.Event) -> None:
        try:
            run(stop)
        except Exception:
            # One loop failing must not take the others down silently: stop everything.
            log.exception("%s stopped with an error; shutting down", name)
            stop.set()

    t = threading.Thread(target=guarded, args=(stop,), name=name, daemon=True)
    t.start()
    return t


def run_up(settings: Settings, *, trainer: bool = True, insecure: bool = False) -> int:
    from service.gateway import guard_api

    if not insecure:
        guard_api(settings, insecure=False)  # before the stack starts: fail fast
    start_stack(settings)
    log.info("Kafka at %s, Milvus at %s", settings.bootstrap, settings.milvus_address)
    with service(settings, insecure=insecure) as health:
        return _run(settings, health, trainer=trainer, insecure=insecure)


def _run(settings: Settings, health: Health, *, trainer: bool, insecure: bool) -> int:
    from consumers.answerer import Answerer
    from consumers.generation import load_generator
    from consumers.indexer import Indexer
    from consumers.standing import StandingMatcher
    from index.embedder import load_embedder
    from index.index import open_index
    from service.gateway import build_app, serve

    stop = stop_on_signals()
    # One process, one torch thread pool: the embedder's and the generator's shares.
    use_threads(settings, "embed", "generate")
    embedder = load_embedder(settings)
    indexing, standing, querying = (open_index(settings, embedder=embedder) for _ in range(3))
    threads = [
        _thread("indexer", Indexer(settings, embedder, indexing.store).run, stop),
        _thread("standing", StandingMatcher(settings, embedder, standing.store).run, stop),
    ]
    generator = load_generator(settings)
    answerer = Answerer(settings, querying.searcher, generator)
    threads.append(_thread("answerer", answerer.run, stop))
    if answerer.follower is not None:
        health.ready_check("adapters", answerer.follower.readiness)
    service = None
    if trainer:
        from trainer.scheduler import TrainerService

        service = TrainerService(settings)
        service.start()
    try:
        serve(build_app(settings, embedder=embedder, health=health), settings, stop, insecure)
    finally:
        stop.set()
        if service is not None:
            service.stop()
        for t in threads:
            t.join(60)
    return 0
