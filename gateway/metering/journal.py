"""The settle journal: settles Redis could not take, kept until it can.

A request that was answered must be billed even when Redis is unreachable at that moment (or
answers an error, or times out). :meth:`gateway.metering.meter.Metering.settle` then hands the
settle here, exactly as it would have been sent (``settle.lua``'s keys and arguments), and
:meth:`Metering.replay` sends it again once Redis answers. Replaying is safe however often it
happens: ``settle.lua`` is idempotent on the request id (the ``rid`` marker), and a settle whose
record is already in the PostgreSQL ledger is dropped without being sent (the marker may be gone
with a Redis that lost its data; the ledger is not).

Each entry is kept in memory and appended to a small file, one line per event, so that a restart
of the process does not lose it::

    +{"a": account, "r": request id, "k": [keys], "v": [args], "t": unix time}
    -<request id>                     (the settle reached Redis)

The file is written at once and fsync'd once per event-loop iteration that added entries (a burst
of failed settles costs one fsync); it is emptied whenever nothing is left. Each process owns one
file, ``settles-<worker>.jsonl`` in the journal directory, under an exclusive ``flock``; a file
nobody holds (a process that died, a worker that no longer exists) is adopted by the next process
that opens its journal: its entries move into that process's own file. The journal is bounded
(``max_entries``): past it, a settle is logged in full at ERROR level, for an operator to replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from policies.usage_record import opened_of, pairs_dict

log = logging.getLogger("modelbridge.journal")

RECORD_AT = 10  # settle.lua's ARGV[11]: the usage record (policies/usage_record.py)
AFTER_RECORD = 2  # at most: a stored response's note and its lifetime (ARGV[12], ARGV[13])


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class SettleCall:
    """One ``settle.lua`` call, as sent: enough to send it again."""

    account: str
    request_id: str
    keys: list[str]
    args: list[str | int]
    at: float = 0.0  # when it was kept

    def line(self) -> bytes:
        entry = {"a": self.account, "r": self.request_id, "k": self.keys, "v": self.args}
        return b"+" + orjson.dumps({**entry, "t": self.at}) + b"\n"

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> SettleCall:
        args = list(raw["v"])
        if len(args) > RECORD_AT + 1 + AFTER_RECORD:  # kept before issue 14: the record's
            # field/value pairs (dozens of them)
            args[RECORD_AT:] = [opened_of(pairs_dict(args[RECORD_AT:]))]
        return cls(
            str(raw["a"]), str(raw["r"]), [str(k) for k in raw["k"]], args, float(raw.get("t", 0))
        )


def read_entries(data: bytes) -> dict[str, SettleCall]:
    """The settles a journal file still holds (a torn last line, from a crash, is skipped)."""
    entries: dict[str, SettleCall] = {}
    for line in data.split(b"\n"):
        if line.startswith(b"+"):
            try:
                call = SettleCall.parse(orjson.loads(line[1:]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            entries[call.request_id] = call
        elif line.startswith(b"-"):
            entries.pop(line[1:].decode(errors="replace"), None)
    return entries


class SettleJournal:
    def __init__(self, directory: Path | None, name: str, max_entries: int = 100_000) -> None:
        self.directory = directory
        self.name = name
        self.max_entries = max_entries
        self.entries: dict[str, SettleCall] = {}
        self.path: Path | None = None
        self.dropped = 0
        self._fd: int | None = None
        self._sync_due = False
        self._lines = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SettleCall]:
        return iter(list(self.entries.values()))

    # --- the file ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Take this process's file (and any file nobody holds); load what they kept."""
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._open_own()
        except OSError as exc:
            log.warning("settle journal: %s; settles Redis refuses are kept in memory only", exc)
            self._fd = None
            return
        for path in sorted(self.directory.glob("settles-*.jsonl")):
            if path != self.path:
                self._adopt(path)
        self._rewrite()
        if self.entries:
            log.warning("settle journal: %d settles kept from before; replaying", len(self.entries))

    def _open_own(self) -> None:
        assert self.directory is not None
        for name in (self.name, f"{self.name}-{os.getpid()}"):
            path = self.directory / f"settles-{name}.jsonl"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.path, self._fd = path, fd
            self.entries.update(read_entries(_read_all(fd)))
            return
        raise OSError(f"no journal file of {self.name} free in {self.directory}")

    def _adopt(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a live process's journal
            if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
                return  # adopted by someone else meanwhile
            found = read_entries(_read_all(fd))
            if found:
                log.warning("settle journal: adopting %d settles from %s", len(found), path.name)
                self.entries.update(found)
                self._rewrite()  # ours on disk before theirs goes
            path.unlink()
        finally:
            os.close(fd)

    def _rewrite(self) -> None:
        """Replace the file's content by the entries held now."""
        if self._fd is None:
            return
        data = b"".join(call.line() for call in self.entries.values())
        os.ftruncate(self._fd, 0)
        if data:
            os.write(self._fd, data)
        os.fsync(self._fd)
        self._lines = len(self.entries)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError as exc:
            log.error("settle journal: cannot write %s: %s", self.path, exc)
            return
        self._lines += 1
        if not self._sync_due:
            self._sync_due = True
            try:
                asyncio.get_running_loop().call_soon(self._sync)
            except RuntimeError:
                self._sync()

    def _sync(self) -> None:
        self._sync_due = False
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            self._sync()
            os.close(self._fd)  # the lock goes with it
            self._fd = None

    # --- entries ----------------------------------------------------------------------------------
    def keep(self, call: SettleCall) -> bool:
        """Keep a settle for later; False (and logged in full) when the journal is full."""
        if call.request_id in self.entries:
            return True
        if len(self.entries) >= self.max_entries:
            self.dropped += 1
            log.error(
                "settle journal full (%d): settle of %s NOT kept: %s",
                self.max_entries,
                call.request_id,
                call.line().decode(errors="replace").strip(),
            )
            return False
        call = call if call.at else _stamped(call)
        self.entries[call.request_id] = call
        self._append(call.line())
        return True

    def done(self, request_id: str) -> None:
        """The settle reached Redis (or the ledger has it): forget it."""
        if self.entries.pop(request_id, None) is None:
            return
        if not self.entries:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            self._lines = 0
        elif self._lines > 4 * len(self.entries) + 1000:
            with contextlib.suppress(OSError):
                self._rewrite()
        else:
            self._append(b"-" + request_id.encode() + b"\n")


def _stamped(call: SettleCall) -> SettleCall:
    return SettleCall(call.account, call.request_id, call.keys, call.args, time.time())


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
