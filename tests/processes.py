"""Gateway processes for multi-process tests: ``modelbridge serve`` as a user runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests.conftest import ADMIN_TOKEN, UPSTREAM_KEY, free_port

REPO = Path(__file__).resolve().parent.parent


def write_config(directory: Path, upstream_url: str, **server: object) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "shutdown_timeout_s": 10, "signups_per_hour": 0, **server},
        "upstreams": {
            "fake": {
                "base_url": upstream_url,
                "api_key_env": "MB_TEST_UPSTREAM_KEY",
                "timeout_s": 5,
            }
        },
        "models": {
            "gpt-4o-mini": {
                "upstream": "fake",
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "max_output_tokens": 1000,
                "encoding": "o200k_base",
            },
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class GatewayProcess:
    def __init__(
        self,
        config: Path,
        database_url: str,
        redis_url: str,
        *,
        workers: int = 1,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "MODELBRIDGE_DATABASE_URL": database_url,
            "MODELBRIDGE_REDIS_URL": redis_url,
            "MODELBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "MB_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
            "MODELBRIDGE_DATA_DIR": str(config.parent / f"data-{self.port}"),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(self.port),
               "--workers", str(workers)]  # fmt: skip
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 90.0) -> None:
        """``/readyz`` answers ready and the banner is out: it comes once *every* worker listens
        (one worker's ``/readyz`` alone let a test send all its connections to that worker
        while the other was still starting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                async with http.get(self.base + "/readyz") as resp:
                    if resp.status == 200 and b"ModelBridge listening on" in self.log.read_bytes():
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout}s: {self.log.read_text()[-3000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("gateway did not stop in time")
            await asyncio.sleep(0.05)
        self._log_file.close()
        return int(self.proc.returncode)

    async def stop(self) -> None:
        self.terminate()
        await self.wait()
