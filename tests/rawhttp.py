"""A raw HTTP/1.1 client for the front's tests: bytes sent and read exactly as written here."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import orjson

from gateway import state as S
from gateway.proxy.front import Front, Fronts
from tests.conftest import Gateway
from tests.helpers import until

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

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def port_of(gateway: Gateway) -> int:
    return int(gateway.base.rsplit(":", 1)[1])


async def connect(gateway: Gateway, *, window: int = 0) -> Conn:
    """A new connection to ``gateway``; with ``window``, a receive buffer of that many bytes
    (set before connecting: a client that does not read fills it soon)."""
    if not window:
        return Conn(*await asyncio.open_connection("127.0.0.1", port_of(gateway)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(gateway)))
    return Conn(*await asyncio.open_connection(sock=sock))


async def front_of(gateway: Gateway, conn: Conn) -> Front:
    """The gateway's end of a client connection."""
    sockname = conn.writer.get_extra_info("sockname")

    def ours() -> list[Front]:
        return [
            c
            for c in gateway.app[S.FRONTS].connections
            if c.transport is not None and c.transport.get_extra_info("peername") == sockname
        ]

    await until(lambda: len(ours()) == 1)
    return ours()[0]


async def slow_client(gateway: Gateway) -> tuple[Conn, Front]:
    """A client that does not read, and the gateway's end of its connection: 4 KiB of receive
    window on its side and of send buffer on the gateway's (not autotuned), so that what it does
    not read pushes back soon."""
    conn = await connect(gateway, window=4096)
    front = await front_of(gateway, conn)
    assert front.transport is not None
    front.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return conn, front


def chunked(data: bytes) -> bytes:
    """``data`` as a chunked body: one chunk, then the last."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


def request_id_of(head: bytes) -> str:
    """The ``x-request-id`` of an answer's head (as read raw, before its body)."""
    return head.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()


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
