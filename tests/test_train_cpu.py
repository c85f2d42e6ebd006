"""experiments/gpt-pretrain/train.py for real, at the cpu profile's sizes, for seconds.

The experiment files are copied to a temporary directory with the cpu profile's
constants rewritten the way a campaign's baseline commit gets them.
"""

from __future__ import annotations

import importlib.util
import math
import re
import runpy
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest import CaptureFixture

from gpt_pretrain import EXPERIMENT, cpu_experiment
from skylab.config import load_experiment
from skylab_trainer.progress import parse_progress
from skylab_trainer.summary import find_metric, parse_summary

SUMMARY_NAMES = [
    "val_bpb",
    "training_seconds",
    "total_seconds",
    "peak_vram_mb",
    "mfu_percent",
    "total_tokens_M",
    "num_steps",
    "num_params_M",
    "depth",
    "tokens_per_second",
    "first_step_seconds",
    "eval_seconds",
    "data_wait_seconds",
    "world_size",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared from about 1 MB of stdlib sources, vocabulary 1024 (fast to build)."""
    base = tmp_path_factory.mktemp("train-data")
    source = base / "source"
    source.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "asyncio"):
        for path in sorted((stdlib / package).glob("*.py")):
            shutil.copyfile(path, source / f"{package}_{path.name}")
    spec = importlib.util.spec_from_file_location(
        "gpt_pretrain_prepare_t", EXPERIMENT / "prepare.py"
    )
    assert spec is not None and spec.loader is not None
    prepare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = prepare
    spec.loader.exec_module(prepare)
    data = base / "data"
    args = ["--data-dir", str(data), "--source", str(source), "--vocab-size", "1024"]
    assert prepare.main(args) == 0
    return data


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_train(
    workdir: Path,
    data_dir: Path,
    budget: float,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Ran:
    """`python train.py` in WORKDIR, run in this process: torch is imported already, and
    importing it again in a fresh interpreter costs more than the training itself."""
    monkeypatch.setenv("SKYLAB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SKYLAB_TIME_BUDGET", str(budget))
    monkeypatch.delenv("SKYLAB_DEVICE", raising=False)
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    capsys.readouterr()
    sys.modules.pop("prepare", None)  # train.py must import the copy next to it
    try:
        runpy.run_path(str(workdir / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.modules.pop("prepare", None)
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err)


def test_cpu_profile_trains_and_reports(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: CaptureFixture[str]
) -> None:
    result = run_train(cpu_experiment(tmp_path / "exp"), data_dir, 3, monkeypatch, capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()

    progress = [p for p in map(parse_progress, lines) if p is not None]
    assert progress, result.stdout
    assert [p.step for p in progress] == sorted({p.step for p in progress})
    assert all(p.loss is not None and math.isfinite(p.loss) for p in progress)
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in progress)
    assert progress[-1].percent_done == 100.0 and progress[-1].seconds_left == 0

    # autoresearch's block: `---`, then `name:` padded to 18 columns (one space after a
    # longer name), nothing after.
    block = lines[lines.index("---") + 1 :]
    assert [line.split(":")[0] for line in block] == SUMMARY_NAMES
    for line in block:
        match = re.fullmatch(r"([a-z_M]+:) +(\S+)", line)
        assert match, line
        name, value = match.groups()
        assert line.index(value) == max(18, len(name) + 1), line
    summary = parse_summary(lines)
    assert 0 < summary["val_bpb"] < 100 and math.isfinite(summary["val_bpb"])
    assert summary["num_steps"] == progress[-1].step > 0
    assert summary["training_seconds"] >= 3
    assert summary["total_seconds"] >= summary["training_seconds"]
    assert summary["peak_vram_mb"] == 0.0
    assert summary["depth"] == load_experiment(EXPERIMENT, "cpu").constants["train.py"]["DEPTH"]
    assert summary["world_size"] == 1
    assert summary["first_step_seconds"] <= summary["total_seconds"]
    assert summary["tokens_per_second"] > 0 and summary["eval_seconds"] > 0
    # The experiment's metric_pattern reads the same value the block holds.
    pattern = re.compile(load_experiment(EXPERIMENT, "cpu").search.metric_pattern, re.MULTILINE)
    assert find_metric(result.stdout, pattern) == f"{summary['val_bpb']:.6f}"


def test_diverging_loss_aborts_with_status_1(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: CaptureFixture[str]
) -> None:
    # Any real loss is above 0.0: the very first step counts as an explosion.
    workdir = cpu_experiment(tmp_path / "exp", train={"MAX_LOSS": 0.0})
    result = run_train(workdir, data_dir, 30, monkeypatch, capsys)
    assert result.returncode == 1
    assert "diverged" in result.stderr
    assert "---" not in result.stdout.splitlines()
