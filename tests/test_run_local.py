"""`skylab run` end to end on the toy experiment: the loop, failures, Ctrl-C, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from tests.toy_experiment import mark_prepared, skylab, skylab_command, write_toy_experiment

from skylab.home import Home
from skylab.store import Store

GRID = """
[strategy.sweep.parameters.LR]
values = [0.5, 0.25, 0.2]
"""


def _run(home: Path, experiment: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return skylab("run", str(experiment), "--home", str(home), "--database-url", url, *extra)


def _trials(url: str, tag: str) -> list[tuple[int, str, bool | None, str]]:
    with Store.connect(url) as store:
        campaign = store.get_campaign(tag)
        assert campaign is not None
        return [(t.number, t.status, t.kept, t.description) for t in store.trials(campaign.id)]


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_campaign_keeps_improvements_and_reverts_the_rest(
    tmp_path: Path, database_url: str
) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    before = {p.name: p.read_bytes() for p in experiment.iterdir()}
    home = tmp_path / "home"
    mark_prepared(home)

    result = _run(home, experiment, database_url, "--tag", "grid", "--max-trials", "4")
    assert result.returncode == 0, result.stderr
    # val_bpb = (LR - 0.3)^2 + 1: 0.1 -> 1.04 (baseline), 0.5 -> 1.04 (tie: reverted),
    # 0.25 -> 1.0025 (kept), 0.2 -> 1.01 (reverted)
    assert _trials(database_url, "grid") == [
        (1, "success", True, "baseline"),
        (2, "success", False, "LR=0.5"),
        (3, "success", True, "LR=0.25"),
        (4, "success", False, "LR=0.2"),
    ]
    assert "ran the maximum of 4 trials" in result.stderr
    git_dir = home / "workspaces" / "grid.git"
    head = _git(git_dir, "rev-parse", "refs/heads/skylab/grid")
    assert head == _git(git_dir, "rev-parse", "refs/skylab/trials/0003")
    assert "LR = 0.25  # the swept constant" in _git(git_dir, "show", f"{head}:train.py")
    # the user's experiment directory is only read
    assert {p.name: p.read_bytes() for p in experiment.iterdir()} == before

    with Store.connect(database_url) as store:
        campaign = store.get_campaign("grid")
        assert campaign is not None and campaign.status == "succeeded"
        trials = store.trials(campaign.id)
        assert trials[2].diff.count("+LR = 0.25") == 1
        assert trials[2].parent_commit == trials[0].commit
        assert trials[3].parent_commit == trials[2].commit  # branches from the best
        assert [p.step for p in store.progress(trials[0].id)] == [1, 2, 3]

    shown = skylab("history", "--tag", "grid", "--home", str(home), "--database-url", database_url)
    assert shown.returncode == 0, shown.stderr
    assert "LR=0.25" in shown.stdout and "kept" in shown.stdout and "reverted" in shown.stdout


def test_failures_are_recorded_and_reverted_and_end_the_campaign(
    tmp_path: Path, database_url: str
) -> None:
    sweep = """
[strategy.sweep.parameters.MODE]
values = ["crash", "nometric", "hang", "ok"]
"""
    experiment = write_toy_experiment(tmp_path / "toy", sweep)
    toml = experiment / "experiment.toml"
    # long enough for a loaded machine to start a trial, short enough to wait out the hang
    toml.write_text(
        toml.read_text().replace("max_trial_wall_time = 120", "max_trial_wall_time = 30")
    )
    home = tmp_path / "home"
    mark_prepared(home)

    result = _run(home, experiment, database_url, "--tag", "fails")
    assert result.returncode == 1, result.stderr
    assert "2 consecutive trials failed" in result.stderr
    with Store.connect(database_url) as store:
        campaign = store.get_campaign("fails")
        assert campaign is not None and campaign.status == "failed"
        crash, nometric = store.trials(campaign.id)[1:]
    assert (crash.status, crash.kept, crash.exit_code) == ("crash", False, 1)
    assert "boom: the toy model diverged" in crash.log_tail
    assert (nometric.status, nometric.kept) == ("crash", False)
    assert "no metric" in nometric.message

    # a timeout is a failure too: with a higher limit the loop goes on past it
    toml.write_text(
        toml.read_text().replace("max_consecutive_failures = 2", "max_consecutive_failures = 5")
    )
    result = _run(home, experiment, database_url, "--tag", "fails", "--resume")
    assert result.returncode == 0, result.stderr
    statuses = [(n, s, k) for n, s, k, _ in _trials(database_url, "fails")]
    assert statuses[3:] == [(4, "timeout", False)]
    # MODE="ok" is the baseline's own value: no change, so the grid is done
    assert "the sweep has tried every point of its grid" in result.stderr


def _wait_for(predicate: Callable[[], object], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _as_in_a_terminal() -> None:
    # A command typed at a terminal gets Ctrl-C; one started in the background of a
    # non-interactive shell inherits SIGINT ignored, and so would skylab if the tests run so.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_kills_the_run_and_resume_finishes_its_trial(
    tmp_path: Path, database_url: str, signum: int
) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    home = tmp_path / "home"
    mark_prepared(home)
    args = (
        "run",
        str(experiment),
        "--home",
        str(home),
        "--database-url",
        database_url,
        "--tag",
        "stop",
        "--max-trials",
        "3",
    )
    process = subprocess.Popen(
        skylab_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOY_SLOW_LR": "0.5"},
        preexec_fn=_as_in_a_terminal,
    )

    # interrupt skylab while trial 2 (LR=0.5, slowed down) trains
    _wait_for(lambda: len(_trials_or_none(database_url, "stop")) == 2 and _training(process))
    victims = _training(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    # killed already; the kernel may take a moment to finish them on a loaded machine
    psutil.wait_procs(victims, timeout=15)
    assert not any(_alive(p) for p in victims)
    # the run is killed; its trial, undecided, waits for another run
    assert _trials(database_url, "stop") == [
        (1, "success", True, "baseline"),
        (2, "running", None, "LR=0.5"),
    ]
    assert _runs(database_url, "stop", 2) == [(1, "killed")]
    with Store.connect(database_url) as store:
        campaign = store.get_campaign("stop")
        assert campaign is not None and campaign.status == "interrupted"

    # the trial goes on with a new run of the same commit; the killed one does not count
    result = skylab(*args[:-2], "--resume")
    assert result.returncode == 0, result.stderr
    assert _trials(database_url, "stop")[1:] == [
        (2, "success", False, "LR=0.5"),
        (3, "success", True, "LR=0.25"),
    ]
    assert _runs(database_url, "stop", 2) == [(1, "killed"), (2, "success")]


def _runs(url: str, tag: str, number: int) -> list[tuple[int, str]]:
    with Store.connect(url) as store:
        campaign = store.get_campaign(tag)
        assert campaign is not None
        trial = store.get_trial(campaign.id, number)
        assert trial is not None
        return [(run.number, run.status) for run in trial.runs]


def _trials_or_none(url: str, tag: str) -> list[tuple[int, str, bool | None, str]]:
    with Store.connect(url) as store:
        campaign = store.get_campaign(tag)
        return (
            []
            if campaign is None
            else [(t.number, t.status, t.kept, t.description) for t in store.trials(campaign.id)]
        )


def _training(process: subprocess.Popen[str]) -> list[psutil.Process]:
    try:
        return [
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "train.py" in " ".join(p.cmdline())
        ]
    except psutil.Error:
        return []


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_second_run_on_the_same_home_is_refused(tmp_path: Path, database_url: str) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    home = tmp_path / "home"
    mark_prepared(home)
    with Home(home.resolve()).exclusive():
        result = _run(home, experiment, database_url)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "in use by another skylab run" in result.stderr


def test_time_while_skylab_was_down_spends_no_budget(tmp_path: Path, database_url: str) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    home = tmp_path / "home"
    mark_prepared(home)
    args = ["run", str(experiment), "--home", str(home), "--database-url", database_url]
    args += ["--tag", "down", "--max-trials", "4", "--budget", "45s"]
    process = subprocess.Popen(
        skylab_command(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TOY_SLOW_LR": "0.5"},
    )
    started = time.monotonic()
    _wait_for(lambda: len(_trials_or_none(database_url, "down")) == 2 and _training(process))
    # The machine dies: skylab and its trial, at once, with no chance to record anything.
    victims = [psutil.Process(process.pid), *_training(process)]
    for victim in victims:
        victim.kill()
    psutil.wait_procs(victims, timeout=15)
    process.communicate(timeout=60)
    up = time.monotonic() - started
    time.sleep(60)

    with Store.connect(database_url) as store:
        campaign = store.get_campaign("down")
        assert campaign is not None
        before = store.active_seconds(campaign.id)
    assert before <= up + 1, (before, up)  # at most until it died: the 60 s are not in it
    result = skylab(*args[:-2], "--resume")  # the budget as it was, 45 s
    assert result.returncode == 0, result.stderr
    # Had the 60 s counted, the campaign would have stopped at once on its budget.
    with Store.connect(database_url) as store:
        campaign = store.get_campaign("down")
        assert campaign is not None and campaign.stop_reason == "ran the maximum of 4 trials"
        spent = store.active_seconds(campaign.id)
        trials = store.trials(campaign.id)
    assert [t.status for t in trials] == ["success"] * 4
    assert spent < time.monotonic() - started - 55, spent
