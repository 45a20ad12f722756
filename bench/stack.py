"""The system under test: the fake upstream and a ModelBridge gateway, each a process of its own.

``FakeUpstream`` runs ``python -m tests.fake_upstream --no-record`` on a free port.
``Gateway`` runs ``modelbridge serve`` with a temporary config routing ``gpt-4o-mini`` to the
fake, on fresh embedded stores in a temporary data dir (or on the servers named by
``MODELBRIDGE_BENCH_DATABASE_URL`` / ``MODELBRIDGE_BENCH_REDIS_URL``), then provisions a user, a
team with operator credits and a team key, so that every request is fully metered: key lookup,
hold, settle, usage stream, usage writer into PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
ADMIN_TOKEN = "bench-admin-" + secrets.token_hex(8)
UPSTREAM_KEY_ENV = "MB_BENCH_UPSTREAM_KEY"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """A small JSON client (urllib): (status, parsed body or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _expect(what: str, got: tuple[int, Any], *ok: int) -> Any:
    if got[0] not in ok:
        raise RuntimeError(f"{what}: HTTP {got[0]} {str(got[1])[:500]}")
    return got[1]


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            if predicate():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class FakeUpstream:
    """The fake OpenAI upstream; with ``anthropic``, the same process also serves the fake
    Anthropic Messages API on a second port (``anthropic_url``, ending at ``/v1``)."""

    def __init__(self, workdir: Path, anthropic: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.anthropic_port = free_port() if anthropic else None
        self.anthropic_url = f"http://127.0.0.1:{self.anthropic_port}/v1" if anthropic else ""
        self.log_path = workdir / "fake_upstream.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "tests.fake_upstream", "--port", str(self.port), "--no-record"]
        if self.anthropic_port is not None:
            cmd += ["--anthropic-port", str(self.anthropic_port)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _wait(
            lambda: http("GET", self.url + "/v1/models")[0] == 200, 30, "fake upstream", self.proc
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        _stop(self.proc, 10)


@dataclass(frozen=True)
class RedisSetup:
    """Which Redis a gateway under test uses: its embedded single node (``url`` empty), or a
    Redis Cluster (``bench.cluster``), with the hot path's script client and WAIT setting."""

    name: str = "single"
    url: str = ""
    script_client: str = "lean"
    wait_replicas: int = 0
    pids: tuple[int, ...] = ()  # the cluster's redis-server processes, for the CPU accounts

    def config(self) -> str:
        """The config's ``redis`` section; none for the defaults, so that a checkout from before
        the section existed (``--project``, ``bench.ab``) reads the same config."""
        if self.script_client == "lean" and self.wait_replicas == 0:
            return ""
        return (
            f"redis: {{script_client: {self.script_client}, wait_replicas: {self.wait_replicas}}}\n"
        )


ANTHROPIC_MODEL = "claude-bench"


def _anthropic_config(anthropic_url: str) -> tuple[str, str]:
    """The upstream and model entries for the fake Anthropic upstream (``bench.surfaces``)."""
    upstream = (
        f'  anth: {{kind: anthropic, base_url: "{anthropic_url}", '
        f"api_key_env: {UPSTREAM_KEY_ENV}, timeout_s: 30}}\n"
    )
    model = f"""\
  {ANTHROPIC_MODEL}:
    upstream: anth
    upstream_model: {ANTHROPIC_MODEL}
    input_per_mtok: 3.00
    output_per_mtok: 15.00
    max_output_tokens: 256
    encoding: o200k_base
"""
    return upstream, model


def _gateway_config(
    port: int, workers: int, upstream_url: str, redis: RedisSetup, anthropic_url: str = ""
) -> str:
    extra_upstream, extra_model = _anthropic_config(anthropic_url) if anthropic_url else ("", "")
    return (
        redis.config()
        + f"""\
server: {{host: 127.0.0.1, port: {port}, workers: {workers}, shutdown_timeout_s: 5}}
upstreams:
  fake: {{base_url: "{upstream_url}/v1", api_key_env: {UPSTREAM_KEY_ENV}, timeout_s: 30}}
{extra_upstream}models:
  {MODEL}:
    upstream: fake
    upstream_model: {MODEL}
    input_per_mtok: 0.15
    output_per_mtok: 0.60
    max_output_tokens: 256
    encoding: o200k_base
{extra_model}plans:
  starter: {{seat_price: 10.00, included_usage_per_seat: 2.00}}
"""
    )


class Gateway:
    """One ``modelbridge serve`` with its own temp dir; ``start()`` then ``provision()``."""

    def __init__(
        self,
        workers: int,
        upstream_url: str,
        project: Path | None = None,
        redis: RedisSetup | None = None,
        key_controls: dict[str, Any] | None = None,
        anthropic_url: str = "",
    ) -> None:
        self.workers = workers
        self.key_controls = key_controls or {}  # e.g. rpm and tpm on the bench key
        self.redis = redis or RedisSetup()
        self.project = project  # another checkout's gateway/ and policies/, run on this venv
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"mb-bench-w{workers}-"))
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(
            _gateway_config(self.port, workers, upstream_url, self.redis, anthropic_url)
        )
        self.log_path = self.dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.external_db = os.environ.get("MODELBRIDGE_BENCH_DATABASE_URL", "")
        self.external_redis = self.redis.url or os.environ.get("MODELBRIDGE_BENCH_REDIS_URL", "")
        self.key = ""
        self.key_id = ""
        self.wrapper: list[str] = []  # a command serve runs under (bench.instructions: valgrind)
        self.limited_key = ""  # provision(limited=...): a second key of the team, with controls
        self.limited_key_id = ""

    @property
    def label(self) -> str:
        if self.redis.name == "single":
            return f"gateway-w{self.workers}"
        return f"{self.redis.name}-w{self.workers}"

    def _env(self) -> dict[str, str]:
        # nothing from the caller's MODELBRIDGE_* may reconfigure the gateway under test
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBRIDGE_")}
        env |= {
            "MODELBRIDGE_DATA_DIR": str(self.data_dir),
            "MODELBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "MODELBRIDGE_LOG_LEVEL": "WARNING",
            UPSTREAM_KEY_ENV: "sk-bench-upstream",
        }
        if self.project is not None:
            env["PYTHONPATH"] = str(self.project)
        if self.external_db:
            env["MODELBRIDGE_DATABASE_URL"] = self.external_db
        if self.external_redis:
            env["MODELBRIDGE_REDIS_URL"] = self.external_redis
        return env

    def start(self, timeout: float = 180) -> None:
        if self.project is None:
            cmd = [str(Path(sys.executable).parent / "modelbridge"), "serve"]
        else:  # `python -m gateway` is the same program; PYTHONPATH picks the other checkout
            cmd = [sys.executable, "-m", "gateway", "serve"]
        cmd += ["--config", str(self.config_path), "--port", str(self.port)]
        cmd += ["--workers", str(self.workers)]
        cmd = [*self.wrapper, *cmd]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.dir, env=self._env(), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait(
                lambda: http("GET", self.base + "/readyz")[0] == 200, timeout, "gateway", self.proc
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log:\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _post(self, what: str, path: str, body: Any, token: str | None = None) -> Any:
        return _expect(what, http("POST", self.base + path, body, token), 200, 201)

    def provision(self, limited: dict[str, Any] | None = None) -> None:
        """A user, a team with operator credits, and a team key (full metering path); with
        ``limited``, a second key of the same team with those controls (e.g. rpm and tpm)."""
        user = {
            "email": f"bench-{secrets.token_hex(4)}@example.com",
            "name": "bench",
            "password": "Bench-" + secrets.token_urlsafe(12),
        }
        self._post("signup", "/api/auth/signup", user)
        token = self._post("login", "/api/auth/login", user)["token"]
        team = self._post("team", "/api/teams", {"name": "bench"}, token)
        credits = {"amount_usd": "1000000.00", "note": "bench"}
        self._post("credits", f"/admin/teams/{team['id']}/credits", credits, ADMIN_TOKEN)
        body = {"name": "bench", "team": team["id"], **self.key_controls}
        key = self._post("key", "/api/keys", body, token)
        self.key, self.key_id = key["secret"], key["id"]
        if limited is not None:
            body = {"name": "bench-limited", "team": team["id"], **limited}
            key = self._post("limited key", "/api/keys", body, token)
            self.limited_key, self.limited_key_id = key["secret"], key["id"]

    # --- the processes whose CPU is accounted -----------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _pidfile(self, path: Path) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split()[0])
        return None

    def store_pids(self) -> dict[str, int]:
        """The embedded PostgreSQL postmaster and Redis (none for servers given by URL)."""
        out = {}
        pg = self._pidfile(self.data_dir / "pg" / "postmaster.pid")
        redis = self._pidfile(self.data_dir / "redis" / "redis.pid")
        if pg and not self.external_db:
            out["postgres"] = pg
        if redis and not self.external_redis:
            out["redis"] = redis
        return out

    def writer_pid(self) -> int | None:
        """The usage writer process ``serve`` starts (``python -m gateway _writer``), if any."""
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{d}/stat").read_text()
                    ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                    if ppid == self.pid and b"_writer" in Path(f"/proc/{d}/cmdline").read_bytes():
                        return int(d)
        return None

    def groups(self) -> procs.Groups:
        """Serving processes ("gateway": serve and its workers), the usage writer, the stores."""
        roots = {"gateway": [self.pid]}
        writer = self.writer_pid()
        if writer is not None:
            roots["writer"] = [writer]
        roots |= {name: [pid] for name, pid in self.store_pids().items()}
        if self.redis.pids:
            roots["redis"] = list(self.redis.pids)
        return procs.Groups(roots)

    def database_url(self) -> str:
        if self.external_db:
            return self.external_db
        lines = (self.data_dir / "pg" / "postmaster.pid").read_text().splitlines()
        return f"postgresql://modelbridge@127.0.0.1:{int(lines[3])}/modelbridge"

    # --- what the gateway itself reports ----------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """The /metrics samples of interest: {'name{labels}': value} (no comments)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def usage_records(self) -> dict[str, int]:
        """Usage rows in PostgreSQL for the bench keys, by usage_source and status."""
        import asyncpg

        async def query() -> dict[str, int]:
            conn = await asyncpg.connect(self.database_url())
            try:
                rows = await conn.fetch(
                    "SELECT usage_source, status, count(*) AS n FROM usage_records"
                    " WHERE key_id = ANY($1::text[]) GROUP BY 1, 2",
                    [k for k in (self.key_id, self.limited_key_id) if k],
                )
            finally:
                await conn.close()
            return {f"{r['usage_source']}/{r['status']}": int(r["n"]) for r in rows}

        return asyncio.run(query())

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the gateway drains its usage writer and stops its stores); make sure the
        embedded stores are gone too, then remove the temp dir."""
        stores = self.store_pids()
        began = time.monotonic()
        _stop(self.proc, 60)
        took = round(time.monotonic() - began, 1)
        left = []
        for name, pid in stores.items():
            deadline = time.monotonic() + 15
            while procs.pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if procs.pid_alive(pid):  # the gateway died without stopping it: stop it ourselves
                left.append(name)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        if not left:
            shutil.rmtree(self.dir, ignore_errors=True)
        return {
            "stop_s": took,
            "exit_code": self.proc.returncode if self.proc else None,
            "stores_left_running": left,
        }


@contextlib.contextmanager
def serving(
    workdir: Path, project: Path | None = None, limited: dict[str, Any] | None = None
) -> Iterator[tuple[FakeUpstream, Gateway]]:
    """The fake upstream and a provisioned gateway (1 worker, embedded stores, full metering;
    ``limited``: its second key's controls), both stopped on the way out."""
    fake = FakeUpstream(workdir)
    fake.start()
    gw = Gateway(1, fake.url, project)
    try:
        gw.start()
        gw.provision(limited=limited)
        yield fake, gw
    finally:
        gw.stop()
        fake.stop()
