"""The final report of one trial: the one JSON document a trial leaves behind."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# A Pod's termination message is capped at 4096 bytes; a report must fit in it.
MAX_REPORT_BYTES = 4096
# Kubernetes bind-mounts this file into the container: it can't be renamed over.
TERMINATION_LOG = Path("/dev/termination-log")


class RunStatus(StrEnum):
    SUCCESS = "success"  # ran to completion and printed the metric
    CRASH = "crash"  # non-zero exit, or no metric in the summary
    TIMEOUT = "timeout"  # outlived its max wall time and was killed
    KILLED = "killed"  # stopped from outside (Ctrl-C, SIGTERM, eviction)


@dataclass
class RunReport:
    status: RunStatus
    metric_name: str
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    duration_seconds: float = 0.0
    message: str = ""
    log_tail: str = ""

    @property
    def peak_vram_mb(self) -> float | None:
        return self.metrics.get("peak_vram_mb")

    def to_json(self, max_bytes: int = MAX_REPORT_BYTES) -> str:
        """Serialise, keeping only as much of the log tail's end as fits in max_bytes."""
        data: dict[str, Any] = asdict(self)
        data["status"] = str(self.status)
        # JSON has no NaN; a diverged run reports its metric as null plus a message.
        data["metric"] = _finite_or_none(self.metric)
        data["metrics"] = {k: v for k, v in self.metrics.items() if math.isfinite(v)}
        data["log_tail"] = ""
        room = max_bytes - len(json.dumps(data, sort_keys=True).encode())
        data["log_tail"] = _fitting_end(self.log_tail, room)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunReport:
        data = json.loads(text)
        return cls(
            status=RunStatus(data["status"]),
            metric_name=str(data["metric_name"]),
            metric=data.get("metric"),
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
            exit_code=data.get("exit_code"),
            duration_seconds=float(data.get("duration_seconds") or 0.0),
            message=str(data.get("message") or ""),
            log_tail=str(data.get("log_tail") or ""),
        )


def _fitting_end(text: str, room: int) -> str:
    """The longest end of `text` whose JSON string form takes at most `room` more bytes."""
    if room <= 0:
        return ""
    # Escapes make a character cost one byte or more, never less: no longer end can fit.
    text = text[-room:]
    low, high = 0, len(text)  # binary search for the earliest start that fits
    while low < high:
        middle = (low + high) // 2
        if _json_string_bytes(text[middle:]) <= room:
            high = middle
        else:
            low = middle + 1
    return text[low:]


def _json_string_bytes(text: str) -> int:
    return len(json.dumps(text).encode()) - len('""')


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def write_report(report: RunReport, path: Path) -> None:
    """Write the report so a reader never sees half of it.

    A regular file is replaced atomically (temp file + rename). The termination log
    and other special files (a FIFO, /dev/stdout) are written in place.
    """
    text = report.to_json()
    if path == TERMINATION_LOG or not _is_regular_or_absent(path):
        with path.open("w", encoding="utf-8") as out:
            out.write(text)
        return
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _is_regular_or_absent(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        return True
