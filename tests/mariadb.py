"""A private MariaDB server for tests that take the database away: its own data directory,
port and socket, so the machine's server is never disturbed.

``await db.install()`` once, then ``start()``, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL: a
crash, recovered by InnoDB at the next start), and ``start()`` again on the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port


def mariadb_binaries() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db), or None when MariaDB is not installed here."""
    server = shutil.which("mariadbd") or (
        "/usr/sbin/mariadbd" if os.access("/usr/sbin/mariadbd", os.X_OK) else None
    )
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if server is None or install is None:
        return None
    return server, install


@dataclass
class PrivateMariaDB:
    base: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "mariadbd.log"

    def dsn(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def _common(self) -> list[str]:
        # --no-defaults: the machine's /etc/mysql files (user=mysql, its log paths, its
        # port) must not apply to this server.
        return [
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--user=root",
            "--innodb-log-file-size=16M",
            "--innodb-buffer-pool-size=64M",
        ]

    async def install(self) -> None:
        binaries = mariadb_binaries()
        assert binaries is not None
        self.base.mkdir(parents=True, exist_ok=True)
        # --no-defaults must come first for the install script too.
        proc = await asyncio.create_subprocess_exec(
            binaries[1],
            *self._common(),
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.decode(errors='replace')}")

    async def start(self, timeout: float = 60.0) -> None:
        binaries = mariadb_binaries()
        assert binaries is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                binaries[0],
                *self._common(),
                f"--port={self.port}",
                f"--socket={self.base / 'mariadbd.sock'}",
                f"--pid-file={self.base / 'mariadbd.pid'}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                break
            with contextlib.suppress(Exception):
                await self.query(None, "SELECT 1")
                return
            await asyncio.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the private mariadbd did not start:\n{tail}")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    async def query(self, database: str | None, sql: str, *args: object) -> list[dict[str, object]]:
        import aiomysql

        conn = await aiomysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            db=database,
            autocommit=True,
            connect_timeout=2,
        )
        try:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql, args or None)
                return list(await cur.fetchall())
        finally:
            conn.close()
