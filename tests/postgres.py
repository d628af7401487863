"""A PostgreSQL server for the production-backend tests: MLflow's tracking and auth stores and
Prefect's database on PostgreSQL, as infra/docker-compose.yml runs them, each test module on
databases of its own (created here, dropped after).

Where: ``QUANTLENS_TEST_POSTGRES`` (a libpq URL of a role that may create databases), by default
``postgresql://postgres@127.0.0.1:5432/postgres`` — what the dev and CI machines run. Where none
answers, the tests that need it skip with one line saying so.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
HOW = ("no PostgreSQL at {url} ({why}); point QUANTLENS_TEST_POSTGRES at one "
       "(postgresql://user[:password]@host:port/db of a role that may CREATE DATABASE)")


def admin_url() -> str:
    return os.environ.get("QUANTLENS_TEST_POSTGRES", DEFAULT)


def unreachable() -> str | None:
    """Why no PostgreSQL can be used (one line), or None when one answers."""
    try:
        import psycopg
    except ImportError:
        return HOW.format(url=admin_url(), why="psycopg is not installed: pip install -e '.[dev]'")
    try:
        psycopg.connect(admin_url(), connect_timeout=3).close()
    except Exception as err:  # noqa: BLE001 — any failure means: not usable here
        return HOW.format(url=admin_url(), why=str(err).strip().splitlines()[0])
    return None


def _admin():
    import psycopg

    return psycopg.connect(admin_url(), connect_timeout=5, autocommit=True)  # CREATE / DROP DATABASE: not in a transaction


def database_url(name: str, driver: str = "") -> str:
    """The URL of database ``name`` on the same server (``driver``: ``asyncpg`` for Prefect)."""
    u = urlsplit(admin_url())
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return urlunsplit((scheme, u.netloc, f"/{name}", u.query, ""))


class Databases:
    """Databases created for one test module, dropped by :meth:`drop_all` (connections closed first)."""

    def __init__(self, prefix: str):
        self.prefix = f"ql_{prefix}_{uuid.uuid4().hex[:8]}"
        self.names: list[str] = []

    def create(self, what: str) -> str:
        name = f"{self.prefix}_{what}".lower().replace("-", "_").replace(".", "_")
        conn = _admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self.names.append(name)
        return name

    def drop_all(self) -> None:
        conn = _admin()
        try:
            with conn.cursor() as cur:
                for name in self.names:
                    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            conn.close()
        self.names.clear()


def scalar(url: str, sql: str) -> object:
    """One value of one query on the database at ``url`` (a driver suffix such as ``+asyncpg`` is dropped)."""
    import psycopg

    u = urlsplit(url)
    conn = psycopg.connect(urlunsplit(("postgresql", u.netloc, u.path, u.query, "")), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()
