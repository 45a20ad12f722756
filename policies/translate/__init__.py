"""Protocol translation between OpenAI Chat Completions, Anthropic Messages and what the OpenAI
Responses API needs for billing. Pure and synchronous: dicts in, dicts out, no I/O.

Modules, by noun:
  * ``usage``     — one token usage shape (:class:`TokenUsage`) read from and written to each
    protocol;
  * ``requests``  — request bodies, Chat Completions <-> Messages;
  * ``replies``   — non-streamed answers, Chat Completions <-> Messages;
  * ``streams``   — stateful stream translators fed upstream events, returning client events;
  * ``responses_api`` — the Responses API's hold inputs and the usage of its terminal events;
  * ``errors``    — error envelopes of each protocol and the status -> type tables.

Anything a translator cannot express in the other protocol raises :class:`TranslationError`,
which the gateway answers with a 400 in the caller's protocol.
"""

from __future__ import annotations


class TranslationError(ValueError):
    """The request cannot be expressed in the upstream's protocol (answered with a 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
