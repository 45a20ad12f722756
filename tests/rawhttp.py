"""A raw HTTP/1.1 client for the front's tests: bytes sent and read exactly as written here."""

from __future__ import annotations

import asyncio

import orjson

from gateway import state as S
from gateway.proxy.front import Fronts
from tests.conftest import Gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Conn:
    """A raw HTTP/1.1 client connection: what is sent and read is exactly what is written here."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10)
        return await self.response_after_status_line(int(line.split(b" ")[1]))

    async def response_after_status_line(self, status: int) -> tuple[int, dict[str, str], bytes]:
        headers: dict[str, str] = {}
        while line := (await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10))[:-2]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status < 200:
            return status, headers, b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked (aiohttp's streams) or until close
            body = await asyncio.wait_for(self._chunked(), 10)
        return status, headers, body

    async def _chunked(self) -> bytes:
        out = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return out
            out += chunk[:-2]

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""


def post(secret: str, body: object, path: str = "/v1/chat/completions", **extra: str) -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Host": "gw", "Authorization": f"Bearer {secret}", **extra}
    if "Transfer-Encoding" not in extra:
        headers["Content-Length"] = str(len(data))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + data


def counts(gateway: Gateway) -> tuple[int, int]:
    fronts: Fronts = gateway.app[S.FRONTS]
    return fronts.served, fronts.handed_over
