"""Durations as people write them: 90s, 20m, 8h, 1d, sums such as 1h30m, or bare seconds."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PART = re.compile(rf"({_NUMBER.pattern})([smhd])")
_WHOLE = re.compile(rf"(?:{_PART.pattern})+")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float | None:
    """Seconds in TEXT, or None when it is not a duration."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _WHOLE.fullmatch(text):
        return None
    return sum(float(value) * _UNIT_SECONDS[unit] for value, unit in _PART.findall(text))
