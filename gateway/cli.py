"""``modelbridge serve``: start the stores (embedded unless URLs are given), apply migrations,
then serve with one process or ``--workers N`` processes sharing the port (SO_REUSEPORT).

Shutdown, on SIGTERM or SIGINT, in order: stop accepting, let in-flight requests and streams
finish within ``server.shutdown_timeout_s``, cancel what is left (a cancelled stream settles what
it streamed), drain the usage writer, close the pools, stop the embedded stores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import uvloop
from aiohttp import web

from gateway.config import Config, ConfigError, load_config
from gateway.infra.db import migrate_dsn
from gateway.infra.redisconn import RedisUnusable, is_cluster
from gateway.state import Runtime

log = logging.getLogger("modelbridge")

WORKER_ENV = "MODELBRIDGE_WORKER_ID"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelbridge", description="OpenAI-compatible LLM gateway with team metering"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=None, help="config file (default: ./config.yaml)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
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
    writer = sub.add_parser("_writer", help=argparse.SUPPRESS)
    writer.add_argument("--config", default=None)
    writer.add_argument("--consumer", default=None)
    worker = sub.add_parser("_worker", help=argparse.SUPPRESS)
    worker.add_argument("--config", default=None)
    worker.add_argument("--host", required=True)
    worker.add_argument("--port", type=int, required=True)
    return parser


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


async def serve_app(config: Config, runtime: Runtime, *, reuse_port: bool) -> None:
    from gateway.app import build_app  # after the metrics directory is set
    from gateway.proxy.front import FrontSite

    app = build_app(config, runtime, usage_writer=False)  # the writer runs as its own process
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_timeout_s)
    await runner.setup()
    site = FrontSite(
        runner, config.server.host, config.server.port, reuse_port=reuse_port, backlog=2048
    )
    await site.start()
    # What start-up made (modules, config, the token encodings) stays: out of the collector's
    # scans, which otherwise walk it again and again between requests.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: no new connections; waiting up to %ss for streams",
        config.server.shutdown_timeout_s,
    )
    await runner.cleanup()


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


def serve(args: argparse.Namespace) -> None:
    from gateway.infra.metrics import prepare_multiproc_dir
    from gateway.infra.stores import Stores

    config = _with_cli(load_config(args.config), args)
    directory = data_dir()
    stores = Stores(
        directory,
        os.environ.get("MODELBRIDGE_DATABASE_URL") or None,
        os.environ.get("MODELBRIDGE_REDIS_URL") or None,
    )
    urls = stores.start()
    try:
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
        prepare_multiproc_dir(
            directory / "metrics" if embedded else Path(f"/tmp/modelbridge-metrics-{os.getpid()}")
        )
        runtime = Runtime(urls.database_url, urls.redis_url, token, data_dir=str(directory))
        _banner(config, token, generated, directory)
        consumer = f"writer-{socket.gethostname()}-{config.server.port}"  # the same after a restart
        writer = spawn_writer(runtime, args.config, consumer)
        try:
            if config.server.workers == 1:
                _run(serve_app(config, runtime, reuse_port=False))
            else:
                run_workers(config, runtime, args.config)
        finally:
            stop_writer(writer)  # after the workers: it drains what their last streams settled
    finally:
        (directory / STORES_FILE).unlink(missing_ok=True)
        stores.stop()


def spawn_writer(
    runtime: Runtime, config_path: str | None, consumer: str
) -> subprocess.Popen[bytes]:
    """The usage writer process, in a session of its own so that a terminal's Ctrl-C reaches
    it only through us, after the workers have finished. Its consumer name stays the same
    across restarts, so a new writer takes over at once what a killed one had read."""
    env = {
        **os.environ,
        "MODELBRIDGE_DATABASE_URL": runtime.database_url,
        "MODELBRIDGE_REDIS_URL": runtime.redis_url,
    }
    cmd = [sys.executable, "-m", "gateway", "_writer", "--consumer", consumer]
    if config_path:
        cmd += ["--config", config_path]
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def stop_writer(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.error("usage writer did not stop in %ss; killing it (records stay in Redis)", timeout_s)
        proc.kill()
        proc.wait()


def run_workers(config: Config, runtime: Runtime, config_path: str | None) -> None:
    env = {
        **os.environ,
        "MODELBRIDGE_DATABASE_URL": runtime.database_url,
        "MODELBRIDGE_REDIS_URL": runtime.redis_url,
        "MODELBRIDGE_ADMIN_TOKEN": runtime.admin_token,
    }
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "_worker",
        "--host",
        config.server.host,
        "--port",
        str(config.server.port),
    ]
    if config_path:
        cmd += ["--config", config_path]
    procs = [
        subprocess.Popen(cmd, env={**env, WORKER_ENV: str(i)}) for i in range(config.server.workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    from gateway.infra.metrics import mark_worker_dead

    for proc in procs:
        proc.wait()
        mark_worker_dead(proc.pid)


def worker(args: argparse.Namespace) -> None:
    config = _with_cli(load_config(args.config), args)
    runtime = Runtime(
        os.environ["MODELBRIDGE_DATABASE_URL"],
        os.environ["MODELBRIDGE_REDIS_URL"],
        os.environ.get("MODELBRIDGE_ADMIN_TOKEN", ""),
        worker_id=os.environ.get(WORKER_ENV, "0"),
        data_dir=str(data_dir()),
    )
    _run(serve_app(config, runtime, reuse_port=True))


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
    from gateway.metering.usage_writer import serve_writer

    consumer = args.consumer or f"writer-{os.getpid()}"
    _run(
        serve_writer(
            os.environ["MODELBRIDGE_DATABASE_URL"],
            os.environ["MODELBRIDGE_REDIS_URL"],
            consumer,
            load_config(args.config).metering,
        )
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=os.environ.get("MODELBRIDGE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = _parser().parse_args(argv)
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
        print(f"modelbridge: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except RedisUnusable as exc:
        print(f"modelbridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
