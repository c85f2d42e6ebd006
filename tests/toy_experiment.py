"""A toy experiment for driving `skylab run` fast: its train.py takes a second and its
val_bpb is a known function of its constants, so keep/revert can be checked exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TRAIN_PY = '''\
"""Toy training script: val_bpb = (LR - 0.3) ** 2 + 1 (+ NOISE, seeded), after SLEEP s."""
import os
import random
import time

LR = 0.1  # the swept constant
MODE = "ok"  # ok | crash | nometric | hang
SLEEP = 0.5  # seconds of "training"
NOISE = 0.0  # run-to-run spread of val_bpb, drawn from SKYLAB_SEED
LOSS_OFFSET = 0.0  # added to the training loss: a run that trains worse throughout

seed = os.environ.get("SKYLAB_SEED", "0")
for step in range(1, 4):
    print(f"step {step:05d} | loss {4.0 / step + LOSS_OFFSET:.6f} | done {step * 33.3:.1f}%"
          " | left 1s", flush=True)
    time.sleep(SLEEP / 3)
slow = str(LR) == os.environ.get("TOY_SLOW_LR")
if slow and os.environ.get("TOY_SLOW_SEED", seed) == seed:
    time.sleep(60)  # lets a test interrupt this trial (this run of it)
if MODE == "crash":
    raise RuntimeError("boom: the toy model diverged")
if MODE == "hang":
    time.sleep(3600)
if MODE != "nometric":
    print("---")
    print(f"val_bpb:          {(LR - 0.3) ** 2 + 1 + NOISE * random.Random(seed).gauss(0, 1):.6f}")
    print("peak_vram_mb:     0.0")
'''


# One run per trial, greedy keeps: what most tests of the loop's mechanics want. Tests of
# the noise-aware decisions pass their own [decision].
SINGLE_RUN = """
[decision]
noise = "off"
"""


def write_toy_experiment(
    root: Path, sweep: str, extra: str = "", decision: str = SINGLE_RUN
) -> Path:
    """Write an experiment directory with the given [strategy.sweep] body."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN_PY)
    (root / "prepare.py").write_text("# frozen harness of the toy experiment\n")
    (root / "experiment.toml").write_text(
        textwrap.dedent(f"""\
        [experiment]
        name = "toy"

        [search]
        editable_files = ["train.py"]
        frozen_files = ["prepare.py"]
        metric = "val_bpb"
        direction = "minimize"
        metric_pattern = '^val_bpb:\\s+([-+0-9.eE]+)'

        [execution]
        command = "python train.py"
        time_budget_seconds = 1

        [constraints]
        max_trial_wall_time = 120
        max_consecutive_failures = 2

        [prepare]
        ready_marker = "READY"
        {decision}
        {extra}
        [strategy.sweep]
        {sweep}
        """)
    )
    return root


def mark_prepared(home: Path, experiment: str = "toy") -> None:
    data = home / "data" / experiment
    data.mkdir(parents=True, exist_ok=True)
    (data / "READY").write_text("{}")


def skylab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "skylab", *args]


def skylab(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `skylab` CLI in a subprocess."""
    return subprocess.run(
        skylab_command(*args),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
