"""Liveness and readiness of one service process.

Ready means the process can do its work now: Kafka and Milvus answer and, for a consumer-group
member, it owns partitions or waits for an assignment (and still polls). Live means its loops
run. The checks run in a background thread every `interval_s`, so a probe only reads the last
results: cheap under any load, and never stuck behind an outage (a check that hangs makes its
result stale, and a stale result counts as failing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka.errors import KafkaError

from headwater.runtime import clients
from headwater.runtime.member import members
from headwater.runtime.retry import one_line
from headwater.settings import Settings

log = logging.getLogger(__name__)

# A check returns what it found (one line) when fine and raises when not.
Check = Callable[[], str]


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str
    at: float  # time.monotonic() of the check


class Health:
    """Named readiness checks (run in the background) and liveness checks (run when asked)."""

    def __init__(self, interval_s: float = 5.0, stale_s: float | None = None) -> None:
        self.interval_s = interval_s
        self.stale_s = 3 * interval_s + 5 if stale_s is None else stale_s
        self._ready: dict[str, Check] = {}
        self._live: dict[str, Check] = {}
        self._results: dict[str, Result] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ready_check(self, name: str, check: Check) -> None:
        self._ready[name] = check

    def live_check(self, name: str, check: Check) -> None:
        self._live[name] = check

    # -- running the checks ----------------------------------------------------------------
    def start(self) -> Health:
        """Check now and then every `interval_s` in a daemon thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="headwater-health", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def refresh(self) -> None:
        for name, check in list(self._ready.items()):
            result = _run(check)
            with self._lock:
                before = self._results.get(name)
                self._results[name] = result
            if before is None or before.ok != result.ok:
                level = logging.INFO if result.ok else logging.WARNING
                log.log(level, "readiness %s: %s", name, result.detail)

    def stop(self) -> None:
        self._stop.set()
        for check in (*self._ready.values(), *self._live.values()):
            close = getattr(check, "close", None)
            if close is not None:
                close()

    # -- reading them ----------------------------------------------------------------------
    def ready(self) -> tuple[bool, dict[str, Result]]:
        """Whether every readiness check passed recently, with each one's last result."""
        now = time.monotonic()
        with self._lock:
            results = dict(self._results)
        out = {}
        for name in self._ready:
            result = results.get(name)
            if result is None:
                result = Result(False, "not checked yet", now)
            elif now - result.at > self.stale_s:
                result = Result(False, f"stale: last checked {now - result.at:.0f} s ago", now)
            out[name] = result
        return all(r.ok for r in out.values()), out

    def live(self) -> tuple[bool, dict[str, Result]]:
        out = {name: _run(check) for name, check in self._live.items()}
        return all(r.ok for r in out.values()), out


def _run(check: Check) -> Result:
    try:
        return Result(True, check() or "ok", time.monotonic())
    except Exception as exc:
        return Result(False, one_line(exc, 300), time.monotonic())


# -- the checks every service uses -----------------------------------------------------------


class KafkaCheck:
    """The cluster answers a metadata request (one admin client, rebuilt after a failure)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin = None

    def __call__(self) -> str:
        try:
            if self._admin is None:
                self._admin = clients.admin(self.settings, timeout_s=3.0, request_timeout_ms=4000)
            brokers = len(self._admin.describe_cluster()["brokers"])
        except KafkaError:
            self.close()
            raise
        return f"{brokers} brokers"

    def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(KafkaError):
                admin.close()


class MilvusCheck:
    """Milvus answers a cheap call (its own connection, rebuilt after a failure)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = None

    def __call__(self) -> str:
        from pymilvus import MilvusClient

        try:
            if self._client is None:
                # Dedicated: closing it must not close a channel the service's store shares.
                self._client = MilvusClient(**self.settings.milvus_client_config(), timeout=4.0,
                                            dedicated=True)  # fmt: skip
            collections = len(self._client.list_collections())
        except Exception:
            self.close()
            raise
        return f"{collections} collections"

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # a connection we were dropping anyway
                log.debug("closing the Milvus probe: %s", exc)


def group_check() -> str:
    """Every group member of this process owns partitions or waits for some, and polls."""
    found = members()
    if not found:
        raise RuntimeError("no consumer-group member yet")
    states = []
    for member in found:
        ok, why = member.membership()
        if not ok:
            raise RuntimeError(f"{member.group}: {why}")
        states.append(f"{member.group} {why}")
    return "; ".join(states)


def polling_check(limit_s: float = 600.0) -> str:
    """Live while every group member's loop polled within `limit_s` (max.poll.interval.ms)."""
    now = time.monotonic()
    for member in members():
        idle = now - member.last_poll
        if idle > limit_s:
            raise RuntimeError(f"{member.group} has not polled for {idle:.0f} s")
    return "polling"


def thread_check(thread: Callable[[], threading.Thread | None], name: str) -> Check:
    """Live while the thread `thread()` returns runs."""

    def check() -> str:
        t = thread()
        if t is None or not t.is_alive():
            raise RuntimeError(f"{name} is not running")
        return "running"

    return check
