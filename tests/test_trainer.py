"""`skylab-trainer run` end to end: real subprocesses, real process groups, real git."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import skylab_trainer
from skylab_trainer import cli
from skylab_trainer.output import MAX_LINE_CHARS
from skylab_trainer.report import MAX_REPORT_BYTES

TRAINER_ROOT = Path(skylab_trainer.__file__).resolve().parents[1]
PYTHON = shlex.quote(sys.executable)

SUMMARY = """\
---
val_bpb:          0.997900
training_seconds: 1.5
total_seconds:    2.0
peak_vram_mb:     45060.2
mfu_percent:      39.80
num_steps:        3
depth:            8
"""


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any]


def trainer_env(**extra: str) -> dict[str, str]:
    """Our environment without SKYLAB_* inputs, so only what a test sets applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYLAB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TRAINER_ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def trainer_argv(tmp_path: Path, *args: str) -> list[str]:
    report = ["--report", str(tmp_path / "report.json")]
    return [sys.executable, "-m", "skylab_trainer", "run", *report, *args]


def run_trainer(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Outcome:
    done = subprocess.run(
        trainer_argv(tmp_path, *args),
        env=env or trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report_file = tmp_path / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return Outcome(done.returncode, done.stdout, done.stderr, report)


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def is_alive(pid: int) -> bool:
    """A zombie is dead for our purposes: it runs nothing and only awaits reaping."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def read_pid(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"{path.name} was never written")


def test_success_reports_metrics_echoes_progress_and_writes_log(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        "train.py",
        f"""\
        import os, time
        print("budget", os.environ["SKYLAB_TIME_BUDGET"], "extra", os.environ["EXTRA"])
        for step in range(3):
            print(f"\\rstep {{step:05d}} | loss {{4 - step}}.5", end="", flush=True)
            time.sleep(0.05)
        print()
        print({SUMMARY!r}, end="")
        """,
    )
    log = tmp_path / "out.log"
    result = run_trainer(
        tmp_path,
        *("--workdir", str(tmp_path), "--command", f"{PYTHON} train.py"),
        *("--time-budget", "5", "--max-wall-time", "60", "--log", str(log), "--env", "EXTRA=x"),
    )

    assert result.returncode == 0, result.stderr
    assert result.report["status"] == "success"
    assert result.report["metric_name"] == "val_bpb"
    assert result.report["metric"] == pytest.approx(0.9979)
    assert result.report["metrics"] == {
        "val_bpb": 0.9979,
        "training_seconds": 1.5,
        "total_seconds": 2.0,
        "peak_vram_mb": 45060.2,
        "mfu_percent": 39.8,
        "num_steps": 3.0,
        "depth": 8.0,
    }
    assert result.report["exit_code"] == 0
    assert result.report["message"] == ""
    assert result.report["log_tail"] == ""
    # '\r' redraws arrive as separate lines, so a line-by-line follower sees each step.
    lines = result.stdout.splitlines()
    assert "budget 5 extra x" in lines
    assert [line for line in lines if line.startswith("step ")] == [
        "step 00000 | loss 4.5",
        "step 00001 | loss 3.5",
        "step 00002 | loss 2.5",
    ]
    assert "\r" not in result.stdout
    assert log.read_text() == result.stdout
    assert "success val_bpb=0.9979" in result.stderr


def test_crash_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    write_script(tmp_path, "train.sh", "echo starting\necho 'Traceback: boom' >&2\nexit 3\n")

    result = run_trainer(tmp_path, "--workdir", str(tmp_path), "--command", "sh train.sh")

    assert result.returncode == 1
    assert result.report["status"] == "crash"
    assert result.report["exit_code"] == 3
    assert result.report["message"] == "command exited with code 3"
    assert result.report["log_tail"] == "starting\nTraceback: boom"
    assert result.report["duration_seconds"] > 0


def test_exit_zero_without_metric_is_a_crash(tmp_path: Path) -> None:
    result = run_trainer(tmp_path, "--workdir", str(tmp_path), "--command", "echo all good")

    assert result.returncode == 1
    assert result.report["status"] == "crash"
    assert result.report["exit_code"] == 0
    assert result.report["message"].startswith("no metric: pattern ")
    assert "not found in output" in result.report["message"]
    assert result.report["log_tail"] == "all good"


@pytest.mark.parametrize("value", ["nan", "1e999"])
def test_metric_that_is_not_finite_is_a_crash(tmp_path: Path, value: str) -> None:
    # "nan" escapes the default pattern and comes from the summary; "1e999" matches it.
    write_script(tmp_path, "train.sh", f"echo ---\necho 'val_bpb: {value}'\necho 'num_steps: 7'\n")

    result = run_trainer(tmp_path, "--workdir", str(tmp_path), "--command", "sh train.sh")

    assert result.returncode == 1
    assert result.report["status"] == "crash"
    assert "val_bpb is not finite" in result.report["message"]
    assert result.report["metric"] is None  # JSON has no NaN
    assert result.report["metrics"] == {"num_steps": 7.0}


# A command whose whole tree ignores SIGTERM. The command line itself starts with the
# trap, so every process forked after it inherits the ignored disposition.
STUBBORN_COMMAND = "trap '' TERM; sh train.sh"
STUBBORN_TREE = """\
echo $$ > child.pid
sh -c 'echo $$ > grandchild.pid; while :; do sleep 1; done' &
while :; do sleep 1; done
"""


def test_timeout_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    write_script(tmp_path, "train.sh", STUBBORN_TREE)

    result = run_trainer(
        tmp_path,
        *("--workdir", str(tmp_path), "--command", STUBBORN_COMMAND),
        *("--max-wall-time", "2", "--kill-grace", "1"),
    )

    assert result.returncode == 1
    assert result.report["status"] == "timeout"
    assert result.report["exit_code"] == -signal.SIGKILL
    assert result.report["message"] == (
        "exceeded max wall time of 2s; process group sent SIGTERM, then SIGKILL after 1s"
    )
    # Waited out the grace, and not much more (the default 10 s grace would show).
    assert 2.9 <= result.report["duration_seconds"] <= 3.0 + 5.0
    for name in ("child.pid", "grandchild.pid"):
        assert not is_alive(read_pid(tmp_path / name)), name


def test_timeout_as_a_subreaper_ignores_unreaped_zombies(tmp_path: Path) -> None:
    # Like PID 1 in a container: orphans are re-parented to the trainer, which does not
    # reap them; their zombies must not make the process group look unkillable.
    write_script(tmp_path, "train.sh", STUBBORN_TREE)
    wrapper = write_script(
        tmp_path,
        "as_subreaper.py",
        """\
        import ctypes, runpy
        PR_SET_CHILD_SUBREAPER = 36
        assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        runpy.run_module("skylab_trainer", run_name="__main__")
        """,
    )
    argv = trainer_argv(
        tmp_path,
        *("--workdir", str(tmp_path), "--command", STUBBORN_COMMAND),
        *("--max-wall-time", "2", "--kill-grace", "1"),
    )
    argv[1:3] = [str(wrapper)]  # the wrapper instead of `-m skylab_trainer`

    done = subprocess.run(argv, env=trainer_env(), capture_output=True, timeout=120, check=False)

    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 1, done.stderr
    assert report["status"] == "timeout"
    assert report["message"].endswith("then SIGKILL after 1s")
    assert not is_alive(read_pid(tmp_path / "grandchild.pid"))


def test_stragglers_of_a_finished_command_are_killed(tmp_path: Path) -> None:
    # The command succeeds but leaves a SIGTERM-ignoring process holding our pipe.
    write_script(
        tmp_path,
        "train.sh",
        """\
        sh -c 'trap "" TERM; echo $$ > straggler.pid; exec sleep 60' &
        while [ ! -s straggler.pid ]; do sleep 0.05; done
        echo ---
        echo 'val_bpb: 1.25'
        """,
    )

    result = run_trainer(
        tmp_path, "--workdir", str(tmp_path), "--command", "sh train.sh", "--kill-grace", "1"
    )

    assert result.returncode == 0, result.stderr
    assert result.report["status"] == "success"
    assert result.report["metric"] == 1.25
    assert not is_alive(read_pid(tmp_path / "straggler.pid"))


def test_sigterm_to_the_trainer_stops_the_group(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        "train.sh",
        """\
        echo $$ > child.pid
        sleep 60 &
        echo $! > grandchild.pid
        echo started
        wait
        """,
    )
    with (tmp_path / "stdout.txt").open("w") as stdout:
        trainer = subprocess.Popen(
            trainer_argv(tmp_path, "--workdir", str(tmp_path), "--command", "sh train.sh"),
            env=trainer_env(),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        child, grandchild = read_pid(tmp_path / "child.pid"), read_pid(tmp_path / "grandchild.pid")
        trainer.send_signal(signal.SIGTERM)
        _, stderr = trainer.communicate(timeout=60)

    report = json.loads((tmp_path / "report.json").read_text())
    assert trainer.returncode == 1, stderr
    assert report["status"] == "killed"
    assert report["message"].startswith("trainer stopped by SIGTERM")
    assert report["exit_code"] == -signal.SIGTERM
    assert not is_alive(child)
    assert not is_alive(grandchild)


def git(*args: str, cwd: Path) -> str:
    identity = ["-c", "user.name=skylab", "-c", "user.email=skylab@example.invalid"]
    done = subprocess.run(
        ["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def served_repo(tmp_path: Path) -> tuple[Path, str]:
    """A bare repo whose branch has moved past the commit we want: (repo, old commit)."""
    work = tmp_path / "work"
    (work / "exp").mkdir(parents=True)
    git("init", "-q", cwd=work)
    (work / "exp" / "marker.txt").write_text("first\n")
    (work / "exp" / "train.sh").write_text("cat marker.txt\necho ---\necho 'val_bpb: 2.5'\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "first", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    (work / "exp" / "marker.txt").write_text("second\n")
    git("commit", "-qam", "second", cwd=work)
    bare = tmp_path / "served.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=bare)
    return bare, first


@pytest.mark.parametrize("url_style", ["path", "file-url"])
def test_fetches_exactly_the_commit_asked_for(
    tmp_path: Path, served_repo: tuple[Path, str], url_style: str
) -> None:
    repo, first = served_repo
    checkout = tmp_path / "checkout"
    url = str(repo) if url_style == "path" else repo.as_uri()
    # The pod contract: every input from the environment.
    env = trainer_env(
        SKYLAB_REPO_URL=url,
        SKYLAB_COMMIT=first,
        SKYLAB_CHECKOUT_DIR=str(checkout),
        SKYLAB_EXPERIMENT_PATH="exp",
        SKYLAB_COMMAND="sh train.sh",
    )

    result = run_trainer(tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert result.report["status"] == "success"
    assert result.report["metric"] == 2.5
    assert (checkout / "exp" / "marker.txt").read_text() == "first\n"
    assert git("rev-parse", "HEAD", cwd=checkout) == first
    assert result.stdout.splitlines()[0] == "first"


def test_fetch_failure_is_reported(tmp_path: Path, served_repo: tuple[Path, str]) -> None:
    repo, _ = served_repo
    missing = "0123456789abcdef0123456789abcdef01234567"

    result = run_trainer(tmp_path, "--repo", str(repo), "--commit", missing, "--command", "true")

    assert result.returncode == 1
    assert result.report["status"] == "crash"
    assert result.report["message"].startswith(f"fetch failed: cannot check out {missing}")
    assert "not our ref" in result.report["message"]
    assert result.report["log_tail"]


def test_report_fits_the_termination_message_with_a_huge_log(tmp_path: Path) -> None:
    write_script(
        tmp_path,
        "train.py",
        """\
        import sys
        for i in range(5_000):
            print(f"line {i:06d} " + "x" * 90)
        print("y" * 100_000)  # one giant line
        print("the end")
        sys.exit(1)
        """,
    )
    log = tmp_path / "out.log"

    result = run_trainer(
        tmp_path,
        *("--workdir", str(tmp_path), "--command", f"{PYTHON} train.py", "--log", str(log)),
    )

    assert result.returncode == 1
    raw = (tmp_path / "report.json").read_bytes()
    assert len(raw) <= MAX_REPORT_BYTES
    assert result.report["status"] == "crash"
    assert result.report["log_tail"].endswith("y\nthe end")
    assert log.stat().st_size > 600_000
    giant_line_pieces = math.ceil(100_000 / MAX_LINE_CHARS)
    assert log.read_text().count("\n") == 5_000 + giant_line_pieces + 1


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--workdir", "."], {}, "--command / SKYLAB_COMMAND"),
        (["--command", "true"], {}, "--workdir / SKYLAB_WORKDIR"),
        (["--command", "true", "--workdir", "/no/such/dir"], {}, "--workdir / SKYLAB_WORKDIR"),
        (["--command", "true", "--repo", "r"], {"SKYLAB_COMMIT": "abc123"}, "SKYLAB_COMMIT"),
        (["--command", "true", "--workdir", "."], {"SKYLAB_REPO_URL": "r"}, "not both"),
        (["--command", "true", "--workdir", "."], {"SKYLAB_MAX_WALL_TIME": "soon"}, "SKYLAB_MAX"),
        (["--command", "true", "--workdir", ".", "--time-budget", "0"], {}, "--time-budget"),
        (["--command", "true", "--workdir", ".", "--kill-grace", "-1"], {}, "--kill-grace"),
        (["--command", "true", "--workdir", ".", "--metric-pattern", "val"], {}, "--metric-"),
        (["--command", "true", "--workdir", ".", "--metric-pattern", "("], {}, "--metric-"),
        (["--command", "true", "--workdir", ".", "--env", "NOEQUALS"], {}, "--env"),
        (["--command", "true", "--workdir", ".", "--log", "/no/such/dir/log"], {}, "--log"),
        (["--command", "true", "--workdir", ".", "--subdir", "/abs"], {}, "--subdir"),
        (["--bogus"], {}, "--bogus"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for key in [k for k in os.environ if k.startswith("SKYLAB_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    report = tmp_path / "report.json"

    code = cli.main(["run", "--report", str(report), *args])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("skylab-trainer: error: ")
    assert named in err
    assert not report.exists()


def test_bad_input_exit_status_of_the_real_process(tmp_path: Path) -> None:
    result = run_trainer(tmp_path, "--workdir", str(tmp_path))

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "skylab-trainer: error: --command / SKYLAB_COMMAND is required: "
        "expected a shell command line, e.g. 'python train.py'"
    )
