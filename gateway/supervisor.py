"""The child processes of ``modelbridge serve``, kept alive: the workers (``--workers N``) and the
usage writer.

A child that dies while the gateway is not stopping is started again: at once when it had run
for a while, after a growing delay when it keeps dying soon after its start
(:mod:`policies.restarts`). A dead worker's live gauges (requests in flight) leave the merged
``/metrics`` before its replacement starts. The writer keeps its consumer name across restarts,
so the new one takes over at once what the dead one had read and not written.

A worker process takes seconds to start (imports, token tables, pools; more on a loaded
machine), so with several workers one more waits as the *spare*: started like the others but not
bound. A dead worker's slot takes it with a signal (``GO``, SIGUSR1), it binds, and a new spare
starts in the background; without a spare ready (a second death soon after the first), the slot
starts a process from nothing. Each worker process gets a worker id of its own (its settle
journal's name); a dead one's journal is adopted by the next process that opens its journal.

Workers talk back through the pipe named by ``READY_FD_ENV``: ``waiting <pid>`` (a spare whose
GO handler is in place: only then may it be signalled) and ``listens <pid>`` (its socket is
bound). The parent prints its banner once every worker listens, and logs how long a replacement
took from the death to that line.

Nothing here blocks: :meth:`Supervisor.tick` looks at every child and starts what is due. The
caller calls it when something happened, not on a fast timer (each wake-up of an idle process
costs the machine; README, performance): when a child ended (SIGCHLD), when the ready pipe has a
line, when a restart is due (:meth:`Supervisor.next_due_s`), and at the latest every
``SLOW_TICK_S``. The parent's loop with several workers waits in ``select`` on the ready pipe
and a :class:`ChildSignals` pipe; with one worker the serving (uv)loop, which keeps SIGCHLD for
itself, watches each child's pidfd (:class:`ExitWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.lifeline import PARENT_ENV
from policies.restarts import Restart, after_death

log = logging.getLogger("modelbridge.supervisor")

READY_FD_ENV = "MODELBRIDGE_READY_FD"
STANDBY_ENV = "MODELBRIDGE_STANDBY"
WORKER = "worker"
WRITER = "usage writer"
SPARE = "spare worker"
GO = signal.SIGUSR1  # to a spare: bind and serve
SLOW_TICK_S = 1.0  # the longest wait between two looks at the children when no signal comes


@dataclass
class Child:
    """One slot: the command that starts it and the process now in it (None while it waits)."""

    kind: str  # WORKER, WRITER or SPARE
    name: str  # as logged: "worker 1", "usage writer"
    cmd: list[str]
    env: dict[str, str]
    session: bool = False  # a session of its own: a terminal's Ctrl-C reaches it only through us
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    died: float | None = None  # when the process in the slot was found dead (until replaced)
    due: float | None = None  # when to start it again
    crashes: int = 0
    ready: bool = False  # a worker listens; a spare waits for GO
    history: list[float] = field(default_factory=list)  # seconds from death to ready, per restart


class Supervisor:
    """``env_for(child)`` gives each worker or spare process it starts its environment (the
    worker id: a new one per process, so that each has a settle journal of its own)."""

    def __init__(
        self,
        *,
        on_worker_dead: Callable[[int], None] = lambda pid: None,
        env_for: Callable[[Child], dict[str, str]] = lambda child: child.env,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children: list[Child] = []
        self.spare: Child | None = None
        self.stopping = False
        self._on_worker_dead = on_worker_dead
        self._env_for = env_for
        self._clock = clock
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._pending = b""

    def add(self, child: Child) -> Child:
        self.children.append(child)
        self._spawn(child)
        return child

    def keep_spare(self, spare: Child) -> None:
        """Keep a started spare worker from now on: a dead worker's slot takes it (a signal,
        milliseconds) instead of a process that starts from nothing (seconds)."""
        self.spare = spare
        self._spawn(spare)

    def workers(self) -> list[Child]:
        return [c for c in self.children if c.kind == WORKER]

    def _all(self) -> list[Child]:
        return self.children + ([self.spare] if self.spare is not None else [])

    @property
    def ready_fd(self) -> int:
        """The pipe's read end, for a caller that waits with ``select``."""
        return self._ready_r

    def all_ready(self) -> bool:
        return all(c.ready for c in self.workers())

    def _spawn(self, child: Child) -> None:
        env = self._env_for(child)
        env[PARENT_ENV] = str(os.getpid())  # it ends when we do, even by kill -9 (lifeline)
        pass_fds: tuple[int, ...] = ()
        if child.kind in (WORKER, SPARE):
            env[READY_FD_ENV] = str(self._ready_w)
            pass_fds = (self._ready_w,)
        if child.kind == SPARE:
            env[STANDBY_ENV] = "1"
        child.proc = subprocess.Popen(
            child.cmd, env=env, start_new_session=child.session, pass_fds=pass_fds
        )
        child.started, child.due, child.ready = self._clock(), None, False

    def tick(self) -> None:
        """Read the readiness lines, note the dead, start what is due."""
        self._read_ready()
        now = self._clock()
        for child in self._all():
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                self._dead(child, proc, now)
        for child in self._all():
            if child.proc is not None or child.due is None or now < child.due:
                continue
            if self.stopping and child.kind != WRITER:
                continue
            if child.kind == WORKER and self._promote(child):
                continue
            self._spawn(child)

    def pids(self) -> set[int]:
        """The children's processes, as far as the last tick knows them alive."""
        return {child.proc.pid for child in self._all() if child.proc is not None}

    def next_due_s(self) -> float:
        """How long the caller may wait before the next :meth:`tick` when no child ends and no
        line comes: until the next restart due, at most ``SLOW_TICK_S``."""
        now = self._clock()
        waits = [
            child.due - now
            for child in self._all()
            if child.proc is None
            and child.due is not None
            and not (self.stopping and child.kind != WRITER)
        ]
        return max(0.0, min([SLOW_TICK_S, *waits]))

    def _promote(self, child: Child) -> bool:
        """Put the spare, if it waits, in ``child``'s slot; a new spare starts at once."""
        spare = self.spare
        if spare is None or spare.proc is None or not spare.ready:
            return False
        proc = spare.proc
        try:
            proc.send_signal(GO)
        except ProcessLookupError:
            return False
        child.proc, child.started, child.due, child.ready = proc, self._clock(), None, False
        spare.proc, spare.ready, spare.due = None, False, self._clock()
        return True

    def _dead(self, child: Child, proc: subprocess.Popen[bytes], now: float) -> None:
        child.proc, child.ready = None, False
        if child.kind != WRITER:
            self._on_worker_dead(proc.pid)
        if self.stopping and child.kind != WRITER:
            return  # a worker that stops as asked
        if child.died is None:
            child.died = now
        restart: Restart = after_death(child.crashes, now - child.started)
        child.crashes, child.due = restart.crashes, now + restart.delay_s
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if restart.delay_s:
            log.warning(
                "%s (pid %d) died (%s), %d times in a row soon after start: "
                "starting it again in %.1f s",
                child.name,
                proc.pid,
                how,
                restart.crashes,
                restart.delay_s,
            )
        else:
            log.warning("%s (pid %d) died (%s): starting it again", child.name, proc.pid, how)

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._ready_r, 4096):
                self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            what, _, pid = line.decode(errors="replace").partition(" ")
            with contextlib.suppress(ValueError):
                self._reported(what, int(pid))

    def _reported(self, what: str, pid: int) -> None:
        for child in self._all():
            if child.proc is None or child.proc.pid != pid:
                continue
            child.ready = True
            if child.kind == WORKER and child.died is not None:
                took = self._clock() - child.died
                child.history.append(took)
                child.died = None
                log.info(
                    "%s replaced: pid %d listens, %.2f s after the death", child.name, pid, took
                )
            elif child.kind == SPARE:
                child.died = None
                log.info("spare worker (pid %d) started: it waits to replace a worker", pid)

    def signal_workers(self, signum: int) -> None:
        """Stop restarting workers and pass ``signum`` on to those alive (the spare too)."""
        self.stopping = True
        for child in self._all():
            if child.kind != WRITER and child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def workers_alive(self) -> bool:
        return any(
            c.proc is not None and c.proc.poll() is None for c in self._all() if c.kind != WRITER
        )

    def stop_writer(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the writer (it drains what the workers' last streams settled), SIGKILL when
        it hangs; no restart after this."""
        for child in self.children:
            if child.kind != WRITER:
                continue
            proc, child.proc, child.due = child.proc, None, None
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.error(
                    "usage writer did not stop in %ss; killing it (records stay in Redis)",
                    timeout_s,
                )
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for fd in (self._ready_r, self._ready_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class ExitWatch:
    """The children's ends in an asyncio loop: a reader on each child's pidfd (readable once it
    has ended) calls ``on_exit``. :meth:`sync` after each tick follows the children the
    supervisor has now. Where pidfds are missing (Linux < 5.3) :attr:`polling` is set: the caller
    falls back to a short timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        self._loop = loop
        self._on_exit = on_exit
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self.polling = not hasattr(os, "pidfd_open")

    def sync(self, pids: set[int]) -> None:
        for pid in [p for p in self._fds if p not in pids]:
            self._drop(pid)
        for pid in pids - self._fds.keys():
            if self.polling:
                return
            try:  # not reaped yet (only the supervisor reaps): the pid is still this child's
                fd = os.pidfd_open(pid)
            except OSError:
                self.polling = True
                return
            self._fds[pid] = fd
            self._loop.add_reader(fd, self._on_exit)

    def _drop(self, pid: int) -> None:
        fd = self._fds.pop(pid)
        self._loop.remove_reader(fd)
        os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self._drop(pid)


class ChildSignals:
    """SIGCHLD, and the stop signals, as a readable pipe (``signal.set_wakeup_fd``) for a loop
    that waits in ``select``: a child's end wakes it at once instead of at its next poll. Only in
    the main thread; :meth:`close` puts back what was there."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        # A handler, even one that does nothing, is what makes the signal reach the pipe.
        self._old_handler = signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    @property
    def fd(self) -> int:
        return self._r

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass

    def close(self) -> None:
        signal.signal(signal.SIGCHLD, self._old_handler)
        signal.set_wakeup_fd(self._old_fd)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def report(what: str) -> None:
    """In a worker: tell the parent (when it asked) that it ``listens`` (its socket is bound) or,
    a spare, that it is ``waiting`` for GO (its handler is in place)."""
    fd = os.environ.get(READY_FD_ENV)
    if fd:
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), f"{what} {os.getpid()}\n".encode())


def standby() -> bool:
    """In a worker: whether it was started as the spare."""
    return os.environ.get(STANDBY_ENV) == "1"
