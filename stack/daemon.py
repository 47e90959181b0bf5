"""Background processes of the local stack (Kafka broker, Milvus Lite server): start, wait, stop.

A small pidfile manager rather than a supervisor library: the stack is two processes, and the
pidfile must survive the CLI that started them (`headwater kafka start` returns at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from headwater.errors import StackError


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, attempts: int = 200) -> int:
    """The first of `count` consecutive free ports (a local cluster steps its ports from one)."""
    for _ in range(attempts):
        first = free_port()
        if first + count > 65_535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise StackError(f"found no {count} consecutive free ports")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is not running.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass(frozen=True)
class Daemon:
    """One background process identified by its pidfile."""

    name: str
    pidfile: Path
    logfile: Path

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(
        self,
        argv: Sequence[str],
        ready: Callable[[], bool],
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Start argv detached, wait (bounded) until `ready()`; raise StackError otherwise."""
        return self.wait_ready(self.spawn(argv, env, cwd), ready, timeout)

    def spawn(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """Start argv detached and write the pidfile; `wait_ready` then waits for it."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # survives the CLI and ignores its Ctrl-C
            )
        self.pidfile.write_text(str(proc.pid))
        return proc

    def wait_ready(self, proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> int:
        """Wait (bounded) until `ready()`; StackError if the process exits or never gets there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise StackError(
                    f"{self.name} exited with code {proc.returncode} while starting "
                    f"(log {self.logfile}): {last_line(self.logfile)}"
                )
            if ready():
                return proc.pid
            time.sleep(0.2)
        self.stop()
        raise StackError(
            f"{self.name} did not come up within {timeout:.0f}s (log {self.logfile}): "
            f"{last_line(self.logfile)}"
        )

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout`; True if a process was stopped."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            _reap(pid)
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            _reap(pid)
        self.pidfile.unlink(missing_ok=True)
        return True


def _reap(pid: int) -> None:
    # When the daemon is our own child (tests), collect it so it does not linger as a zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for one-line error messages."""
    lines = [ln.strip() for ln in tail(path, 40).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
