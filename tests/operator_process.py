"""The real `skylab operator` in a process of its own, as a pod runs it: it can be
SIGKILLed (a node lost, an OOM kill) where an operator thread in the test's process
can only be stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from skylab.controller.settings import OperatorSettings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def operator_process(
    name: str,
    settings: OperatorSettings,
    kubeconfig: Path,
    log: Path,
    *,
    peering: str | None = None,
    priority: int | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`skylab operator` named NAME (its pod's), with SETTINGS' database, workspaces and
    timers, its output appended to LOG; with PEERING, a replica of that peering at PRIORITY.
    Whatever is left of it is stopped on the way out."""
    env = {key: value for key, value in os.environ.items() if key != "KUBERNETES_SERVICE_HOST"}
    env |= {
        "KUBECONFIG": str(kubeconfig),
        "POD_ID": name,
        "SKYLAB_DATABASE_URL": settings.database_url,
        "SKYLAB_WORKSPACE_ROOT": str(settings.workspace_root),
        "SKYLAB_GIT_URL": settings.git_url,
        "SKYLAB_EXPERIMENTS_DIR": os.pathsep.join(map(str, settings.experiment_dirs)),
        "SKYLAB_HTTP_PORT": str(free_port()),
        "SKYLAB_RESYNC_SECONDS": f"{settings.resync_seconds:g}",
        "SKYLAB_RETRY_SECONDS": f"{settings.retry_seconds:g}",
        "SKYLAB_PROGRESS_SECONDS": f"{settings.progress_seconds:g}",
    }
    command = [sys.executable, "-m", "skylab", "operator"]
    if peering is not None:
        command.append(f"--peering={peering}")
        if priority is not None:
            env["SKYLAB_PEERING_PRIORITY"] = str(priority)
    with log.open("ab") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
