"""train.py data-parallel under torchrun: 2 CPU processes (gloo) equal 1 process.

tests/ddp_worker.py runs a few optimizer steps on the same global batches either way
and a validation pass; the whole train.py then runs under torchrun and prints one
summary. Slow: every process imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_pretrain import EXPERIMENT, cpu_experiment, write_text_corpus

# Every process imports torch, which takes minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    source = write_text_corpus(base / "source")
    data = base / "data"
    command = [sys.executable, "prepare.py", "--data-dir", str(data), "--source", str(source)]
    subprocess.run([*command, "--vocab-size", "512"], cwd=EXPERIMENT, check=True, timeout=300)
    return data


def _torchrun(processes: int, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """ARGS under torchrun with PROCESSES ranks on this machine; its output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, f"--nproc_per_node={processes}", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_ranks_match_one_process_on_the_same_global_batch(
    prepared: Path, tmp_path: Path
) -> None:
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    one_process = [sys.executable, "ddp_worker.py", str(single), str(prepared)]
    subprocess.run(one_process, cwd=TESTS, check=True, timeout=600)
    _torchrun(2, "ddp_worker.py", str(double), str(prepared), cwd=TESTS)
    one, two = torch.load(single), torch.load(double)

    assert len(one["losses"]) == 3
    torch.testing.assert_close(one["losses"], two["losses"], rtol=1e-5, atol=1e-6)
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-6)
    for name, weight in one["state"].items():
        torch.testing.assert_close(two["state"][name], weight, rtol=1e-4, atol=2e-5, msg=name)
    assert one["losses"][0] != one["losses"][-1]  # the steps did train


def test_train_py_under_torchrun_prints_one_summary(prepared: Path, tmp_path: Path) -> None:
    tiny = dict(
        DEPTH=2,
        MODEL_DIM=64,
        HEAD_DIM=32,
        TOTAL_BATCH_SIZE=2048,
        DEVICE_BATCH_SIZE=4,
        PROGRESS_SECONDS=0.0,
    )
    small_eval = dict(MAX_SEQ_LEN=128, EVAL_TOKENS=4096)
    experiment = cpu_experiment(tmp_path / "gpt-pretrain", train=tiny, prepare=small_eval)
    env = {"SKYLAB_DATA_DIR": str(prepared), "SKYLAB_TIME_BUDGET": "4", "SKYLAB_DEVICE": "cpu"}

    output = _torchrun(2, "train.py", cwd=experiment, env=env)

    assert output.count("\n---\n") == 1, output[-2000:]
    summary = dict(
        line.split(":", 1) for line in output.split("\n---\n", 1)[1].splitlines() if ":" in line
    )
    assert summary["world_size"].strip() == "2"
    assert float(summary["val_bpb"]) > 0
    assert float(summary["training_seconds"]) >= 4
    steps = [line for line in output.splitlines() if line.startswith("step ")]
    assert len(steps) == int(summary["num_steps"])  # rank 0 alone prints progress
    assert "accumulation 2 x 512 tokens per rank" in output  # 2048 / (512 x 2 ranks)
