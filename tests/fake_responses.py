"""The OpenAI Responses API objects and stream events that the fake upstream answers with.

Used by ``tests.fake_upstream`` for ``POST /v1/responses`` (and by ``tests.fake_azure`` for
``POST /openai/responses``). A plain answer is a ``response`` object; a stream is SSE with an
``event:`` line per event and no ``[DONE]``: ``response.created``, ``response.in_progress``,
then per output item ``response.output_item.added``, for a message ``response.content_part.added``
/ ``response.output_text.delta`` (one per piece) / ``response.output_text.done`` /
``response.content_part.done``, for a function call ``response.function_call_arguments.delta`` /
``.done``, then ``response.output_item.done``; and one terminal event: ``response.completed``,
``response.incomplete`` (output cut by ``max_output_tokens``: ``incomplete_details.reason``) or
``response.failed`` (``error``). Every event carries ``sequence_number`` from 0.

Token rule (words as in the chat rule): input_tokens = words of ``instructions`` + for a string
input its words, for a list 3 per item + the words of its text (``content`` string or parts'
``text``, a function call output's ``output``); output_tokens = pieces sent + function calls +
reasoning_tokens.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson


def input_tokens(body: Mapping[str, Any], words: Callable[[str], int]) -> int:
    total = words(body["instructions"]) if isinstance(body.get("instructions"), str) else 0
    items = body.get("input")
    if isinstance(items, str):
        return total + words(items)
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        total += 3
        content = item.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        texts = [p.get("text") for p in parts if isinstance(p, dict)]
        texts.append(item.get("output"))
        total += sum(words(t) for t in texts if isinstance(t, str))
    return total


@dataclass
class ResponsePlan:
    """One generated response, rendered as a ``response`` object or as stream events."""

    request: Mapping[str, Any]
    model: str
    pieces: list[str]
    tool_calls: Sequence[Mapping[str, Any]]
    usage: dict[str, Any] | None
    status: str = "completed"  # or "incomplete" / "failed"
    id: str = field(default_factory=lambda: "resp_" + secrets.token_hex(12))
    created_at: int = field(default_factory=lambda: int(time.time()))
    _seq: int = 0

    def _message(self, done: bool) -> dict[str, Any]:
        text = {"type": "output_text", "text": "".join(self.pieces), "annotations": []}
        content = [text | {"logprobs": []}] if done else []
        status = "completed" if done else "in_progress"
        head = {"id": "msg_" + self.id[5:], "type": "message", "role": "assistant"}
        return head | {"status": status, "content": content}

    def _call(self, index: int, done: bool) -> dict[str, Any]:
        call = self.tool_calls[index]
        args = call.get("arguments", {})
        return {
            "id": f"fc_{self.id[5:]}_{index}",
            "type": "function_call",
            "status": "completed" if done else "in_progress",
            "call_id": f"call_{self.id[5:]}_{index}",
            "name": call["name"],
            "arguments": (args if isinstance(args, str) else orjson.dumps(args).decode())
            if done
            else "",
        }

    def _items(self, done: bool) -> list[dict[str, Any]]:
        items = [self._message(done)] if self.pieces or not self.tool_calls else []
        return items + [self._call(i, done) for i in range(len(self.tool_calls))]

    def body(self, final: bool = True) -> dict[str, Any]:
        req = self.request
        status = self.status if final else "in_progress"
        out: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": req.get("instructions"),
            "max_output_tokens": req.get("max_output_tokens"),
            "model": self.model,
            "output": self._items(True) if final else [],
            "parallel_tool_calls": req.get("parallel_tool_calls", True),
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": req.get("store", True),
            "temperature": req.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools", []),
            "top_p": req.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": self.usage if final else None,
            "user": None,
            "metadata": req.get("metadata", {}),
        }
        if final and status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if final and status == "failed":
            out["error"] = {"code": "server_error", "message": "The model failed to respond."}
        return out

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload)

    def events(self) -> list[bytes]:
        """The stream's events (each without its trailing blank line)."""
        ev = self._event
        out = [ev("response.created", response=self.body(False))]
        out.append(ev("response.in_progress", response=self.body(False)))
        for index, (started, finished) in enumerate(
            zip(self._items(False), self._items(True), strict=True)
        ):
            out.append(ev("response.output_item.added", output_index=index, item=started))
            ids = {"item_id": started["id"], "output_index": index}
            if started["type"] == "message":
                part = {"type": "output_text", "text": "", "annotations": []}
                out.append(ev("response.content_part.added", **ids, content_index=0, part=part))
                for piece in self.pieces:
                    delta = {"content_index": 0, "delta": piece, "logprobs": []}
                    out.append(ev("response.output_text.delta", **ids, **delta))
                text = "".join(self.pieces)
                done = {"content_index": 0, "text": text, "logprobs": []}
                out.append(ev("response.output_text.done", **ids, **done))
                part = part | {"text": text}
                out.append(ev("response.content_part.done", **ids, content_index=0, part=part))
            else:
                args = finished["arguments"]
                out.append(ev("response.function_call_arguments.delta", **ids, delta=args))
                out.append(ev("response.function_call_arguments.done", **ids, arguments=args))
            out.append(ev("response.output_item.done", output_index=index, item=finished))
        out.append(ev(f"response.{self.status}", response=self.body(True)))
        return out


def usage(prompt: int, output: int, cached: int, reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }
