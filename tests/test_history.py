"""History as people read it: the table, results.tsv and the best line."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from skylab.engine import Status
from skylab.errors import UserError
from skylab.history import best_line, export_tsv, format_table
from skylab.store import TrialRecord
from skylab.strategies.base import Usage

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _trial(
    number: int,
    status: Status,
    kept: bool | None,
    metric: float | None = None,
    peak_vram_mb: float | None = None,
    description: str = "",
    duration_seconds: float | None = 300.0,
    sd: float | None = None,
    runs: int = 1,
) -> TrialRecord:
    return TrialRecord(
        id=100 + number,
        campaign_id=1,
        number=number,
        is_baseline=number == 1,
        commit=f"{number}abcdef0123456789",
        parent_commit=None,
        strategy="sweep",
        description=description or f"trial {number}",
        rationale="",
        diff="",
        params={},
        status=status,
        kept=kept,
        decision_reason="",
        metric_name=None if status == "running" else "val_bpb",
        metric=metric,
        metric_sd=sd,
        run_count=0 if status in ("running", "killed") else runs,
        metrics={},
        peak_vram_mb=peak_vram_mb,
        exit_code=None,
        duration_seconds=None if status == "running" else duration_seconds,
        message="",
        log_tail="",
        usage=Usage(),
        created_at=NOW,
        started_at=NOW,
        finished_at=None if status == "running" else NOW,
    )


# A mixed history, out of order as a caller might pass it.
HISTORY = [
    _trial(6, "success", True, 0.9932, 46080.0, "raise LR\tto 0.04\nand warm up longer"),
    _trial(1, "success", True, 0.9979, 45060.2, "baseline", sd=0.0041, runs=3),
    _trial(2, "success", False, 1.005, 45100.0, "deeper model"),
    _trial(3, "crash", False, None, None, "wider MLP"),
    _trial(4, "timeout", False, None, 44000.0, "bigger batch"),
    _trial(5, "killed", False, None, None, "interrupted"),
    _trial(7, "running", None, description="in flight"),
]

EXPECTED_TSV = (
    "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
    "1abcdef\t0.997900\t44.0\tkeep\tbaseline\n"
    "2abcdef\t1.005000\t44.0\tdiscard\tdeeper model\n"
    "3abcdef\t0.000000\t0.0\tcrash\twider MLP\n"
    "4abcdef\t0.000000\t0.0\tcrash\tbigger batch\n"
    "6abcdef\t0.993200\t45.0\tkeep\traise LR to 0.04 and warm up longer\n"
)


def test_export_writes_autoresearchs_results_tsv(tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"

    assert export_tsv(HISTORY, path, "val_bpb") == 5

    assert path.read_bytes() == EXPECTED_TSV.encode()


def test_export_names_the_metric_column(tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    export_tsv([], path, "accuracy")
    assert path.read_text() == "commit\taccuracy\tmemory_gb\tstatus\tdescription\n"


def test_export_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    path.write_text("precious\n")

    with pytest.raises(UserError, match="already exists"):
        export_tsv(HISTORY, path, "val_bpb")
    assert path.read_text() == "precious\n"

    export_tsv(HISTORY, path, "val_bpb", overwrite=True)
    assert path.read_text() == EXPECTED_TSV


def test_table_shows_each_decision_aligned() -> None:
    lines = format_table(HISTORY, "val_bpb").splitlines()

    header, rows = lines[0], lines[1:]
    assert header.split() == [
        "#",
        "commit",
        "val_bpb",
        "sd",
        "runs",
        "memory_gb",
        "status",
        "decision",
        "duration",
        "description",
    ]
    cells = [row.split() for row in rows]
    assert [(cell[0], cell[6], cell[7]) for cell in cells] == [
        ("1", "success", "kept"),
        ("2", "success", "reverted"),
        ("3", "crash", "reverted"),
        ("4", "timeout", "reverted"),
        ("5", "killed", "reverted"),
        ("6", "success", "kept"),
        ("7", "running", "—"),
    ]
    assert cells[0][1:6] == ["1abcdef", "0.997900", "0.004100", "3", "44.0"]
    assert cells[1][2:6] == ["1.005000", "—", "1", "44.0"]  # one run: no spread
    assert cells[2][2:6] == ["—", "—", "1", "—"]  # a crash has neither metric nor memory
    assert rows[5].endswith("raise LR to 0.04 and warm up longer")
    # Every description starts in the same column as its heading.
    column = header.index("description")
    assert all(row[column - 2 : column] == "  " and row[column] != " " for row in rows)
    assert "5m00s" in rows[0]


def test_best_line_names_the_trial() -> None:
    line = best_line(HISTORY[0])

    assert line.startswith("best: #6 6abcdef val_bpb 0.993200, 45.0 GB, 5m00s:")
    assert line.endswith("raise LR to 0.04 and warm up longer")
