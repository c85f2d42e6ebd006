"""What `skylab run` shows on the terminal: a live progress line per trial."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from skylab_trainer.progress import Progress

# Without a terminal (CI, a log file) progress is printed at most this often.
PLAIN_PROGRESS_INTERVAL_SECONDS = 5.0


class Console:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._last_plain = 0.0
        self._line_open = False

    def say(self, message: str) -> None:
        self._close_line()
        print(message, file=self.stream, flush=True)

    def progress(self, label: str, progress: Progress) -> None:
        parts = [f"{label} step {progress.step}"]
        if progress.loss is not None:
            parts.append(f"loss {progress.loss:.4f}")
        if progress.tokens_per_second is not None:
            parts.append(f"{_si(progress.tokens_per_second)} tok/s")
        if progress.seconds_left is not None:
            parts.append(f"{progress.seconds_left:.0f}s left")
        line = " | ".join(parts)
        if self.live:
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()
            self._line_open = True
        elif time.monotonic() - self._last_plain >= PLAIN_PROGRESS_INTERVAL_SECONDS:
            self._last_plain = time.monotonic()
            print(line, file=self.stream, flush=True)

    def _close_line(self) -> None:
        if self._line_open:
            self.stream.write("\r\033[K")
            self._line_open = False


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
