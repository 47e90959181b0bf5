"""Launch milvus-lite's C++ server binary on a TCP address, as the only owner of its data file.

    python -m stack.litebinary --db-file DIR/milvus.db --host 127.0.0.1 --port P

milvus-lite 2.5 ships a `milvus` binary (`milvus <db file> <host:port> <log level>`) but no
server command, and in TCP mode the binary itself guards nothing, so this launcher does:

1. `flock` the data dir's own lock (`server.lock`): the one that matters. milvus-lite's Python
   `Server.stop()` unlinks its `.<db>.lock` even when it failed to take it, so after one refused
   embedded open a second server could lock a fresh inode and open the same file; ours is never
   unlinked.
2. `lockf` `.<db>.lock`, the file milvus-lite's embedded mode locks, so a `MilvusClient("<db>")`
   in some other program is refused while the file is served.
3. Refuse a port anyone listens on: the binary's gRPC server binds with SO_REUSEPORT, so on a
   busy port it starts anyway and the kernel splits clients between two servers (seen as random
   "collection not found" and "readonly database" errors).
4. `execve` the binary: the pid the caller started *is* the server, a kill -9 frees both locks
   with it, and no orphan keeps serving the port.

Only the standard library: `milvus_lite/__init__.py` (which imports pkg_resources) never runs.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import socket
import sys
from pathlib import Path

PACKAGE = "milvus_lite"
DB_FILE = "milvus.db"
SERVER_LOCK = "server.lock"


def binary() -> Path:
    """The packaged `milvus` binary (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("milvus-lite is not installed (pip install milvus-lite==2.5.1)")
    path = Path(next(iter(spec.submodule_search_locations)), "lib", "milvus")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: milvus-lite 2.5.x ships this binary")
    return path


def lock(path: Path, how: str) -> int:
    """An fd holding an exclusive lock on `path` (flock or lockf); BlockingIOError if taken."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if how == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def port_free(host: str, port: int) -> bool:
    """Whether nobody listens on (host, port).

    A bind without SO_REUSEPORT fails against any listener, SO_REUSEPORT ones included, and
    with SO_REUSEADDR it ignores the TIME_WAIT connections a killed server leaves for a minute.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stack.litebinary", description=__doc__)
    ap.add_argument("--db-file", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log-level", default="ERROR")
    args = ap.parse_args(argv)

    db: Path = args.db_file.absolute()
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        exe = binary()
    except FileNotFoundError as exc:
        print(f"headwater: {exc}", file=sys.stderr)
        return 2
    try:
        own = lock(db.parent / SERVER_LOCK, "flock")
    except BlockingIOError:
        print(f"headwater: {db.parent} is served by another process (lock "
              f"{db.parent / SERVER_LOCK} held)", file=sys.stderr)  # fmt: skip
        return 3
    try:
        embedded = lock(db.parent / f".{db.name}.lock", "lockf")
    except BlockingIOError:
        print(f"headwater: {db} is open in an embedded milvus-lite client", file=sys.stderr)
        return 3
    if not port_free(args.host, args.port):
        print(f"headwater: port {args.port} on {args.host} is in use", file=sys.stderr)
        return 4
    for fd in (own, embedded):
        os.set_inheritable(fd, True)  # the locks live as long as the exec'd server
    env = dict(os.environ)
    # The binary's shared libraries (knowhere, openblas, tbb) sit next to it.
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")])
    )
    os.chdir(db.parent)
    sys.stdout.flush()
    os.execve(exe, [str(exe), str(db), f"{args.host}:{args.port}", args.log_level], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
