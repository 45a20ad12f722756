"""The front's request framing (``gateway.proxy.head``) against llhttp (``httptools``), the parser
aiohttp and Node.js use: on the same bytes, a request the front serves is read by llhttp with the
same method, path, version, headers, body, keep-alive and end; everything else is handed to
aiohttp, which reads it with llhttp itself. Never a disagreement."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.proxy.head import MAX_HEAD, PATHS, Framed, HandOver, frame

MAX_BODY = 1000
READ = (
    b"content-length",
    b"authorization",
    b"x-api-key",
    b"connection",
    b"x-modelbridge-tags",
    b"anthropic-version",
    b"anthropic-beta",
)


@dataclass
class Message:
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    end: int = 0  # the offset just past the message


class _Llhttp:
    """The messages llhttp completes in ``data``, each with the offset where it ends, and its
    error if it stops on one."""

    def __init__(self, data: bytes) -> None:
        self.messages: list[Message] = []
        self.error: Exception | None = None
        self._fed = 0
        self._parser = httptools.HttpRequestParser(self)
        try:
            for i in range(len(data)):  # a byte at a time: each message's end is exact
                self._fed = i + 1
                self._parser.feed_data(data[i : i + 1])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # not a subclass
            self.error = exc

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        message = self.messages[-1]
        message.method = self._parser.get_method()
        message.version = self._parser.get_http_version()
        message.keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].end = self._fed

    @property
    def complete(self) -> list[Message]:
        return [m for m in self.messages if m.end]


def agree(data: bytes) -> int:
    """Check the front against llhttp on ``data``; the number of requests the front serves."""
    llhttp = _Llhttp(data)
    served, start = 0, 0
    while start < len(data):
        rest = data[start:]
        try:
            framed = frame(rest, MAX_BODY)
        except HandOver:
            return served  # aiohttp's from here on: it parses with llhttp itself
        if framed is None:  # the front waits for more bytes: so must llhttp
            assert len(llhttp.complete) == served, (data, llhttp.complete)
            return served
        assert len(llhttp.complete) > served, (data, llhttp.error)
        _same(framed, rest, llhttp.complete[served], start)
        served, start = served + 1, start + framed.end
        if not framed.head.keep_alive:
            return served  # answered, then the front closes: the rest is never read
    return served


def _same(framed: Framed, rest: bytes, message: Message, start: int) -> None:
    head = framed.head
    assert (message.method, message.url, message.version) == (b"POST", head.path, "1.1")
    assert message.end == start + framed.end  # the next request starts at the same byte
    assert message.body == rest[framed.body_start : framed.end]
    assert message.keep_alive == head.keep_alive
    for name in READ:
        theirs = [v.strip(b" \t") for n, v in message.headers if n == name]
        if name in head.headers:
            assert theirs and theirs[0] == head.headers[name], (name, theirs, head.headers)
        else:
            assert not theirs, (name, theirs)
    assert head.length == len(message.body)


# --- generated requests --------------------------------------------------------------------------
# One generator, two drivers: hypothesis (shrinks a failure to its smallest form) and a seeded
# random.Random (many more cases per second). ``choose`` picks one of its options; each request
# is plain, odd in a few places, or odd anywhere, so that all three forms are common.
Choose = Callable[[Sequence[bytes]], bytes]

_PLAIN_PATHS = sorted(PATHS)
_ODD_PATHS = [
    b"/v1/chat/completions?x=1",
    b"/v1/chat/completions/",
    b"//v1/embeddings",
    b"*",
    b"/V1/completions",
    b"http://gw/v1/completions",
    b"/v1/chat%2Fcompletions",
    b"/v1/emb\x00",
    b"/v1/messages/count_tokens",
    b"/v1/messages?beta=true",
    b"/v1/Messages",
    b"/v1/chat/completions#f",
    b"",
]
_ODD_METHODS = [b"post", b"GET", b"PUT", b"POSTX", b"PRI", b""]
_ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"", b"HTTP/11"]
_ODD_SPACES = [b"  ", b"\t", b""]
_ODD_EOLS = [b"\n", b"\r", b"\r\r\n", b"\n\r"]
_PLAIN_NAMES = [
    b"Content-Length",
    b"content-length",
    b"CONTENT-LENGTH",
    b"Authorization",
    b"X-Api-Key",
    b"x-api-key",
    b"Connection",
    b"connection",
    b"X-ModelBridge-Tags",
    b"anthropic-version",
    b"Anthropic-Beta",
    b"Host",
    b"Content-Type",
    b"X-Other",
    b"User-Agent",
]
_ODD_NAMES = [
    b"Transfer-Encoding",
    b"Expect",
    b"Upgrade",
    b"Content-Length ",
    b" Content-Length",
    b"Content Length",
    b"",
    b"X-\xc3\xa9",
    b"Con\x00nection",
    b"X-A\x7f",
    b"Authori{ation",
    b"transfer-encoding",
    b"Transfer-Encodingx",
]
_ODD_COLONS = [b":", b":\t", b" : ", b":  ", b"", b"::"]
_PLAIN_VALUES = [
    b"Bearer mb_abc",
    b"close",
    b"keep-alive",
    b"Close",
    b"keep-alive, close",
    b"close, upgrade",
    b"closed",
    b"x close",
    b",close",
    b"team=a, b=2",
    b"",
    b"application/json",
    b"Bearer  spaced ",
    b"k1",
    b"2023-06-01",
    b"prompt-caching-2024-07-31,  tools-2024-04-04 ",
]
_ODD_VALUES = [
    b"chunked",
    b"gzip, chunked",
    b"identity",
    b"100-continue",
    b"h2c",
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\xc3\xa9",
    b"\t",
    b" ",
    b"\r",
    b"\n",
    b'"',
    b"a\r\n b",
    b"a\r\n\tb",
]
_LENGTHS = [
    b"0",
    b"2",
    b"5",
    b"05",
    b" 5 ",
    b"+5",
    b"-5",
    b"5,5",
    b"5 5",
    b"0x5",
    b"",
    b"5.0",
    b"99999999999999999999",
    b"1001",
    b"1000",
    b"\t2",
    b"0000000000000000002",
]
_BODIES = [
    b"",
    b"{}",
    b"[1]",
    b"x",
    b"\r\n",
    b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\n",
    b"\x00\xff",
    b'{"model":"m"}',
]


def build(choose: Choose) -> bytes:
    """One to three requests, possibly cut short."""
    data = b"".join(_request(choose) for _ in range(int(choose([b"1", b"1", b"2", b"3"]))))
    if choose([b"whole", b"whole", b"cut"]) == b"cut":
        data = data[: int(choose([str(n).encode() for n in range(len(data) + 1)]))]
    return data


def _request(choose: Choose) -> bytes:
    odd = {b"plain": 0, b"few": 8, b"any": 2}[choose([b"plain", b"few", b"few", b"any"])]

    def pick(plain: Sequence[bytes], others: Sequence[bytes]) -> bytes:
        if odd and choose([b"odd", *[b"plain"] * odd]) == b"odd":
            return choose(others)
        return choose(plain)

    sp = pick([b" "], _ODD_SPACES)
    line = pick([b"POST"], _ODD_METHODS) + sp + pick(_PLAIN_PATHS, _ODD_PATHS)
    line += sp + pick([b"HTTP/1.1"], _ODD_VERSIONS)
    body = choose(_BODIES)
    headers = []
    for _ in range(int(choose([b"0", b"1", b"2", b"3", b"4"]))):
        name = pick(_PLAIN_NAMES, _ODD_NAMES)
        if name.strip().lower() == b"content-length":
            value = pick([str(len(body)).encode()], _LENGTHS)
        else:
            value = pick(_PLAIN_VALUES, _ODD_VALUES)
        headers.append(name + pick([b": "], _ODD_COLONS) + value)
    if choose([b"length", b"length", b"none"]) == b"length":
        at = int(choose([str(n).encode() for n in range(len(headers) + 1)]))
        headers.insert(at, b"Content-Length: %d" % len(body))
    eol = pick([b"\r\n"], _ODD_EOLS)
    return line + eol + b"".join(h + pick([b"\r\n"], _ODD_EOLS) for h in headers) + eol + body


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    return build(lambda options: draw(st.sampled_from(options)))


def _random_requests(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [build(rng.choice) for _ in range(count)]


def _post(path: bytes, *headers: bytes, body: bytes = b"{}") -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: gw", *headers]
    if not any(h.lower().startswith(b"content-length") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@given(_requests())
@settings(max_examples=300, deadline=None)
@example(_post(b"/v1/chat/completions", b"Connection: keep-alive", b"Connection: close"))
@example(_post(b"/v1/chat/completions", b"Connection: closed"))
@example(_post(b"/v1/chat/completions", b"Connection: keep-alive, close"))
@example(_post(b"/v1/embeddings", b"Content-Length: 2\n") + b"{}")
@example(b"POST /v1/embeddings HTTP/1.1\nContent-Length: 0\n\n")
@example(b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 0\r\n\n")
@example(_post(b"/v1/completions") + b"\r\n" + _post(b"/v1/completions"))
def test_the_front_frames_as_llhttp_does_or_hands_over(data: bytes) -> None:
    agree(data)


def test_many_more_random_requests_agree() -> None:
    cases = _random_requests(seed=9, count=10_000)
    served = [agree(data) for data in cases]
    assert sum(n > 0 for n in served) > 1_000  # the served form is common, not a rarity
    assert sum(n > 1 for n in served) > 100  # and pipelined ones


@pytest.mark.parametrize(
    ("data", "served"),
    [
        (_post(b"/v1/chat/completions", b"Authorization: Bearer k  "), 1),
        (_post(b"/v1/completions") + _post(b"/v1/embeddings", body=b"[1]"), 2),
        (_post(b"/v1/completions", b"Connection: Close"), 1),
        (_post(b"/v1/completions", b"X-ModelBridge-Tags: a=1", b"X-ModelBridge-Tags: b=2"), 1),
        (_post(b"/v1/messages", b"x-api-key: k", b"anthropic-version: 2023-06-01"), 1),
        (_post(b"/v1/messages", b"anthropic-beta: a", b"Anthropic-Beta: b"), 1),  # the first
        (_post(b"/v1/completions")[:-1], 0),  # the body is still coming
        (_post(b"/v1/completions", b"X-Pad: " + b"p" * MAX_HEAD), 0),  # aiohttp's
    ],
)
def test_known_cases_agree(data: bytes, served: int) -> None:
    assert agree(data) == served
