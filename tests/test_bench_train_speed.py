"""bench/train_speed.py: the table from two runs, failures as one line, the real train.py.

The fast tests time a stand-in train.py that prints progress lines and a summary block
in train.py's format without importing torch; the slow one benches the real train.py at
the cpu profile from a raw corpus in the climbmix layout, prepare.py included.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "train_speed.py"
NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"

# Prints what train.py prints (a device line, one progress line per step, the summary
# block) with step k taking k ms; exits 1 like a diverged run when FAIL is set, hangs when
# HANG is.
FAKE_TRAIN = """\
import os
import sys
import time

DEVICE = "cpu"
TOTAL_BATCH_SIZE = 1000
TIMING_SKIP_STEPS = 10
CUDA_PEAK_FLOPS = 989.5e12
OTHER_PEAK_FLOPS = 1e12
PROGRESS_SECONDS = 1.0
NEW_FIELDS = True
FAIL = False
HANG = False

budget = float(os.environ["SKYLAB_TIME_BUDGET"])
print(f"device {DEVICE} | params 0.01M | vocab 256 | budget {budget:.0f}s")
print(f"progress every {PROGRESS_SECONDS} s from {os.environ['SKYLAB_DATA_DIR']}")
for step in range(1, 21):
    print(
        f"step {step:05d} | loss 5.000000 | lrm 1.00 | dt {step}ms | "
        f"tok/s {TOTAL_BATCH_SIZE * 1000 // step:,} | mfu 1.0% | done 50.0% | left 1s | epoch 1"
    )
if HANG:
    print(f"hanging: pid {os.getpid()}", flush=True)
    time.sleep(600)
if FAIL:
    print("error: training loss nan at step 20: diverged, aborting", file=sys.stderr)
    sys.exit(1)
stats = dict(val_bpb=1.5, training_seconds=2.0, peak_vram_mb=2048.0, mfu_percent=1.25)
stats.update(num_steps=20, depth=2)
if NEW_FIELDS:
    stats.update(tokens_per_second=12345.0, first_step_seconds=budget + 0.5)
    stats.update(eval_seconds=0.75, world_size=1)
print("---")
for name, value in stats.items():
    print(f"{name + ':':<18}{value}")
"""


CPU_RUN = ["--device", "cpu", "--budget", "3", "--warm-budget", "1"]


def bench_on(experiment: Path, data: Path, *python_flags: str) -> list[str]:
    """The command line that benches EXPERIMENT on DATA in a fresh interpreter."""
    where = ["--experiment", str(experiment), "--data", str(data)]
    return [sys.executable, *python_flags, str(BENCH), *where]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train_speed", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


@pytest.fixture(autouse=True)
def no_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench writes its log to $OUT when it is set; only the tests that ask get one."""
    monkeypatch.delenv("OUT", raising=False)


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path]:
    """(a stand-in experiment, a data directory with a READY manifest)."""
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    (experiment / "train.py").write_text(FAKE_TRAIN)
    (experiment / "prepare.py").write_text('READY = "READY"\nMAX_SEQ_LEN = 64\n')
    data = tmp_path / "data"
    data.mkdir()
    (data / "READY").write_text("{}")
    return experiment, data


def row(text: str, name: str) -> str:
    """The 'this run' cell of the table's row NAME."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == name:
            return cells[1]
    raise AssertionError(f"no row {name!r} in:\n{text}")


def number(cell: str) -> float:
    match = re.match(NUMBER, cell)
    assert match, cell
    return float(match.group(1).replace(",", ""))


def test_table_from_a_stand_in_train_py(
    bench: ModuleType,
    fake: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    experiment, data = fake
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    argv = ["--experiment", str(experiment), "--data", str(data), "--budget", "3"]
    assert bench.main([*argv, "--warm-budget", "1", "--work", str(tmp_path / "work")]) == 0
    text = capsys.readouterr().out

    # Every step's line: PROGRESS_SECONDS was rewritten in the copy, not in the original.
    assert f"[cold] progress every 0.0 s from {data}" in text
    assert "PROGRESS_SECONDS = 1.0" in (experiment / "train.py").read_text()
    assert row(text, "device").startswith("cpu")
    assert row(text, "tokens/s") == "12,345 (0.01x the reference)"
    assert row(text, "MFU[1]") == "1.2% of 1.0 TFLOP/s"
    # On the CPU no step is skipped: 1..20 ms.
    assert row(text, "ms per step, median[3]") == "10.5"
    assert row(text, "ms per step, p10 / p90[3]") == "2.9 / 18.1"
    assert row(text, "peak VRAM") == "2,048 MiB (2.0 GiB)"
    assert re.fullmatch(r"3\.5 s \(\d+\.\d s seen\)", row(text, "first step, cold[4]"))
    assert re.fullmatch(r"1\.5 s \(\d+\.\d s seen\)", row(text, "first step, warm[4]"))
    assert row(text, "eval") == "0.8 s"
    assert row(text, "val_bpb") == "1.5000"
    assert row(text, "steps (timed / all)") == "20 / 20 in 2.0 s of training"
    assert row(text, "set-up (prepare.py)") == "none"
    assert "12 x heads x head_dim x span per layer" in text

    log = (tmp_path / "out" / "train_speed.log").read_text()
    table = (tmp_path / "out" / "train_speed.md").read_text()
    assert "[cold] step 00020" in log and "[warm] step 00020" in log
    assert table.strip() in log
    assert row(table, "val_bpb") == "1.5000"


def test_cuda_steps_skip_the_warm_up_and_missing_fields_read_n_a(
    bench: ModuleType,
    fake: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    experiment, data = fake
    argv = ["--experiment", str(experiment), "--data", str(data), "--budget", "3"]
    argv += ["--set", "DEVICE=cuda", "--set", "NEW_FIELDS=False", "--set", "TIMING_SKIP_STEPS=12"]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out

    assert row(text, "ms per step, median[3]") == "16.5"  # steps 13..20
    assert row(text, "steps (timed / all)") == "8 / 20 in 2.0 s of training"
    # Counted as train.py counts it: (20 - 12) steps x 1000 tokens in 2.0 s.
    assert row(text, "tokens/s").startswith("4,000[2] ")
    assert row(text, "MFU[1]") == "1.2% of 989.5 TFLOP/s"
    assert row(text, "first step, cold[4]").startswith("n/a (")
    assert row(text, "eval") == "n/a"
    assert "train.py --set DEVICE='cuda'" not in text and "--set DEVICE=cuda" in text


def test_a_failing_run_ends_with_one_error_line(fake: tuple[Path, Path], tmp_path: Path) -> None:
    experiment, data = fake
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    result = subprocess.run(
        [*bench_on(experiment, data), "--budget", "3", "--set", "FAIL=True"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "train_speed: error: the cold run exited with status 1: "
        "error: training loss nan at step 20: diverged, aborting"
    )
    assert "last lines of the cold run:" in result.stderr
    assert "    step 00020 |" in result.stderr
    assert last in (tmp_path / "out" / "train_speed.log").read_text()
    assert not (tmp_path / "out" / "train_speed.md").exists()


def test_sigterm_kills_the_run_in_progress(fake: tuple[Path, Path]) -> None:
    experiment, data = fake
    bench = subprocess.Popen(
        [*bench_on(experiment, data), "--set", "HANG=True"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bench.stdout is not None
        for line in bench.stdout:
            if "hanging: pid" in line:
                run = int(line.split()[-1])
                break
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 130
    finally:
        bench.kill()
        bench.communicate()
    with pytest.raises(ProcessLookupError):
        os.kill(run, 0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("NO_SUCH_CONSTANT=1", "train.py: NO_SUCH_CONSTANT is not a module-level constant"),
        ("TOTAL_BATCH_SIZE=big", "train.py: TOTAL_BATCH_SIZE holds an int (1000), so 'big'"),
        ("NOEQUALS", "--set 'NOEQUALS': expected NAME=VALUE"),
    ],
)
def test_a_bad_setting_is_refused_before_any_run(
    bench: ModuleType,
    fake: tuple[Path, Path],
    setting: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    experiment, data = fake
    argv = ["--experiment", str(experiment), "--data", str(data), "--set", setting]
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"train_speed: error: {message}")
    assert len(captured.err.strip().splitlines()) == 1


def test_needs_nothing_beyond_the_standard_library(fake: tuple[Path, Path]) -> None:
    """`python -S`: no site-packages at all, as on a GPU image without skylab or pydantic."""
    experiment, data = fake
    result = subprocess.run(
        [*bench_on(experiment, data, "-S"), "--budget", "3", "--set", "TIMING_SKIP_STEPS=11"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| val_bpb " in result.stdout
    # --profile needs skylab.config, hence pydantic: refused in one line.
    result = subprocess.run(
        [sys.executable, "-S", str(BENCH), "--data", str(data), "--profile", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "train_speed: error: --profile reads experiment.toml with skylab.config, which "
        "needs pydantic; install it or leave --profile out"
    )


def write_climbmix_corpus(root: Path) -> Path:
    """Stdlib sources as parquet shards with a `text` column: one training shard and the
    pinned validation shard, as in ../shared/data/bench-corpus."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        path.read_text(encoding="utf-8")
        for package in ("json", "email", "asyncio", "importlib")
        for path in sorted((stdlib / package).glob("*.py"))
    ]
    root.mkdir()
    val = [text for i, text in enumerate(texts) if i % 5 == 0]
    train = [text for i, text in enumerate(texts) if i % 5 != 0]
    pq.write_table(pa.table({"text": train}), root / "shard_00000.parquet")
    pq.write_table(pa.table({"text": val}), root / "shard_06542.parquet")
    return root


def run_to_the_end(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit status, stdout and stderr) of COMMAND; past TIMEOUT it gets SIGTERM, on which
    the bench kills the run in progress (in a process group of its own) before exiting."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, output


@pytest.mark.slow
@pytest.mark.timeout(1500)  # two fresh interpreters import torch: minutes on a busy machine
def test_benches_the_real_train_py_on_the_cpu(tmp_path: Path) -> None:
    corpus = write_climbmix_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    status, output = run_to_the_end(
        [sys.executable, str(BENCH), "--data", str(corpus), "--profile", "cpu", *CPU_RUN],
        dict(os.environ, OUT=str(out)),
        timeout=1400,
    )
    assert status == 0, output[-5000:]
    text = (out / "train_speed.md").read_text()
    assert text.strip() in output

    assert row(text, "device").startswith("cpu, torch ")
    assert number(row(text, "tokens/s")) > 0
    assert 0 < number(row(text, "val_bpb")) < 100 and math.isfinite(number(row(text, "val_bpb")))
    p10, p90 = (number(cell) for cell in row(text, "ms per step, p10 / p90[3]").split(" / "))
    assert 0 < p10 <= number(row(text, "ms per step, median[3]")) <= p90
    for run in ("cold", "warm"):
        cell = row(text, f"first step, {run}[4]")
        assert re.fullmatch(rf"(n/a|{NUMBER} s) \({NUMBER} s seen\)", cell), cell
    assert number(row(text, "set-up (prepare.py)")) > 0

    log = (out / "train_speed.log").read_text()
    assert "[set-up] prepare: ready:" in log
    assert "[cold] device cpu" in log and "[warm] ---" in log
    # PROGRESS_SECONDS = 0.0: a line for every step, 1 to the last.
    steps = [int(m) for m in re.findall(r"^\[cold\] step (\d+) \|", log, re.MULTILINE)]
    all_steps = number(row(text, "steps (timed / all)").split(" / ")[1])
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == all_steps
