"""The local Milvus Lite server: one process owns `<data_dir>/milvus` and serves it over gRPC.

Only one process may open a Lite data directory, so indexers, query consumers and the CLI all
reach it through `http://127.0.0.1:<milvus_port>`, the same code path as a real Milvus server.
"""

from __future__ import annotations

import sys

from headwater.errors import StackError
from headwater.settings import Settings
from stack.daemon import Daemon, port_open

START_TIMEOUT_S = 60.0


class LiteServer:
    def __init__(self, settings: Settings) -> None:
        if not settings.uses_local_milvus:
            raise StackError(
                f"HEADWATER_MILVUS_URI={settings.milvus_uri} points at a Milvus server; "
                "headwater starts no Milvus Lite server"
            )
        self.settings = settings
        self.home = settings.data_dir / "milvus"
        self.daemon = Daemon(
            "Milvus Lite server",
            self.home.with_suffix(".pid"),
            settings.data_dir / "logs" / "milvus-lite.log",
        )

    @property
    def address(self) -> str:
        return self.settings.milvus_address

    def status(self) -> str | None:
        if self.daemon.pid() is not None and port_open("127.0.0.1", self.settings.milvus_port):
            return self.address
        return None

    def start(self) -> str:
        if self.status():
            return self.address
        port = self.settings.milvus_port
        if port_open("127.0.0.1", port):
            raise StackError(
                f"port {port} is in use by another process; set HEADWATER_MILVUS_PORT, or "
                "HEADWATER_MILVUS_URI to use that server"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.home),
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        self.daemon.start(argv, ready=lambda: port_open("127.0.0.1", port), timeout=START_TIMEOUT_S)
        return self.address

    def stop(self) -> bool:
        return self.daemon.stop(timeout=20.0)
