"""bench/operator_reaction.py: the operator against a cluster in a process of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_bench_runs_every_trial_and_prints_its_figures() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "operator_reaction.py"),
            "--campaigns",
            "2",
            "--trials",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"campaigns 2 x 3 trials: 6 Jobs run in [0-9.]+s", out), out
    # Two gaps in each campaign: after its first and its second Job.
    gaps = re.search(r"over 4 gaps: p50 ([0-9]+) ms, p95 ([0-9]+) ms, max ([0-9]+) ms", out)
    assert gaps, out
    p50, p95, most = map(int, gaps.groups())
    assert 0 < p50 <= p95 <= most
    assert re.search(r"throughput: [0-9.]+ trials/s", out), out
    assert re.search(
        r"CPU per trial: operator [0-9]+ ms, cluster \(emulator and kubelet\) [0-9]+ ms", out
    )


def test_bad_arguments_are_refused_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "operator_reaction.py"), "--trials", "30"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--trials between 1 and 21" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # usage, then the one-line error
