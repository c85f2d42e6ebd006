"""Finding an experiment directory by path or by name, and its baseline files."""

from __future__ import annotations

from pathlib import Path

import skylab
from skylab.config import CONFIG_FILE, ExperimentConfig
from skylab.constants import rewrite_constants
from skylab.errors import UserError

DEFAULT_EXPERIMENT = "gpt-pretrain"


def search_path() -> list[Path]:
    """Where named experiments are looked up, first match wins."""
    package = Path(skylab.__file__).resolve().parent
    return [
        Path.cwd() / "experiments",
        package / "bundled_experiments",  # inside an installed wheel
        package.parents[1] / "experiments",  # a source checkout (editable install)
    ]


def resolve_experiment(spec: str | None) -> Path:
    """An experiment directory from a path or a bundled experiment's name."""
    spec = spec or DEFAULT_EXPERIMENT
    path = Path(spec)
    if (path / CONFIG_FILE).is_file():
        return path.resolve()
    if path.is_dir():
        raise UserError(f"{path}: not an experiment directory (no {CONFIG_FILE})")
    for folder in search_path():
        candidate = folder / spec
        if (candidate / CONFIG_FILE).is_file():
            return candidate.resolve()
    known = sorted({p.parent.name for f in search_path() for p in f.glob(f"*/{CONFIG_FILE}")})
    raise UserError(
        f"unknown experiment {spec!r}: not a directory with {CONFIG_FILE}, "
        f"nor one of: {', '.join(known) or 'none found'}"
    )


def baseline_files(config: ExperimentConfig) -> dict[str, str]:
    """The experiment's files as a campaign's baseline commit holds them, profile applied."""
    names = [*config.tracked_files, CONFIG_FILE]
    if (config.root / "program.md").is_file():
        names.append("program.md")
    files = {name: (config.root / name).read_text() for name in names}
    for name, values in config.constants.items():
        files[name] = rewrite_constants(files[name], values)
    return files
