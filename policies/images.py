"""How many prompt tokens one image may cost, for the hold: pure, no I/O.

A provider bills an image by its size, which the gateway does not measure (an image may be a URL
it never fetches), so the hold counts every image part of a request at the most one image can
cost on the model. Too little there and a hard limit could be passed by the difference; the
settle charges what the provider reports either way.

The figures are the providers' documented worst cases, by the name of the model served (its
``upstream_model``; the longest matching prefix wins, so a dated snapshot matches its family):

* OpenAI's tiled models: ``base + tiles * per_tile``, at most 8 tiles of 512 px (an image is
  scaled into 2048 x 2048, then its short side down to 768: 2048 x 768 is 4 x 2 tiles).
  gpt-4o-mini bills an image at gpt-4o's price in its own cheaper tokens: 2,833 + 8 x 5,667.
* OpenAI's patch models: at most 1,536 patches of 32 px, times the model's multiplier.
* Anything else (Claude, an Azure deployment's own name, a local model): :data:`DEFAULT`,
  above Claude's largest image (~4,800 tokens at 2,576 px on the long edge).

A model's ``image_tokens`` in ``config.yaml`` replaces the figure (a provider not listed here, or
to hold tighter for a model known to get small images only).
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT = 5_000
_MAX_TILES = 8
_MAX_PATCHES = 1_536


def _tiled(base: int, per_tile: int) -> int:
    return base + _MAX_TILES * per_tile


def _patched(multiplier_pct: int) -> int:
    return -(-_MAX_PATCHES * multiplier_pct // 100)  # rounded up


KNOWN: dict[str, int] = {
    "gpt-4o": _tiled(85, 170),
    "chatgpt-4o": _tiled(85, 170),
    "gpt-4.1": _tiled(85, 170),
    "gpt-4.5": _tiled(85, 170),
    "gpt-4-turbo": _tiled(85, 170),
    "gpt-4o-mini": _tiled(2_833, 5_667),
    "o1": _tiled(75, 150),
    "o3": _tiled(75, 150),
    "computer-use-preview": _tiled(65, 129),
    "gpt-4.1-mini": _patched(162),
    "gpt-4.1-nano": _patched(246),
    "o4-mini": _patched(172),
}
_BY_LENGTH = sorted(KNOWN, key=len, reverse=True)


def image_tokens(upstream_model: str) -> int:
    """The most one image can cost on ``upstream_model``, in prompt tokens."""
    name = upstream_model.lower()
    for prefix in _BY_LENGTH:
        if name == prefix or name.startswith(prefix + "-"):
            return KNOWN[prefix]
    return DEFAULT


def model_image_tokens(upstream_models: Iterable[str]) -> int:
    """For a model served by several deployments: the most any of them can bill."""
    return max((image_tokens(name) for name in upstream_models), default=DEFAULT)
