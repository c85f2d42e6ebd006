"""Reading results out of a finished run's output.

autoresearch's train.py ends with a summary block:

    ---
    val_bpb:          0.997900
    training_seconds: 300.1
    peak_vram_mb:     45060.2

Every numeric `name: value` line after the last `---` line is a metric.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SEPARATOR = "---"
_METRIC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*(\S+)\s*$")


def parse_summary(lines: Iterable[str]) -> dict[str, float]:
    """The metrics of the summary block, or {} when there is no `---` line."""
    block: list[str] | None = None
    for line in lines:
        if line.rstrip() == SEPARATOR:
            block = []
        elif block is not None:
            block.append(line)
    metrics: dict[str, float] = {}
    for line in block or []:
        match = _METRIC_LINE.match(line)
        if match:
            value = to_float(match.group(2))
            if value is not None:
                metrics[match.group(1)] = value
    return metrics


def find_metric(text: str, pattern: re.Pattern[str]) -> str | None:
    """The first group of the pattern's last match: the run's final word wins."""
    value: str | None = None
    for match in pattern.finditer(text):
        value = match.group(1)
    return value


def to_float(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None
