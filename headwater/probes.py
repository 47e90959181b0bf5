"""A service's own port: `/livez`, `/readyz` (alias `/healthz`) and `/metrics`.

The probes answer without authentication (Kubernetes and compose call them) and say only
ok/failing per check; why goes to the log. `/metrics` needs `Authorization: Bearer
<metrics_token>` whenever that token is set, and a port beyond loopback is refused without it,
as the API is without its tokens (`guard_exposure`), unless the operator passes `--insecure`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from headwater.errors import InsecureService
from headwater.health import Health, Result

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an unspecified address: assume reachable from elsewhere


def guard_exposure(host: str, authenticated: bool, what: str, fix: str, insecure: bool) -> None:
    """Refuse to listen beyond loopback without authentication, unless told `insecure`."""
    if authenticated or is_loopback(host):
        return
    if not insecure:
        raise InsecureService(
            f"{what} would listen on {host} without authentication: set {fix}, bind 127.0.0.1, "
            "or pass --insecure (local play only)"
        )
    banner = (f"*** INSECURE: {what} listens on {host} WITHOUT AUTHENTICATION (--insecure); "
              "anyone who can reach this port can use it ***")  # fmt: skip
    log.warning(banner)
    print(banner, file=sys.stderr, flush=True)


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an Authorization header carries `token` (compared in constant time)."""
    if token is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    given = given.strip()
    return (
        scheme.lower() == "bearer"
        and given.isascii()
        and secrets.compare_digest(given.encode(), token.encode())
    )


def probe_body(ok: bool, results: dict[str, Result]) -> dict[str, Any]:
    """What a probe says: the verdict and each check's state, no addresses or messages."""
    return {
        "status": "ok" if ok else "failing",
        "checks": {name: "ok" if r.ok else "failing" for name, r in results.items()},
    }


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


class ProbeServer:
    """Serves a `Health` and the metrics registry on host:port, in a daemon thread."""

    def __init__(
        self,
        health: Health,
        *,
        host: str,
        port: int,
        metrics_token: str | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.health = health
        self.metrics_token = metrics_token
        self.registry = registry
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="headwater-probes", daemon=True
        )

    def start(self) -> ProbeServer:
        self._thread.start()
        log.info("probes and metrics on http://%s:%d (/livez /readyz /metrics)",
                 self._server.server_address[0], self.port)  # fmt: skip
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict, start: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start, "405 Method Not Allowed", b"", "text/plain")
        if path == "/metrics":
            if not bearer_ok(environ.get("HTTP_AUTHORIZATION"), self.metrics_token):
                return _reply(start, "401 Unauthorized", b"metrics need a bearer token\n",
                              "text/plain", [("WWW-Authenticate", "Bearer")])  # fmt: skip
            return _reply(start, "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path == "/livez":
            ok, results = self.health.live()
        elif path in ("/readyz", "/healthz"):
            ok, results = self.health.ready()
        else:
            return _reply(start, "404 Not Found", b"", "text/plain")
        body = json.dumps(probe_body(ok, results)).encode()
        return _reply(start, "200 OK" if ok else "503 Service Unavailable", body,
                      "application/json")  # fmt: skip


def _reply(
    start: Callable,
    status: str,
    body: bytes,
    content_type: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    start(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   *(headers or [])])  # fmt: skip
    return [body]
