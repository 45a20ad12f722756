"""Redis Cluster key slots: which of the 16384 slots a key lives in (pure).

A key's slot is CRC16 (XMODEM) of its hash tag modulo 16384. The hash tag is the part between the
first ``{`` and the first ``}`` after it, when that part is not empty; otherwise the whole key.
Every key of one billing account carries the tag ``{acct:<account>}`` (policies/keyspace.py), so
an account's scripts run on one slot: the gateway routes them by :func:`key_slot` of any of their
keys, and a cluster answers ``MOVED`` only when its slot map changed.
"""

from __future__ import annotations

SLOTS = 16384


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses it."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that decides its slot."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    raw = key.encode() if isinstance(key, str) else key
    return crc16(hash_tag(raw)) % SLOTS
