"""Per-step progress lines: the format train.py prints and the control plane follows.

A progress line looks like

    step 00042 | loss 4.123456 | dt 312ms | tok/s 1,234,567 | mfu 39.7% | done 42.0% | left 174s

Fields are separated by " | ", each a name then a value. Only `step` is required;
unknown fields are ignored so train.py can add its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Progress:
    step: int
    loss: float | None = None
    tokens_per_second: float | None = None
    percent_done: float | None = None
    seconds_left: float | None = None


def parse_progress(line: str) -> Progress | None:
    """Return the progress a line reports, or None when it is not a progress line."""
    line = line.strip()
    if not line.startswith("step "):
        return None
    fields: dict[str, float] = {}
    for part in line.split(" | "):
        name, _, raw = part.strip().partition(" ")
        match = _NUMBER.search(raw)
        if match:
            try:
                fields[name] = float(match.group().replace(",", ""))
            except ValueError:
                continue
    if "step" not in fields:
        return None
    return Progress(
        step=int(fields["step"]),
        loss=fields.get("loss"),
        tokens_per_second=fields.get("tok/s"),
        percent_done=fields.get("done"),
        seconds_left=fields.get("left"),
    )
