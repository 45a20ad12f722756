"""The shape of API keys and other secrets: ``mb_`` + 40 base62 characters + a 6-character
checksum. The checksum lets the gateway refuse a mistyped or made-up key without any lookup.

Pure: the random part is passed in (``gateway.credentials`` draws it from ``secrets``).
"""

from __future__ import annotations

import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_PREFIX = "mb_"
BODY_LEN = 40  # 40 * log2(62) = 238 random bits
CHECK_LEN = 6
KEY_LEN = len(KEY_PREFIX) + BODY_LEN + CHECK_LEN
DISPLAY_LEN = len(KEY_PREFIX) + 8


def base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        digits.append(BASE62[rem])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return base62(zlib.crc32(body.encode()), CHECK_LEN)


def format_key(body: str) -> str:
    return f"{KEY_PREFIX}{body}{checksum(body)}"


def well_formed(key: str) -> bool:
    if len(key) != KEY_LEN or not key.startswith(KEY_PREFIX):
        return False
    body = key[len(KEY_PREFIX) : len(KEY_PREFIX) + BODY_LEN]
    if any(ch not in BASE62 for ch in body):
        return False
    return key[-CHECK_LEN:] == checksum(body)


def display_prefix(key: str) -> str:
    return key[:DISPLAY_LEN]
