"""When a dead child process of ``modelbridge serve`` (a worker, the usage writer) is started
again.

A child that had run for a while is replaced at once: its death is an accident (an OOM kill, a
``kill -9``) and every second without it is capacity lost. A child that dies again soon after
its start is crash-looping (a bad config value only it reads, a store it cannot reach): each
further restart waits twice as long as the one before, up to a ceiling, so that a loop neither
burns the CPU the other workers need nor floods the log. Once a child has lived ``stable_s`` the
count starts over.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    first_s: float = 0.5  # the wait before the second restart in a row
    ceiling_s: float = 30.0
    stable_s: float = 10.0  # a child that lived this long was not crash-looping


@dataclass(frozen=True, slots=True)
class Restart:
    delay_s: float  # seconds from the death to the new start
    crashes: int  # deaths in a row, each soon after its start (this one included)


def after_death(crashes: int, lived_s: float, backoff: Backoff = Backoff()) -> Restart:
    """The restart of a child that died after ``lived_s`` seconds, ``crashes`` being the count
    of quick deaths in a row before this one."""
    crashes = 1 if lived_s >= backoff.stable_s else crashes + 1
    if crashes == 1:
        return Restart(0.0, 1)
    return Restart(min(backoff.ceiling_s, backoff.first_s * 2 ** (crashes - 2)), crashes)
