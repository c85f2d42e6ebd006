"""Fixtures shared by the test modules."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from skylab.store import Store

# PostgreSQL: one embedded server for the session, a fresh database for each test.


def _settings_off(url: str, *settings: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in settings:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
        conn.execute("SELECT pg_reload_conf()")


@contextmanager
def _cluster_dir(name: str) -> Iterator[Path]:
    # Not under tmp_path: as root, the server runs as another user, and each pytest
    # session starting (ours or a parallel one) resets pytest's base directory to mode
    # 0700, which locks that user out.
    with tempfile.TemporaryDirectory(prefix=f"skylab-{name}-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """The URL of the session's embedded server (its skylab database)."""
    from skylab.store.embedded import embedded_postgres

    with _cluster_dir("postgres") as data_dir, embedded_postgres(data_dir) as url:
        # A throwaway cluster: durability would only slow the tests down.
        _settings_off(url, "fsync", "synchronous_commit", "full_page_writes")
        yield url


@pytest.fixture
def database_url(postgres_server_url: str) -> Iterator[str]:
    """The URL of an empty database of its own, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(postgres_server_url, dbname=name)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A Store on a fresh, migrated database."""
    with Store.connect(database_url) as opened:
        yield opened


@pytest.fixture(scope="module")
def embedded_data_dir() -> Iterator[Path]:
    """A data directory for embedded_postgres() whose cluster exists and is stopped."""
    from skylab.store.embedded import embedded_postgres

    with _cluster_dir("embedded") as data_dir:
        with embedded_postgres(data_dir) as url:
            # Committed rows survive a killed server all the same (they are in the OS's
            # cache), and crash recovery skips syncing the whole cluster to disk.
            _settings_off(url, "fsync")
        yield data_dir
