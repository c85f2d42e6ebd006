"""The workspace versions: one bare git repository per campaign.

Every trial is a commit on its parent with a ref of its own
(`refs/skylab/trials/NNNN`); kept trials advance the branch `skylab/<campaign>`.
Reverting is never a reset of anyone's checkout: the branch simply stays where it
was. The repository lives under the skylab home, outside the user's experiment
directory, which skylab only ever reads.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil

from skylab.strategies.base import FileEdit

LOGGER = logging.getLogger("skylab.workspace")

_IDENTITY = {
    "GIT_AUTHOR_NAME": "skylab",
    "GIT_AUTHOR_EMAIL": "skylab@localhost",
    "GIT_COMMITTER_NAME": "skylab",
    "GIT_COMMITTER_EMAIL": "skylab@localhost",
}


class GitError(RuntimeError):
    pass


def trial_ref(number: int) -> str:
    return f"refs/skylab/trials/{number:04d}"


class Workspace:
    def __init__(self, git_dir: Path, campaign: str) -> None:
        self.git_dir = git_dir
        self.branch = f"skylab/{campaign}"

    @classmethod
    def create(
        cls, git_dir: Path, campaign: str, files: Mapping[str, str]
    ) -> tuple[Workspace, str]:
        """Initialise the repository with FILES (path -> content) as the root commit."""
        if git_dir.exists():
            raise GitError(f"workspace {git_dir} already exists")
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        _git(None, "init", "--quiet", "--bare", str(git_dir))
        workspace = cls(git_dir, campaign)
        # Trainers fetch trial commits by hash; their refs are not under refs/heads.
        workspace._git("config", "uploadpack.allowAnySHA1InWant", "true")
        edits = [FileEdit(path, content) for path, content in sorted(files.items())]
        root = workspace._commit(None, edits, f"baseline of campaign {campaign}")
        workspace.advance(root)
        return workspace, root

    def commit_trial(
        self, number: int, parent: str, edits: Iterable[FileEdit], message: str
    ) -> str:
        """Commit EDITS on PARENT as trial NUMBER and point the trial's ref at it."""
        commit = self._commit(parent, list(edits), message)
        self._git("update-ref", trial_ref(number), commit)
        return commit

    def mark_baseline(self, number: int, commit: str) -> None:
        self._git("update-ref", trial_ref(number), commit)

    def advance(self, commit: str) -> None:
        """Move the campaign branch to COMMIT (a kept trial)."""
        self._git("update-ref", f"refs/heads/{self.branch}", commit)

    def head(self) -> str:
        return self._git("rev-parse", f"refs/heads/{self.branch}")

    def read_file(self, commit: str, path: str) -> str:
        return self._git("show", f"{commit}:{path}", strip=False)

    def diff(self, parent: str, commit: str) -> str:
        return self._git("diff", "--no-color", parent, commit, strip=False)

    def _commit(self, parent: str | None, edits: list[FileEdit], message: str) -> str:
        with tempfile.TemporaryDirectory(prefix="skylab-index-") as scratch:
            # A private index keeps concurrent commits (parallel trials) apart.
            index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
            if parent is not None:
                self._git("read-tree", parent, env=index)
            for edit in edits:
                blob = self._git("hash-object", "-w", "--stdin", stdin=edit.content)
                self._git(
                    "update-index", "--add", "--cacheinfo", f"100644,{blob},{edit.path}", env=index
                )
            tree = self._git("write-tree", env=index)
        parents = ["-p", parent] if parent is not None else []
        return self._git("commit-tree", tree, *parents, "-m", message)

    def _git(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        strip: bool = True,
    ) -> str:
        return _git(self.git_dir, *args, env=env, stdin=stdin, strip=strip)


def _git(
    git_dir: Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    strip: bool = True,
) -> str:
    command = ["git", *(["--git-dir", str(git_dir)] if git_dir else []), *args]
    for _ in range(2):
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **_IDENTITY, **(env or {})},
            check=False,
        )
        if result.returncode == 0:
            return result.stdout.strip() if strip else result.stdout
        if git_dir is None or not _removed_stale_lock(git_dir, result.stderr):
            break
    raise GitError(f"git {args[0]} failed: {result.stderr.strip()}")


_LOCK_HELD = re.compile(r"Unable to create '([^']+\.lock)': File exists")


def _removed_stale_lock(git_dir: Path, stderr: str) -> bool:
    """Remove the lock file git found in GIT_DIR if no git process works on GIT_DIR: a
    process killed in the middle of a ref update (git writes a ref by renaming its lock
    file over it) leaves the lock, and every later update of that ref would fail."""
    match = _LOCK_HELD.search(stderr)
    if match is None:
        return False
    lock = Path(match[1])
    if not (lock.is_relative_to(git_dir.resolve()) or lock.is_relative_to(git_dir)):
        return False  # not in this repository: not ours to remove
    if _git_running_on(git_dir):
        return False
    lock.unlink(missing_ok=True)  # gone meanwhile: try again all the same
    LOGGER.warning("removed %s, a lock left by a git process that is gone", lock)
    return True


def _git_running_on(git_dir: Path) -> bool:
    """True when a live git process was started on GIT_DIR (by us or anyone)."""
    wanted = {str(git_dir), str(git_dir.resolve())}
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if process.info["name"] == "git" and wanted & set(cmdline):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False
