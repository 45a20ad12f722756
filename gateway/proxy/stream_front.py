"""A stream served by the lean front (:mod:`gateway.proxy.front`) from end to end.

The provider is called with the lean client (:meth:`gateway.upstream.upstreams.Upstreams.stream`):
its answer's body reaches :class:`LeanStream` from the event loop's read of the provider's socket,
with no task woken per chunk. Until the stream's first bytes are in, nothing has reached the
client and a failure is retried along the call's route, as on aiohttp's path
(:func:`gateway.proxy.forwarding.forward_stream`). Then the front writes the ``200`` head and the
first events in one write, and from there each read of the provider's socket is fed to the
call's relay (:class:`gateway.proxy.streaming.SSERelay`, or its exchange's) and what it gives is
written to the client at once, one chunk of the client's chunked answer per write. The end (the
provider's last chunk, its failure, the client leaving) is billed in the same loop step as the
last write: the settle is sent first, then the stream's end goes out; the task that served the
request only awaits the settle's result. A client that stops reading pauses the provider's socket
(backpressure); its read timeout does not run meanwhile.

Billing is :func:`gateway.proxy.forwarding.finish_stream`'s: the provider's usage, else tiktoken
on what was streamed (marked ``estimated``, status 499 when the client left), the hold released
when the provider failed before any text; shutdown's cancel bills what was streamed (499).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol

from aiohttp.http import SERVER_SOFTWARE

from gateway import state as S
from gateway.errors import ClientGone, UpstreamFailed, UpstreamTimeout
from gateway.metering.meter import SettleAsk, SettleResult
from gateway.proxy import forwarding
from gateway.proxy.handlers import (
    Call,
    base_headers,
    count,
    estimate,
    prepare_upstream,
    price,
    rate_lines,
    release_quietly,
    settle,
    settle_ask,
    upstream_error,
)
from gateway.proxy.routing import count_attempt
from gateway.proxy.streaming import SSERelay
from gateway.upstream.http1 import OriginError, OriginTimeout, Streamed
from policies.translate import usage as usage_mod

_END = b"0\r\n\r\n"  # the client's chunked answer is over


class Client(Protocol):
    """The lean front's side of a stream: its client's connection."""

    @property
    def closed(self) -> bool: ...

    def write_raw(self, data: bytes) -> None: ...

    def stream_head(self, headers: dict[str, str], lines: str = "") -> bytes: ...

    def streaming(self, stream: LeanStream | None) -> None: ...


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class LeanStream:
    """One attempt's answer from the provider (a :class:`gateway.upstream.http1.BodySink`):
    buffered until the task has its first bytes, then relayed to the client as it comes."""

    def __init__(self, call: Call, client: Client) -> None:
        self.call = call
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.upstream: Streamed | None = None
        self.relay: SSERelay | None = None  # set once the 200 is out: bytes go straight on
        self._early: list[bytes] = []  # the body, before the relay
        self.ended = False  # the provider's body is over (whole, or cut by ``error``)
        self.error: OriginError | None = None
        self._wake: asyncio.Future[None] | None = None
        self.over: asyncio.Future[None] = self.loop.create_future()  # billed, or to bill
        self.concluded = False
        self.pending: Awaitable[SettleResult] | None = None  # a settle sent, its result
        self.unsent: SettleAsk | None = None  # a settle to make (no open script connection)
        self.release = False  # the hold goes back (failed before any text)
        self.tail = b""  # what the client still gets after the settle (when not written yet)
        self._head = b""  # the 200 head, when the whole stream came in its first read

    # --- BodySink -------------------------------------------------------------------------------
    def on_body(self, data: bytes) -> None:
        relay = self.relay
        if relay is None:
            self._early.append(data)
            self._wake_task()
            return
        if self.concluded:
            return
        out = relay.feed(data)
        if relay.outcome.done:  # its proper end ([DONE], message_stop...): billed, then ended
            self._end_early(out + relay.flush())
        elif out:
            self._send(out)

    def _end_early(self, last: bytes) -> None:
        """The stream's proper end is in: the settle is sent and the client's answer ended with
        its last events in one write, without waiting for the provider's end of body (read and
        dropped: the connection goes back to the pool)."""
        if self.client.closed:
            self.client_lost()
            return
        self._conclude(last)
        if self.upstream is not None:
            self.upstream.resume()  # the rest of the body is read (and dropped) whatever comes

    def on_end(self, error: OriginError | None) -> None:
        self.ended, self.error = True, error
        if self.relay is None:
            self._wake_task()
        elif not self.concluded:
            outcome = self.relay.outcome
            rest = b""
            if error is None:
                rest = self.relay.flush()
            else:
                outcome.upstream_failed = True
            if rest:
                self._send(rest)
            self._conclude()

    # --- the client -------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        assert self.relay is not None
        if self.client.closed:
            self.client_lost()
            return
        self.client.write_raw(_chunk(data))

    def client_lost(self) -> None:
        """The client closed its connection mid-stream: the provider's is dropped, and what was
        streamed is billed."""
        if self.relay is None or self.concluded:
            return
        self.relay.outcome.client_gone = True
        if self.upstream is not None:
            self.upstream.abort()
        self._conclude()

    def pause(self) -> None:
        if self.upstream is not None and not self.concluded:
            self.upstream.pause()

    def resume(self) -> None:
        if self.upstream is not None and not self.concluded:
            self.upstream.resume()

    # --- the task's side --------------------------------------------------------------------------
    def _wake_task(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def first_bytes(self) -> bytes:
        """The body's first bytes (an :class:`UpstreamFailed` worth a retry when there are
        none)."""
        while not self._early and not self.ended:
            self._wake = self.loop.create_future()
            await self._wake
        if self._early:
            first, self._early = b"".join(self._early), []
            return first
        upstream = self.call.model.upstream
        if isinstance(self.error, OriginTimeout):
            error: UpstreamFailed = UpstreamTimeout(f"upstream {upstream} sent no byte in time")
        elif self.error is not None:
            error = UpstreamFailed(f"upstream {upstream} broke before its first byte")
        else:
            error = UpstreamFailed(f"upstream {upstream} ended the stream before its first byte")
        error.retryable = True
        raise error from self.error

    async def whole(self) -> bytes:
        """An error answer's body (nothing when it broke or was over the bound)."""
        while not self.ended:
            self._wake = self.loop.create_future()
            await self._wake
        return b"" if self.error is not None else b"".join(self._early)

    def start(self, relay: SSERelay, first: bytes) -> None:
        """The 200 and the first events, in one write; from now on every read goes on."""
        self.relay = relay
        self.client.streaming(self)
        out = relay.feed(first)
        head = self.client.stream_head(base_headers(self.call), rate_lines(self.call))
        if relay.outcome.done:  # the whole stream at once: the settle first, then one write
            self._head = head
            self._end_early(out + relay.flush())
            return
        self.client.write_raw(head + _chunk(out) if out else head)
        if self._early:  # what came while the task was waking
            more, self._early = b"".join(self._early), []
            self.on_body(more)
        if self.ended and not self.concluded:
            self.on_end(self.error)

    def _conclude(self, last: bytes = b"") -> None:
        """Bill the stream and end the client's answer (``last``: events not written yet), in
        this loop step when the settle can be sent now (else the task does it). The task is
        woken either way."""
        self.concluded = True
        data, self._head = self._head + (_chunk(last) if last else b""), b""
        call, relay = self.call, self.relay
        assert relay is not None and call.route is not None
        outcome = relay.outcome
        app = call.app
        if outcome.upstream_failed:
            app[S.ROUTER].failed(call.route.target, app[S.CLOCK].now())
        count_attempt(app[S.METRICS], call.route.target, outcome.upstream_failed, last=True)
        tokens = (
            None if outcome.client_gone else outcome.tokens or usage_mod.from_chat(outcome.usage)
        )
        if not outcome.client_gone:  # SDKs raise on an event carrying "error": never a clean end
            broken = outcome.upstream_failed and outcome.broken
            self.tail = data + (_chunk(outcome.broken) + _END if broken else _END)
        if tokens is None and outcome.upstream_failed and not outcome.streamed_text():
            self.release = True
        else:
            source = "upstream" if tokens is not None else "estimated"
            tokens = tokens or estimate(call, outcome.streamed_text())
            charge = price(call, tokens)
            status = 499 if outcome.client_gone else 200
            ask = settle_ask(call, tokens, source, status, charge)
            self.pending = app[S.METERING].settle_sent(ask)
            count(call, tokens, charge)
            if self.pending is None:
                self.unsent = ask
            else:
                self._write_tail()
        if self.tail and data:  # the events go now; the end waits for the settle
            self.tail = self.tail[len(data) :]
            self.client.write_raw(data)
        if not self.over.done():
            self.over.set_result(None)

    def _write_tail(self) -> None:
        tail, self.tail = self.tail, b""
        if tail and not self.client.closed:
            self.client.write_raw(tail)

    async def finish(self) -> None:
        """After :meth:`_conclude`: what it could not do at once, then the settle's result."""
        call = self.call
        metering = call.app[S.METERING]
        if self.release:
            await release_quietly(call)
            call.hold = None
            self._write_tail()
        elif self.unsent is not None:
            await metering.settle(self.unsent)  # or kept: never raises
            self._write_tail()
        if self.pending is not None:
            await self.pending


async def serve(call: Call, client: Client) -> None:
    """Stream ``call``'s answer to ``client`` (the hold placed). Raises before the first byte
    (the error goes to the client, the hold is released by the caller); after it, never."""
    while True:
        started = time.perf_counter()
        stream = LeanStream(call, client)
        try:
            first = await _open(call, stream)
        except UpstreamFailed as exc:
            call.upstream_s += time.perf_counter() - started
            if not await forwarding.retry(call, exc):
                raise
            prepare_upstream(call)  # for the route's next target
            continue
        except BaseException:
            if stream.upstream is not None:
                stream.upstream.abort()
            raise
        break
    assert call.route is not None
    if client.closed:  # the client left as the answer began
        assert stream.upstream is not None
        stream.upstream.abort()
        count_attempt(call.app[S.METRICS], call.route.target, failed=False, last=True)
        raise ClientGone("the client closed the connection before its stream began")
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    relay = SSERelay(not wants_usage) if call.exchange.native else call.exchange.relay(call)
    stream.start(relay, first)
    try:
        await stream.over
    except asyncio.CancelledError:
        # Shutdown cancelled the stream: bill what was streamed, then let the cancel go on.
        if not stream.concluded:
            stream.concluded = True
            if stream.upstream is not None:
                stream.upstream.abort()
            await settle(call, estimate(call, relay.outcome.streamed_text()), "estimated", 499)
        else:
            await stream.finish()
        raise
    finally:
        call.upstream_s += time.perf_counter() - started
    await stream.finish()


async def _open(call: Call, stream: LeanStream) -> bytes:
    """Start the stream on the call's target (its request built in ``call.wire``) and read its
    first bytes."""
    app = call.app
    upstreams, model = app[S.UPSTREAMS], call.model
    stream.upstream = await upstreams.stream(model.upstream, call.wire, stream)
    app[S.METRICS].child(app[S.METRICS].ttfb, model.name).observe(stream.upstream.ttfb_s)
    if stream.upstream.status >= 400:
        raw = await stream.whole()
        raise upstream_error(stream.upstream.status, raw, model.upstream)
    return await stream.first_bytes()


def head(headers: dict[str, str], date: str, keep_alive: bool, more: str = "") -> bytes:
    """The 200 head of a stream, as aiohttp's ``StreamResponse`` writes it; ``more``: more
    header lines, joined by CRLF, after ``headers``."""
    lines = ["HTTP/1.1 200 OK", *(f"{name}: {value}" for name, value in headers.items())]
    if more:
        lines.append(more)
    lines += [
        "Content-Type: text/event-stream",
        "Cache-Control: no-cache",
        "Transfer-Encoding: chunked",
        f"Date: {date}",
        f"Server: {SERVER_SOFTWARE}",
    ]
    if not keep_alive:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
