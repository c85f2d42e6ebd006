"""One trial from start to report: check out, run under limits, judge the outcome."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from skylab_trainer.fetch import FetchError, fetch_commit
from skylab_trainer.output import OutputSink
from skylab_trainer.report import RunReport, RunStatus
from skylab_trainer.summary import find_metric, parse_summary, to_float
from skylab_trainer.supervise import GroupEnd, Limits, RunResult, StopReason, supervise

# The report carries this much of the log on failure (to_json may trim it further).
REPORT_TAIL_LINES = 50


@dataclass(frozen=True)
class TrialConfig:
    command: str  # a shell command line, run by /bin/sh -c
    metric_name: str
    metric_pattern: re.Pattern[str]  # group 1 is the primary metric's value
    limits: Limits
    workdir: Path | None = None  # an existing checkout; otherwise repo + commit
    repo: str | None = None
    commit: str | None = None
    checkout_dir: Path | None = None  # where to fetch into; None: a temporary dir
    subdir: str = "."
    time_budget: float | None = None
    log_path: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)


def run_trial(config: TrialConfig, echo: BinaryIO) -> RunReport:
    """Run the trial, echoing its output lines to `echo`; never raises for trial failures."""
    start = time.monotonic()
    try:
        with _checkout(config) as root:
            return _run_in(root / config.subdir, config, echo)
    except FetchError as exc:
        return _failed(
            config,
            f"fetch failed: cannot check out {config.commit} from {config.repo}: {exc}",
            time.monotonic() - start,
            exc.output,
        )


@contextmanager
def _checkout(config: TrialConfig) -> Iterator[Path]:
    if config.workdir is not None:
        yield config.workdir
        return
    assert config.repo is not None and config.commit is not None  # checked by the CLI
    dest = config.checkout_dir or Path(tempfile.mkdtemp(prefix="skylab-trial-"))
    try:
        fetch_commit(config.repo, config.commit, dest)
        yield dest
    finally:
        if config.checkout_dir is None:
            shutil.rmtree(dest, ignore_errors=True)


def _run_in(cwd: Path, config: TrialConfig, echo: BinaryIO) -> RunReport:
    if not cwd.is_dir():
        return _failed(config, f"experiment path {config.subdir!r} is not a directory", 0.0)
    try:
        sink = OutputSink(echo, config.log_path)
    except OSError as exc:
        return _failed(config, f"cannot open the log file: {exc}", 0.0)
    try:
        result = supervise(config.command, cwd, _command_env(config), config.limits, sink.write)
    except OSError as exc:
        return _failed(config, f"cannot start the command: {exc}", 0.0)
    finally:
        sink.close()
    return _judge(result, list(sink.tail), config)


def _command_env(config: TrialConfig) -> dict[str, str]:
    # Unbuffered, so progress lines reach us (and the control plane) as they happen.
    env = {**os.environ, **config.extra_env, "PYTHONUNBUFFERED": "1"}
    if config.time_budget is not None:
        env["SKYLAB_TIME_BUDGET"] = _format_seconds(config.time_budget)
    return env


def _judge(result: RunResult, tail: list[str], config: TrialConfig) -> RunReport:
    """Turn how the command ended and what it printed last into the report."""
    metrics = parse_summary(tail)
    metric, metric_problem = _primary_metric(tail, metrics, config)
    report = RunReport(
        status=RunStatus.SUCCESS,
        metric_name=config.metric_name,
        metric=metric,
        metrics=metrics,
        exit_code=result.exit_code,
        duration_seconds=round(result.duration_seconds, 3),
    )
    verdict = _failure(result, metric_problem, config.limits)
    if verdict is not None:
        report.status, report.message = verdict
        report.log_tail = "\n".join(tail[-REPORT_TAIL_LINES:])
    return report


def _primary_metric(
    tail: list[str], metrics: Mapping[str, float], config: TrialConfig
) -> tuple[float | None, str | None]:
    """The metric's value and, when it is unusable, why."""
    raw = find_metric("\n".join(tail), config.metric_pattern)
    if raw is not None:
        value = to_float(raw)
        if value is None:
            return None, f"metric {config.metric_name}: {raw!r} is not a number"
    elif config.metric_name in metrics:
        # The pattern misses spellings like "nan"; the summary block still has them.
        value = metrics[config.metric_name]
    else:
        pattern = config.metric_pattern.pattern
        return None, f"no metric: pattern {pattern!r} not found in output"
    if not math.isfinite(value):
        return value, f"metric {config.metric_name} is not finite ({value})"
    return value, None


def _failure(
    result: RunResult, metric_problem: str | None, limits: Limits
) -> tuple[RunStatus, str] | None:
    if result.stopped_by is StopReason.SIGNAL:
        received = _signal_name(result.stop_signal) if result.stop_signal else "a signal"
        return RunStatus.KILLED, f"trainer stopped by {received}; {_how_stopped(result, limits)}"
    if result.stopped_by is StopReason.TIMEOUT:
        limit = _format_seconds(limits.max_wall_time or 0.0)
        how = _how_stopped(result, limits)
        return RunStatus.TIMEOUT, f"exceeded max wall time of {limit}s; {how}"
    code = result.exit_code
    if code is not None and code < 0:
        return RunStatus.CRASH, f"command killed by {_signal_name(-code)}"
    if code != 0:
        return RunStatus.CRASH, f"command exited with code {code}"
    if metric_problem is not None:
        return RunStatus.CRASH, metric_problem
    return None


def _how_stopped(result: RunResult, limits: Limits) -> str:
    grace = _format_seconds(limits.kill_grace)
    return {
        GroupEnd.EXITED: "the command had already exited",
        GroupEnd.SIGTERM: "process group stopped by SIGTERM",
        GroupEnd.SIGKILL: f"process group sent SIGTERM, then SIGKILL after {grace}s",
        GroupEnd.UNKILLABLE: "process group survived SIGKILL (stuck in the kernel?)",
    }[result.group_end]


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # real-time signals have no name
        return f"signal {signum}"


def _failed(config: TrialConfig, message: str, duration: float, log: str = "") -> RunReport:
    return RunReport(
        status=RunStatus.CRASH,
        metric_name=config.metric_name,
        duration_seconds=round(duration, 3),
        message=message,
        log_tail="\n".join(log.splitlines()[-REPORT_TAIL_LINES:]),
    )


def _format_seconds(seconds: float) -> str:
    """'300' rather than '300.0', so shell-minded consumers can read it as an integer."""
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)
