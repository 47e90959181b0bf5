"""Stopping long-running loops cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT; loops finish their batch and commit before exiting.

    Call from the main thread. A second signal while stopping is left to the default
    behaviour, so an operator can still kill a process that does not stop.
    """
    stop = threading.Event()

    def handler(signum: int, _: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop
