"""Content codings of request bodies: which one a request uses, and decoding it with a bound.

A body may be sent ``identity`` (no header), ``gzip`` or ``deflate`` (the zlib format, or raw
deflate as some clients send it). Anything else, a list of several codings or several headers, is
refused (415): one layer is all a JSON body needs. Names are case-insensitive; spaces around them
are ignored.

:func:`decode` never holds more than ``limit + 1`` decoded bytes: a zip bomb (a gigabyte of zeros
in a megabyte) stops at the limit, whatever its ratio.

Pure: the header values and the body in, the decoded body out.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

ALWAYS = frozenset({"gzip", "deflate"})


class UnsupportedCoding(ValueError):
    """The body's coding is not one the gateway decodes; the message says which."""


class BadCoding(ValueError):
    """The body does not decode in its coding."""


class TooLarge(ValueError):
    """The decoded body is longer than the limit."""


def content_coding(values: Sequence[str], available: frozenset[str] = ALWAYS) -> str:
    """The one coding of a body (``identity`` when none is named)."""
    codings = [c.strip().lower() for value in values for c in value.split(",")]
    codings = [c for c in codings if c]
    if not codings:
        return "identity"
    if len(codings) > 1:
        raise UnsupportedCoding("one Content-Encoding at most: " + ", ".join(codings))
    coding = codings[0]
    if coding != "identity" and coding not in available:
        known = ", ".join(sorted(available | {"identity"}))
        raise UnsupportedCoding(f"Content-Encoding {coding!r} is not supported (use {known})")
    return coding


def _decompressor(coding: str, data: bytes) -> zlib._Decompress:
    if coding == "gzip":
        return zlib.decompressobj(31)
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and int.from_bytes(data[:2]) % 31 == 0
    return zlib.decompressobj(15 if zlib_header else -15)


def decode(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decoded from ``coding`` (``identity``, ``gzip`` with any number of members,
    ``deflate``); raises :class:`TooLarge` past ``limit`` decoded bytes, :class:`BadCoding`."""
    if coding == "identity":
        if len(data) > limit:
            raise TooLarge(f"larger than {limit} bytes")
        return data
    out = bytearray()
    rest = data
    try:
        while True:
            decompressor = _decompressor(coding, rest)
            out += decompressor.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or decompressor.unconsumed_tail:
                raise TooLarge(f"larger than {limit} bytes decoded")
            if not decompressor.eof:
                raise BadCoding(f"the {coding} data is truncated")
            rest = decompressor.unused_data
            if coding != "gzip" or not rest:
                break
    except zlib.error as exc:
        raise BadCoding(f"not valid {coding} data") from exc
    if rest:
        raise BadCoding(f"bytes after the end of the {coding} data")
    return bytes(out)
