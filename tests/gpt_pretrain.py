"""experiments/gpt-pretrain/train.py loaded as a module, for tests of its parts."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from skylab.constants import ConstantValue

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "gpt-pretrain"
UNICODE_LINES = [
    "naïve café, déjà vu — Größe, Ærøskøbing",
    "東京都は日本の首都です。 北京欢迎你",
    "Ελληνικά, русский язык, עברית, العربية",
    "emoji: 🚀🔥👩‍💻 and math: ∑∫√∞ ≠ ≤",
]


def load_train() -> ModuleType:
    """train.py as a module (it imports prepare from its own directory)."""
    sys.path.insert(0, str(EXPERIMENT))
    try:
        spec = importlib.util.spec_from_file_location("gpt_pretrain_train", EXPERIMENT / "train.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENT))


def write_text_corpus(root: Path) -> Path:
    """About 400 KB: stdlib sources (long documents) plus many short unicode notes."""
    root.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email"):
        for source in sorted((stdlib / package).glob("*.py")):
            (root / f"{package}_{source.name}").write_text(source.read_text(encoding="utf-8"))
    for i in range(300):
        note = f"Note {i}.\n{UNICODE_LINES[i % len(UNICODE_LINES)]}\nvalue = {i * 37 % 101}\n"
        (root / f"note_{i:03d}.txt").write_text(note, encoding="utf-8")
    return root


def cpu_experiment(
    target: Path,
    train: Mapping[str, ConstantValue] | None = None,
    prepare: Mapping[str, ConstantValue] | None = None,
) -> Path:
    """The experiment's train.py and prepare.py in TARGET with the cpu profile's constants,
    then TRAIN's and PREPARE's."""
    from skylab.config import load_experiment
    from skylab.constants import rewrite_constants

    config = load_experiment(EXPERIMENT, "cpu")
    target.mkdir()
    for name, overrides in (("train.py", train), ("prepare.py", prepare)):
        values = {**config.constants.get(name, {}), **(overrides or {})}
        source = (EXPERIMENT / name).read_text()
        (target / name).write_text(rewrite_constants(source, values) if values else source)
    return target
