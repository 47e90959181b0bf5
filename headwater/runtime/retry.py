"""Retries as a wrapper: exponential backoff with full jitter, bounded by a stop event.

Handlers never sleep or loop on failure themselves; the consumer runtime and the readers wrap
them with `retrying`, so every loop backs off the same way and stops promptly on shutdown.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from headwater.errors import Cancelled, Unavailable
from headwater.runtime.clients import KafkaError, is_final

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delays of `initial * factor**n`, capped at `maximum`, each drawn in [(1-jitter)·d, d]."""

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        # Jitter keeps the members of a group from hammering a recovering broker in lockstep.
        rng = rng or random.Random()
        delay = self.initial
        while True:
            yield delay * (1 - self.jitter * rng.random())
            delay = min(self.maximum, delay * self.factor)


DEFAULT_BACKOFF = Backoff()


def transient(exc: BaseException) -> bool:
    """The default retry rule: a service is unavailable (Milvus, Kafka), not a bad record."""
    if isinstance(exc, Unavailable):
        return True
    return isinstance(exc, KafkaError) and not is_final(exc)


def retrying(
    call: Callable[[], T],
    *,
    stop: threading.Event,
    what: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    retry_on: Callable[[BaseException], bool] = transient,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """`call()` until it succeeds; transient failures wait a backoff delay and try again.

    Raises the first error `retry_on` rejects, or `Cancelled` when `stop` is set while waiting.
    """
    delays = backoff.delays()
    while True:
        try:
            return call()
        except Exception as exc:
            if not retry_on(exc):
                raise
            delay = next(delays)
            log.warning("%s failed, retrying in %.1f s: %s", what, delay, one_line(exc))
            if on_retry is not None:
                on_retry(exc, delay)
            if stop.wait(delay):
                raise Cancelled(what) from exc


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as one line of at most `limit` characters, prefixed with its type."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    line = text if text.startswith(name) else f"{name}: {text}" if text else name
    return line[:limit]
