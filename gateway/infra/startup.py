"""What ``modelbridge serve`` holds before it starts anything: the data dir's lock, the port, and
the stop signals.

* **The data dir** is locked (``flock`` on ``serve.lock``) for the life of the process: a second
  ``serve`` on it would share the embedded stores, the settle journal and the metric files. It
  gets :class:`StartError` naming the holder's pid, one line.
* **The port** is taken before the stores start, so that a port in use is a one-line error in a
  second, with nothing to clean up, and the banner comes only once the workers listen. A plain
  ``bind`` first (it fails when any socket holds the port, another gateway's ``SO_REUSEPORT``
  ones too, and resolves port 0 to a free one); then a ``SO_REUSEPORT`` socket bound to that
  port, never listening (it takes no connection), holds it until exit: the workers bind their
  own listening sockets next to it, a replaced worker too, and nobody else can take it between.
* **Stop signals** (SIGTERM, SIGINT, SIGHUP) are caught from the first line on. During the start
  the first one unwinds the start (:class:`Interrupted`) through the cleanup that stops what was
  started (the embedded PostgreSQL and Redis too); while serving and during the cleanup a signal
  is only noted (``received``): the serving loop stops on it and the cleanup is never cut short.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
LOCK_FILE = "serve.lock"


class StartError(RuntimeError):
    """The gateway cannot start; the message is the one line the operator reads."""


class Interrupted(KeyboardInterrupt):
    """A stop signal during the start: unwinds to the cleanup. A KeyboardInterrupt, because
    asyncio lets those through wherever they are raised (a transport's write would otherwise
    catch it as a fatal I/O error, log a traceback and raise a connection error in its place)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None
        self.raising = True  # during the start: the first signal raises Interrupted

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if first and self.raising:
            self.raising = False
            raise Interrupted(signum)


def interrupted_by(exc: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` behind ``exc``, if any: raised from a signal handler in the
    middle of a library's I/O (asyncpg's socket write, say), it can come out wrapped."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, Interrupted):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def lock_data_dir(directory: Path) -> int:
    """Lock ``directory`` for this process (the lock goes with it); the lock file's fd."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartError(
            f"the data dir {directory} is in use by another modelbridge (pid {holder}): "
            "stop that one, or give this one another MODELBRIDGE_DATA_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    found: list[tuple[socket.AddressFamily, tuple[str, int]]] = []
    for family, _, _, _, address in infos:
        item = (family, (str(address[0]), port))
        if family in (socket.AF_INET, socket.AF_INET6) and item not in found:
            found.append(item)
    return found


def _socket(family: socket.AddressFamily, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """The port (a free one for 0) and the sockets that hold it for our workers (close them at
    exit). Raises :class:`StartError` when it is in use or cannot be bound."""
    if not 0 <= port <= 65535:
        raise StartError(f"port {port} is out of range: 0 to 65535 (0: a free port)")
    held: list[socket.socket] = []
    try:
        for family, (address, _) in _addresses(host, port):
            shown = f"[{address}]" if family == socket.AF_INET6 else address
            for reuse_port in (False, True):
                sock = _socket(family, reuse_port)
                try:
                    sock.bind((address, port))
                except OSError as exc:
                    sock.close()
                    reason = (exc.strerror or str(exc)).lower()
                    raise StartError(f"cannot listen on {shown}:{port}: {reason}") from None
                port = int(sock.getsockname()[1])
                if reuse_port:
                    held.append(sock)
                else:
                    sock.close()
    except BaseException:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return port, held
