"""A small, faithful fake of Anthropic's Messages API, for the gateway's tests and benchmark.

Endpoints (under ``/v1``): ``POST /messages`` (plain, or SSE with ``"stream": true``) and
``POST /messages/count_tokens`` (``{"input_tokens": N}``); any other path is Anthropic's 404.
Every request needs ``x-api-key`` or ``Authorization: Bearer`` (recent SDKs send the key so;
when ``api_key`` is set: that key, else 401 ``authentication_error``) and an
``anthropic-version`` header (else 400); a Messages request needs ``model``, ``max_tokens`` (an
integer >= 1) and ``messages``. Errors use Anthropic's envelope
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with its statuses: 400
``invalid_request_error``, 401 ``authentication_error``, 403 ``permission_error``, 404
``not_found_error``, 413 ``request_too_large``, 429 ``rate_limit_error``, 500 ``api_error``, 529
``overloaded_error``; responses carry a ``request-id`` header.

Replies: text blocks' content is ``content_pieces`` joined, then one ``tool_use`` block per
``tool_calls`` entry ``{"name", "input"}``. A stream is ``message_start`` (usage with the input
counts and ``output_tokens: 1``), per block ``content_block_start`` / deltas (one ``text_delta``
per piece, ``input_json_delta`` in two halves) / ``content_block_stop``, a ``ping`` after the
first block's start, ``message_delta`` (stop reason and the *cumulative* usage: the input counts
again and the final ``output_tokens``), ``message_stop``. ``max_tokens`` smaller than the number
of pieces truncates them (``stop_reason: max_tokens``); a stop sequence equal to a piece stops
before it (``stop_sequence``).

Token rule (markers removed, words as in ``tests.fake_upstream``): input = words of ``system`` +
per message 3 + words of its text blocks / tool results; ``input_tokens`` is that less nothing
(cache counts are reported beside it, as Anthropic does); output = pieces + tool calls +
thinking tokens.

Behaviour keys (defaults in brackets): status [200]; error_body [None: the envelope for the
status]; content_pieces [DEFAULT_PIECES]; tool_calls [()]; input_tokens, output_tokens [None: the
rule]; cache_read_tokens [0]; cache_creation_tokens [0]; thinking_tokens [0]; stop_reason [None];
delay_s; chunk_delay_s; hang; omit_usage [False: no ``usage`` anywhere]; drop_after [None: close
after that many events]; stream_error [None: an error type (e.g. ``overloaded_error``) sent as an
``error`` event after the first content delta, ending the stream]; malformed [False: cut JSON / a
non-JSON event]; headers. Queued with ``fake.next(**kw)``, defaults with ``fake.set_default``, per
request with the ``x-fake-behaviour`` header or a ``[[fake:{json}]]`` marker in a text block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.fake_upstream import (
    _BODY,
    _DROPPED,
    _INVALID,
    BEHAVIOUR_HEADER,
    DEFAULT_PIECES,
    RecordedRequest,
    _drop,
    _Reply,
    _stream,
    _words,
)
from tests.fake_upstream import (
    Behaviour as OpenAIBehaviour,
)

VERSION = "2023-06-01"
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
MALFORMED = b'{"id": "msg_cut", "type": "message", "content": [{"type": "te'


@dataclass(frozen=True)
class Behaviour:
    status: int = 200
    error_body: Any = None
    content_pieces: Sequence[str] = DEFAULT_PIECES
    tool_calls: Sequence[Mapping[str, Any]] = ()
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    thinking_tokens: int = 0
    stop_reason: str | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    hang: bool = False
    omit_usage: bool = False
    drop_after: int | None = None
    stream_error: str | None = None
    malformed: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    padding: int = 0  # count_tokens: a "padding" field of this many bytes in the answer


def error_response(
    status: int, message: str | None = None, kind: str | None = None
) -> web.Response:
    default_kind, default_msg = ERRORS.get(status, ("api_error", "Internal server error"))
    request_id = "req_" + secrets.token_hex(12)
    err = {"type": kind or default_kind, "message": message or default_msg}
    body = {"type": "error", "error": err, "request_id": request_id}
    headers = {"request-id": request_id}
    data = orjson.dumps(body)
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            out.append(block["text"])
        elif block.get("type") == "tool_result":
            out.extend(_texts(block.get("content")))
    return out


def input_tokens(body: Mapping[str, Any], markers: list[str]) -> int:
    total = sum(_words(t, markers) for t in _texts(body.get("system")))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            total += 3 + sum(_words(t, markers) for t in _texts(message.get("content")))
    return total


@dataclass
class _Answer:
    model: str
    pieces: list[str]
    tool_calls: Sequence[Mapping[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    usage: dict[str, Any] | None
    id: str = field(default_factory=lambda: "msg_" + secrets.token_hex(12))

    def _tool(self, index: int) -> dict[str, Any]:
        call = self.tool_calls[index]
        head = {"type": "tool_use", "id": f"toolu_{self.id[4:]}_{index}", "name": call["name"]}
        return head | {"input": dict(call.get("input") or {})}

    def _head(self, content: list[dict[str, Any]], usage: Any) -> dict[str, Any]:
        head = {"id": self.id, "type": "message", "role": "assistant", "model": self.model}
        head |= {"content": content, "stop_reason": None, "stop_sequence": None}
        return head if usage is None else head | {"usage": usage}

    def body(self) -> dict[str, Any]:
        content = [{"type": "text", "text": "".join(self.pieces)}] if self.pieces else []
        content += [self._tool(i) for i in range(len(self.tool_calls))]
        out = self._head(content, self.usage)
        return out | {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}

    def events(self, stream_error: str | None) -> list[bytes]:
        start_usage = None if self.usage is None else self.usage | {"output_tokens": 1}
        out = [_event({"type": "message_start", "message": self._head([], start_usage)})]
        index = 0
        if self.pieces:
            block = {"type": "text", "text": ""}
            out.append(_event({"type": "content_block_start", "index": 0, "content_block": block}))
            out.append(_event({"type": "ping"}))
            for piece in self.pieces:
                delta = {"type": "text_delta", "text": piece}
                out.append(_event({"type": "content_block_delta", "index": 0, "delta": delta}))
                if stream_error:
                    message = (
                        "Overloaded" if stream_error == "overloaded_error" else "Internal error"
                    )
                    err = {"type": stream_error, "message": message}
                    return [*out, _event({"type": "error", "error": err})]
            out.append(_event({"type": "content_block_stop", "index": 0}))
            index = 1
        for i in range(len(self.tool_calls)):
            block = self._tool(i) | {"input": {}}
            out.append(
                _event({"type": "content_block_start", "index": index, "content_block": block})
            )
            text = orjson.dumps(self._tool(i)["input"]).decode()
            for half in (text[: len(text) // 2], text[len(text) // 2 :]):
                delta = {"type": "input_json_delta", "partial_json": half}
                out.append(_event({"type": "content_block_delta", "index": index, "delta": delta}))
            out.append(_event({"type": "content_block_stop", "index": index}))
            index += 1
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        final: dict[str, Any] = {"type": "message_delta", "delta": delta}
        if self.usage is not None:
            final["usage"] = self.usage
        return [*out, _event(final), _event({"type": "message_stop"})]


def _event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload)


class FakeAnthropic:
    """In-process fake Anthropic server; see the module docstring for the behaviours."""

    def __init__(self, *, api_key: str | None = None, record: bool = True) -> None:
        self.api_key = api_key
        self.record = record
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.cancelled = 0
        self.default = Behaviour()
        self._queue: deque[dict[str, Any]] = deque()
        self._runner: web.AppRunner | None = None
        self._stopping = False

    def next(self, **behaviour: Any) -> None:
        Behaviour(**behaviour)
        self._queue.append(behaviour)

    def set_default(self, **behaviour: Any) -> None:
        self.default = Behaviour(**behaviour)

    def reset(self) -> None:
        self.requests.clear()
        self.cancelled = 0
        self._queue.clear()
        self.default = Behaviour()

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"condition not met within {timeout:.1f}s")
            await asyncio.sleep(0.01)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner, self._stopping = runner, False
        bound_host, bound_port = runner.addresses[0][:2]
        self.base_url = f"http://{bound_host}:{bound_port}/v1"
        return self.base_url

    @property
    def root_url(self) -> str:
        """The base URL the ``anthropic`` SDK takes (it appends ``/v1/messages`` itself)."""
        return self.base_url.removesuffix("/v1")

    async def stop(self) -> None:
        if self._runner is not None:
            self._stopping = True
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = _INVALID
        request[_BODY] = body
        if self.record:
            parsed = None if body is _INVALID else body
            headers = CIMultiDict(request.headers)
            self.requests.append(
                RecordedRequest(
                    request.method, request.path, dict(request.query), headers, parsed, raw
                )
            )
        key = request.headers.get("x-api-key")
        auth = request.headers.get("Authorization", "")
        if key is None and auth.startswith("Bearer "):  # newer SDKs send the key as Bearer
            key = auth.removeprefix("Bearer ").strip()
        if key is None:
            return error_response(401, "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            return error_response(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return error_response(400, "anthropic-version: header is required")
        try:
            return await handler(request)
        except _Reply as reply:
            return reply.response
        except asyncio.CancelledError:
            if not self._stopping and not request.get(_DROPPED):
                self.cancelled += 1
            raise
        except ConnectionResetError:
            if not request.get(_DROPPED):
                self.cancelled += 1
            return web.Response()

    def _behaviour(self, request: web.Request, markers: list[str], *, pop: bool) -> Behaviour:
        overrides = self._queue.popleft() if pop and self._queue else {}
        for text in filter(None, [request.headers.get(BEHAVIOUR_HEADER), *markers]):
            try:
                overrides = {**overrides, **orjson.loads(text)}
            except (orjson.JSONDecodeError, TypeError) as exc:
                raise _Reply(error_response(400, f"fake: bad behaviour JSON {text!r}")) from exc
        try:
            return dataclasses.replace(self.default, **overrides)
        except TypeError as exc:
            raise _Reply(error_response(400, f"fake: {exc}")) from exc

    @staticmethod
    def _parse(request: web.Request, *, generate: bool) -> dict[str, Any]:
        body = request[_BODY]
        if not isinstance(body, dict):
            raise _Reply(
                error_response(400, "There was an error parsing the body of your request.")
            )
        required = ("model", "messages", "max_tokens") if generate else ("model", "messages")
        for key in required:
            if key not in body:
                raise _Reply(error_response(400, f"{key}: Field required"))
        if not isinstance(body["messages"], list):
            raise _Reply(error_response(400, "messages: Input should be a valid list"))
        max_tokens = body.get("max_tokens", 1)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _Reply(
                error_response(400, "max_tokens: Input should be greater than or equal to 1")
            )
        for index, message in enumerate(body["messages"]):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                msg = f"messages.{index}.role: Input should be 'user' or 'assistant'"
                raise _Reply(error_response(400, msg))
        return body

    async def _prelude(self, request: web.Request, beh: Behaviour, stream: bool) -> None:
        if beh.delay_s:
            await asyncio.sleep(beh.delay_s)
        if beh.hang:
            await asyncio.get_running_loop().create_future()
        if beh.status >= 400:
            if isinstance(beh.error_body, str):
                resp = web.Response(text=beh.error_body, status=beh.status, headers=beh.headers)
            elif beh.error_body is not None:
                data = orjson.dumps(beh.error_body)
                kind = "application/json"
                resp = web.Response(
                    body=data, status=beh.status, content_type=kind, headers=beh.headers
                )
            else:
                resp = error_response(beh.status)
                resp.headers.update(beh.headers)
            raise _Reply(resp)
        if beh.drop_after is not None and not stream:
            raise _Reply(_drop(request, web.Response()))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = self._parse(request, generate=True)
        markers: list[str] = []
        prompt = input_tokens(body, markers)
        stream = bool(body.get("stream"))
        beh = self._behaviour(request, markers, pop=True)
        await self._prelude(request, beh, stream)
        answer = self._answer(body, prompt, beh)
        headers = {"request-id": "req_" + answer.id[4:], **beh.headers}
        if not stream:
            if beh.malformed:
                return web.Response(body=MALFORMED, content_type="application/json")
            body_bytes = orjson.dumps(answer.body())
            return web.Response(body=body_bytes, content_type="application/json", headers=headers)
        events = answer.events(beh.stream_error)
        as_openai = OpenAIBehaviour(
            chunk_delay_s=beh.chunk_delay_s, drop_after=beh.drop_after, malformed=beh.malformed
        )
        return await _stream(request, events, as_openai, headers, typed=True)

    @staticmethod
    def _answer(body: Mapping[str, Any], prompt: int, beh: Behaviour) -> _Answer:
        pieces, stop, stop_sequence = list(beh.content_pieces), "end_turn", None
        stops = body.get("stop_sequences") or []
        for index, piece in enumerate(pieces):
            if piece in stops:
                pieces, stop, stop_sequence = pieces[:index], "stop_sequence", piece
                break
        calls = list(beh.tool_calls) if stop_sequence is None else []
        if calls:
            stop = "tool_use"
        if len(pieces) + len(calls) > body["max_tokens"]:
            pieces, calls, stop = pieces[: body["max_tokens"]], [], "max_tokens"
        output = beh.output_tokens
        if output is None:
            output = len(pieces) + len(calls) + beh.thinking_tokens
        usage: dict[str, Any] = {
            "input_tokens": prompt if beh.input_tokens is None else beh.input_tokens,
            "cache_creation_input_tokens": beh.cache_creation_tokens,
            "cache_read_input_tokens": beh.cache_read_tokens,
            "output_tokens": output,
        }
        if beh.thinking_tokens:
            usage["output_tokens_details"] = {"thinking_tokens": beh.thinking_tokens}
        model = str(body["model"])
        final_usage = None if beh.omit_usage else usage
        return _Answer(model, pieces, calls, beh.stop_reason or stop, stop_sequence, final_usage)

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = self._parse(request, generate=False)
        markers: list[str] = []
        tokens = input_tokens(body, markers)
        beh = self._behaviour(request, markers, pop=False)
        await self._prelude(request, beh, False)
        answer: dict[str, Any] = {"input_tokens": tokens}
        if beh.padding:
            answer["padding"] = "x" * beh.padding
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return error_response(404, "Not Found")
