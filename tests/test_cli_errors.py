"""Bad input: exit status 2 and one line naming the problem, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.toy_experiment import mark_prepared, skylab, write_toy_experiment

GRID = """
[strategy.sweep.parameters.LR]
values = [0.2, 0.4]
"""


def _fails_cleanly(home: Path, *args: str) -> str:
    result = skylab(*args, "--home", str(home), "--database-url", "postgresql:///unused")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    # nothing started: no database, no workspace, no trial
    assert not (home / "postgres").exists()
    assert not (home / "workspaces").exists()
    return lines[0]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace('metric = "val_bpb"\n', ""), "search.metric: required field"),
        (lambda t: t + "\n[bogus]\n", "bogus: unknown field"),
        (lambda t: t.replace('direction = "minimize"', 'direction = "down"'), "search.direction"),
        (lambda t: t.replace("[experiment]", "[experiment"), "invalid TOML"),
        (
            lambda t: t.replace("values = [0.2, 0.4]", "values = []"),
            "strategy.sweep.parameters.LR.values",
        ),
        (lambda t: t.replace("parameters.LR]", "parameters.NOT_THERE]"), "NOT_THERE"),
        (lambda t: t.replace("values = [0.2, 0.4]", 'values = ["fast"]'), "LR"),
        (
            lambda t: t.replace("time_budget_seconds = 1", "time_budget_seconds = -5"),
            "execution.time_budget_seconds",
        ),
    ],
)
def test_invalid_experiment_toml(tmp_path: Path, edit: object, expected: str) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    toml = experiment / "experiment.toml"
    toml.write_text(edit(toml.read_text()))  # type: ignore[operator]
    mark_prepared(tmp_path / "home")
    line = _fails_cleanly(tmp_path / "home", "run", str(experiment))
    assert expected in line
    assert "experiment.toml" in line


def test_missing_experiment_toml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _fails_cleanly(tmp_path / "home", "run", str(tmp_path / "empty"))
    assert "no experiment.toml" in line


def test_unknown_experiment_name(tmp_path: Path) -> None:
    line = _fails_cleanly(tmp_path / "home", "run", "no-such-experiment")
    assert "unknown experiment 'no-such-experiment'" in line


def test_unknown_strategy(tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(tmp_path / "home", "run", str(experiment), "--strategy", "genetic")
    assert "unknown strategy 'genetic'" in line


def test_unknown_profile(tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(tmp_path / "home", "run", str(experiment), "--profile", "tpu")
    assert "unknown profile 'tpu'" in line


def test_data_not_prepared(tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(tmp_path / "home", "run", str(experiment))
    assert "skylab prepare toy" in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--budget", "soon"), ("--max-trials", "0"), ("--tag", "Bad Tag")]
)
def test_bad_flags(tmp_path: Path, flag: str, value: str) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    result = skylab("run", str(experiment), flag, value, "--home", str(tmp_path / "home"))
    assert result.returncode == 2
    assert flag in result.stderr.strip().splitlines()[-1]
