"""The campaign repository: commits, refs, keep and revert, the user's files untouched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from skylab.strategies.base import FileEdit
from skylab.workspace import GitError, Workspace, trial_ref


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[Workspace, str]:
    files = {"train.py": "LR = 0.1\n", "prepare.py": "SEQ = 8\n", "sub/notes.md": "hi\n"}
    return Workspace.create(tmp_path / "ws" / "camp.git", "camp", files)


def test_baseline_commit_holds_the_files(workspace: tuple[Workspace, str]) -> None:
    ws, root = workspace
    assert ws.head() == root
    assert ws.read_file(root, "train.py") == "LR = 0.1\n"
    assert ws.read_file(root, "sub/notes.md") == "hi\n"
    assert _git(ws.git_dir, "rev-parse", "refs/heads/skylab/camp") == root
    assert _git(ws.git_dir, "config", "uploadpack.allowAnySHA1InWant") == "true"


def test_trial_commit_is_a_child_with_its_own_ref(workspace: tuple[Workspace, str]) -> None:
    ws, root = workspace
    commit = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.2\n")], "LR=0.2")
    assert _git(ws.git_dir, "rev-parse", f"{commit}^") == root
    assert _git(ws.git_dir, "rev-parse", trial_ref(2)) == commit
    assert _git(ws.git_dir, "log", "-1", "--format=%s", commit) == "LR=0.2"
    assert ws.read_file(commit, "train.py") == "LR = 0.2\n"
    # untouched files are carried over from the parent
    assert ws.read_file(commit, "prepare.py") == "SEQ = 8\n"
    diff = ws.diff(root, commit)
    assert "-LR = 0.1" in diff and "+LR = 0.2" in diff
    # committing does not move the branch: only a keep does
    assert ws.head() == root


def test_keep_advances_and_revert_leaves_the_branch(workspace: tuple[Workspace, str]) -> None:
    ws, root = workspace
    kept = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.2\n")], "keep me")
    ws.advance(kept)
    reverted = ws.commit_trial(3, kept, [FileEdit("train.py", "LR = 9\n")], "revert me")
    assert ws.head() == kept
    # the reverted trial is still inspectable by its ref
    assert ws.read_file(_git(ws.git_dir, "rev-parse", trial_ref(3)), "train.py") == "LR = 9\n"
    assert _git(ws.git_dir, "rev-parse", trial_ref(3)) == reverted
    # the next trial branches from the kept one
    nxt = ws.commit_trial(4, ws.head(), [FileEdit("train.py", "LR = 0.3\n")], "next")
    assert _git(ws.git_dir, "rev-parse", f"{nxt}^") == kept


def test_the_users_checkout_is_never_touched(tmp_path: Path) -> None:
    user = tmp_path / "experiment"
    user.mkdir()
    (user / "train.py").write_text("LR = 0.1\n")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    ws, root = Workspace.create(
        tmp_path / "home" / "c.git", "c", {"train.py": (user / "train.py").read_text()}
    )
    commit = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.5\n")], "x")
    ws.advance(commit)
    ws.advance(root)  # a revert is a ref move
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert not (user / ".git").exists()


def test_a_trainer_can_fetch_a_trial_commit_by_hash(
    workspace: tuple[Workspace, str], tmp_path: Path
) -> None:
    ws, root = workspace
    commit = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.7\n")], "x")
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    subprocess.run(
        ["git", "-C", str(checkout), "fetch", "-q", "--depth=1", str(ws.git_dir), commit],
        check=True,
    )
    subprocess.run(["git", "-C", str(checkout), "checkout", "-q", commit], check=True)
    assert (checkout / "train.py").read_text() == "LR = 0.7\n"


def test_create_refuses_an_existing_repository(workspace: tuple[Workspace, str]) -> None:
    ws, _ = workspace
    with pytest.raises(GitError, match="already exists"):
        Workspace.create(ws.git_dir, "camp", {"a": "b"})


def test_unknown_path_is_a_git_error(workspace: tuple[Workspace, str]) -> None:
    ws, root = workspace
    with pytest.raises(GitError):
        ws.read_file(root, "missing.py")


def _killed_mid_update(git_dir: Path, ref: str, commit: str) -> None:
    """A real `git update-ref` SIGKILLed while it holds REF's lock (a transaction that
    is prepared, so the lock is taken, and never committed)."""
    process = subprocess.Popen(
        ["git", "--git-dir", str(git_dir), "update-ref", "--stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"start\nupdate {ref} {commit}\nprepare\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "start: ok"
    assert process.stdout.readline().strip() == "prepare: ok"  # the lock is held now
    process.kill()
    process.wait()


def test_a_lock_left_by_a_git_killed_mid_update_is_removed(
    workspace: tuple[Workspace, str],
) -> None:
    ws, root = workspace
    first = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.2\n")], "one")
    _killed_mid_update(ws.git_dir, trial_ref(3), first)
    _killed_mid_update(ws.git_dir, f"refs/heads/{ws.branch}", first)
    assert (ws.git_dir / f"{trial_ref(3)}.lock").exists()
    with pytest.raises(subprocess.CalledProcessError):  # git alone refuses for good
        _git(ws.git_dir, "update-ref", trial_ref(3), first)
    # The workspace recognises both locks as a dead process's and goes on.
    third = ws.commit_trial(3, root, [FileEdit("train.py", "LR = 0.3\n")], "three")
    ws.advance(third)
    assert _git(ws.git_dir, "rev-parse", trial_ref(3)) == third
    assert ws.head() == third
    assert not list(ws.git_dir.rglob("*.lock"))


def test_a_lock_of_a_live_git_process_is_left_alone(workspace: tuple[Workspace, str]) -> None:
    ws, root = workspace
    holder = subprocess.Popen(
        ["git", "--git-dir", str(ws.git_dir), "update-ref", "--stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        holder.stdin.write(f"start\nupdate {trial_ref(2)} {root}\nprepare\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "start: ok"
        assert holder.stdout.readline().strip() == "prepare: ok"
        with pytest.raises(GitError, match="File exists"):
            ws.mark_baseline(2, root)
        assert (ws.git_dir / f"{trial_ref(2)}.lock").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_commit_keeps_every_byte_of_its_files_and_names(
    workspace: tuple[Workspace, str],
) -> None:
    ws, root = workspace
    content = "π = 3.14  # ünïcode\r\nLR = 0.2\n\n\nno newline at the end"
    edits = [
        FileEdit("train.py", content),
        FileEdit("dir with spaces/new file.py", "x = 1\n"),
        FileEdit('"quoted".py', "y = 2\n"),
        FileEdit("empty.py", ""),
    ]
    message = "LR=0.2\n\ndata 3\nM 100644 inline evil\n"  # fast-import's words, as text
    commit = ws.commit_trial(2, root, edits, message)
    for edit in edits:
        shown = subprocess.run(
            ["git", "--git-dir", str(ws.git_dir), "show", f"{commit}:{edit.path}"],
            check=True,
            capture_output=True,
        ).stdout
        assert shown == edit.content.encode()
    assert ws.read_file(commit, "prepare.py") == "SEQ = 8\n"  # the parent's, carried over
    shown_message = subprocess.run(
        ["git", "--git-dir", str(ws.git_dir), "log", "-1", "--format=%B", commit],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert shown_message.rstrip("\n") == message.rstrip("\n")
    assert (
        _git(ws.git_dir, "log", "-1", "--format=%an <%ae>", commit) == "skylab <skylab@localhost>"
    )


def test_a_trial_committed_again_replaces_its_ref(workspace: tuple[Workspace, str]) -> None:
    # A proposal redone after a restart: the trial's ref moves to the new commit.
    ws, root = workspace
    first = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.2\n")], "first")
    again = ws.commit_trial(2, root, [FileEdit("train.py", "LR = 0.3\n")], "again")
    assert first != again
    assert _git(ws.git_dir, "rev-parse", trial_ref(2)) == again


def test_a_commit_on_an_unknown_parent_is_a_git_error(workspace: tuple[Workspace, str]) -> None:
    ws, _ = workspace
    with pytest.raises(GitError, match="fast-import"):
        ws.commit_trial(2, "1" * 40, [FileEdit("train.py", "LR = 0.2\n")], "orphan")
    with pytest.raises(subprocess.CalledProcessError):
        _git(ws.git_dir, "rev-parse", "--verify", trial_ref(2))
