"""Connections to MariaDB (aiomysql pool) and SQLite (one worker thread).

Each backend offers the same three statements (fetch, execute, executemany) inside
``transaction()`` or ``connection()`` (autocommit), and turns driver errors into the
store's errors: StoreUnavailable when the server is away or busy, StoreRefused when it
answered with a refusal. Both make events wait (errors.py says why no database error can
be an event's own); the text names the cause for the health answer.
The SQL itself lives in the store and the schema, written once for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

import aiomysql
import pymysql

from actors.persistence.errors import (
    StoreClosed,
    StoreConflict,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from actors.persistence.schema import MYSQL, RETIRED_INDEXES, SQLITE, TABLES, Dialect
from actors.persistence.takeover import refuse_go_tables
from schemas.config import mask_secrets, mask_url_password, split_url, url_password, url_secrets

log = logging.getLogger("volumed.persistence.db")
T = TypeVar("T")

Row = dict[str, Any]


class Connection(Protocol):
    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        """A statement whose answer nobody reads: in a transaction it may wait and go with
        the next statement or the commit (its error, if any, comes then and fails the
        transaction alike); outside one it runs now."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """As write, once per row."""
        ...


class Backend(Protocol):
    dialect: Dialect
    where: str
    """The DSN without its password, for messages."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Connection]: ...

    def connection(self) -> contextlib.AbstractAsyncContextManager[Connection]: ...

    async def close(self) -> None: ...


def missing_columns(dialect: Dialect, present: set[tuple[str, str]]) -> list[str]:
    """ALTER statements for the columns added to volumed's tables since a database was
    created (``present``: its (table, column) pairs; a table without any is missing whole,
    and created, not altered), so an upgrade needs no manual step."""
    tables = {t for t, _ in present}
    return [
        dialect.column_ddl(table, column)
        for table in TABLES
        if table.name in tables
        for column in table.columns
        if (table.name, column.name) not in present
    ]


def upgrade_ddl(
    dialect: Dialect, columns: set[tuple[str, str]], indexes: set[tuple[str, str]]
) -> list[str]:
    """The statements that bring tables created by an earlier version to ``TABLES`` (its
    (table, column) and (table, index) pairs present): columns added (nullable, so existing
    rows stay valid), retired indexes dropped (before the new ones: a retired unique index
    may forbid what the new shape allows), new indexes made."""
    tables = {t for t, _ in columns}
    statements = missing_columns(dialect, columns)
    statements += [dialect.drop_index_ddl(t, i) for t, i in RETIRED_INDEXES if (t, i) in indexes]
    statements += [
        dialect.index_ddl(table, index)
        for table in TABLES
        if table.name in tables
        for index in table.indexes
        if (table.name, index.name) not in indexes
    ]
    return statements


# -- MariaDB ------------------------------------------------------------------------------

# Client errors (2xxx) are all about the connection; these server errors are transient too:
# too many connections, server shutdown, connection killed, idle disconnect, read-only.
_MYSQL_TRANSIENT = {1040, 1053, 1077, 1290, 1836, 1927, 4031}
_MYSQL_CONFLICT = {1205, 1213}  # lock wait timeout, deadlock
_MYSQL_MISSING_TABLE = 1146
_MYSQL_UNKNOWN_COLUMN = 1054
_DB_NAME = re.compile(r"^[A-Za-z0-9_$]{1,64}$")


class MySQLBackend:
    """An aiomysql pool. A connection that failed is closed, so the pool makes a new one:
    after a database restart the next statement reconnects."""

    dialect = MYSQL

    def __init__(self, pool: Any, where: str, secrets: Sequence[str]) -> None:
        self._pool = pool
        self.where = where
        self._secrets = secrets
        self._closed = False

    @classmethod
    async def open(
        cls, dsn: str, *, connect_timeout: float = 5.0, prepare: bool = True
    ) -> MySQLBackend:
        """``prepare``: check the tables and create or extend volumed's (``volumed migrate``
        opens without, to convert the Go daemon's tables first)."""
        where = mask_url_password(dsn)
        secrets = url_secrets(dsn)
        # The one URL parser: a password may hold '#', '/', '?' or '@' unescaped.
        parts = split_url(dsn)
        database = parts.rest.partition("?")[0].lstrip("/") or "volumed"
        if not _DB_NAME.fullmatch(database):
            raise StoreRefused(f"{where}: the database name must be letters, digits, _ or $")
        if parts.port and not parts.port.isdigit():
            raise StoreRefused(f"{where}: the port is not a number")
        params: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": int(parts.port or 3306),
            "user": unquote(parts.user or "root"),
            "password": url_password(dsn) or "",
            "connect_timeout": connect_timeout,
            "charset": "utf8mb4",
            "autocommit": True,
            # Without CLIENT.FOUND_ROWS: an upsert that keeps the row it meets counts 0
            # rows, which tells the store whether a volume's head moved (store._move_head).
            "client_flag": 0,
        }
        wrap = _MySQLErrors(where, secrets)
        try:
            await cls._create_database(params, database, where)
            pool = await aiomysql.create_pool(
                minsize=1, maxsize=10, db=database, pool_recycle=3600, **params
            )
        except Exception as e:
            raise wrap(e) from None
        backend = cls(pool, where, secrets)
        if not prepare:
            return backend
        try:
            async with backend.connection() as conn:
                # Before anything is created or altered: the Go daemon's tables are refused.
                await refuse_go_tables(conn, where)
                # Only the missing ones: "IF NOT EXISTS" on an existing table is a warning,
                # and every warning costs a SHOW WARNINGS round trip and a Python warning.
                present = {
                    r["name"]
                    for r in await conn.fetch(
                        "SELECT TABLE_NAME AS name FROM information_schema.TABLES "
                        "WHERE TABLE_SCHEMA = DATABASE()"
                    )
                }
                for table in TABLES:
                    if table.name not in present:
                        for statement in MYSQL.table_ddl(table):
                            await conn.execute(statement)
                columns = await conn.fetch(
                    "SELECT TABLE_NAME AS t, COLUMN_NAME AS c FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                )
                indexes = await conn.fetch(
                    "SELECT DISTINCT TABLE_NAME AS t, INDEX_NAME AS i "
                    "FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()"
                )
                for statement in upgrade_ddl(
                    MYSQL,
                    {(r["t"], r["c"]) for r in columns},
                    {(r["t"], r["i"]) for r in indexes},
                ):
                    log.info("upgrading the schema: %s", statement)
                    await conn.execute(statement)
        except BaseException:
            await backend.close()
            raise
        return backend

    @staticmethod
    async def _create_database(params: dict[str, Any], database: str, where: str) -> None:
        conn = await aiomysql.connect(**params)
        try:
            async with conn.cursor() as cur:
                await cur.execute(
                    "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (database,)
                )
                if await cur.fetchall():
                    return
                await cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{database}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
        except pymysql.err.MySQLError as e:
            # Not allowed to create databases: it must exist already (checked next).
            log.info("cannot create database %s (%s); using it as it is", where, e.args[-1])
        finally:
            conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        if self._closed:
            raise StoreClosed(f"the store for {self.where} is closed")
        wrap = _MySQLErrors(self.where, self._secrets)
        try:
            raw = await self._pool.acquire()
        except Exception as e:
            raise wrap(e) from None
        try:
            yield _MySQLConnection(raw, wrap)
        except BaseException:
            # A connection in an unknown state (cancelled mid-statement, server gone) is
            # dropped rather than handed to the next user; so is one whose statement was
            # refused: privileges granted on a database reach a session only when it
            # starts, so the next try must come from a new one.
            raw.close()
            raise
        finally:
            self._pool.release(raw)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection() as conn:
            assert isinstance(conn, _MySQLConnection)
            conn.begin()
            try:
                yield conn
                # The queued writes go with it: their errors come here.
                await conn.commit()
            except BaseException:
                conn.end()
                with contextlib.suppress(Exception):
                    await conn.raw.rollback()
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        try:
            await asyncio.wait_for(self._pool.wait_closed(), 5)
        except Exception:
            self._pool.terminate()


class _MySQLErrors:
    def __init__(self, where: str, secrets: Sequence[str]) -> None:
        self.where = where
        self.secrets = secrets

    def __call__(self, e: BaseException) -> StoreError:
        if isinstance(e, StoreError):
            return e
        text = mask_secrets(f"{self.where}: {_describe(e)}", self.secrets)
        code = e.args[0] if isinstance(e, pymysql.err.MySQLError) and e.args else None
        if code in _MYSQL_CONFLICT:
            return StoreConflict(text)
        if isinstance(e, pymysql.err.InterfaceError | OSError | TimeoutError) or (
            isinstance(code, int) and (2000 <= code < 3000 or code in _MYSQL_TRANSIENT)
        ):
            return StoreUnavailable(text)
        if isinstance(e, pymysql.err.OperationalError) and code is None:
            return StoreUnavailable(text)
        return StoreRefused(
            text, missing_table=code == _MYSQL_MISSING_TABLE, schema=code == _MYSQL_UNKNOWN_COLUMN
        )


def _describe(e: BaseException) -> str:
    if isinstance(e, pymysql.err.MySQLError) and len(e.args) >= 2:
        return f"{e.args[1]} (error {e.args[0]})"
    return str(e) or type(e).__name__


class _MySQLConnection:
    def __init__(self, raw: Any, wrap: _MySQLErrors) -> None:
        self.raw = raw
        self._wrap = wrap
        # In a transaction: its statements not sent yet (BEGIN, writes), as text. They go
        # with the next statement, or with COMMIT, in one round trip: the server runs them
        # in order and stops at the first error (the connections allow several statements
        # in one: aiomysql sets CLIENT.MULTI_STATEMENTS), whose answer is read then.
        self._queued: list[str] | None = None

    def begin(self) -> None:
        self._queued = ["BEGIN"]

    def end(self) -> None:
        self._queued = None

    async def commit(self) -> None:
        queued, self._queued = self._queued, None
        if queued == ["BEGIN"]:
            return  # no statement: nothing to commit
        self._queued = queued
        try:
            async with self.raw.cursor() as cur:
                await self._send(cur, "COMMIT")
        except Exception as e:
            raise self._wrap(e) from None
        finally:
            self._queued = None

    def _text(self, sql: str, args: Sequence[Any]) -> str:
        # As aiomysql's execute writes it.
        return sql % tuple(self.raw.escape(a) for a in args) if args else sql

    async def _send(self, cur: Any, sql: str, args: Sequence[Any] = ()) -> None:
        """Run ``sql`` after the queued statements; the cursor ends on its answer."""
        queued = self._queued
        if not queued:
            await cur.execute(sql, tuple(args) or None)
            return
        self._queued = []
        await cur.execute("; ".join([*queued, self._text(sql, args)]))
        for _ in queued:
            if not await cur.nextset():
                raise RuntimeError("the server did not run every statement sent together")

    async def call(self, aw: Any) -> Any:
        try:
            return await aw
        except Exception as e:
            raise self._wrap(e) from None

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            async with self.raw.cursor() as cur:
                await self._send(cur, sql, args)
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
        except Exception as e:
            raise self._wrap(e) from None

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            async with self.raw.cursor() as cur:
                await self._send(cur, sql, args)
                return int(cur.rowcount)
        except Exception as e:
            raise self._wrap(e) from None

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        if self._queued is None:
            await self.execute(sql, args)
            return
        try:
            self._queued.append(self._text(sql, args))
        except Exception as e:
            raise self._wrap(e) from None

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._queued is not None and len(rows) == 1:
            await self.write(sql, rows[0])
            return
        try:
            async with self.raw.cursor() as cur:
                if self._queued:  # aiomysql writes this statement itself: the queued go first
                    await self._send(cur, "DO 0")
                # aiomysql sends an INSERT ... VALUES as one multi-row statement.
                await cur.executemany(sql, [tuple(r) for r in rows])
        except Exception as e:
            raise self._wrap(e) from None


# -- SQLite -------------------------------------------------------------------------------

_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o", "readonly")


class SQLiteBackend:
    """The stdlib sqlite3 module on one dedicated thread (WAL mode). One connection, so one
    statement sequence at a time: the lock keeps a read out of an open transaction."""

    dialect = SQLITE

    def __init__(self, path: str, where: str) -> None:
        self.path = path
        self.where = where
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="volumed-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, dsn: str) -> SQLiteBackend:
        path = dsn.removeprefix("sqlite://")
        if path in ("/:memory:", ":memory:"):
            path = ":memory:"
        if not path:
            raise StoreRefused(f"{dsn}: expected sqlite:///path/file.db")
        backend = cls(path, dsn)
        try:
            await backend._run(backend._connect)
        except BaseException:
            await backend.close()
            raise
        return backend

    def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Tables first, then what an earlier version's tables lack (an index may name a
        # column that is added here), then the indexes.
        existed = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in TABLES:
            db.execute(SQLITE.table_ddl(table)[0])
        columns = {
            (table.name, row[1])
            for table in TABLES
            for row in db.execute(f"PRAGMA table_info({table.name})")
        }
        indexes = {
            (table.name, row[1])
            for table in TABLES
            for row in db.execute(f"PRAGMA index_list({table.name})")
        }
        for statement in upgrade_ddl(SQLITE, columns, indexes):
            if existed:  # not for a database created just now
                log.info("upgrading the schema: %s", statement)
            db.execute(statement)
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, *args)
        except sqlite3.Error as e:
            text = f"{self.where}: {e}"
            lowered = str(e).lower()
            if isinstance(e, sqlite3.OperationalError) and any(
                w in lowered for w in _SQLITE_TRANSIENT
            ):
                raise StoreUnavailable(text) from None
            raise StoreRefused(
                text,
                missing_table="no such table" in lowered,
                schema="no such column" in lowered or "has no column" in lowered,
            ) from None

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreClosed(f"the store for {self.where} is closed")
        return self._db

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        if self._closed:
            raise StoreClosed(f"the store for {self.where} is closed")
        async with self._lock:
            yield _SQLiteConnection(self)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self.connection() as conn:
            assert isinstance(conn, _SQLiteConnection)
            # IMMEDIATE takes the write lock before the first statement: no other writer
            # between read and write.
            conn.begin()
            try:
                yield conn
                # The queued writes go with it: their errors come here.
                await conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.rollback()
                raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                with contextlib.suppress(Exception):
                    await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=False)


def _adapt(args: Sequence[Any]) -> tuple[Any, ...]:
    # Stored as text that sorts in time order (same format for every value).
    return tuple(
        a.isoformat(sep=" ", timespec="microseconds") if isinstance(a, dt.datetime) else a
        for a in args
    )


class _SQLiteConnection:
    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        # In a transaction: its statements not run yet (BEGIN IMMEDIATE, writes), with
        # their arguments (a list of rows: executemany). They run in the next statement's
        # turn on the thread, or the commit's: one hop to the thread instead of several.
        # Taken and cleared only on the thread: a statement cancelled while it runs there
        # still finds them (the ROLLBACK runs after it).
        self._queued: list[tuple[str, Any, bool]] | None = None

    def begin(self) -> None:
        self._queued = [("BEGIN IMMEDIATE", (), False)]

    def _db(self) -> sqlite3.Connection:
        """The connection, for a statement on the thread, the queued ones run first."""
        db = self._backend._require()
        queued = self._queued
        if queued:
            self._queued = []
            for sql, args, many in queued:
                if many:
                    db.executemany(sql, args)
                else:
                    db.execute(sql, args)
        return db

    async def commit(self) -> None:
        def run() -> None:
            queued, self._queued = self._queued, None
            if queued and queued[0][0] == "BEGIN IMMEDIATE" and len(queued) == 1:
                return  # no statement: nothing to commit
            self._queued = queued
            try:
                self._db().execute("COMMIT")
            finally:
                self._queued = None

        await self._backend._run(run)

    async def rollback(self) -> None:
        def run() -> None:
            self._queued = None
            self._backend._require().execute("ROLLBACK")

        await self._backend._run(run)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        def run() -> list[Row]:
            cur = self._db().execute(sql, _adapt(args))
            names = [d[0] for d in cur.description or ()]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

        return await self._backend._run(run)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        def run() -> int:
            return self._db().execute(sql, _adapt(args)).rowcount

        return await self._backend._run(run)

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        if self._queued is None:
            await self.execute(sql, args)
        else:
            self._queued.append((sql, _adapt(args), False))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._queued is not None:
            self._queued.append((sql, [_adapt(r) for r in rows], True))
            return

        def run() -> None:
            self._db().executemany(sql, [_adapt(r) for r in rows])

        await self._backend._run(run)


async def open_backend(dsn: str) -> Backend:
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme in ("mysql", "mariadb"):
        return await MySQLBackend.open(dsn)
    if scheme == "sqlite":
        return await SQLiteBackend.open(dsn)
    raise unsupported_database(dsn)


def unsupported_database(dsn: str) -> StoreRefused:
    return StoreRefused(
        f"{mask_url_password(dsn)}: unsupported database; "
        "use mysql://user:password@host:port/database or sqlite:///path/file.db"
    )
