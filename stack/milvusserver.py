"""A local Milvus standalone server (2.3, from the PyPI package `milvus`) without Docker.

Milvus Lite serves the default stack; this runs the real server binary when something must be
checked against a server that enforces Milvus' own limits (a JSON field's 65,536 bytes, no BM25
in 2.3, JSON objects only) or behaves like one (collections released after a restart).

The package is used only to render the configuration and to unpack the binary (once per
machine, into `<cache_dir>/milvus-<version>/bin`); the binary then runs as a daemon with its own
data directory, on free ports recorded in `<home>/ports.json` (a restart on the same data keeps
them), with an embedded etcd and local storage. What the package gets wrong for a daemon is
done here: etcd is given its own ports through an embed config (it ignores `etcd_port` and
would listen on 2379), ports are checked with SO_REUSEADDR (a restart right after a kill -9
finds them in TIME_WAIT), and readiness waits for a real request, not only `/healthz`.

Milvus 2.3 listens on every interface whatever its configuration says, so authentication is
on: the root password is replaced by a random one at the first start, kept in
`<home>/token` (mode 0600), and `token` is what clients pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from headwater.errors import StackError
from headwater.settings import Settings
from stack.daemon import Daemon, free_port, last_line

VERSION = "2.3.5"
START_TIMEOUT_S = 300.0  # first start: unpack (~10 s) + etcd + every coordinator, on 2 busy cores
STOP_TIMEOUT_S = 20.0  # SIGTERM can hang with loaded collections; the data survives a SIGKILL
DEFAULT_TOKEN = "root:Milvus"
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord",
              "dataNode")  # fmt: skip


class MilvusServer:
    """One Milvus standalone server: `start()` (idempotent), `stop()`, `kill()`, `uri`, `token`."""

    def __init__(self, home: Path, cache_dir: Path) -> None:
        self.home = Path(home).resolve()
        self.cache = Path(cache_dir).resolve() / f"milvus-{VERSION}"
        self.daemon = Daemon(
            f"Milvus {VERSION} server", self.home / "milvus.pid", self.home / "logs" / "stdout.log"
        )

    @classmethod
    def for_settings(cls, settings: Settings) -> MilvusServer:
        """The server of the local stack's data dir (`<data_dir>/milvus-server`)."""
        return cls(settings.data_dir / "milvus-server", settings.cache_dir)

    # -- where it is ---------------------------------------------------------------------------
    @property
    def ports(self) -> dict[str, int]:
        try:
            return json.loads((self.home / "ports.json").read_text())
        except FileNotFoundError:
            return {}

    @property
    def uri(self) -> str:
        port = self.ports.get("proxy_port")
        if port is None:
            raise StackError(f"the Milvus server in {self.home} was never started")
        return f"http://127.0.0.1:{port}"

    @property
    def token(self) -> str:
        try:
            return (self.home / "token").read_text().strip()
        except FileNotFoundError:
            return DEFAULT_TOKEN

    def settings(self, base: Settings) -> Settings:
        """`base` pointed at this server."""
        from pydantic import SecretStr

        return base.model_copy(update={"milvus_uri": self.uri,
                                       "milvus_token": SecretStr(self.token)})  # fmt: skip

    def status(self) -> str | None:
        ports = self.ports
        if self.daemon.pid() is not None and ports and _healthy(ports["metrics_port"]):
            return self.uri
        return None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        """Start (or find running) the server; returns its URI once it answers requests."""
        if self.status():
            return self.uri
        try:
            import milvus
        except ImportError as exc:
            raise StackError(
                f"the PyPI package `milvus` ({VERSION}) is needed for a local Milvus server: "
                f"pip install 'headwater[milvus-server]'"
            ) from exc
        if milvus.__version__ != VERSION:
            raise StackError(f"`milvus` {milvus.__version__} is installed; {VERSION} is needed")
        self.home.mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        self._configure(ports)
        binary = self._unpack()
        env = dict(os.environ)
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(ports["metrics_port"]),
            MILVUS_RUN_DIR=str(self.home / "run"),
            LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        )
        deadline = time.monotonic() + timeout
        self.daemon.start(
            [str(binary), "run", "standalone"],
            ready=lambda: _healthy(ports["metrics_port"]),
            timeout=timeout,
            env=env,
            cwd=self.home,  # the binary reads configs/milvus.yaml from its working directory
        )
        self._secure(deadline)
        return self.uri

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        return self.daemon.stop(timeout=timeout)

    def kill(self) -> bool:
        """SIGKILL (a crash); `start()` brings it back on the same data."""
        pid = self.daemon.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return self.daemon.stop(timeout=5)  # reaps it and removes the pidfile

    # -- internals -----------------------------------------------------------------------------
    def _ports(self) -> dict[str, int]:
        ports = self.ports
        if not ports:
            from milvus import MilvusServerConfig

            keys = [k for k in MilvusServerConfig().configurable_items if k.endswith("_port")]
            ports = {k: free_port() for k in [*keys, "metrics_port", "etcd_peer_port"]}
            (self.home / "ports.json").write_text(json.dumps(ports, indent=1))
        return ports

    def _configure(self, ports: dict[str, int]) -> None:
        from milvus import MilvusServerConfig

        cfg = MilvusServerConfig(data_dir=str(self.home))
        cfg.try_bind_port = _bind_reusing  # type: ignore[method-assign]
        cfg.update(**{k: v for k, v in ports.items() if k in cfg.configurable_items})
        cfg.set("authorization_enabled", True)
        for component in COMPONENTS:  # advertise loopback, not "the first unicast address"
            cfg.set(f"{component}.ip", "127.0.0.1")
        cfg.resolve()  # writes configs/milvus.yaml
        etcd = self.home / "configs" / "etcd.yaml"
        client, peer = ports["etcd_port"], ports["etcd_peer_port"]
        etcd.write_text(
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n"
        )
        conf = self.home / "configs" / "milvus.yaml"
        text = conf.read_text()
        embed = "  use:\n    embed: true"
        if embed not in text:
            raise StackError(f"unexpected Milvus {VERSION} configuration template (no etcd embed)")
        conf.write_text(text.replace(embed, f"  config:\n    path: {etcd}\n{embed}", 1))

    def _unpack(self) -> Path:
        """The server binary, unpacked from the package once per machine (under a lock)."""
        from milvus import _initialize_data_files

        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _initialize_data_files(str(self.cache))  # skips files whose checksum matches
        return self.cache / "bin" / "milvus"

    def _secure(self, deadline: float) -> None:
        """Wait until requests are served; at the first start, replace the default password."""
        from pymilvus import MilvusClient

        token_file = self.home / "token"
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client = MilvusClient(uri=self.uri, token=self.token, timeout=10)
                try:
                    client.list_collections()
                    if not token_file.exists():
                        password = secrets.token_urlsafe(18)
                        client.update_password("root", "Milvus", password)
                        token_file.touch(mode=0o600)
                        token_file.write_text(f"root:{password}\n")
                    return
                finally:
                    client.close()
            except Exception as exc:  # not serving yet (M8: /healthz OK comes first)
                last = exc
                time.sleep(1.0)
        self.stop()
        raise StackError(
            f"Milvus {VERSION} server did not serve requests in time ({last}); "
            f"log {self.daemon.logfile}: {last_line(self.daemon.logfile)}"
        )


def _healthy(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response,
    ):
        return b"OK" in response.read()
    return False


def _bind_reusing(port: int) -> Any:
    # The package binds without SO_REUSEADDR: a port in TIME_WAIT after a kill -9 would fail.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None
