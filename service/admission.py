"""Bounds on the gateway's concurrent work: per tenant and overall, refused rather than queued.

A search waiting for a freshness token, an answer stream or a notification stream each holds a
thread or a connection for a while; without bounds, one tenant's burst (or 40 requests with a
hopeless token) would hold them all and every other tenant, and `/healthz`, would wait. Over a
bound the request is refused at once with `Busy` (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from headwater.errors import Busy

RETRY_AFTER_S = 1.0


class Admission:
    """At most `total` slots of one kind of work at once, and `per_tenant` of them per tenant."""

    def __init__(self, kind: str, total: int, per_tenant: int) -> None:
        self.kind = kind
        self.total = total
        self.per_tenant = per_tenant
        self._held: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._count

    def acquire(self, tenant: str) -> Slot:
        """A slot for `tenant` (release it when done), or Busy when a bound is reached."""
        with self._lock:
            if self._count >= self.total:
                raise Busy(f"too many {self.kind} at once; retry shortly", RETRY_AFTER_S)
            if self._held.get(tenant, 0) >= self.per_tenant:
                raise Busy(
                    f"too many {self.kind} of tenant {tenant} at once; retry shortly",
                    RETRY_AFTER_S,
                )
            self._held[tenant] = self._held.get(tenant, 0) + 1
            self._count += 1
        return Slot(self, tenant)

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._count -= 1
            left = self._held[tenant] - 1
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        held = self.acquire(tenant)
        try:
            yield
        finally:
            held.release()


class Slot:
    """One acquired slot; `release` is idempotent (streams release it from two places)."""

    def __init__(self, admission: Admission, tenant: str) -> None:
        self._admission = admission
        self._tenant = tenant
        self._lock = threading.Lock()
        self._released = False

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._release(self._tenant)
