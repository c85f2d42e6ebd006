"""Running one command in its own process group, under a wall-time limit.

The command runs in a new session, so its whole process tree (torchrun workers,
dataloader processes, anything it forks) shares one process group that can be
signalled at once. It is stopped when it outlives its wall time or when we are
asked to stop: SIGTERM to the group, a grace period, then SIGKILL to the group.
Stragglers left behind by a command that exited on its own get the same treatment.
"""

from __future__ import annotations

import math
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

# How often we look at the clock and the child while no output arrives.
POLL_SECONDS = 0.1
# After SIGKILL the kernel needs a moment; a process stuck in the kernel (D state)
# may never go, and then we report without waiting for it.
KILL_WAIT_SECONDS = 5.0
# Output still in flight once the group is gone. A process that left the group
# (setsid) may hold the pipe open forever; we don't wait for it.
DRAIN_SECONDS = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROC = Path("/proc")

OutputHandler = Callable[[bytes], None]
_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class StopReason(StrEnum):
    TIMEOUT = "timeout"  # the command outlived its max wall time
    SIGNAL = "signal"  # we were sent SIGTERM or SIGINT


class GroupEnd(StrEnum):
    """How the process group ended up empty, or didn't."""

    EXITED = "exited"  # nothing was left when the command exited
    SIGTERM = "sigterm"  # gone within the grace period after SIGTERM
    SIGKILL = "sigkill"  # needed SIGKILL
    UNKILLABLE = "unkillable"  # still there after SIGKILL (stuck in the kernel)


@dataclass(frozen=True)
class Limits:
    max_wall_time: float | None  # seconds; None means no limit
    kill_grace: float  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # negative: killed by that signal; None: would not die
    duration_seconds: float
    stopped_by: StopReason | None = None
    stop_signal: int | None = None  # the signal we received, when stopped_by is SIGNAL
    group_end: GroupEnd = GroupEnd.EXITED


def supervise(
    command: str,
    cwd: Path,
    env: Mapping[str, str],
    limits: Limits,
    on_output: OutputHandler,
) -> RunResult:
    """Run `command` through /bin/sh, feeding its merged stdout+stderr to `on_output`."""
    with _StopSignals() as stop:
        start = time.monotonic()
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None  # stdout=PIPE
        pipe = _Pipe(proc.stdout, on_output)
        try:
            deadline = start + (limits.max_wall_time or math.inf)
            stopped_by = _wait_for_exit(proc, pipe, deadline, stop)
            group_end = _end_group(proc, pipe, limits.kill_grace)
            pipe.drain(DRAIN_SECONDS)
        except BaseException:
            # Whatever went wrong here, never leave a training run behind holding a GPU.
            _signal_group(proc.pid, signal.SIGKILL)
            raise
        finally:
            pipe.close()
        return RunResult(
            exit_code=proc.poll(),
            duration_seconds=time.monotonic() - start,
            stopped_by=stopped_by,
            stop_signal=stop.signum if stopped_by is StopReason.SIGNAL else None,
            group_end=group_end,
        )


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag while the command runs, so we can stop it
    cleanly and still write a report instead of dying on the spot."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, _SignalHandler] = {}

    def __enter__(self) -> _StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum


class _Pipe:
    """Non-blocking reads of the child's output with a timeout."""

    def __init__(self, stream: IO[bytes], on_output: OutputHandler) -> None:
        self._stream = stream
        self._on_output = on_output
        self._poller = select.poll()
        self._poller.register(stream.fileno(), select.POLLIN)
        self.eof = False

    def pump(self, timeout: float) -> None:
        """Hand over what arrives within `timeout` seconds (one read at most)."""
        if self.eof:
            time.sleep(timeout)
            return
        if self._poller.poll(max(timeout, 0.0) * 1000):
            data = os.read(self._stream.fileno(), 65536)
            if data:
                self._on_output(data)
            else:
                self.eof = True

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            self.pump(min(POLL_SECONDS, left))

    def close(self) -> None:
        self._stream.close()


def _wait_for_exit(
    proc: subprocess.Popen[bytes], pipe: _Pipe, deadline: float, stop: _StopSignals
) -> StopReason | None:
    """Relay output until the child exits (None) or must be stopped (why)."""
    while proc.poll() is None:
        if stop.signum is not None:
            return StopReason.SIGNAL
        left = deadline - time.monotonic()
        if left <= 0:
            return StopReason.TIMEOUT
        pipe.pump(min(POLL_SECONDS, left))
    return None


def _end_group(proc: subprocess.Popen[bytes], pipe: _Pipe, grace: float) -> GroupEnd:
    """SIGTERM the group, then SIGKILL what is left after `grace`.

    The child leads its session, so the group id is its pid; the group outlives the
    child for as long as any grandchild does.
    """
    group = proc.pid
    if not _signal_group(group, signal.SIGTERM):
        return GroupEnd.EXITED
    if _wait_until_gone(group, pipe, grace):
        return GroupEnd.SIGTERM
    _signal_group(group, signal.SIGKILL)
    if _wait_until_gone(group, pipe, KILL_WAIT_SECONDS):
        return GroupEnd.SIGKILL
    return GroupEnd.UNKILLABLE


def _wait_until_gone(group: int, pipe: _Pipe, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_has_live_members(group):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pipe.pump(min(POLL_SECONDS, left))
    return True


def _group_has_live_members(group: int) -> bool:
    """Whether a process of the group still runs.

    Zombies don't count: they are dead and only wait for their parent to reap them,
    which for orphans is an init that may be slow (or us, as PID 1 of a container).
    """
    if not _signal_group(group, 0):
        return False
    if not PROC.is_dir():
        return True  # no /proc (not Linux): the group exists, assume it lives
    for stat_file in PROC.glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses; fields follow the last ')'.
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process went away while we looked
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state not in ("Z", "X"):
            return True
    return False


def _signal_group(group: int, signum: int) -> bool:
    """Signal every process in the group; False when the group is already empty."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member we may not signal (it changed user); the group still exists.
        return True
    return True
