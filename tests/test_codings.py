"""Content codings of request bodies, as tables: which are served, and decoding with a bound."""

from __future__ import annotations

import gzip
import zlib

import pytest

from policies import codings
from policies.codings import BadCoding, TooLarge, UnsupportedCoding, content_coding, decode

BODY = b'{"model": "gpt-4o-mini"}'


@pytest.mark.parametrize(
    ("values", "coding"),
    [
        ([], "identity"),
        (["identity"], "identity"),
        (["gzip"], "gzip"),
        ([" GZip "], "gzip"),
        (["Deflate"], "deflate"),
        ([""], "identity"),
    ],
)
def test_served_codings(values: list[str], coding: str) -> None:
    assert content_coding(values) == coding


@pytest.mark.parametrize(
    "values",
    [
        ["br"],
        ["zstd"],
        ["compress"],
        ["x-gzip"],
        ["gzip, gzip"],
        ["gzip", "gzip"],
        ["gzip;q=1"],
        ["*"],
        ["gzip, identity"],
        ["\udcff"],
    ],
)
def test_refused_codings(values: list[str]) -> None:
    with pytest.raises(UnsupportedCoding):
        content_coding(values)


def test_brotli_where_the_caller_can_decode_it() -> None:
    assert content_coding(["br"], codings.ALWAYS | {"br"}) == "br"


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("gzip", gzip.compress(BODY[:10]) + gzip.compress(BODY[10:])),  # two members
        ("deflate", zlib.compress(BODY)),
        ("deflate", raw_deflate(BODY)),  # as some clients send it
    ],
)
def test_decode(coding: str, data: bytes) -> None:
    assert decode(data, coding, len(BODY)) == BODY


@pytest.mark.parametrize(
    ("coding", "data", "error"),
    [
        ("identity", BODY, TooLarge),
        ("gzip", gzip.compress(BODY), TooLarge),
        ("gzip", gzip.compress(BODY[:10]) + gzip.compress(BODY[10:]), TooLarge),
        ("deflate", zlib.compress(BODY), TooLarge),
        ("gzip", gzip.compress(BODY)[:-9], BadCoding),  # truncated
        ("gzip", gzip.compress(BODY)[:-8] + b"\0" * 8, BadCoding),  # wrong checksum
        ("gzip", gzip.compress(BODY) + b"junk", BadCoding),
        ("gzip", BODY, BadCoding),
        ("deflate", b"\x78\x9c" + b"\xff" * 10, BadCoding),
        ("gzip", b"", BadCoding),
    ],
)
def test_decode_refuses(coding: str, data: bytes, error: type[Exception]) -> None:
    limit = len(BODY) - 1 if error is TooLarge else len(BODY)
    with pytest.raises(error):
        decode(data, coding, limit)


def test_a_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB in about 64 KiB
    with pytest.raises(TooLarge):
        decode(bomb, "gzip", 1 << 20)
    assert decode(bomb, "gzip", 64 << 20) == b"\0" * (64 << 20)
