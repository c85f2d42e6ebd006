"""The operator's read-only git endpoint: trainers fetch trial commits by hash, nothing else."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from skylab.gitserve import GitServer
from skylab.strategies.base import FileEdit
from skylab.workspace import Workspace
from skylab_trainer.fetch import FetchError, fetch_commit


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[GitServer, Workspace, str]]:
    root = tmp_path / "workspaces"
    workspace, _ = Workspace.create(root / "camp.git", "camp", {"train.py": "LR = 1\n"})
    trial = workspace.commit_trial(2, workspace.head(), [FileEdit("train.py", "LR = 2\n")], "t2")
    server = GitServer(root, host="127.0.0.1", port=0).start()
    try:
        yield server, workspace, trial
    finally:
        server.stop()


def test_a_trainer_fetches_a_trial_commit_over_http(
    served: tuple[GitServer, Workspace, str], tmp_path: Path
) -> None:
    server, _, trial = served
    checkout = tmp_path / "checkout"
    fetch_commit(server.url("camp"), trial, checkout)
    assert (checkout / "train.py").read_text() == "LR = 2\n"
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    assert head.stdout.strip() == trial


def test_an_unknown_campaign_is_a_clear_fetch_error(
    served: tuple[GitServer, Workspace, str], tmp_path: Path
) -> None:
    server, _, trial = served
    with pytest.raises(FetchError, match="fetch"):
        fetch_commit(server.url("other"), trial, tmp_path / "checkout")


def test_push_is_refused(served: tuple[GitServer, Workspace, str], tmp_path: Path) -> None:
    server, workspace, trial = served
    clone = tmp_path / "clone"
    fetch_commit(server.url("camp"), trial, clone)
    pushed = subprocess.run(
        ["git", "-C", str(clone), "push", server.url("camp"), "HEAD:refs/heads/evil"],
        capture_output=True,
        text=True,
        env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert pushed.returncode != 0
    refs = subprocess.run(
        ["git", "--git-dir", str(workspace.git_dir), "for-each-ref", "--format=%(refname)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "refs/heads/evil" not in refs


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/git/camp.git/info/refs?service=git-receive-pack", 403),
        ("/git/camp.git/git-receive-pack", 404),
        ("/git/camp.git/HEAD", 404),
        ("/git/camp.git/config", 404),
        ("/git/../camp.git/info/refs?service=git-upload-pack", 404),
        ("/git/camp.git/objects/info/packs", 404),
        ("/other/camp.git/info/refs?service=git-upload-pack", 404),
    ],
)
def test_only_upload_pack_is_served(
    served: tuple[GitServer, Workspace, str], path: str, status: int
) -> None:
    server, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10)
    assert refused.value.code == status


def test_refs_are_advertised(served: tuple[GitServer, Workspace, str]) -> None:
    server, _, _ = served
    url = f"http://127.0.0.1:{server.port}/git/camp.git/info/refs?service=git-upload-pack"
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"] == "application/x-git-upload-pack-advertisement"
        assert b"refs/heads/skylab/camp" in reply.read()
