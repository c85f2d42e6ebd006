"""`skylab run` deciding on several runs: the baseline's spread, confirmation runs, a
Ctrl-C in the middle of them, and a run pruned by its loss curve (the toy experiment,
whose val_bpb has a seeded noise of its own)."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time
from pathlib import Path

import psutil
from tests.toy_experiment import mark_prepared, skylab, skylab_command, write_toy_experiment

from skylab.store import Store, TrialRecord

AWARE = """
[decision]
noise = "aware"
"""
NOISY = """
[profiles.noisy.constants."train.py"]
NOISE = 0.003
"""
GRID = """
[strategy.sweep.parameters.LR]
values = [0.5, 0.25, 0.2]
"""


def toy_val_bpb(lr: float, seed: int) -> float:
    """What the toy's train.py prints for LR under SKYLAB_SEED=SEED (rounded as printed)."""
    return round((lr - 0.3) ** 2 + 1 + 0.003 * random.Random(str(seed)).gauss(0, 1), 6)


def campaign_trials(url: str, tag: str) -> list[TrialRecord]:
    with Store.connect(url) as store:
        campaign = store.get_campaign(tag)
        assert campaign is not None
        return store.trials(campaign.id)


def setup(tmp_path: Path, grid: str = GRID, decision: str = AWARE) -> tuple[Path, Path]:
    experiment = write_toy_experiment(tmp_path / "toy", grid, extra=NOISY, decision=decision)
    home = tmp_path / "home"
    mark_prepared(home)
    return experiment, home


def test_the_baseline_runs_three_times_and_a_keep_is_confirmed(
    tmp_path: Path, database_url: str
) -> None:
    experiment, home = setup(tmp_path)
    args = ["run", str(experiment), "--profile", "noisy", "--home", str(home)]
    result = skylab(*args, "--database-url", database_url, "--tag", "n", "--max-trials", "4")
    assert result.returncode == 0, result.stderr
    baseline, tie, better, worse = campaign_trials(database_url, "n")

    # The baseline: three runs, seeded 42, 43, 44, then measured again (seeds 45, ...)
    # before a confirmation run, up to twice that trial's runs; its metric is their mean.
    seeds = [42 + i for i in range(len(baseline.runs))]
    assert [(r.number, r.seed) for r in baseline.runs] == [(i + 1, s) for i, s in enumerate(seeds)]
    assert 4 <= len(baseline.runs) <= 6, "LR=0.25 is confirmed against 4, then 6 runs"
    values = [toy_val_bpb(0.1, seed) for seed in seeds]
    assert [r.metric for r in baseline.runs] == values
    assert baseline.metric is not None and baseline.metric_sd is not None
    assert abs(baseline.metric - statistics.fmean(values)) < 1e-9 and baseline.metric_sd > 0
    assert f"± {statistics.stdev(values[:3]):.6f} (n=3)" in result.stderr  # as decided
    assert f"(the best, measured again): val_bpb={baseline.metric:.6f}" in result.stderr

    # LR=0.5 is as good as the baseline: not kept, whether or not it was confirmed.
    assert tie.kept is False and tie.run_count in (1, 3)
    # LR=0.25 is better by 12 sigma: confirmed by two more runs, then kept on its mean.
    assert (better.kept, better.run_count, better.description) == (True, 3, "LR=0.25")
    assert [r.seed for r in better.runs] == [42, 43, 44]
    assert better.decision_reason.startswith("kept: ")
    assert "against the best's" in better.decision_reason and "sigma=" in better.decision_reason
    # LR=0.2 beats the baseline but not LR=0.25: reverted.
    assert worse.kept is False
    assert f"{better.metric:.6f}" in worse.decision_reason

    shown = skylab("history", "--tag", "n", "--home", str(home), "--database-url", database_url)
    assert shown.returncode == 0, shown.stderr
    header, first = shown.stdout.splitlines()[1:3]
    assert header.split()[:5] == ["#", "commit", "val_bpb", "sd", "runs"]
    runs = str(len(baseline.runs))
    assert first.split()[2:5] == [f"{baseline.metric:.6f}", f"{baseline.metric_sd:.6f}", runs]


def test_a_ctrl_c_in_a_confirmation_run_neither_loses_nor_repeats_a_run(
    tmp_path: Path, database_url: str
) -> None:
    experiment, home = setup(tmp_path)
    args = ["run", str(experiment), "--profile", "noisy", "--home", str(home)]
    args += ["--database-url", database_url, "--tag", "c", "--max-trials", "3"]
    # LR=0.25's second run (seed 43) trains until it is interrupted.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOY_SLOW_LR": "0.25", "TOY_SLOW_SEED": "43"}
    process = subprocess.Popen(
        skylab_command(*args), stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while not confirming(database_url):
        assert process.poll() is None and time.monotonic() < deadline, "never got there"
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert not training_in(tmp_path), "the interrupted run's process group was not killed"
    third = campaign_trials(database_url, "c")[2]
    assert third.status == "running"
    assert [(r.number, r.seed, r.status) for r in third.runs] == [
        (1, 42, "success"),
        (2, 43, "killed"),
    ]

    resumed = skylab(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    third = campaign_trials(database_url, "c")[2]
    # Run 1 is not run again; the killed run is replaced, with its seed.
    assert [(r.number, r.seed, r.status) for r in third.runs] == [
        (1, 42, "success"),
        (2, 43, "killed"),
        (3, 43, "success"),
        (4, 44, "success"),
    ]
    assert (third.status, third.kept, third.run_count) == ("success", True, 3)


def training_in(folder: Path) -> list[psutil.Process]:
    """The train.py processes running in a checkout under FOLDER."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cwd = process.info["cwd"] or ""
        if "train.py" in (process.info["cmdline"] or []) and cwd.startswith(str(folder)):
            found.append(process)
    return found


def confirming(url: str) -> bool:
    with Store.connect(url) as store:
        campaign = store.get_campaign("c")
        trial = None if campaign is None else store.get_trial(campaign.id, 3)
    return trial is not None and any(r.number == 2 and r.status == "running" for r in trial.runs)


def test_a_run_that_trains_worse_throughout_is_pruned(tmp_path: Path, database_url: str) -> None:
    offset = """
[strategy.sweep.parameters.LOSS_OFFSET]
values = [3.0]
"""
    experiment, home = setup(tmp_path, offset, AWARE + "prune = true\n")
    args = ["run", str(experiment), "--profile", "noisy", "--home", str(home)]
    result = skylab(*args, "--database-url", database_url, "--tag", "p", "--max-trials", "2")
    assert result.returncode == 0, result.stderr
    _, pruned = campaign_trials(database_url, "p")
    assert (pruned.status, pruned.kept, pruned.run_count) == ("pruned", False, 1)
    [run] = pruned.runs
    assert run.status == "pruned" and run.metric is None
    assert "of the budget is above the best's" in run.message
    assert "run 1 pruned" in result.stderr
