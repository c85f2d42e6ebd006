"""The workspace versions: one bare git repository per campaign.

Every trial is a commit on its parent with a ref of its own
(`refs/skylab/trials/NNNN`); kept trials advance the branch `skylab/<campaign>`.
Reverting is never a reset of anyone's checkout: the branch simply stays where it
was. The repository lives under the skylab home, outside the user's experiment
directory, which skylab only ever reads.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import time
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
        root = workspace._commit(
            f"refs/heads/{workspace.branch}", None, edits, f"baseline of campaign {campaign}"
        )
        return workspace, root

    def commit_trial(
        self, number: int, parent: str, edits: Iterable[FileEdit], message: str
    ) -> str:
        """Commit EDITS on PARENT as trial NUMBER and point the trial's ref at it."""
        return self._commit(trial_ref(number), parent, list(edits), message)

    def mark_baseline(self, number: int, commit: str) -> None:
        self._git("update-ref", trial_ref(number), commit)

    def advance(self, commit: str) -> None:
        """Move the campaign branch to COMMIT (a kept trial)."""
        self._git("update-ref", f"refs/heads/{self.branch}", commit)

    def head(self) -> str:
        return self._git("rev-parse", f"refs/heads/{self.branch}")

    def read_file(self, commit: str, path: str) -> str:
        if _COMMIT_ID.fullmatch(commit):  # a commit's files never change: read them once
            return _file_of_commit(str(self.git_dir), commit, path)
        return self._git("show", f"{commit}:{path}", strip=False)

    def diff(self, parent: str, commit: str) -> str:
        return self._git("diff", "--no-color", parent, commit, strip=False)

    def _commit(self, ref: str, parent: str | None, edits: list[FileEdit], message: str) -> str:
        """Commit EDITS on PARENT (None: a root commit of EDITS alone) and point REF at it.

        One git process: fast-import writes the blobs, the tree, the commit and the ref
        (through a lock file, as update-ref does), and prints the commit's id.
        """
        now = int(time.time())
        person = (
            f"{_IDENTITY['GIT_COMMITTER_NAME']} <{_IDENTITY['GIT_COMMITTER_EMAIL']}> {now} +0000"
        )
        stream = [f"commit {ref}\nmark :1\nauthor {person}\ncommitter {person}\n".encode()]
        stream.append(_data(message))
        if parent is not None:
            stream.append(f"from {parent}\n".encode())
        for edit in edits:
            stream.append(f"M 100644 inline {_quoted(edit.path)}\n".encode())
            stream.append(_data(edit.content))
        stream.append(b"get-mark :1\ndone\n")
        return self._git("fast-import", "--quiet", "--force", "--done", stdin=b"".join(stream))

    def _git(self, *args: str, stdin: bytes | None = None, strip: bool = True) -> str:
        return _git(self.git_dir, *args, stdin=stdin, strip=strip)


def _data(text: str) -> bytes:
    """TEXT as a fast-import data block: its length in bytes, then the bytes."""
    raw = text.encode()
    return b"data %d\n" % len(raw) + raw + b"\n"


def _quoted(path: str) -> str:
    """PATH as fast-import reads it: C-style quoted when it starts with a quote or holds
    a line break, else as it is."""
    if not path.startswith('"') and "\n" not in path:
        return path
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@functools.lru_cache(maxsize=64)
def _file_of_commit(git_dir: str, commit: str, path: str) -> str:
    return _git(Path(git_dir), "show", f"{commit}:{path}", strip=False)


def _git(
    git_dir: Path | None,
    *args: str,
    stdin: bytes | None = None,
    strip: bool = True,
) -> str:
    command = ["git", *(["--git-dir", str(git_dir)] if git_dir else []), *args]
    for _ in range(2):
        # Bytes in and out: fast-import counts its data in bytes, whatever the locale.
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            env={**os.environ, **_IDENTITY},
            check=False,
        )
        stderr = result.stderr.decode(errors="replace")
        if result.returncode == 0:
            stdout = result.stdout.decode()
            return stdout.strip() if strip else stdout
        if git_dir is None or not _removed_stale_lock(git_dir, stderr):
            break
    raise GitError(f"git {args[0]} failed: {stderr.strip()}")


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
