"""Bad input: exit status 2 and one line naming the problem, before anything runs.

The CLI runs in-process (a fresh interpreter per case would cost seconds each); one test
checks the same through the real process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.toy_experiment import mark_prepared, skylab, write_toy_experiment

from skylab.cli import main

GRID = """
[strategy.sweep.parameters.LR]
values = [0.2, 0.4]
"""


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The exit status and standard error of `skylab ARGS`."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _fails_cleanly(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> str:
    code, stderr = _cli(
        capsys, *args, "--home", str(home), "--database-url", "postgresql:///unused"
    )
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
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
        (
            lambda t: t.replace('noise = "off"', "baseline_runs = 0"),
            "decision.baseline_runs: Input should be greater than or equal to 1",
        ),
        (
            lambda t: t.replace('noise = "off"', "confirm_runs = -1"),
            "decision.confirm_runs: Input should be greater than or equal to 0",
        ),
        (
            lambda t: t.replace('noise = "off"', "max_runs = 2"),
            "decision: max_runs must be at least 1 + confirm_runs (3), got 2",
        ),
        (lambda t: t.replace('noise = "off"', "z = 0"), "decision.z: Input should be greater"),
        (lambda t: t.replace('noise = "off"', "z = true"), "decision.z: Input should be a valid"),
        (lambda t: t.replace('noise = "off"', 'noise = "on"'), "decision.noise: Input should be"),
    ],
)
def test_invalid_experiment_toml(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, edit: object, expected: str
) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    toml = experiment / "experiment.toml"
    toml.write_text(edit(toml.read_text()))  # type: ignore[operator]
    mark_prepared(tmp_path / "home")
    line = _fails_cleanly(capsys, tmp_path / "home", "run", str(experiment))
    assert expected in line
    assert "experiment.toml" in line


def test_missing_experiment_toml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _fails_cleanly(capsys, tmp_path / "home", "run", str(tmp_path / "empty"))
    assert "no experiment.toml" in line


def test_unknown_experiment_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _fails_cleanly(capsys, tmp_path / "home", "run", "no-such-experiment")
    assert "unknown experiment 'no-such-experiment'" in line


def test_unknown_strategy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(
        capsys, tmp_path / "home", "run", str(experiment), "--strategy", "genetic"
    )
    assert "unknown strategy 'genetic'" in line


def test_unknown_profile(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(capsys, tmp_path / "home", "run", str(experiment), "--profile", "tpu")
    assert "unknown profile 'tpu'" in line


def test_data_not_prepared(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    line = _fails_cleanly(capsys, tmp_path / "home", "run", str(experiment))
    assert "skylab prepare toy" in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--budget", "soon"), ("--max-trials", "0"), ("--tag", "Bad Tag")]
)
def test_bad_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, value: str
) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", GRID)
    code, stderr = _cli(
        capsys, "run", str(experiment), flag, value, "--home", str(tmp_path / "home")
    )
    assert code == 2
    assert flag in stderr.strip().splitlines()[-1]


def test_the_real_process_exits_2_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = skylab("run", "no-such-experiment", "--home", str(home))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("skylab: error: unknown experiment 'no-such-experiment'")
    assert not home.exists() or not any(home.iterdir())


def test_prepare_writes_where_data_dir_says(tmp_path: Path) -> None:
    experiment = write_toy_experiment(tmp_path / "toy", "parameters = { LR = { values = [0.1] } }")
    # The toy harness records where it was asked to put the data.
    (experiment / "prepare.py").write_text(
        "import pathlib, sys\n"
        "target = pathlib.Path(sys.argv[sys.argv.index('--data-dir') + 1])\n"
        "target.mkdir(parents=True, exist_ok=True)\n"
        "(target / 'READY').write_text('{}')\n"
    )
    volume = tmp_path / "volume"
    done = skylab("prepare", str(experiment), "--data-dir", str(volume), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (volume / "READY").is_file()
    assert not (tmp_path / ".skylab").exists()  # nothing in the default home
