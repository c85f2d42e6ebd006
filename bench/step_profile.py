"""Where one optimizer step of experiments/gpt-pretrain/train.py spends its time.

Builds train.py's model and optimizers in this process, from a copy of the experiment
with --profile and --set applied, and trains on random tokens: data loading is left out
(train.py's summary reports the loader's wait as data_wait_seconds). After --warm-up
steps (compilation) it prints

- the step split into forward+backward and each optimizer's step, from --steps timed
  steps, with a device synchronisation around each part;
- the kernels of --steps steps under torch.profiler, by kind (matmul, attention, fused
  Triton, copies and fills, other) and the --top longest. On CPU, where there are no
  kernels, the operators' own (self) time stands in for them.

    python bench/step_profile.py                                            # a GPU
    .venv/bin/python bench/step_profile.py --profile cpu --device cpu       # the CPU

It needs what train.py needs, plus the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.profiler import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (
    BenchError,
    add_experiment_arguments,
    bench_constants,
    copy_experiment,
    parse_setting,
    profile_settings,
)

# Kinds of kernels (or CPU operators), by a lower-case part of their name; the first
# kind that matches wins, so attention is told apart before the Triton kernels that
# FlexAttention compiles to.
KINDS = (
    ("attention", ("flash", "fmha", "flex_attention", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("fused triton", ("triton",)),
    ("copy, fill", ("memcpy", "memset", "aten::copy_", "aten::fill_", "aten::zero_")),
)
OTHER = "other"


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, parts in KINDS:
        if any(part in lowered for part in parts):
            return kind
    return OTHER


@dataclass(frozen=True)
class Setup:
    train: ModuleType
    device: torch.device
    model: Callable[..., torch.Tensor]  # compiled where train.py compiles
    optimizers: list[Any]
    batch: tuple[torch.Tensor, torch.Tensor]
    accum_steps: int


def load_train(experiment: Path) -> ModuleType:
    """EXPERIMENT's train.py as a module (it imports prepare from its own directory)."""
    sys.path.insert(0, str(experiment))
    for name in ("train", "prepare"):
        sys.modules.pop(name, None)  # another experiment's, imported earlier
    spec = importlib.util.spec_from_file_location("train", experiment / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build(train: ModuleType, vocab_size: int) -> Setup:
    """The model, optimizers and one micro-batch of random tokens, as train.py's main()
    sets them up on one device."""
    prepare = sys.modules["prepare"]
    ranks = train.Ranks()
    device = train.pick_device(ranks)
    torch.manual_seed(train.SEED)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seq_len, rows = prepare.MAX_SEQ_LEN, train.DEVICE_BATCH_SIZE
    if train.TOTAL_BATCH_SIZE % (rows * seq_len):
        raise BenchError(
            f"TOTAL_BATCH_SIZE {train.TOTAL_BATCH_SIZE} is not a multiple of "
            f"DEVICE_BATCH_SIZE x MAX_SEQ_LEN ({rows} x {seq_len})",
            status=2,
        )
    raw = train.GPT(vocab_size, seq_len).to(device)
    compiled = train.COMPILE and device.type == "cuda"
    if compiled and train.FLEX_ATTENTION:
        raw.use_flex_attention()
    model = torch.compile(raw, dynamic=False) if compiled else raw
    tokens = torch.randint(vocab_size, (rows, seq_len + 1), device=device)
    return Setup(
        train=train,
        device=device,
        model=model,
        optimizers=train.build_optimizers(raw),
        batch=(tokens[:, :-1], tokens[:, 1:]),
        accum_steps=train.TOTAL_BATCH_SIZE // (rows * seq_len),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(setup: Setup, steps: int) -> None:
    train = setup.train
    autocast = train.autocast_for(setup.device)
    for _ in range(steps):
        batches = itertools.repeat(setup.batch)
        loss = train.train_step(
            setup.model, setup.optimizers, batches, setup.accum_steps, autocast, train.Ranks()
        )
        loss.item()  # the step loop's one host sync, as in train.py


def phase_seconds(setup: Setup, steps: int) -> dict[str, float]:
    """Seconds per step of forward+backward and of each optimizer's step."""
    seconds: dict[str, float] = defaultdict(float)
    originals = [(optimizer, optimizer.step) for optimizer in setup.optimizers]

    def timed(step: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            synchronize(setup.device)
            started = time.perf_counter()
            step()
            synchronize(setup.device)
            seconds[name] += time.perf_counter() - started

        return run

    for optimizer, step in originals:
        optimizer.step = timed(step, f"{type(optimizer).__name__} step")
    try:
        synchronize(setup.device)
        started = time.perf_counter()
        train_steps(setup, steps)
        synchronize(setup.device)
        total = time.perf_counter() - started
    finally:
        for optimizer, _ in originals:
            del optimizer.step  # the class's method again
    phases = {"forward+backward": (total - sum(seconds.values())) / steps}
    phases.update({name: value / steps for name, value in seconds.items()})
    return phases


def kernel_microseconds(setup: Setup, steps: int) -> dict[str, float]:
    """Microseconds per kernel name over STEPS profiled steps; on CPU, per operator
    (self time, so nested operators are not counted twice)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setup.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        train_steps(setup, steps)
        synchronize(setup.device)
    totals: dict[str, float] = defaultdict(float)
    if setup.device.type == "cuda":
        for event in profiler.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
    else:
        for average in profiler.key_averages():
            totals[average.key] += average.self_cpu_time_total
    return totals


def report(
    phases: dict[str, float], kernels: dict[str, float], steps: int, tokens: int, top: int
) -> Iterable[str]:
    step = sum(phases.values())
    yield f"one step: {1000 * step:.1f} ms, {tokens / step:,.0f} tokens/s"
    for name, seconds in phases.items():
        yield f"  {name:<28} {1000 * seconds:9.1f} ms  {100 * seconds / step:5.1f}%"
    total = sum(kernels.values())
    if total <= 0:
        yield "no kernel times recorded"
        return
    by_kind: dict[str, float] = defaultdict(float)
    for name, micros in kernels.items():
        by_kind[kind_of(name)] += micros
    yield ""
    yield f"kernels: {total / 1000 / steps:.1f} ms per step"
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        yield f"  {kind:<28} {micros / 1000 / steps:9.1f} ms  {100 * micros / total:5.1f}%"
    yield ""
    yield f"the {top} longest (ms per step, share, kind):"
    longest = sorted(kernels.items(), key=lambda item: -item[1])[:top]
    for name, micros in longest:
        share = 100 * micros / total
        yield f"  {micros / 1000 / steps:8.2f}  {share:5.1f}%  {kind_of(name):<12} {name[:100]}"


def set_up(args: argparse.Namespace, copy: Path) -> Setup:
    """The experiment copied to COPY with the profile's and --set's constants, built."""
    experiment = args.experiment.resolve()
    settings = [parse_setting(text) for text in args.settings]
    profile_constants, _ = profile_settings(experiment, args.profile)
    copy_experiment(experiment, copy, bench_constants(experiment, profile_constants, settings))
    return build(load_train(copy), args.vocab_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the random tokens")
    parser.add_argument("--warm-up", type=int, default=5, help="steps before timing (5)")
    parser.add_argument("--steps", type=int, default=5, help="timed and profiled steps (5)")
    parser.add_argument("--top", type=int, default=25, help="longest kernels listed (25)")
    add_experiment_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.warm_up, args.steps, args.top, args.vocab_size) < 1:
        parser.error("--warm-up, --steps, --top and --vocab-size must be at least 1")
    if args.device:
        os.environ["SKYLAB_DEVICE"] = args.device
    with tempfile.TemporaryDirectory(prefix="step-profile-") as work:
        try:
            setup = set_up(args, Path(work) / "experiment")
        except BenchError as exc:
            print(f"step_profile: error: {exc}", file=sys.stderr)
            return exc.status
        started = time.perf_counter()
        train_steps(setup, args.warm_up)
        synchronize(setup.device)
        seconds = time.perf_counter() - started
        print(f"device {setup.device}: {args.warm_up} warm-up steps in {seconds:.1f} s")
        phases = phase_seconds(setup, args.steps)
        kernels = kernel_microseconds(setup, args.steps)
    tokens = setup.train.TOTAL_BATCH_SIZE
    for line in report(phases, kernels, args.steps, tokens, args.top):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
