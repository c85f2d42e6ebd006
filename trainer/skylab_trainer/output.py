"""What happens to a trial command's output: split into lines, echoed, logged, tailed."""

from __future__ import annotations

import codecs
import contextlib
import re
from collections import deque
from pathlib import Path
from typing import BinaryIO

# A line is cut here even without a terminator, so one endless progress bar cannot
# grow memory without bound.
MAX_LINE_CHARS = 16_384
# Enough lines to still hold the summary block when a few warnings follow it.
TAIL_LINES = 200

_TERMINATOR = re.compile(r"\r\n|\r|\n")


class LineSplitter:
    """Turns a byte stream into lines ended by '\\n', '\\r\\n' or a lone '\\r'.

    Progress bars redraw with '\\r'; each redraw becomes its own line so that a
    reader following the stream line by line sees every update. A '\\r' that
    starts a redraw right after a line ended yields no empty line.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> list[str]:
        return self._split(self._pending + self._decoder.decode(data), final=False)

    def close(self) -> list[str]:
        return self._split(self._pending + self._decoder.decode(b"", final=True), final=True)

    def _split(self, text: str, final: bool) -> list[str]:
        lines: list[str] = []
        start = 0
        for match in _TERMINATOR.finditer(text):
            # A trailing '\r' may be the first half of a '\r\n' still in the pipe.
            if match.group() == "\r" and match.end() == len(text) and not final:
                break
            segment = text[start : match.start()]
            if segment or match.group() != "\r":
                lines.extend(_cut(segment))
            start = match.end()
        pieces = _cut(text[start:])
        # The last piece is unterminated: keep it for the next read unless we are done.
        self._pending = "" if final else pieces.pop()
        lines.extend(piece for piece in pieces if piece)
        return lines


def _cut(text: str) -> list[str]:
    """Pieces of at most MAX_LINE_CHARS; an empty text is one empty piece."""
    return [text[i : i + MAX_LINE_CHARS] for i in range(0, len(text), MAX_LINE_CHARS)] or [""]


class OutputSink:
    """Echoes each line to our stdout (flushed), writes it to the log, keeps a tail."""

    def __init__(self, echo: BinaryIO, log_path: Path | None) -> None:
        self._splitter = LineSplitter()
        self._log = log_path.open("wb") if log_path else None
        self._outputs = [echo] if self._log is None else [echo, self._log]
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def write(self, data: bytes) -> None:
        self._emit(self._splitter.feed(data))

    def close(self) -> None:
        self._emit(self._splitter.close())
        if self._log:
            # A log that failed to write fails to flush again here; its fd closes anyway.
            with contextlib.suppress(OSError):
                self._log.close()

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        self.tail.extend(lines)
        data = "".join(line + "\n" for line in lines).encode()
        for output in list(self._outputs):
            try:
                output.write(data)
                output.flush()
            except OSError:
                # Our reader went away or the disk is full: the trial and its report go on.
                self._outputs.remove(output)
