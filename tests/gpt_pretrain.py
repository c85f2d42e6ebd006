"""experiments/gpt-pretrain/train.py loaded as a module, for tests of its parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "gpt-pretrain"


def load_train() -> ModuleType:
    """train.py as a module (it imports prepare from its own directory)."""
    sys.path.insert(0, str(EXPERIMENT))
    try:
        spec = importlib.util.spec_from_file_location("gpt_pretrain_train", EXPERIMENT / "train.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENT))
