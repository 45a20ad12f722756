"""A child of ``modelbridge serve`` (a worker, the spare, the usage writer) lives no longer than
``serve`` does, even when ``serve`` is killed with ``kill -9`` or by the OOM killer.

The supervisor names itself in the child's environment (:data:`PARENT_ENV`); the child's very
first step (``python -m gateway``, before the heavy imports) asks the kernel for a SIGTERM when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), which it handles as any stop: a worker drains,
the writer writes what it read. A parent already gone by then would never signal: the child
exits at once. A worker also watches its parent once serving (``gateway.cli``); this covers the
seconds of its start, when a spare or a replacement is still importing.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_ENV = "MODELBRIDGE_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        os._exit(0)
