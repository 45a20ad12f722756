"""``modelbridge serve`` started and stopped as a new user would, as real processes: the banner
only once the port listens (port 0: the real one), one line and a known exit code for every
refusal to start (port in use or out of range, a config error with its file and line, a data
dir in use), no embedded store left running after a signal during the start, the unset
provider key named at start and in the client's error, ``--help`` and ``--version``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import openai
import psutil
import pytest

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api
from tests.processes import REPO, write_config

T = TypeVar("T")
BANNER = re.compile(r"^ModelBridge listening on http://127\.0\.0\.1:(\d+) ", re.M)


def env(data_dir: Path, *, stores: tuple[str, str] | None, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELBRIDGE_")}
    base.pop("MB_TEST_UPSTREAM_KEY", None)
    base |= {"MODELBRIDGE_DATA_DIR": str(data_dir), "MODELBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN}
    if stores is not None:
        base |= {"MODELBRIDGE_DATABASE_URL": stores[0], "MODELBRIDGE_REDIS_URL": stores[1]}
    return base | extra


def serve(*args: str, env: dict[str, str], **popen: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "gateway", *args]
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def finished(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def no_traceback(err: str) -> list[str]:
    """stderr's lines; none of them a traceback's."""
    assert "Traceback" not in err, err
    return err.splitlines()


@pytest.fixture
def config(tmp_path: Path, fake: FakeUpstream) -> Path:
    return write_config(tmp_path, fake.base_url)


CONFIG_ERRORS = {  # a config file's text: the error, after "modelbridge: configuration error: "
    "server:\n  host: 127.0.0.1\n  port: [1\n": (
        "{path}:4: malformed YAML: expected ',' or ']', but got '<stream end>'"
    ),
    "server:\n  host: 127.0.0.1\n  port: abc\n": (
        "{path}:3: server.port: expected a number, got 'abc'"
    ),
    "server:\n  prot: 1\n": "{path}:2: unknown keys in server: prot",
    "upstreams:\n  a:\n    base_url: x\n    timeout_s: soon\n": (
        "{path}:4: upstreams.a.timeout_s: expected a number, got 'soon'"
    ),
}


def test_every_refusal_to_start_is_one_line_and_its_exit_code(tmp_path: Path, config: Path) -> None:
    """Port out of range (2), port in use (1, before any store starts), config errors with file
    and line (2); ``--help`` without internal commands, ``--version`` (0). All at once."""
    data = tmp_path / "data"
    cases: list[tuple[list[str], int, list[str]]] = [
        (["--help"], 0, []),
        (["--version"], 0, []),
    ]
    for port in ("70000", "-1"):
        line = f"modelbridge: --port {port} is out of range: 0 to 65535 (0: a free port)"
        cases.append((["serve", "--config", str(config), "--port", port], 2, [line]))
    for i, (text, expected) in enumerate(CONFIG_ERRORS.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        line = "modelbridge: configuration error: " + expected.format(path=path)
        cases.append((["serve", "--config", str(path)], 2, [line]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = f"modelbridge: cannot listen on 127.0.0.1:{port}: address already in use"
        cases.append((["serve", "--config", str(config), "--port", str(port)], 1, [line]))
        procs = [serve(*args, env=env(data, stores=None)) for args, _, _ in cases]
        results = [finished(proc) for proc in procs]
    for (args, code, lines), (got, out, err) in zip(cases, results, strict=True):
        assert got == code, (args, err)
        if lines:
            assert out == "" and no_traceback(err)[-len(lines) :] == lines, (args, err)
    help_text, version = results[0][1], results[1][1]
    assert "{serve,reconcile}" in help_text
    for hidden in ("_writer", "_worker", "SUPPRESS"):
        assert hidden not in help_text
    assert version == "modelbridge 0.1.0\n"
    # The port in use was refused before the embedded stores started.
    assert not (data / "pg").exists() and not (data / "redis").exists()


class Running:
    """A ``serve`` whose stdout and stderr go to files, read while it runs."""

    def __init__(self, directory: Path, *args: str, env: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.out, self.err = directory / "stdout", directory / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", *args],
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=err,
            )

    def until(self, found: Callable[[], T | None], timeout: float = 90) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = found()
            if value is not None:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.err.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"not within {timeout}s: {self.err.read_text()[-2000:]}")

    def port(self) -> int:
        """The banner's port, once the banner is out."""

        def banner() -> int | None:
            match = BANNER.search(self.out.read_text())
            return int(match.group(1)) if match else None

        return self.until(banner)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal it; its exit code, which must come within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"serve did not stop within {timeout}s after {sig}") from None


async def test_port_0_banner_after_bind_unset_key_warned_and_named_in_the_clients_error(
    tmp_path: Path, config: Path, database_url: str, redis_url: str, fake: FakeUpstream
) -> None:
    """The banner shows the port the kernel gave, which accepts connections at that moment;
    the unset provider key is a warning at start, and the provider's 401 reaches the client as
    the gateway's key refused, not theirs; stopped right after, it exits 0 at once."""
    stores = (database_url, redis_url)
    gw = Running(
        tmp_path / "gw",
        "--config",
        str(config),
        "--port",
        "0",
        env=env(tmp_path / "d", stores=stores),
    )
    try:
        port = gw.port()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening when the banner said so
        warning = (
            "WARNING modelbridge: upstream fake: MB_TEST_UPSTREAM_KEY is not set: the provider "
            "will refuse the gateway's requests (models: gpt-4o-mini)"
        )
        assert any(line.endswith(warning) for line in gw.err.read_text().splitlines())

        async with aiohttp.ClientSession() as http:
            _, _, secret = await Api(
                http, f"http://127.0.0.1:{port}", ADMIN_TOKEN
            ).funded_team_key()
        client = openai.AsyncOpenAI(
            api_key=secret, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        await client.close()
        assert refused.value.status_code == 401
        assert refused.value.body["code"] == "upstream_error"  # type: ignore[index]
        assert refused.value.body["message"] == (  # type: ignore[index]
            "The provider refused the gateway's own API key for upstream 'fake' (HTTP 401). "
            "Your key for this gateway was accepted: the gateway's operator must fix its "
            "provider key."
        )
        stopped = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - stopped < 15
    finally:
        gw.stop()
    assert "Traceback" not in gw.err.read_text(), gw.err.read_text()[-3000:]


def test_a_second_serve_on_the_same_data_dir_is_one_line_and_exit_1(
    tmp_path: Path, config: Path, database_url: str, redis_url: str
) -> None:
    """(The first is stopped right after its banner: it exits at once, see 755bf96.)"""
    data = tmp_path / "data"
    first_env = env(data, stores=(database_url, redis_url), MB_TEST_UPSTREAM_KEY=UPSTREAM_KEY)
    first = Running(tmp_path / "first", "--config", str(config), "--port", "0", env=first_env)
    try:
        first.until(
            lambda: (
                (data / "serve.lock").read_text() or None
                if (data / "serve.lock").exists()
                else None
            )
        )
        second = serve("serve", "--config", str(config), "--port", "0", env=first_env)
        code, out, err = finished(second)
        assert (code, out) == (1, "")
        assert no_traceback(err) == [
            f"modelbridge: the data dir {data} is in use by another modelbridge "
            f"(pid {first.proc.pid}): stop that one, or give this one another MODELBRIDGE_DATA_DIR"
        ]
        assert first.stop() == 0  # stopped during its start: at once, exit 0
    finally:
        first.stop()


def store_processes(data: Path) -> list[str]:
    """The processes that run on ``data`` (the embedded PostgreSQL and Redis)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(data) in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_start_leaves_no_store_running(
    tmp_path: Path, config: Path, sig: signal.Signals
) -> None:
    """Embedded stores: the signal comes once PostgreSQL runs (its pid file), while it starts
    up, well before the banner (Redis, the migrations and the app are still to come: on an idle
    machine Redis's pid file was too late, the start could end first). (Before the fix: the
    PostgreSQL server stayed, orphaned.)"""
    # Not under pytest's basetemp: another pytest run resets its mode to 0700, and PostgreSQL
    # (run as its own user when we are root) must reach its data directory.
    top = Path(tempfile.mkdtemp(prefix="mb-signal-"))
    data = top / "data"
    gw = Running(
        tmp_path / "gw", "--config", str(config), "--port", "0", env=env(data, stores=None)
    )
    try:
        gw.until(lambda: True if (data / "pg" / "postmaster.pid").exists() else None)
        assert store_processes(data)
        code = gw.stop(sig, timeout=60)
        assert code == 0, gw.err.read_text()[-3000:]
        assert store_processes(data) == []
    finally:
        gw.stop(signal.SIGKILL)
        shutil.rmtree(top, ignore_errors=True)
    assert "listening on" not in gw.out.read_text()
    assert "Traceback" not in gw.err.read_text()
