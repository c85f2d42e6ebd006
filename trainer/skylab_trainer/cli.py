"""`skylab-trainer run`: the trial entrypoint of pods and of the local executor.

Every flag defaults from an environment variable, because a pod's contract is its
env. An empty variable counts as unset. Exit status: 0 when the trial succeeded,
1 when it did not (the report says why), 2 when the inputs are wrong.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

from skylab_trainer.report import TERMINATION_LOG, RunReport, RunStatus, write_report
from skylab_trainer.supervise import Limits
from skylab_trainer.trial import TrialConfig, run_trial

PROG = "skylab-trainer"
DEFAULT_METRIC_NAME = "val_bpb"
DEFAULT_KILL_GRACE = 10.0
# A SHA-1 or SHA-256 object id; servers only hand out a commit asked for in full.
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass(frozen=True)
class _Input:
    flag: str
    env: str | None
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def name(self) -> str:
        """How error messages name the input: both ways of giving it."""
        return f"{self.flag} / {self.env}" if self.env else self.flag


WORKDIR = _Input("--workdir", "SKYLAB_WORKDIR", "an existing checkout to run in")
REPO = _Input("--repo", "SKYLAB_REPO_URL", "git repository to fetch the commit from")
COMMIT = _Input("--commit", "SKYLAB_COMMIT", "full commit id to check out")
CHECKOUT_DIR = _Input("--checkout-dir", "SKYLAB_CHECKOUT_DIR", "where to check out (temp dir)")
SUBDIR = _Input("--subdir", "SKYLAB_EXPERIMENT_PATH", "experiment dir in the checkout (.)")
COMMAND = _Input("--command", "SKYLAB_COMMAND", "shell command line to run, e.g. 'python train.py'")
TIME_BUDGET = _Input("--time-budget", "SKYLAB_TIME_BUDGET", "seconds; given to the command")
MAX_WALL_TIME = _Input("--max-wall-time", "SKYLAB_MAX_WALL_TIME", "seconds before it is stopped")
KILL_GRACE = _Input("--kill-grace", "SKYLAB_KILL_GRACE", "seconds from SIGTERM to SIGKILL (10)")
REPORT = _Input("--report", "SKYLAB_REPORT_PATH", f"report JSON path ({TERMINATION_LOG})")
LOG = _Input("--log", "SKYLAB_LOG_PATH", "file to write the full output to")
METRIC_NAME = _Input("--metric-name", "SKYLAB_METRIC_NAME", f"({DEFAULT_METRIC_NAME})")
METRIC_PATTERN = _Input(
    "--metric-pattern", "SKYLAB_METRIC_PATTERN", r"regex, group 1 = metric ('^NAME:\s+(...)')"
)
EXTRA_ENV = _Input("--env", None, "KEY=VALUE for the command's environment (repeatable)")
INPUTS = (
    WORKDIR,
    REPO,
    COMMIT,
    CHECKOUT_DIR,
    SUBDIR,
    COMMAND,
    TIME_BUDGET,
    MAX_WALL_TIME,
    KILL_GRACE,
    REPORT,
    LOG,
    METRIC_NAME,
    METRIC_PATTERN,
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, report_path = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    report = run_trial(config, sys.stdout.buffer)
    try:
        write_report(report, report_path)
    except OSError as exc:
        print(f"{PROG}: cannot write the report to {report_path}: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: {_describe(report)}", file=sys.stderr)
    return 0 if report.status is RunStatus.SUCCESS else 1


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[TrialConfig, Path]:
    """The trial to run and where its report goes, from flags falling back to env."""
    args = _parser().parse_args(argv)
    values = _Values(vars(args), environ)
    metric_name = values.get(METRIC_NAME) or DEFAULT_METRIC_NAME
    source = _source(values)
    kill_grace = _seconds(values, KILL_GRACE, positive=False)
    config = TrialConfig(
        command=values.require(COMMAND, "a shell command line, e.g. 'python train.py'"),
        metric_name=metric_name,
        metric_pattern=_metric_pattern(values.get(METRIC_PATTERN), metric_name),
        limits=Limits(
            max_wall_time=_seconds(values, MAX_WALL_TIME, positive=True),
            kill_grace=DEFAULT_KILL_GRACE if kill_grace is None else kill_grace,
        ),
        subdir=_subdir(values.get(SUBDIR) or "."),
        time_budget=_seconds(values, TIME_BUDGET, positive=True),
        log_path=_file_path(values, LOG),
        extra_env=_extra_env(args.env or []),
        workdir=source.workdir,
        repo=source.repo,
        commit=source.commit,
        checkout_dir=source.checkout_dir,
    )
    report_path = _file_path(values, REPORT) or TERMINATION_LOG
    return config, report_path


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of usage + message: easy to read in a pod's status.
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Run one skylab trial and report on it.")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="run")
    run = commands.add_parser("run", help="run one trial and write its report")
    for item in INPUTS:
        env_help = f" [env {item.env}]" if item.env else ""
        run.add_argument(item.flag, dest=item.dest, metavar="VALUE", help=item.help + env_help)
    run.add_argument(
        EXTRA_ENV.flag, dest="env", action="append", metavar="KEY=VALUE", help=EXTRA_ENV.help
    )
    return parser


class _Values:
    """Flag values with their environment fallbacks; '' means unset in both."""

    def __init__(self, flags: Mapping[str, object], environ: Mapping[str, str]) -> None:
        self._flags = flags
        self._environ = environ

    def get(self, item: _Input) -> str | None:
        flag = self._flags.get(item.dest)
        if isinstance(flag, str) and flag:
            return flag
        from_env = self._environ.get(item.env, "") if item.env else ""
        return from_env or None

    def require(self, item: _Input, expected: str) -> str:
        value = self.get(item)
        if value is None:
            raise UsageError(f"{item.name} is required: expected {expected}")
        return value


class _Source(NamedTuple):
    workdir: Path | None = None
    repo: str | None = None
    commit: str | None = None
    checkout_dir: Path | None = None


def _source(values: _Values) -> _Source:
    """Either an existing workdir, or a repo and commit to fetch: exactly one."""
    workdir, repo, commit = values.get(WORKDIR), values.get(REPO), values.get(COMMIT)
    if workdir is not None:
        if repo is not None or commit is not None:
            raise UsageError(f"give either {WORKDIR.name} or {REPO.name} + {COMMIT.name}, not both")
        if not Path(workdir).is_dir():
            raise UsageError(f"{WORKDIR.name}: expected an existing directory, got {workdir!r}")
        return _Source(workdir=Path(workdir))
    if repo is None:
        raise UsageError(f"{WORKDIR.name} or {REPO.name} + {COMMIT.name} is required")
    if commit is None or not _FULL_COMMIT.fullmatch(commit):
        raise UsageError(f"{COMMIT.name}: expected a full lowercase hex commit id, got {commit!r}")
    checkout_dir = values.get(CHECKOUT_DIR)
    return _Source(
        repo=repo, commit=commit, checkout_dir=Path(checkout_dir) if checkout_dir else None
    )


def _seconds(values: _Values, item: _Input, positive: bool) -> float | None:
    raw = values.get(item)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        expected = "a positive number of seconds" if positive else "seconds >= 0"
        raise UsageError(f"{item.name}: expected {expected}, got {raw!r}")
    return seconds


def _metric_pattern(raw: str | None, metric_name: str) -> re.Pattern[str]:
    source = raw or rf"^{re.escape(metric_name)}:\s+([-+0-9.eE]+)"
    try:
        pattern = re.compile(source, re.MULTILINE)
    except re.error as exc:
        raise UsageError(f"{METRIC_PATTERN.name}: expected a regex, got {raw!r} ({exc})") from exc
    if pattern.groups < 1:
        raise UsageError(f"{METRIC_PATTERN.name}: expected a regex with a group, got {raw!r}")
    return pattern


def _subdir(raw: str) -> str:
    if Path(raw).is_absolute():
        raise UsageError(f"{SUBDIR.name}: expected a path inside the checkout, got {raw!r}")
    return raw


def _file_path(values: _Values, item: _Input) -> Path | None:
    raw = values.get(item)
    if raw is None:
        return None
    path = Path(raw)
    if not path.parent.is_dir():
        raise UsageError(f"{item.name}: expected a path in an existing directory, got {raw!r}")
    return path


def _extra_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise UsageError(f"{EXTRA_ENV.name}: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _describe(report: RunReport) -> str:
    metric = f" {report.metric_name}={report.metric}" if report.metric is not None else ""
    message = f": {report.message}" if report.message else ""
    return f"{report.status}{metric} in {report.duration_seconds:.1f}s{message}"
