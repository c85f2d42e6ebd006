"""Versioned schema migrations: numbered SQL files under migrations/, each applied once.

A file is named NNNN_name.sql. Every migration runs in its own transaction together
with the row that records it in schema_migrations, so it is applied entirely or not
at all, and running migrate() again applies nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import psycopg

# Key of the advisory lock that serialises migrating processes: "skylab" as an integer.
LOCK_KEY = int.from_bytes(b"skylab", "big")
_FILE_NAME = re.compile(r"(\d{4})_(\w+)\.sql")


class MigrationError(RuntimeError):
    """The shipped migrations or the database's schema version are inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    found: list[Migration] = []
    for entry in files("skylab.store").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


def migrate(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply the pending migrations in order and return them; CONN must be idle.

    Each transaction first takes a transaction-scoped advisory lock, so processes
    that start together migrate one at a time and each sees what the other applied.
    """
    migrations = available()
    newest = max((migration.version for migration in migrations), default=0)
    applied_now: list[Migration] = []
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            applied = _applied_versions(conn)
            if applied and max(applied) > newest:
                raise MigrationError(
                    f"the database has schema version {max(applied)}, newer than the "
                    f"{newest} this skylab knows: upgrade skylab"
                )
            pending = [migration for migration in migrations if migration.version not in applied]
            if not pending:
                return applied_now
            migration = pending[0]
            # Passed as bytes: the file is trusted package text, not a typed literal.
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        applied_now.append(migration)


def _applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        conn.execute(
            """
            CREATE TABLE schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        return set()
    return {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}
