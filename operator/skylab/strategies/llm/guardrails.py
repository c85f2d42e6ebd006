"""Checks on a proposal before any GPU time is spent on it.

Each finding is a message for the model, which gets a bounded number of chances to
fix it: no change at all, an edited Python file that does not compile, and a change
identical to an earlier trial's.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from skylab.strategies.base import PastTrial


def problem(
    changes: Mapping[str, str], original: Mapping[str, str], history: Sequence[PastTrial]
) -> str | None:
    """What is wrong with CHANGES (path -> new content), or None."""
    if not changes:
        return (
            "You made no change to any editable file. Make one focused change with the tool, "
            "then reply with the CHANGE line."
        )
    for name, content in changes.items():
        if not name.endswith(".py"):
            continue
        try:
            compile(content, name, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"line {exc.lineno}" if exc.lineno else "somewhere"
            code = (exc.text or "").rstrip()
            return (
                f"{name} does not compile: {exc.msg} ({where}){': ' + code if code else ''}. "
                "Fix it with the tool, then reply with the CHANGE line again."
            )
    signature = change_signature(changes, original)
    for trial in history:
        if trial.diff and diff_signature(trial.diff) == signature:
            return (
                f"This exact change was already tried as trial #{trial.number} ({trial.outcome}: "
                f"{trial.description}). Undo it and try something different."
            )
    return None


def change_signature(changes: Mapping[str, str], original: Mapping[str, str]) -> list[str]:
    """The removed and added lines of CHANGES, file by file, without context or positions."""
    lines: list[str] = []
    for name in sorted(changes):
        diff = difflib.unified_diff(
            original[name].splitlines(), changes[name].splitlines(), lineterm="", n=0
        )
        lines.append(f"file {name}")
        lines += [line for line in diff if _changed_line(line)]
    return lines


def diff_signature(diff: str) -> list[str]:
    """The same signature, read from a stored `git diff` of a trial."""
    lines: list[str] = []
    for line in diff.splitlines():
        if line.startswith("+++ "):
            path = line[4:].removeprefix("b/")
            lines.append(f"file {path}")
        elif _changed_line(line):
            lines.append(line)
    return lines


def _changed_line(line: str) -> bool:
    return line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
