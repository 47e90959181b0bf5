"""The local Milvus Lite server: one process owns `<data_dir>/milvus` and serves it over gRPC.

Only one process may open a Lite data file, so indexers, query consumers and the CLI all reach
it through `http://127.0.0.1:<milvus_port>`, the same code path as a real Milvus server. The
process is milvus-lite's C++ binary, exec'd by `stack.litebinary` after it has taken the data
dir's lock and checked the port (see there for why each is needed).
"""

from __future__ import annotations

import logging
import sys

from headwater.errors import StackError
from headwater.settings import Settings
from stack.daemon import Daemon, port_open
from stack.litebinary import DB_FILE

# A restarted server listens at once but answers only after rebuilding its in-memory segments
# from the data file: 34 s for 100k chunks on an idle 2-core machine, 137 s at load 9.
START_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 2.0


def answers(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Milvus at `address` answers a call (listening is not enough, see above)."""
    from pymilvus import MilvusClient

    pymilvus_log = logging.getLogger("pymilvus.decorators")
    level = pymilvus_log.level
    pymilvus_log.setLevel(logging.CRITICAL)  # a refused probe is expected, not news
    try:
        # dedicated: closing it must not close another client's channel to the same server.
        client = MilvusClient(uri=address, timeout=timeout, dedicated=True)
        try:
            client.list_collections(timeout=timeout)
        finally:
            client.close()
        return True
    except Exception:
        return False
    finally:
        pymilvus_log.setLevel(level)


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

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
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
            sys.executable, "-m", "stack.litebinary", "--db-file", str(self.home / DB_FILE),
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        self.daemon.start(argv, ready=self._ready, timeout=timeout)
        return self.address

    def _ready(self) -> bool:
        return port_open("127.0.0.1", self.settings.milvus_port) and answers(self.address)

    def stop(self) -> bool:
        return self.daemon.stop(timeout=20.0)
