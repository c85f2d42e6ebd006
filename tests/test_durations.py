"""Durations as the CLI (--budget) and the Campaign (budget.wallClock) take them."""

from __future__ import annotations

import pytest

from skylab.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("20m", 1200.0),
        ("8h", 28800.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("2.5m", 150.0),
        (" 45s ", 45.0),
    ],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h 30m", "-5m", "1.h", "m30"])
def test_what_is_not_a_duration_is_none(text: str) -> None:
    assert parse_duration(text) is None
