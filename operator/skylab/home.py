"""The skylab home: the directory (default ./.skylab) holding everything a local
campaign writes — the embedded database, campaign repositories, trial runs and
prepared data — guarded so only one `skylab run` uses it at a time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from skylab.errors import UserError

DEFAULT_HOME = ".skylab"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, path: str | None) -> Home:
        return cls(Path(path or os.environ.get("SKYLAB_HOME") or DEFAULT_HOME).resolve())

    @property
    def postgres_dir(self) -> Path:
        return self.root / "postgres"

    def data_dir(self, experiment: str) -> Path:
        return self.root / "data" / experiment

    def workspace(self, campaign: str) -> Path:
        return self.root / "workspaces" / f"{campaign}.git"

    def runs_dir(self, campaign: str) -> Path:
        return self.root / "runs" / campaign

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the home's lock for a whole run; a second run gets a clear error."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / "run.lock"
        with lock_path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(
                    f"{self.root} is in use by another skylab run (pid {holder}); "
                    "wait for it or use another --home"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)
