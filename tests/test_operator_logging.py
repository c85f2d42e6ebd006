"""`skylab operator`'s log: the process as a cluster runs it, against the emulator.

Each trial's steps are one line each (created, Job created, running, decided), a handler
that fails says why and that it retries, JSON lines parse, and no secret is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from kmock import resource as k8s_resource
from psycopg.conninfo import make_conninfo

from db_outage import DatabaseProxy, database_proxy
from emulator import KubeEmulator
from kubelet import (  # the settings fixture registers under its own name
    CAMPAIGNS,
    GRID,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    Outcome,
    crash,
    kubelet,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: F401  # fixtures register under their own names
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    open_watches,
    operator_rbac_fixture,
    stored,
)
from toy_experiment import write_toy_experiment

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]
# Given with the database URL: it must never reach the log.
PASSWORD = "pw-never-logged-7f3a"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def operator_process(
    tmp_path: Path, database_url: str, *flags: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path]]:
    """`skylab operator FLAGS` in a process of its own, its stderr in a file."""
    experiments = tmp_path / "experiments"
    write_toy_experiment(experiments / "toy", GRID)
    env = {
        **os.environ,
        "SKYLAB_DATABASE_URL": make_conninfo(database_url, password=PASSWORD),
        "SKYLAB_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
        "SKYLAB_GIT_URL": "http://skylab.skylab.svc:8080/git",
        "SKYLAB_EXPERIMENTS_DIR": str(experiments),
        "SKYLAB_HTTP_PORT": str(_free_port()),
        "SKYLAB_RESYNC_SECONDS": "1",
        "SKYLAB_PROGRESS_SECONDS": "1",
        "SKYLAB_RETRY_SECONDS": "0.3",
    }
    log = tmp_path / "operator.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "skylab", "operator", *flags],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _watching(kube: KubeEmulator, process: subprocess.Popen[bytes], log: Path) -> bool:
    assert process.poll() is None, f"the operator exited:\n{log.read_text()}"
    return {k8s_resource(r) for r in (CAMPAIGNS, TRIALS, JOBS)} <= open_watches(kube)


def _trial_phase(kube: KubeEmulator, name: str) -> str | None:
    return ((stored(kube, TRIALS, NAMESPACE, name) or {}).get("status") or {}).get("phase")


async def _run_campaign_then_break_the_database(
    kube: KubeEmulator, tmp_path: Path, database_url: str, *flags: str
) -> str:
    """Trial 1 succeeds, 2 crashes, each once seen running; while 3 runs, the database
    is away (its connections dropped, new ones refused) until a handler has failed."""
    released: set[int] = set()
    ends = {1: success(1.0), 2: crash("RuntimeError: boom")}

    def script(number: int) -> Outcome | None:
        return ends[number] if number in released else None

    with database_proxy(database_url) as proxy:
        return await _run_and_cut(kube, tmp_path, proxy, script, released, *flags)


async def _run_and_cut(
    kube: KubeEmulator,
    tmp_path: Path,
    proxy: DatabaseProxy,
    script: Callable[[int], Outcome | None],
    released: set[int],
    *flags: str,
) -> str:
    async with operator_process(tmp_path, proxy.url, *flags) as (process, log):
        await eventually(lambda: _watching(kube, process, log), timeout=SLOW)
        async with kubelet(kube, script):
            await create(kube, CAMPAIGNS, sweep_campaign("logged", budget={"maxTrials": 3}))
            for name, number in (("logged-0001", 1), ("logged-0002", 2)):
                await eventually(lambda n=name: _trial_phase(kube, n) == "Running", timeout=SLOW)
                released.add(number)
            await eventually(lambda: _trial_phase(kube, "logged-0003") == "Running", timeout=SLOW)
            proxy.cut()
            await eventually(lambda: "will try again" in log.read_text(), timeout=SLOW)
            proxy.restore()
    return log.read_text()


async def test_json_lines_tell_each_step_and_each_retry_with_its_cause(
    kube: KubeEmulator, tmp_path: Path, database_url: str
) -> None:
    text = await _run_campaign_then_break_the_database(
        kube, tmp_path, database_url, "--log-format", "json"
    )
    assert PASSWORD not in text
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines()]
    started = [line for line in lines if line["message"].startswith("skylab operator")]
    assert len(started) == 1 and "/test_" in started[0]["message"]  # the database, by name

    def about(name: str, reason: str) -> list[dict[str, Any]]:
        return [
            line
            for line in lines
            if line.get("reason") == reason and (line.get("object") or {}).get("name") == name
        ]

    assert len(about("logged", "TrialCreated")) == 3
    for trial in ("logged-0001", "logged-0002", "logged-0003"):
        assert len(about(trial, "JobCreated")) == 1, trial
        assert len(about(trial, "Running")) == 1, trial
    [kept] = about("logged-0001", "Kept")
    assert (kept["severity"], kept["status"], kept["metric"]) == ("info", "success", 1.0)
    [reverted] = about("logged-0002", "Reverted")
    assert (reverted["severity"], reverted["status"], reverted["metric"]) == (
        "warn",
        "crash",
        None,
    )
    assert "RuntimeError: boom" in reverted["message"]
    assert len(about("logged", "Running")) == 1  # the Campaign's phase, once
    [retry, *_] = [line for line in lines if "will try again" in line["message"]]
    assert retry["severity"] == "error" and retry["object"]["kind"] in ("Campaign", "Trial")
    assert retry["object"]["name"].startswith("logged")
    assert "connection" in retry["message"]  # the cause, in the line itself
    # Only kopf's warnings and errors: no line per handler call or timer tick at info.
    assert not [line for line in lines if line["message"].endswith("succeeded.")]


async def test_text_lines_name_the_object(
    kube: KubeEmulator, tmp_path: Path, database_url: str
) -> None:
    text = await _run_campaign_then_break_the_database(
        kube, tmp_path, database_url, "--log-level", "info"
    )
    assert PASSWORD not in text
    kept = [line for line in text.splitlines() if "Trial Kept:" in line]
    assert len(kept) == 1
    assert f"[{NAMESPACE}/logged-0001] Trial Kept: success, val_bpb=1.000000" in kept[0]
    assert "[INFO" in kept[0]
    assert any("will try again" in line and "connection" in line for line in text.splitlines())
