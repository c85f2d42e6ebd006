"""A campaign's record as people read it: a table, autoresearch's results.tsv, the best trial."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from skylab.errors import UserError
from skylab.store.db import TrialRecord
from skylab.strategies.base import Usage

NONE = "—"  # a value a trial has not got (yet)
# results.tsv lists what was trained: killed and running trials were interrupted, and
# skipped proposals never ran.
_EXPORTED = frozenset({"success", "crash", "timeout"})
_RIGHT_ALIGNED = frozenset({0, 2, 3, 4, 5, 8})  # the numeric columns of format_table


def decision(trial: TrialRecord) -> str:
    if trial.kept is None:
        return NONE
    return "kept" if trial.kept else "reverted"


def format_table(trials: Sequence[TrialRecord], metric_name: str) -> str:
    """An aligned table of the trials, in number order: each one's mean over its runs, their
    standard deviation and count; LLM usage columns when there is any."""
    llm = any(trial.usage.total_tokens for trial in trials)
    usage_header = ("tokens", "llm_usd") if llm else ()
    rows = [
        (
            "#",
            "commit",
            metric_name,
            "sd",
            "runs",
            "memory_gb",
            "status",
            "decision",
            "duration",
            *usage_header,
            "description",
        )
    ]
    rows += [
        (
            str(trial.number),
            trial.commit[:7],
            NONE if trial.metric is None else f"{trial.metric:.6f}",
            NONE if trial.metric_sd is None or trial.run_count < 2 else f"{trial.metric_sd:.6f}",
            str(trial.run_count),
            _memory_gb(trial),
            trial.status,
            decision(trial),
            _duration(trial.duration_seconds),
            *((_tokens(trial.usage.total_tokens), f"{trial.usage.cost_usd:.4f}") if llm else ()),
            _one_line(trial.description),
        )
        for trial in _in_order(trials)
    ]
    right_aligned = _RIGHT_ALIGNED | ({9, 10} if llm else set())
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def usage_line(trials: Sequence[TrialRecord]) -> str | None:
    """The campaign's LLM spend in one line, or None when no model was called."""
    used = [trial.usage for trial in trials if trial.usage.total_tokens]
    if not used:
        return None
    total = sum(used, Usage())
    return (
        f"LLM: {len(used)} proposals, {_tokens(total.input_tokens)} input, "
        f"{_tokens(total.output_tokens)} output, {_tokens(total.cache_read_tokens)} cache-read "
        f"and {_tokens(total.cache_write_tokens)} cache-write tokens, "
        f"about ${total.cost_usd:.4f}"
    )


def export_tsv(
    trials: Sequence[TrialRecord], path: Path, metric_name: str, *, overwrite: bool = False
) -> int:
    """Write autoresearch's results.tsv for the trials; return the number of rows.

    Columns: commit, the metric, memory_gb, status (keep, discard or crash; a timeout
    is a crash) and description. A crash has 0.000000 and 0.0 for metric and memory.
    """
    lines = [f"commit\t{metric_name}\tmemory_gb\tstatus\tdescription\n"]
    for trial in _in_order(trials):
        if trial.status not in _EXPORTED:
            continue
        if trial.status == "success":
            metric = f"{trial.metric or 0.0:.6f}"
            memory = f"{(trial.peak_vram_mb or 0.0) / 1024:.1f}"
            status = "keep" if trial.kept else "discard"
        else:
            metric, memory, status = "0.000000", "0.0", "crash"
        description = re.sub(r"[\t\r\n]", " ", trial.description)
        lines.append(f"{trial.commit[:7]}\t{metric}\t{memory}\t{status}\t{description}\n")
    try:
        with path.open("w" if overwrite else "x", encoding="utf-8", newline="") as file:
            file.writelines(lines)
    except FileExistsError:
        raise UserError(f"{path} already exists: refusing to overwrite it") from None
    return len(lines) - 1


def best_line(trial: TrialRecord) -> str:
    """One line on the best trial, for `skylab history --best`."""
    metric = NONE if trial.metric is None else f"{trial.metric:.6f}"
    return (
        f"best: #{trial.number} {trial.commit[:7]} {trial.metric_name or 'metric'} {metric},"
        f" {_memory_gb(trial)} GB, {_duration(trial.duration_seconds)}:"
        f" {_one_line(trial.description)}"
    )


def _in_order(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    return sorted(trials, key=lambda trial: trial.number)


def _memory_gb(trial: TrialRecord) -> str:
    return NONE if trial.peak_vram_mb is None else f"{trial.peak_vram_mb / 1024:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def _tokens(count: int) -> str:
    if count < 1000:
        return str(count)
    if count < 1_000_000:
        return f"{count / 1000:.1f}k"
    return f"{count / 1_000_000:.2f}M"


def _one_line(text: str) -> str:
    return " ".join(text.split())
