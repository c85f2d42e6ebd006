"""Checking out exactly one commit of the campaign repository, shallowly."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

# A fetch that hangs (an unreachable server) must not eat the trial's wall time.
FETCH_TIMEOUT_SECONDS = 600.0


class FetchError(Exception):
    """The commit could not be checked out; `output` is what git said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def fetch_commit(repo: str, commit: str, dest: Path, git_config: Sequence[str] = ()) -> None:
    """Make `dest` a detached checkout of `commit` (or a branch or tag) fetched from `repo`.

    Fetching a bare SHA needs the server to allow it (uploadpack.allowAnySHA1InWant);
    the campaign workspace sets that, so no branch or tag has to point at the commit.
    GIT_CONFIG holds `key=value` settings for the fetch (credentials as an HTTP
    header, so that they never appear in a URL or an error message).
    """
    dest.mkdir(parents=True, exist_ok=True)
    source = _absolute_if_local(repo)
    options = [arg for setting in git_config for arg in ("-c", setting)]
    _git("init", "-q", str(dest))
    _git(*options, "-C", str(dest), "fetch", "--depth=1", "--no-tags", "-q", source, commit)
    _git("-C", str(dest), "checkout", "-q", "--detach", "--force", "FETCH_HEAD")


def _absolute_if_local(repo: str) -> str:
    # git resolves a relative path against -C's directory, not ours.
    if "://" not in repo and Path(repo).exists():
        return str(Path(repo).resolve())
    return repo


def _git(*args: str) -> None:
    # No terminal prompt: a repository that asks for credentials fails instead of hanging.
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        done = subprocess.run(
            ["git", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"git {_verb(args)}: timed out after {exc.timeout:g}s") from exc
    except OSError as exc:
        raise FetchError(f"cannot run git: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        last = output.splitlines()[-1] if output else f"exit code {done.returncode}"
        raise FetchError(f"git {_verb(args)}: {last}", output)


def _verb(args: tuple[str, ...]) -> str:
    """The git subcommand, past any `-c key=value` and `-C dir` options."""
    index = 0
    while args[index] in ("-c", "-C"):
        index += 2
    return args[index]
