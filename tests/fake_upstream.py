"""A small, faithful fake of the OpenAI HTTP API, for the gateway's tests and benchmark.

Endpoints (under ``/v1``): ``POST /chat/completions``, ``POST /completions`` (legacy),
``POST /embeddings``, ``POST /responses`` (the Responses API, plain and typed-event SSE: see
``tests.fake_responses``), ``GET /models``, ``GET /models/{id}``; any other path is OpenAI's 404
``Invalid URL (METHOD /path)``. Errors use OpenAI's envelope ``{"error": {"message", "type",
"param", "code"}}``. With ``api_key`` set, a request without ``Authorization: Bearer <api_key>``
gets OpenAI's 401 (wrong key: ``code: invalid_api_key``) and consumes no queued behaviour.

Replies: the content is ``content_pieces`` joined (default ``DEFAULT_PIECES``, 6 pieces). With
``"stream": true`` the reply is SSE, one ``data: {json}\\n\\n`` event written and flushed at a
time: chat sends a role chunk (``delta: {role: assistant, content: ""}``), one chunk per piece,
then a chunk with an empty delta and ``finish_reason``; legacy completions send one chunk per
piece then ``text: ""`` with ``finish_reason``. Only if the request has ``stream_options:
{include_usage: true}`` does every chunk carry ``"usage": null`` and a last chunk with
``choices: []`` and ``usage`` follow. Then ``data: [DONE]``. ``max_completion_tokens`` (else
``max_tokens``) smaller than the number of pieces truncates them (finish_reason ``length``).

Token rule (``[[fake:...]]`` markers removed first; words = ``len(text.split())``):
  * chat prompt_tokens = sum over messages of (3 + words of its content; for a list content,
    the words of its ``text`` parts);
  * completions / embeddings prompt_tokens = sum of the words of each prompt/input string, or of
    the length of each token array;
  * completion_tokens = number of content pieces sent + ``reasoning_tokens``.

Behaviour keys (``Behaviour`` fields, defaults in brackets): status [200]; error_body [None: the
OpenAI envelope for the status; a dict is sent as JSON, a str as text]; content_pieces
[DEFAULT_PIECES]; prompt_tokens, completion_tokens [None: the rule]; cached_tokens [0];
reasoning_tokens [0]; finish_reason [None: stop/length]; delay_s [0, before answering];
chunk_delay_s [0, before each SSE event but the first]; hang [False: never answer, until the
client goes away]; omit_usage [False: send no usage at all, even when asked]; drop_after [None:
close the connection after that many SSE events, before ``[DONE]``; a non-streaming request gets
no response at all]; headers [{}: extra response headers]; tool_calls [(): function calls
``{"name", "arguments"}`` (arguments a dict or JSON text) answered after the content, finish_reason
``tool_calls``; each counts one completion token]; malformed [False: a plain answer is cut JSON
(status 200), a stream's second event is not JSON]; fail_response [False: a Responses stream ends
with ``response.failed``, a plain one has status ``failed``]; no_done [False: a chat stream ends
cleanly but without ``data: [DONE]``, as a provider that cut it]; gated [False: answer only once
the test calls ``fake.open_gate()`` (after any ``delay_s``), whatever time that takes].

Each POST request takes the next ``fake.next(**kw)`` queued overrides (else none) on top of
``fake.default`` (``fake.set_default(**kw)``), then the JSON of its ``x-fake-behaviour`` header,
then any ``[[fake:{json}]]`` marker found in message contents / prompt / input (for use through
a gateway that forwards no custom header). GET requests never consume the queue.

Every request is recorded in ``fake.requests``; requests whose client went away while in flight
(hang, delay, stream) are counted in ``fake.cancelled``; ``fake.peak_inflight`` is the most
requests it had in flight at once.

Standalone: ``python -m tests.fake_upstream --port 18080 [--no-record]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import re
import secrets
import signal
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from tests import fake_responses

DEFAULT_PIECES: tuple[str, ...] = ("Hello", " from", " the", " fake", " upstream", ".")
DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
BEHAVIOUR_HEADER = "x-fake-behaviour"
MARKER_RE = re.compile(r"\[\[fake:(\{.*?\})\]\]", re.DOTALL)
FINGERPRINT = "fp_fake0001"
_INVALID = object()
_BODY = web.RequestKey("body", object)
_DROPPED = web.RequestKey("dropped", bool)
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one request (see the module docstring)."""

    status: int = 200
    error_body: Any = None
    content_pieces: Sequence[str] = DEFAULT_PIECES
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    hang: bool = False
    omit_usage: bool = False
    drop_after: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tool_calls: Sequence[Mapping[str, Any]] = ()
    malformed: bool = False
    fail_response: bool = False
    no_done: bool = False
    gated: bool = False


MALFORMED_BODY = b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"ind'
MALFORMED_EVENT = b'{"id": "chatcmpl-cut", "choices": [{"delta": {"content": "x'


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: Any  # parsed JSON; None when empty or not JSON
    raw: bytes


class _Reply(Exception):
    """Raised to answer the request at once with ``response``."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


def error_response(
    status: int, message: str | None = None, *, param: str | None = None, code: Any = ...
) -> web.Response:
    msg, etype, default_code = _ERRORS.get(status, ("Error.", "api_error", None))
    code = default_code if code is ... else code
    err = {"message": message or msg, "type": etype, "param": param, "code": code}
    return _json({"error": err}, status=status)


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    body = orjson.dumps(obj)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _words(text: str, markers: list[str]) -> int:
    if "[[fake:" in text:
        markers.extend(MARKER_RE.findall(text))
        text = MARKER_RE.sub(" ", text)
    return len(text.split())


def _chat_prompt_tokens(messages: Any, markers: list[str]) -> int:
    total = 0
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        parts = content if isinstance(content, list) else [{"text": content}]
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        total += 3 + sum(_words(t, markers) for t in texts if isinstance(t, str))
    return total


def _input_items(value: Any) -> list[Any]:
    """Split a prompt/input (str, list of str, token array, list of token arrays) into items."""
    if isinstance(value, list) and value and isinstance(value[0], str | list):
        return value
    return [value]


def _input_tokens(items: list[Any], markers: list[str]) -> int:
    words = sum(_words(i, markers) for i in items if isinstance(i, str))
    return words + sum(len(i) for i in items if isinstance(i, list))


def _vector(item: Any, dim: int) -> list[float]:
    digest = hashlib.blake2b(orjson.dumps(item), digest_size=64).digest()
    return [(digest[i % 64] - 128) / 128 for i in range(dim)]  # exact in float32


def _usage(prompt: int, completion: int, beh: Behaviour) -> dict[str, Any]:
    details = {
        "reasoning_tokens": beh.reasoning_tokens,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": beh.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": details,
    }


@dataclass
class _Plan:
    """One generated completion, rendered either as a JSON body or as SSE events."""

    chat: bool
    model: str
    pieces: list[str]
    finish: str
    usage: dict[str, Any] | None
    tool_calls: Sequence[Mapping[str, Any]] = ()
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    def _calls(self, streamed: bool) -> list[dict[str, Any]]:
        calls = []
        for index, call in enumerate(self.tool_calls):
            args = call.get("arguments", {})
            text = args if isinstance(args, str) else orjson.dumps(args).decode()
            fn = {"name": call["name"], "arguments": "" if streamed else text}
            entry = {"id": f"call_{self.id}_{index}", "type": "function", "function": fn}
            calls.append({"index": index, **entry} if streamed else entry)
        return calls

    def body(self) -> dict[str, Any]:
        text = "".join(self.pieces)
        if self.chat:
            content = text if text or not self.tool_calls else None
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if self.tool_calls:
                message["tool_calls"] = self._calls(streamed=False)
            message["annotations"] = []
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": self.finish}
        out = self._head("chat.completion" if self.chat else "text_completion", [choice])
        return out if self.usage is None else out | {"usage": self.usage}

    def events(self, include_usage: bool) -> list[bytes]:
        if self.chat:
            deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
            deltas += [{"content": p} for p in self.pieces]
            for call, full in zip(self._calls(True), self._calls(False), strict=True):
                more = {
                    "index": call["index"],
                    "function": {"arguments": full["function"]["arguments"]},
                }
                deltas += [{"tool_calls": [call]}, {"tool_calls": [more]}]
            choices: list[dict[str, Any]] = [
                {"index": 0, "delta": d, "logprobs": None} for d in [*deltas, {}]
            ]
        else:
            choices = [{"index": 0, "text": p, "logprobs": None} for p in [*self.pieces, ""]]
        for c in choices:
            c["finish_reason"] = None
        choices[-1]["finish_reason"] = self.finish
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if not include_usage or self.usage is None:
            return [orjson.dumps(self._head(obj, [c])) for c in choices]
        out = [orjson.dumps(self._head(obj, [c]) | {"usage": None}) for c in choices]
        return [*out, orjson.dumps(self._head(obj, []) | {"usage": self.usage})]


class FakeUpstream:
    """In-process fake OpenAI server; see the module docstring for the behaviours."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        embedding_dim: int = 8,
        models: Sequence[str] = DEFAULT_MODELS,
        record: bool = True,
    ) -> None:
        self.api_key = api_key
        self.embedding_dim = embedding_dim
        self.models = list(models)
        self.record = record
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.cancelled = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.default = Behaviour()
        self._queue: deque[dict[str, Any]] = deque()
        self._gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._stopping = False
        # Responses it stored (``store`` not false): id -> the input a request continuing it is
        # billed for again (its input + output tokens), as OpenAI bills previous_response_id.
        self.stored: dict[str, int] = {}

    def open_gate(self) -> None:
        """Let the ``gated`` requests answer (this one and any later, until :meth:`reset`)."""
        self._gate.set()

    def next(self, **behaviour: Any) -> None:
        """Queue overrides (on top of ``default``) for the next POST request."""
        Behaviour(**behaviour)  # unknown keys raise TypeError here
        self._queue.append(behaviour)

    def set_default(self, **behaviour: Any) -> None:
        """Set the behaviour used under the queued overrides (unnamed keys: their defaults)."""
        self.default = Behaviour(**behaviour)

    def reset(self) -> None:
        """Forget requests, cancellations and queued behaviours; restore the default."""
        self.requests.clear()
        self.cancelled = 0
        self.peak_inflight = self.inflight
        self._queue.clear()
        self._gate.clear()
        self.default = Behaviour()

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"condition not met within {timeout:.1f}s")
            await asyncio.sleep(0.01)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._models)
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
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    dict(request.query),
                    CIMultiDict(request.headers),
                    None if body is _INVALID else body,
                    raw,
                )
            )
        auth = request.headers.get("Authorization", "")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return _auth_error(auth)
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            return await handler(request)
        except _Reply as reply:
            return reply.response
        except asyncio.CancelledError:
            if not self._stopping and not request.get(_DROPPED):
                self.cancelled += 1
            raise
        except ConnectionResetError:  # the client went away while we were writing
            if not request.get(_DROPPED):
                self.cancelled += 1
            return web.Response()
        finally:
            self.inflight -= 1

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

    async def _prelude(self, request: web.Request, beh: Behaviour, stream: bool) -> None:
        """Apply delay / hang / error status / non-streaming drop (raising ``_Reply``)."""
        if beh.delay_s:
            await asyncio.sleep(beh.delay_s)
        if beh.gated:
            await self._gate.wait()
        if beh.hang:
            await asyncio.get_running_loop().create_future()  # until the client goes away
        if beh.status >= 400:
            if isinstance(beh.error_body, str):
                resp = web.Response(text=beh.error_body, status=beh.status, headers=beh.headers)
            elif beh.error_body is not None:
                resp = _json(beh.error_body, beh.status, beh.headers)
            else:
                resp = self.error_for(beh.status)
                resp.headers.update(beh.headers)
            raise _Reply(resp)
        if beh.drop_after is not None and not stream:
            raise _Reply(_drop(request, web.Response()))

    @staticmethod
    def _parse(request: web.Request, *required: str) -> dict[str, Any]:
        body = request[_BODY]
        if not isinstance(body, dict):
            raise _Reply(error_response(400, "We could not parse the JSON body of your request."))
        for key in required:
            if body.get(key) is None:
                msg = f"Missing required parameter: '{key}'."
                raise _Reply(error_response(400, msg, param=key, code="missing_required_parameter"))
        if body.get("stream_options") is not None and not body.get("stream"):
            msg = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise _Reply(error_response(400, msg, param="stream_options", code=None))
        return body

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        body = self._parse(request, "model", "messages" if chat else "prompt")
        markers: list[str] = []
        if chat:
            prompt = _chat_prompt_tokens(body["messages"], markers)
        else:
            prompt = _input_tokens(_input_items(body["prompt"]), markers)
        stream = bool(body.get("stream"))
        beh = self._behaviour(request, markers, pop=True)
        await self._prelude(request, beh, stream)
        pieces, finish = list(beh.content_pieces), "tool_calls" if beh.tool_calls else "stop"
        limit = body.get("max_completion_tokens") if chat else None
        limit = body.get("max_tokens") if limit is None else limit
        if isinstance(limit, int) and len(pieces) > limit:
            pieces, finish = pieces[:limit], "length"
        completion = beh.completion_tokens
        if completion is None:
            completion = len(pieces) + len(beh.tool_calls) + beh.reasoning_tokens
        prompt = prompt if beh.prompt_tokens is None else beh.prompt_tokens
        usage = None if beh.omit_usage else _usage(prompt, completion, beh)
        model = str(body["model"])
        plan = _Plan(chat, model, pieces, beh.finish_reason or finish, usage, beh.tool_calls)
        headers = {"x-request-id": "req_" + plan.id, **beh.headers}
        if not stream:
            if beh.malformed:
                return web.Response(body=MALFORMED_BODY, content_type="application/json")
            return _json(self.decorate(plan.body()), headers=headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = [*self.stream_prefix(), *plan.events(include_usage)]
        return await _stream(request, events, beh, headers)

    def error_for(self, status: int) -> web.Response:
        """Hook: the provider's error answer for a behaviour's ``status``."""
        return error_response(status)

    def decorate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Hook: what a provider adds to a plain chat answer (Azure: content filter results)."""
        return body

    def stream_prefix(self) -> list[bytes]:
        """Hook: events a provider sends before the first chunk of a chat stream."""
        return []

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = self._parse(request, "model", "input")
        markers: list[str] = []
        prompt = fake_responses.input_tokens(body, lambda text: _words(text, markers))
        stream = bool(body.get("stream"))
        beh = self._behaviour(request, markers, pop=True)
        await self._prelude(request, beh, stream)
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.stored:  # stored by another deployment, or never
                msg = f"Previous response with id '{previous}' not found."
                return error_response(
                    400, msg, param="previous_response_id", code="previous_response_not_found"
                )
            prompt += self.stored[previous]
        pieces, status = list(beh.content_pieces), "failed" if beh.fail_response else "completed"
        limit = body.get("max_output_tokens")
        if isinstance(limit, int) and len(pieces) > limit:
            pieces, status = pieces[:limit], "incomplete"
        completion = beh.completion_tokens
        if completion is None:
            completion = len(pieces) + len(beh.tool_calls) + beh.reasoning_tokens
        prompt = prompt if beh.prompt_tokens is None else beh.prompt_tokens
        usage = fake_responses.usage(prompt, completion, beh.cached_tokens, beh.reasoning_tokens)
        model = str(body["model"])
        plan = fake_responses.ResponsePlan(
            body, model, pieces, beh.tool_calls, None if beh.omit_usage else usage, status
        )
        if body.get("store") is not False:
            self.stored[plan.id] = prompt + completion
        headers = {"x-request-id": "req_" + plan.id, **beh.headers}
        if not stream:
            if beh.malformed:
                return web.Response(body=MALFORMED_BODY, content_type="application/json")
            return _json(plan.body(), headers=headers)
        return await _stream(request, plan.events(), beh, headers, typed=True)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = self._parse(request, "model", "input")
        markers: list[str] = []
        items = _input_items(body["input"])
        prompt = _input_tokens(items, markers)
        beh = self._behaviour(request, markers, pop=True)
        await self._prelude(request, beh, False)
        dim = body.get("dimensions") or self.embedding_dim
        data = []
        for index, item in enumerate(items):
            vec: Any = _vector(item, dim)
            if body.get("encoding_format") == "base64":
                vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vec})
        out: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if not beh.omit_usage:
            tokens = prompt if beh.prompt_tokens is None else beh.prompt_tokens
            out["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json(out, headers=beh.headers)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self._prelude(request, self._behaviour(request, [], pop=False), False)
        model = request.match_info.get("model")
        if model is None:
            return _json({"object": "list", "data": [_model_obj(m) for m in self.models]})
        if model not in self.models:
            msg = f"The model '{model}' does not exist"
            return error_response(404, msg, param="model", code="model_not_found")
        return _json(_model_obj(model))

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return error_response(404, f"Invalid URL ({request.method} {request.path})", code=None)


def _model_obj(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}


def _auth_error(auth: str) -> web.Response:
    key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    if not key:
        msg = "You didn't provide an API key. Provide it in an Authorization header (Bearer auth)."
        return error_response(401, msg, code=None)
    masked = key[:3] + "****" + key[-4:] if len(key) > 8 else "****"
    return error_response(401, f"Incorrect API key provided: {masked}.")


def _drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Close the TCP connection (after flushing what was already written)."""
    request[_DROPPED] = True
    if request.transport is not None:
        request.transport.close()
    return resp


async def _stream(
    request: web.Request,
    events: list[bytes],
    beh: Behaviour,
    headers: Mapping[str, str],
    *,
    typed: bool = False,
) -> web.StreamResponse:
    """Write ``events`` one by one; ``typed`` events carry their own ``event:`` line and the
    stream ends without ``[DONE]`` (Responses API, Anthropic)."""
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache", **headers})
    resp.content_type, resp.charset = "text/event-stream", "utf-8"
    await resp.prepare(request)
    if beh.malformed:
        bad = b"data: " + MALFORMED_EVENT
        events = [*events[:1], b"event: bad\n" + bad if typed else MALFORMED_EVENT, *events[1:]]
    for i, event in enumerate(events):
        if beh.drop_after is not None and i >= beh.drop_after:
            return _drop(request, resp)
        if i and beh.chunk_delay_s:
            await asyncio.sleep(beh.chunk_delay_s)
        await resp.write(event + b"\n\n" if typed else b"data: " + event + b"\n\n")
    if beh.drop_after is not None:
        return _drop(request, resp)
    if not typed and not beh.no_done:
        await resp.write(b"data: [DONE]\n\n")
    return resp


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeUpstream(api_key=args.api_key, embedding_dim=args.dim, record=not args.no_record)
    fake.set_default(delay_s=args.delay_s, chunk_delay_s=args.chunk_delay_s)
    print(f"fake upstream listening on {await fake.start(args.host, args.port)}", flush=True)
    anthropic = None
    if args.anthropic_port is not None:  # the benchmark's Anthropic upstream, same process
        from tests.fake_anthropic import FakeAnthropic

        anthropic = FakeAnthropic(record=not args.no_record)
        url = await anthropic.start(args.host, args.anthropic_port)
        print(f"fake anthropic listening on {url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()
        if anthropic is not None:
            await anthropic.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI upstream (tests / benchmark)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.add_argument("--no-record", action="store_true", help="do not record requests")
    parser.add_argument(
        "--anthropic-port", type=int, default=None, help="also serve the fake Anthropic API"
    )
    parser.add_argument("--dim", type=int, default=8, help="embedding dimension")
    parser.add_argument("--delay-s", type=float, default=0.0, help="delay before each reply")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0, help="delay between events")
    uvloop.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
