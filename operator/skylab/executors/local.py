"""The local executor: the trainer entrypoint as a subprocess of `skylab run`."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from skylab.executors.base import StopRun, TrialInterrupted, TrialLaunch
from skylab_trainer.report import RunReport, RunStatus

# Seconds the trainer waits between SIGTERM and SIGKILL of the training process group.
KILL_GRACE_SECONDS = 5.0


class LocalExecutor:
    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir

    def run_dir(self, launch: TrialLaunch) -> Path:
        return self.runs_dir / launch.name

    def run(self, launch: TrialLaunch, on_line: Callable[[str], None]) -> RunReport:
        """Run one run of a trial to its end; raise TrialInterrupted on Ctrl-C or SIGTERM.

        ON_LINE sees every output line; when it raises StopRun the run is stopped there.
        """
        run_dir = self.run_dir(launch)
        run_dir.mkdir(parents=True, exist_ok=True)
        report_path = run_dir / "report.json"
        report_path.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "skylab_trainer",
            "run",
            "--repo",
            launch.repo,
            "--commit",
            launch.commit,
            "--checkout-dir",
            str(run_dir / "checkout"),
            "--command",
            launch.command,
            "--time-budget",
            f"{launch.time_budget_seconds:g}",
            "--max-wall-time",
            f"{launch.max_wall_time_seconds:g}",
            "--kill-grace",
            f"{KILL_GRACE_SECONDS:g}",
            "--metric-name",
            launch.metric_name,
            "--metric-pattern",
            launch.metric_pattern,
            "--report",
            str(report_path),
            "--log",
            str(run_dir / "train.log"),
        ]
        for key, value in sorted(launch.env.items()):
            command += ["--env", f"{key}={value}"]

        # Its own session: a Ctrl-C reaches skylab, which stops the trainer in order.
        trainer = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        interrupted = False
        try:
            assert trainer.stdout is not None
            for line in trainer.stdout:
                on_line(line.rstrip("\n"))
            trainer.wait()
        except StopRun:
            _stop(trainer)  # the report says killed; the caller knows why
        except KeyboardInterrupt:
            interrupted = True
            _stop(trainer)
        report = _read_report(report_path, launch, trainer.returncode)
        if interrupted:
            if report.status != RunStatus.KILLED:
                report.status = RunStatus.KILLED
                report.message = report.message or "interrupted"
            raise TrialInterrupted(report)
        return report


def _stop(trainer: subprocess.Popen[str]) -> None:
    """Ask the trainer to kill its training process group and write its report."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits too
    try:
        trainer.send_signal(signal.SIGTERM)
        try:
            # Keep draining its output: a trainer blocked on a full pipe never exits.
            trainer.communicate(timeout=KILL_GRACE_SECONDS + 30)
        except subprocess.TimeoutExpired:
            trainer.kill()
            trainer.communicate()
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_report(path: Path, launch: TrialLaunch, exit_code: int | None) -> RunReport:
    try:
        return RunReport.from_json(path.read_text())
    except (OSError, ValueError, KeyError) as exc:
        return RunReport(
            status=RunStatus.CRASH,
            metric_name=launch.metric_name,
            exit_code=exit_code,
            message=f"the trainer left no readable report ({exc})",
        )
