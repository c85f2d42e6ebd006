"""What the model reads: a static prefix (tools, rules, program.md) and the campaign's memory.

The static prefix is the same for every proposal of a campaign and carries a 1-hour
cache breakpoint (a trial takes longer than the default 5 minutes). The memory is
bounded: the last `history_trials` trials, cut descriptions, and one crash log tail,
so a prompt's size does not grow with the campaign's length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from skylab.config import ExperimentConfig
from skylab.strategies.base import PastTrial, ProposalContext
from skylab.strategies.llm.editor import TOOL_NAME, TOOL_TYPE

MAX_DESCRIPTION_CHARS = 120
MAX_CRASH_LOG_CHARS = 3000
CACHE_1H: dict[str, str] = {"type": "ephemeral", "ttl": "1h"}

RULES = """\
You are the research strategy of skylab, an automated loop that improves an ML \
experiment one trial at a time: you propose one focused change, skylab commits it, \
trains for a fixed time budget, measures the metric and keeps the change only if it \
beats the best result so far.

How to work:
- Edit files only with the {tool} tool. Paths are relative to the experiment \
directory, for example `train.py`.
- You may edit: {editable}. You may read: {frozen}. Anything else is refused.
- Make ONE focused change per proposal, small enough to judge by its result. Do not \
repeat a change the trial table shows was already tried.
- The edited files must stay valid Python that runs within the time budget.
- When the edit is done, reply with a final message whose first line is \
`CHANGE: <what you changed, in one line>` followed by a short rationale.

The experiment's own rules follow."""


def tools() -> list[dict[str, Any]]:
    return [{"type": TOOL_TYPE, "name": TOOL_NAME}]


def system(config: ExperimentConfig, program: str) -> list[dict[str, Any]]:
    """The rules and program.md; the breakpoint caches tools and system together."""
    frozen = ", ".join(config.search.frozen_files) or "nothing else"
    rules = RULES.format(
        tool=TOOL_NAME, editable=", ".join(config.search.editable_files), frozen=frozen
    )
    return [
        {"type": "text", "text": rules},
        {"type": "text", "text": program or "(no program.md)", "cache_control": CACHE_1H},
    ]


def memory(context: ProposalContext, history_trials: int, files: Mapping[str, str]) -> str:
    """The first user message: goal, best so far, recent trials, last crash, and FILES
    (the parent commit's content of each editable file)."""
    config = context.experiment
    search = config.search
    finished = [t for t in context.history if t.status != "running"]
    sections = [_goal(config, context.best, len(finished))]
    if history_trials and context.history:
        sections.append(_table(context.history, search.metric, history_trials))
    crashed = _last_crash(context.history)
    if crashed is not None:
        tail = crashed.log_tail[-MAX_CRASH_LOG_CHARS:]
        sections.append(
            f"## Last crashed trial: #{crashed.number} {_cut(crashed.description)}\n"
            f"Its log ended with:\n```\n{tail}\n```"
        )
    shown = [f"## {name}\n```\n{files[name]}\n```" for name in search.editable_files]
    sections.append(
        f"# The editable files at the best kept commit {context.parent_commit[:7]}\n\n"
        + "\n\n".join(shown)
    )
    sections.append(
        "Propose your next change now: edit the files with the tool, then reply with the "
        "CHANGE line."
    )
    return "\n\n".join(sections)


def _goal(config: ExperimentConfig, best: PastTrial | None, finished: int) -> str:
    search = config.search
    budget = config.execution.time_budget_seconds
    lines = [
        "# Goal",
        f"{search.direction.capitalize()} {search.metric}. Each trial trains for "
        f"{budget:g} s of training time (`{config.execution.command}`).",
    ]
    if best is not None and best.metric is not None:
        lines.append(
            f"Best so far: {search.metric} = {best.metric:.6f} (trial #{best.number}: "
            f"{_cut(best.description)}), after {finished} finished trial(s)."
        )
    return "\n".join(lines)


def _table(history: Sequence[PastTrial], metric: str, rows: int) -> str:
    recent = list(history)[-rows:]
    shown = f"the last {len(recent)} of {len(history)}" if len(history) > rows else "all"
    lines = [
        f"# Trials so far ({shown}, oldest first)",
        f"| # | {metric} | outcome | description |",
        "|---|---|---|---|",
    ]
    for trial in recent:
        value = "-" if trial.metric is None else f"{trial.metric:.6f}"
        lines.append(f"| {trial.number} | {value} | {trial.outcome} | {_cut(trial.description)} |")
    return "\n".join(lines)


def _last_crash(history: Sequence[PastTrial]) -> PastTrial | None:
    return next(
        (t for t in reversed(history) if t.status in ("crash", "timeout") and t.log_tail), None
    )


def _cut(text: str) -> str:
    one_line = " ".join(text.split()).replace("|", "/")
    if len(one_line) <= MAX_DESCRIPTION_CHARS:
        return one_line
    return one_line[: MAX_DESCRIPTION_CHARS - 1] + "…"
