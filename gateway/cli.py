"""``modelbridge serve``: lock the data dir and take the port (:mod:`gateway.infra.startup`),
start the stores (embedded unless URLs are given), apply migrations, then serve with one process
or ``--workers N`` processes sharing the port (SO_REUSEPORT), kept alive with the usage writer
by :mod:`gateway.supervisor`. The banner comes once every worker listens.

Shutdown, on SIGTERM, SIGINT or SIGHUP, in order: stop accepting, let in-flight requests and
streams finish within ``server.shutdown_timeout_s``, cancel what is left (a cancelled stream
settles what it streamed), drain the usage writer, close the pools, stop the embedded stores. A
signal during the start stops what was started so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import uvloop

from gateway.config import Config, ConfigError, load_config
from gateway.infra.db import migrate_dsn
from gateway.infra.redisconn import RedisUnusable, is_cluster
from gateway.infra.startup import (
    STOP_SIGNALS,
    StartError,
    StopSignals,
    interrupted_by,
    lock_data_dir,
    reserve_port,
)
from gateway.infra.stores import StoreError
from gateway.supervisor import (
    GO,
    SPARE,
    WORKER,
    WRITER,
    Child,
    ChildSignals,
    ExitWatch,
    Supervisor,
    report,
    standby,
)

if TYPE_CHECKING:
    from gateway.state import Runtime

log = logging.getLogger("modelbridge")

WORKER_ENV = "MODELBRIDGE_WORKER_ID"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelbridge", description="OpenAI-compatible LLM gateway with team metering"
    )
    parser.add_argument("--version", action="version", version=f"modelbridge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,reconcile}")
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="config file (default: ./config.yaml)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None, help="0: a free port (shown at start)")
    serve.add_argument("--workers", type=int, default=None)
    check = sub.add_parser(
        "reconcile",
        help="check that Redis, the usage ledger, the daily rollup and the balances agree",
        description="Compare every billing account's money: Redis counters vs the PostgreSQL "
        "usage ledger vs the daily rollup vs the balances, to the nano-dollar. Prints JSON; "
        "exit 0 when all agree, 1 when anything differs.",
    )
    check.add_argument("--config", default=None, help="config file (default: ./config.yaml)")
    check.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the accounts that differ, check them again; exit on that second check",
    )
    return parser


def _internal_parser() -> argparse.ArgumentParser:
    """The commands ``serve`` runs its children with (not for people: not in ``--help``)."""
    parser = argparse.ArgumentParser(prog="modelbridge")
    sub = parser.add_subparsers(dest="command", required=True)
    writer = sub.add_parser("_writer")
    writer.add_argument("--config", default=None)
    writer.add_argument("--consumer", default=None)
    worker = sub.add_parser("_worker")
    worker.add_argument("--config", default=None)
    worker.add_argument("--host", required=True)
    worker.add_argument("--port", type=int, required=True)
    return parser


def _version() -> str:
    try:
        return metadata.version("modelbridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def data_dir() -> Path:
    return Path(os.environ.get("MODELBRIDGE_DATA_DIR", ".modelbridge")).resolve()


def _with_cli(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.host:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    if getattr(args, "workers", None):
        server = replace(server, workers=args.workers)
    return replace(config, server=server)


def admin_token(embedded: bool, directory: Path) -> tuple[str, bool]:
    """The operator token and whether it was generated now (to print it once)."""
    token = os.environ.get("MODELBRIDGE_ADMIN_TOKEN", "")
    if token or not embedded:
        return token, False
    path = directory / "admin_token"
    if path.exists():
        return path.read_text().strip(), False
    directory.mkdir(parents=True, exist_ok=True)
    token = "mbadmin_" + secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, True


async def serve_app(
    config: Config,
    runtime: Runtime,
    *,
    reuse_port: bool,
    on_listening: Callable[[], None] = lambda: None,
    supervisor: Supervisor | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    spare: bool = False,
    parent: int | None = None,
) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP. ``on_listening`` runs once the socket is bound;
    with one worker the ``supervisor``'s tick runs while serving, when a child ends (its
    pidfd), when a restart is due, and at the latest every second. A ``spare`` worker starts
    everything but the socket, says so, and binds when it gets GO (SIGUSR1)."""
    from aiohttp import web  # not in the usage writer (README, performance: its memory)

    from gateway.app import build_app  # after the metrics directory is set
    from gateway.proxy.front import FrontSite

    app = build_app(config, runtime, usage_writer=False)  # the writer runs as its own process
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_timeout_s)
    await runner.setup()
    stop, wake = asyncio.Event(), asyncio.Event()  # wake: look at the children now
    loop = asyncio.get_running_loop()

    def halt() -> None:
        stop.set()
        wake.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, halt)
    if stop_requested():  # a signal came before the handlers above
        stop.set()
    if parent is not None:
        watching = asyncio.create_task(_orphaned(parent, stop), name="parent-watch")
    try:
        if spare:
            go = asyncio.Event()
            loop.add_signal_handler(GO, go.set)
            report("waiting")
            either = [asyncio.ensure_future(e.wait()) for e in (go, stop)]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            for waiting in either:
                waiting.cancel()
            if stop.is_set():
                return
        site = FrontSite(
            runner, config.server.host, config.server.port, reuse_port=reuse_port, backlog=2048
        )
        await site.start()
        on_listening()
        # What start-up made (modules, config, the token encodings) stays: out of the
        # collector's scans, which otherwise walk it again and again between requests.
        gc.collect()
        gc.freeze()
        if supervisor is None:
            await stop.wait()
        else:
            await _supervise(supervisor, stop, wake)
        log.info(
            "shutting down: no new connections; waiting up to %ss for streams",
            config.server.shutdown_timeout_s,
        )
    finally:
        await runner.cleanup()
        if parent is not None:
            watching.cancel()


async def _supervise(supervisor: Supervisor, stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Keep the children alive from the serving loop until ``stop``: a tick when a child ends
    (its pidfd), when the ready pipe has a line, when a restart is due, at the latest every
    second; no timer of its own otherwise (it was a tick every 50 ms: 20 wake-ups a second)."""
    loop = asyncio.get_running_loop()
    exits = ExitWatch(loop, wake.set)
    loop.add_reader(supervisor.ready_fd, wake.set)
    try:
        while not stop.is_set():
            wake.clear()
            supervisor.tick()
            exits.sync(supervisor.pids())
            wait_s = (
                min(supervisor.next_due_s(), 0.05) if exits.polling else supervisor.next_due_s()
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait_s)
    finally:
        loop.remove_reader(supervisor.ready_fd)
        exits.close()


async def _orphaned(parent: int, stop: asyncio.Event) -> None:
    """A worker whose ``serve`` died (``kill -9``, OOM) stops instead of serving on, orphaned.
    The parent's pidfd wakes it when the parent ends (no wake-up until then); without pidfds,
    ``getppid()`` every second."""
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
    else:
        loop, gone = asyncio.get_running_loop(), asyncio.Event()
        loop.add_reader(fd, gone.set)
        try:
            if os.getppid() == parent:  # else it ended before the pidfd was opened
                await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    log.warning("the serving process (pid %d) is gone: stopping", parent)
    stop.set()


def _run(coro: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)  # type: ignore[arg-type]


def _banner(config: Config, token: str, generated: bool, directory: Path) -> None:
    url = f"http://{config.server.host}:{config.server.port}"
    print(f"ModelBridge listening on {url} (OpenAI base URL: {url}/v1)", flush=True)
    print(f"Dashboard: {url}/", flush=True)
    if generated:
        print(
            f"Operator token (shown once, stored in {directory / 'admin_token'}): {token}",
            flush=True,
        )
    elif token:
        print(
            "Operator token: from MODELBRIDGE_ADMIN_TOKEN or the data dir's admin_token file",
            flush=True,
        )


def _warn_unset_keys(config: Config) -> None:
    """One line per provider whose key variable is unset: it will refuse every request."""
    for up in config.upstreams.values():
        if up.api_key_env and not os.environ.get(up.api_key_env):
            models = sorted(m.name for m in config.models.values() if m.upstream == up.name)
            log.warning(
                "upstream %s: %s is not set: the provider will refuse the gateway's requests "
                "(models: %s)",
                up.name,
                up.api_key_env,
                ", ".join(models) or "none",
            )


def serve(args: argparse.Namespace) -> None:
    """Lock the data dir, take the port, start the stores, serve; stop what was started on
    every way out (see :mod:`gateway.infra.startup` for the signals)."""
    signals = StopSignals()
    signals.install()
    try:
        _serve(args, signals)
    except BaseException as exc:  # Interrupted is one; it may also come wrapped
        stopped = interrupted_by(exc)
        if stopped is None:
            raise
        log.info("stopped by %s during start", signal.Signals(stopped.signum).name)


def _serve(args: argparse.Namespace, signals: StopSignals) -> None:
    from gateway.infra.metrics import prepare_multiproc_dir
    from gateway.infra.stores import Stores
    from gateway.state import Runtime

    config = _with_cli(load_config(args.config), args)
    directory = data_dir()
    lock = lock_data_dir(directory)
    held: list[socket.socket] = []
    metrics_dir: Path | None = None  # made here for external stores: removed on the way out
    stores = Stores(
        directory,
        os.environ.get("MODELBRIDGE_DATABASE_URL") or None,
        os.environ.get("MODELBRIDGE_REDIS_URL") or None,
    )
    try:
        port, held = reserve_port(config.server.host, config.server.port)
        config = replace(config, server=replace(config.server, port=port))
        _warn_unset_keys(config)
        urls = stores.start()
        _write_stores_file(
            directory,
            None if os.environ.get("MODELBRIDGE_DATABASE_URL") else urls.database_url,
            None if os.environ.get("MODELBRIDGE_REDIS_URL") else urls.redis_url,
        )
        embedded = not os.environ.get("MODELBRIDGE_DATABASE_URL")
        token, generated = admin_token(embedded, directory)
        if not token:
            log.warning("MODELBRIDGE_ADMIN_TOKEN is not set: the operator API (/admin) is disabled")
        asyncio.run(migrate_dsn(urls.database_url))
        asyncio.run(is_cluster(urls.redis_url))  # credentials refused: one clear line, no start
        if not embedded:
            metrics_dir = Path(f"/tmp/modelbridge-metrics-{os.getpid()}")
        prepare_multiproc_dir(metrics_dir or directory / "metrics")
        runtime = Runtime(urls.database_url, urls.redis_url, token, data_dir=str(directory))
        banner = functools.partial(_banner, config, token, generated, directory)
        _supervised(config, runtime, args.config, signals, banner)
    finally:
        signals.raising = False  # from here on a signal never cuts the cleanup short
        (directory / STORES_FILE).unlink(missing_ok=True)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        stores.stop()
        for sock in held:
            sock.close()
        os.close(lock)


def _supervised(
    config: Config,
    runtime: Runtime,
    config_path: str | None,
    signals: StopSignals,
    banner: Callable[[], None],
) -> None:
    """The usage writer and the workers (in this process with one), kept alive until a stop
    signal; then the workers stop first and the writer drains what their last streams
    settled."""
    from gateway.infra.metrics import mark_worker_dead

    ids = itertools.count()

    def env_for(child: Child) -> dict[str, str]:
        """Each worker process an id of its own (its settle journal's name)."""
        return child.env if child.kind == WRITER else {**child.env, WORKER_ENV: str(next(ids))}

    supervisor = Supervisor(on_worker_dead=mark_worker_dead, env_for=env_for)
    try:
        consumer = f"writer-{socket.gethostname()}-{config.server.port}"  # the same on restarts
        supervisor.add(writer_child(runtime, config_path, consumer))
        if config.server.workers == 1:
            signals.raising = False  # the loop's own handlers stop it
            try:
                _run(
                    serve_app(
                        config,
                        runtime,
                        reuse_port=True,
                        on_listening=banner,
                        supervisor=supervisor,
                        stop_requested=lambda: signals.received is not None,
                    )
                )
            finally:
                signals.install()  # the loop left SIG_DFL behind
        else:
            for i in range(config.server.workers):
                supervisor.add(worker_child(config, runtime, config_path, f"worker {i}"))
            signals.raising = False
            spare = worker_child(config, runtime, config_path, "spare worker", SPARE)
            _run_workers(supervisor, signals, banner, spare)
    finally:
        supervisor.signal_workers(signal.SIGTERM)
        while supervisor.workers_alive():
            supervisor.tick()
            time.sleep(0.05)
        supervisor.stop_writer()
        supervisor.close()


def _run_workers(
    supervisor: Supervisor, signals: StopSignals, banner: Callable[[], None], spare: Child
) -> None:
    """Wait until every worker listens (one that dies first stops the start), print the banner,
    start the spare, then keep them alive until a stop signal, which goes on to them."""
    woken = ChildSignals()  # a child's end or a stop signal wakes the select below at once
    try:
        while not supervisor.all_ready() and signals.received is None:
            for child in supervisor.workers():
                if child.proc is None or child.proc.poll() is not None:
                    code = child.proc.returncode if child.proc is not None else "?"
                    raise StartError(f"{child.name} exited during start (exit code {code})")
            supervisor.tick()
            _wait(supervisor, woken)
        if signals.received is None:
            banner()
            supervisor.keep_spare(spare)
        while signals.received is None:
            supervisor.tick()
            _wait(supervisor, woken)
    finally:
        woken.close()
    supervisor.signal_workers(signals.received)


def _wait(supervisor: Supervisor, woken: ChildSignals) -> None:
    """Until a readiness line, a signal (a child's end, a stop) or the next restart due."""
    select.select([supervisor.ready_fd, woken.fd], [], [], supervisor.next_due_s())
    woken.drain()


def _child_env(runtime: Runtime) -> dict[str, str]:
    return {
        **os.environ,
        "MODELBRIDGE_DATABASE_URL": runtime.database_url,
        "MODELBRIDGE_REDIS_URL": runtime.redis_url,
        "MODELBRIDGE_ADMIN_TOKEN": runtime.admin_token,
    }


def writer_child(runtime: Runtime, config_path: str | None, consumer: str) -> Child:
    """The usage writer process, in a session of its own so that a terminal's Ctrl-C reaches
    it only through us, after the workers have finished. Its consumer name stays the same
    across restarts, so a new writer takes over at once what a killed one had read."""
    cmd = [sys.executable, "-m", "gateway", "_writer", "--consumer", consumer]
    if config_path:
        cmd += ["--config", config_path]
    return Child(WRITER, "usage writer", cmd, _child_env(runtime), session=True)


def worker_child(
    config: Config, runtime: Runtime, config_path: str | None, name: str, kind: str = WORKER
) -> Child:
    cmd = [sys.executable, "-m", "gateway", "_worker", "--host", config.server.host]
    cmd += ["--port", str(config.server.port)]
    if config_path:
        cmd += ["--config", config_path]
    return Child(kind, name, cmd, _child_env(runtime))


def worker(args: argparse.Namespace) -> None:
    from gateway.state import Runtime

    config = _with_cli(load_config(args.config), args)
    runtime = Runtime(
        os.environ["MODELBRIDGE_DATABASE_URL"],
        os.environ["MODELBRIDGE_REDIS_URL"],
        os.environ.get("MODELBRIDGE_ADMIN_TOKEN", ""),
        worker_id=os.environ.get(WORKER_ENV, "0"),
        data_dir=str(data_dir()),
    )
    listening = functools.partial(report, "listens")
    _run(
        serve_app(
            config,
            runtime,
            reuse_port=True,
            on_listening=listening,
            spare=standby(),
            parent=os.getppid(),
        )
    )


STORES_FILE = "stores.json"  # the embedded stores' URLs while `serve` runs (for `reconcile`)


def _write_stores_file(directory: Path, database_url: str | None, redis_url: str | None) -> None:
    urls = {k: v for k, v in (("database_url", database_url), ("redis_url", redis_url)) if v}
    if urls:
        path = directory / STORES_FILE
        path.write_text(json.dumps(urls) + "\n")
        path.chmod(0o600)


def reconcile_command(args: argparse.Namespace) -> int:
    """``modelbridge reconcile``: the stores from the environment, else those of the gateway
    running on the data dir, else the embedded stores started for the check."""
    from gateway.infra.stores import Stores
    from gateway.metering.reconcile import run_check

    config = load_config(args.config)
    database_url = os.environ.get("MODELBRIDGE_DATABASE_URL") or None
    redis_url = os.environ.get("MODELBRIDGE_REDIS_URL") or None
    directory = data_dir()
    running = directory / STORES_FILE
    if (database_url is None or redis_url is None) and running.exists():
        found = json.loads(running.read_text())
        database_url = database_url or found.get("database_url")
        redis_url = redis_url or found.get("redis_url")
    stores = Stores(directory, database_url, redis_url)
    urls = stores.start()
    try:
        result = asyncio.run(run_check(urls.database_url, urls.redis_url, config, args.repair))
    finally:
        stores.stop()
    print(json.dumps(result, indent=2))
    final = result.get("after_repair", result)
    return 0 if final["ok"] else 1


def usage_writer(args: argparse.Namespace) -> None:
    from gateway.infra.outages import POOL_LOGGER, Outages
    from gateway.metering.writer_process import serve_writer

    consumer = args.consumer or f"writer-{os.getpid()}"
    logging.getLogger(POOL_LOGGER).addFilter(Outages().filter)  # one line, not a traceback a second
    _run(
        serve_writer(
            os.environ["MODELBRIDGE_DATABASE_URL"],
            os.environ["MODELBRIDGE_REDIS_URL"],
            consumer,
            load_config(args.config).metering,
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 0 stopped as asked (a signal, in any state), 1 could not start or run (port
    in use, data dir locked, a store that does not start), 2 a usage or configuration error.
    Every refusal to start is one line on stderr."""
    logging.basicConfig(
        level=os.environ.get("MODELBRIDGE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    argv = sys.argv[1:] if argv is None else argv
    internal = bool(argv) and argv[0] in ("_writer", "_worker")
    args = (_internal_parser() if internal else _parser()).parse_args(argv)
    port = getattr(args, "port", None)
    if args.command == "serve" and port is not None and not 0 <= port <= 65535:
        _fail(f"--port {port} is out of range: 0 to 65535 (0: a free port)", 2)
    try:
        if args.command == "serve":
            serve(args)
        elif args.command == "_writer":
            usage_writer(args)
        elif args.command == "reconcile":
            raise SystemExit(reconcile_command(args))
        else:
            worker(args)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", 2)
    except RedisUnusable as exc:
        _fail(str(exc), 2)
    except (StartError, StoreError) as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        pass


def _fail(message: str, code: int) -> NoReturn:
    print(f"modelbridge: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
