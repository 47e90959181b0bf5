"""Stopping long-running loops cleanly on SIGTERM / SIGINT, within a bounded time."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

GRACE_S = 60.0


def stop_on_signals(grace_s: float = GRACE_S) -> threading.Event:
    """An event set by SIGTERM or SIGINT; loops finish their batch and commit before exiting.

    Call from the main thread. If the process is still alive `grace_s` after the signal (a
    client stuck in a call that ignores its timeout), it exits anyway: nothing is lost by that,
    offsets are committed only after the work they cover. A second signal kills at once.
    """
    stop = threading.Event()

    def handler(signum: int, _: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        signal.signal(signum, signal.SIG_DFL)
        watchdog = threading.Timer(grace_s, _give_up, args=(grace_s,))
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _give_up(grace_s: float) -> None:
    log.error("did not stop within %.0f s of the signal; exiting now", grace_s)
    logging.shutdown()
    os._exit(1)
