"""How fast experiments/gpt-pretrain/train.py trains: tokens/s, MFU, step times, start-up.

Runs train.py's default configuration twice on a copy of the experiment: a cold run of
--budget training seconds (75) with empty TorchInductor and Triton caches, then a warm
run of --warm-budget seconds (5) on the caches the cold run filled. Prints one table:
tokens/s, MFU, ms per step (median, p10, p90), peak VRAM, time to the first step cold and
warm, evaluation seconds and val_bpb, beside karpathy/autoresearch's figures on an H200.

    python bench/train_speed.py --data ../shared/data/bench-corpus          # a GPU
    .venv/bin/python bench/train_speed.py --data DIR --profile cpu --device cpu \\
        --budget 10 --warm-budget 2                                         # a CPU

--data is a prepared data directory (one with prepare.py's READY manifest), used as is,
or a corpus for `prepare.py --source` (parquet shards with a `text` column in the
climbmix layout, or text files), prepared into --work first as a timed set-up step;
preparing needs the rustbpe package. --profile applies an experiment.toml profile's
constants (and its prepare arguments); --set NAME=VALUE rewrites one constant of
train.py (or of prepare.py, where only that file has it). When OUT is set, the whole log
goes to $OUT/train_speed.log and the table to $OUT/train_speed.md too. It needs only the
Python standard library besides what train.py needs: operator/ and trainer/ are put on
sys.path here, so an environment without skylab installed runs it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]

from skylab.constants import ConstantValue, read_constants, rewrite_constants  # noqa: E402
from skylab.errors import UserError  # noqa: E402
from skylab_trainer.output import LineSplitter  # noqa: E402
from skylab_trainer.progress import parse_progress  # noqa: E402
from skylab_trainer.summary import parse_summary  # noqa: E402
from skylab_trainer.supervise import Limits, StopReason, supervise  # noqa: E402

EXPERIMENT = REPO / "experiments" / "gpt-pretrain"
FILES = ("train.py", "prepare.py")

# karpathy/autoresearch's train.py on an NVIDIA H200, torch 2.11 (the figures).
REFERENCE_DEVICE = "NVIDIA H200, torch 2.11 (karpathy/autoresearch train.py)"
REFERENCE_TOKENS_PER_SECOND = 1.64e6
REFERENCE_MFU_PERCENT = 39.7
REFERENCE_PEAK_TFLOPS = 989.5
REFERENCE_STEP_MS = 320.0
REFERENCE_FIRST_STEP_COLD = 62.0
REFERENCE_EVAL_SECONDS = 14.0

TAIL_LINES = 15  # of a failed run, shown before the error
KILL_GRACE_SECONDS = 10.0  # between SIGTERM and SIGKILL to a run's process group
RUN_TIMEOUT_EXTRA = 1200.0  # seconds a run may take beyond 3x its budget (start-up, eval)
NA = "n/a"


class BenchError(Exception):
    """The bench cannot go on; its message is printed as one line."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def profile_settings(
    experiment: Path, profile: str | None
) -> tuple[dict[str, dict[str, ConstantValue]], list[str]]:
    """The profile's constants per file and its prepare arguments, read the way
    campaigns read experiment.toml; nothing without a profile."""
    if profile is None:
        return {}, []
    try:
        from skylab.config import load_experiment
    except ModuleNotFoundError as exc:
        raise BenchError(
            f"--profile reads experiment.toml with skylab.config, which needs {exc.name}; "
            "install it or leave --profile out",
            status=2,
        ) from exc
    config = load_experiment(experiment, profile)
    constants = {name: dict(values) for name, values in config.constants.items()}
    return constants, list(config.prepare.args)


def parse_setting(text: str) -> tuple[str, ConstantValue]:
    """NAME=VALUE: VALUE as a Python literal (1e-3, True, 'x'), else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise BenchError(f"--set {text!r}: expected NAME=VALUE", status=2)
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    if not isinstance(value, bool | int | float | str):
        raise BenchError(f"--set {text!r}: the value must be a number, a bool or a string", 2)
    return name.strip(), value


def copy_experiment(
    source: Path, target: Path, constants: Mapping[str, Mapping[str, ConstantValue]]
) -> None:
    """SOURCE's files in TARGET, each file's CONSTANTS rewritten."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for name, values in constants.items():
        path = target / name
        try:
            path.write_text(rewrite_constants(path.read_text(), values))
        except UserError as exc:
            raise BenchError(f"{name}: {exc}", status=2) from exc


def bench_constants(
    experiment: Path,
    profile: Mapping[str, Mapping[str, ConstantValue]],
    settings: Sequence[tuple[str, ConstantValue]],
) -> dict[str, dict[str, ConstantValue]]:
    """The profile's constants, then --set's, then a progress line at every step."""
    merged = {name: dict(values) for name, values in profile.items()}
    present = {
        name: read_constants((experiment / name).read_text())
        for name in FILES
        if (experiment / name).is_file()
    }
    for name, value in settings:
        # train.py unless only prepare.py has it; an unknown name fails in train.py.
        owner = next((f for f in FILES if name in present.get(f, {})), FILES[0])
        merged.setdefault(owner, {})[name] = value
    merged.setdefault("train.py", {})["PROGRESS_SECONDS"] = 0.0
    return merged


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


class Log:
    """Lines to stdout and, when OUT is set, to $OUT/train_speed.log as well."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")

    def line(self, text: str = "", stream: IO[str] | None = None) -> None:
        print(text, file=stream or sys.stdout, flush=True)
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class Run:
    label: str
    lines: list[str] = field(default_factory=list)
    first_step_seen: float | None = None  # seconds from launch to the first progress line
    seconds: float = 0.0

    @property
    def summary(self) -> dict[str, float]:
        return parse_summary(self.lines)


def run_logged(
    label: str,
    command: list[str],
    cwd: Path,
    env: Mapping[str, str],
    log: Log,
    timeout: float,
) -> Run:
    """Run COMMAND in its own process group, streaming its output (stderr merged) to LOG
    line by line as it comes; BenchError with its last lines when it fails or outlives
    TIMEOUT, KeyboardInterrupt when we are sent SIGTERM or SIGINT meanwhile."""
    run = Run(label)
    shell = shlex.join(command)
    log.line(f"[{label}] $ {shell}  (in {cwd})")
    started = time.monotonic()
    splitter = LineSplitter()

    def take(lines: list[str]) -> None:
        for line in lines:
            if run.first_step_seen is None and parse_progress(line) is not None:
                run.first_step_seen = time.monotonic() - started
            run.lines.append(line)
            log.line(f"[{label}] {line}")

    limits = Limits(max_wall_time=timeout, kill_grace=KILL_GRACE_SECONDS)
    # exec: the run is our child, not the shell's, so we reap it when it ends.
    result = supervise(f"exec {shell}", cwd, env, limits, lambda data: take(splitter.feed(data)))
    take(splitter.close())
    run.seconds = result.duration_seconds
    if result.stopped_by is StopReason.SIGNAL:
        raise KeyboardInterrupt
    if result.stopped_by is StopReason.TIMEOUT:
        raise BenchError(_failure(run, log, f"killed after {timeout:.0f} s"))
    if result.exit_code != 0:
        raise BenchError(_failure(run, log, f"exited with status {result.exit_code}"))
    return run


def _failure(run: Run, log: Log, what: str) -> str:
    """The one-line error of a failed run, after its last lines."""
    tail = [line for line in run.lines if line.strip()][-TAIL_LINES:]
    log.line(f"last lines of the {run.label} run:", sys.stderr)
    for line in tail:
        log.line(f"    {line}", sys.stderr)
    last = tail[-1].strip() if tail else "no output"
    message = f"the {run.label} run {what}: {last}"
    if "rustbpe" in last:
        message += " (prepare the data where rustbpe is installed and pass that directory)"
    return message


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

_DEVICE_LINE = re.compile(r"^device (\S+)")
_STEP_MS = re.compile(r"\| dt ([\d.]+)ms\b")


def run_device(run: Run) -> str:
    """The device train.py reports on its first line (cuda, cpu, mps)."""
    for line in run.lines:
        match = _DEVICE_LINE.match(line)
        if match:
            return match.group(1).split(":")[0]
    return "unknown"


def step_times(run: Run, skip: int) -> list[float]:
    """Milliseconds of each step after the first SKIP, from the progress lines' dt field
    (the trainer's Progress keeps step, loss, tok/s, done and left, not dt)."""
    times = []
    for line in run.lines:
        progress = parse_progress(line)
        match = _STEP_MS.search(line)
        if progress is not None and match and progress.step > skip:
            times.append(float(match.group(1)))
    return times


def percentiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(p10, median, p90), inclusive method; None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], statistics.median(values), deciles[8]


def device_name(device: str) -> str:
    if device != "cuda":
        return device
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cuda (nvidia-smi not available)"
    names = [name.strip() for name in result.stdout.splitlines() if name.strip()]
    if not names:
        return "cuda"
    return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"


def torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return NA


def _number(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return NA
    return f"{value:,.{digits}f}{unit}"


@dataclass
class Figures:
    device: str
    gpu: str
    torch: str
    world_size: int | None
    tokens_per_second: float | None
    tokens_per_second_derived: bool
    mfu_percent: float | None
    peak_flops: float | None
    step_ms: tuple[float, float, float] | None
    timed_steps: int
    skip_steps: int
    num_steps: float | None
    training_seconds: float | None
    peak_vram_mb: float | None
    first_step_cold: float | None
    first_step_cold_seen: float | None
    first_step_warm: float | None
    first_step_warm_seen: float | None
    eval_seconds: float | None
    val_bpb: float | None
    setup_seconds: float | None


def figures(
    cold: Run, warm: Run, constants: Mapping[str, ConstantValue], setup: float | None
) -> Figures:
    """The table's figures from the two runs and train.py's (rewritten) constants."""
    summary = cold.summary
    device = run_device(cold)
    on_cuda = device == "cuda"
    skip = int(constants.get("TIMING_SKIP_STEPS", 10)) if on_cuda else 0
    peak = constants.get("CUDA_PEAK_FLOPS" if on_cuda else "OTHER_PEAK_FLOPS")
    steps = step_times(cold, skip)

    tokens = summary.get("tokens_per_second")
    derived = False
    batch = constants.get("TOTAL_BATCH_SIZE")
    seconds = summary.get("training_seconds")
    if tokens is None and "num_steps" in summary and seconds and isinstance(batch, int | float):
        # train.py's own definition: tokens of the steps after the skipped ones, per
        # training second (TOTAL_BATCH_SIZE counts every process's tokens).
        tokens = max(summary["num_steps"] - skip, 0) * batch / seconds
        derived = True
    world = summary.get("world_size")
    return Figures(
        device=device,
        gpu=device_name(device),
        torch=torch_version(),
        world_size=int(world) if world is not None else None,
        tokens_per_second=tokens,
        tokens_per_second_derived=derived,
        mfu_percent=summary.get("mfu_percent"),
        peak_flops=float(peak) if isinstance(peak, int | float) else None,
        step_ms=percentiles(steps),
        timed_steps=len(steps),
        skip_steps=skip,
        num_steps=summary.get("num_steps"),
        training_seconds=seconds,
        peak_vram_mb=summary.get("peak_vram_mb"),
        first_step_cold=summary.get("first_step_seconds"),
        first_step_cold_seen=cold.first_step_seen,
        first_step_warm=warm.summary.get("first_step_seconds"),
        first_step_warm_seen=warm.first_step_seen,
        eval_seconds=summary.get("eval_seconds"),
        val_bpb=summary.get("val_bpb"),
        setup_seconds=setup,
    )


def table(f: Figures, title: str, setting: str) -> str:
    """The figures as a markdown table with its footnotes."""
    ratio = ""
    if f.tokens_per_second is not None:
        ratio = f" ({f.tokens_per_second / REFERENCE_TOKENS_PER_SECOND:.2f}x the reference)"
    tokens = _number(f.tokens_per_second, 0) + ("[2]" if f.tokens_per_second_derived else "")
    peak = f" of {f.peak_flops / 1e12:,.1f} TFLOP/s" if f.peak_flops else ""
    p10, p50, p90 = f.step_ms or (None, None, None)
    vram = NA
    if f.peak_vram_mb is not None:
        vram = f"{f.peak_vram_mb:,.0f} MiB ({f.peak_vram_mb / 1024:.1f} GiB)"
    processes = f" ({f.world_size} processes)" if f.world_size and f.world_size > 1 else ""

    def first(value: float | None, seen: float | None) -> str:
        text = _number(value, 1, " s")
        return text + (f" ({seen:.1f} s seen)" if seen is not None else "")

    rows = [
        ("device", f"{f.gpu}{processes}, torch {f.torch}", REFERENCE_DEVICE),
        ("tokens/s", tokens + ratio, f"{REFERENCE_TOKENS_PER_SECOND:,.0f}"),
        (
            "MFU[1]",
            _number(f.mfu_percent, 1, "%") + peak,
            f"{REFERENCE_MFU_PERCENT}% of {REFERENCE_PEAK_TFLOPS} TFLOP/s",
        ),
        ("ms per step, median[3]", _number(p50, 1), f"{REFERENCE_STEP_MS:.0f}"),
        ("ms per step, p10 / p90[3]", f"{_number(p10, 1)} / {_number(p90, 1)}", ""),
        ("peak VRAM", vram, ""),
        (
            "first step, cold[4]",
            first(f.first_step_cold, f.first_step_cold_seen),
            f"{REFERENCE_FIRST_STEP_COLD:.0f} s",
        ),
        ("first step, warm[4]", first(f.first_step_warm, f.first_step_warm_seen), ""),
        ("eval", _number(f.eval_seconds, 1, " s"), f"{REFERENCE_EVAL_SECONDS:.0f} s"),
        ("val_bpb", _number(f.val_bpb, 4), "(other data)"),
        (
            "steps (timed / all)",
            f"{f.timed_steps} / {_number(f.num_steps, 0)} in "
            f"{_number(f.training_seconds, 1, ' s')} of training",
            "",
        ),
        (
            "set-up (prepare.py)",
            _number(f.setup_seconds, 1, " s") if f.setup_seconds is not None else "none",
            "",
        ),
    ]
    header = ("figure", "this run", "reference")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def format_row(row: tuple[str, str, str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    lines = [
        f"{title}: {setting}",
        "",
        format_row(header),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(format_row(row) for row in rows),
        "",
        "[1] train.py's count (GPT.flops_per_token): 6 FLOPs per weight of every matmul, the "
        "embedding lookup excluded, plus attention's QK^T and AV at 12 x heads x head_dim x "
        "span per layer, span = the layer's window, a full square per token with no causal "
        "discount; over the peak train.py assumes (CUDA_PEAK_FLOPS on CUDA).",
        *(
            [
                "[2] train.py's summary has no tokens_per_second: counted from its num_steps, "
                "TOTAL_BATCH_SIZE and training_seconds."
            ]
            if f.tokens_per_second_derived
            else []
        ),
        "[3] the dt of every step's progress line"
        + (
            f", the first {f.skip_steps} (compile warm-up, TIMING_SKIP_STEPS) left out."
            if f.skip_steps
            else ", every step (only CUDA runs skip TIMING_SKIP_STEPS warm-up steps)."
        ),
        "[4] train.py's first_step_seconds: process start to the end of the first optimizer "
        "step; cold with empty TorchInductor and Triton caches, warm with the ones the cold "
        "run filled. 'seen': launch to the first progress line, as this bench saw it.",
        f"{NA}: train.py's summary has no such field. Reference: karpathy/autoresearch's "
        "train.py on an NVIDIA H200 with torch 2.11; other data and code, so a guide only.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--data", required=True, type=Path, help="a prepared data directory or a raw corpus"
    )
    parser.add_argument("--budget", type=float, default=75.0, help="cold run, seconds (75)")
    parser.add_argument("--warm-budget", type=float, default=5.0, help="warm run, seconds (5)")
    parser.add_argument(
        "--work", type=Path, help="work directory, kept (default: a temporary one, removed)"
    )
    add_experiment_arguments(parser)
    return parser


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """--profile, --set, --device and --experiment: which train.py runs, and where."""
    parser.add_argument("--profile", help="an experiment.toml profile to apply, e.g. cpu")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="rewrite one constant of train.py (repeatable)",
    )
    parser.add_argument("--device", help="SKYLAB_DEVICE for train.py (cuda, cpu, ...)")
    parser.add_argument(
        "--experiment", type=Path, default=EXPERIMENT, help="default: experiments/gpt-pretrain"
    )


def bench(args: argparse.Namespace, work: Path, log: Log) -> str:
    """Set up, run cold and warm, and return the table."""
    experiment = args.experiment.resolve()
    data = args.data.resolve()
    if not data.exists():
        raise BenchError(f"--data {args.data}: no such directory", status=2)
    settings = [parse_setting(text) for text in args.settings]
    profile_constants, prepare_args = profile_settings(experiment, args.profile)
    constants = bench_constants(experiment, profile_constants, settings)
    copy = work / "experiment"
    if copy.exists():
        shutil.rmtree(copy)
    copy_experiment(experiment, copy, constants)
    train_constants = read_constants((copy / "train.py").read_text())

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device:
        env["SKYLAB_DEVICE"] = args.device
    prepare = copy / "prepare.py"
    ready = "READY"  # prepare.py's name for its manifest, written last
    if prepare.is_file():
        ready = str(read_constants(prepare.read_text()).get("READY", ready))
    setup: float | None = None
    if (data / ready).is_file():
        log.line(f"data: {data} is prepared ({ready} found)")
        prepared = data
    else:
        prepared = work / "data"
        command = [sys.executable, "prepare.py", *prepare_args]
        command += ["--source", str(data), "--data-dir", str(prepared)]
        run = run_logged("set-up", command, copy, env, log, RUN_TIMEOUT_EXTRA)
        setup = run.seconds

    caches = work / "cache"
    if caches.exists():
        shutil.rmtree(caches)  # the cold run starts from nothing
    env.update(
        SKYLAB_DATA_DIR=str(prepared),
        TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
        TRITON_CACHE_DIR=str(caches / "triton"),
    )
    runs = []
    for label, budget in (("cold", args.budget), ("warm", args.warm_budget)):
        env["SKYLAB_TIME_BUDGET"] = f"{budget:g}"
        timeout = 3 * budget + RUN_TIMEOUT_EXTRA
        runs.append(run_logged(label, [sys.executable, "train.py"], copy, env, log, timeout))

    changes = [f"--profile {args.profile}"] if args.profile else []
    changes += [f"--set {text}" for text in args.settings]
    title = f"train.py {' '.join(changes)}" if changes else "train.py as committed"
    return table(
        figures(runs[0], runs[1], train_constants, setup),
        title,
        f"cold run {args.budget:g} s, warm run {args.warm_budget:g} s of training, data {data}",
    )


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt  # between runs; during one, supervise() stops it first


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.warm_budget <= 0:
        parser.error("--budget and --warm-budget must be positive")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    out = os.environ.get("OUT")
    log = Log(Path(out) / "train_speed.log" if out else None)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="train-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        text = bench(args, work, log)
        log.line()
        log.line(text)
    except (BenchError, UserError) as exc:
        status = exc.status if isinstance(exc, BenchError) else 2
        log.line(f"train_speed: error: {exc}", sys.stderr)
        return status
    except KeyboardInterrupt:
        log.line("train_speed: error: interrupted", sys.stderr)
        return 130
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        log.close()
        signal.signal(signal.SIGTERM, previous)
    if out:
        (Path(out) / "train_speed.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
