"""A real PostgreSQL server for tests, started from the system's binaries and thrown away after.

    server = PgServer.start()          # initdb + postgres on a free port of 127.0.0.1
    url = server.create_database()     # a fresh database, copied from the template
    server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    server.stop()                      # the data directory goes with it

The binaries are the newest of ``/usr/lib/postgresql/<version>/bin`` (Debian's
layout), else the ones ``pg_config --bindir`` names. When the tests run as root
the server runs as the ``postgres`` user (PostgreSQL refuses root). The server is
built for speed, not durability (``fsync=off``): its data is thrown away.
Trust authentication on loopback; the unix socket lives in the temporary folder.

When PostgreSQL cannot be started, ``PgServerError`` says why (missing binaries,
the initdb or server log); the tests that need it fail with that message.
"""
from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the superuser's name, and the system account the server runs as under root
TEMPLATE = "ledger_template"
FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


class PgServerError(Exception):
    """PostgreSQL could not be found or started; the message says why."""


def find_bindir() -> Path:
    """The folder of the newest installed PostgreSQL's server binaries (initdb, pg_ctl, postgres)."""
    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    found = sorted((bindir for bindir in DEBIAN_ROOT.glob("*/bin") if (bindir / "initdb").exists()), key=version)
    if found:
        return found[-1]
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise PgServerError(f"PostgreSQL is not installed: no initdb under {DEBIAN_ROOT}/<version>/bin nor on PATH;"
                        " install it (Debian: apt-get install -y postgresql)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PgServer:
    """One running PostgreSQL cluster in a temporary folder, reachable as the superuser without a password."""

    def __init__(self, bindir: Path, folder: Path, port: int):
        self.bindir = bindir
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = port
        self.url = f"postgresql://{SERVER_USER}@127.0.0.1:{port}/postgres"
        self._names = itertools.count(1)
        self._copy = ""

    # -- starting and stopping ------------------------------------------------------------
    @classmethod
    def start(cls, bindir: Path | None = None, attempts: int = 3) -> "PgServer":
        """initdb a new cluster and start it on a free loopback port (a port taken meanwhile: another one)."""
        bindir = bindir or find_bindir()
        folder = Path(tempfile.mkdtemp(prefix="pgtest-", dir=_memory_folder()))
        server = None
        try:
            (folder / "owner").write_text(str(os.getpid()))
            _sweep(folder.parent, bindir)
            _give_to_server_user(folder)
            server = cls(bindir, folder, free_port())
            server._initdb()
            for attempt in range(attempts):
                try:
                    server._run_server()
                    break
                except PgServerError:
                    if attempt == attempts - 1 or "already in use" not in server._log_tail():
                        raise
                    server.port = free_port()
                    server.url = f"postgresql://{SERVER_USER}@127.0.0.1:{server.port}/postgres"
            server.execute(f"CREATE DATABASE {TEMPLATE}")
            if int(server.execute("SHOW server_version_num")[0][0]) >= 150000:
                server._copy = " STRATEGY FILE_COPY"  # copies files instead of writing them all to the WAL: 2x faster
            return server
        except BaseException:
            if server is not None:
                server.stop()
            else:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _initdb(self) -> None:
        command = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SERVER_USER, "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        done = _run(command)
        if done.returncode != 0:
            raise PgServerError(f"initdb failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")

    def _run_server(self) -> None:
        options = " ".join((*FAST, "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
                            "-c", "max_connections=200", "-p", str(self.port)))
        command = [str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options]
        done = _run(command)
        if done.returncode != 0:
            raise PgServerError(f"the PostgreSQL server did not start (pg_ctl exit {done.returncode}): "
                                f"{done.stderr.strip()[-500:]}\nserver log:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove its folder."""
        if (self.data / "postmaster.pid").exists():
            _stop(self.bindir, self.data)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- using it ------------------------------------------------------------------------
    def url_of(self, database: str) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, params: tuple | list | None = None, *, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); the rows it returns, if any."""
        with psycopg.connect(self.url_of(database), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, template: str = TEMPLATE) -> str:
        """A new, empty database copied from ``template``; its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE {template}{self._copy}")
        return self.url_of(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``create_database``, ending the connections still open to it."""
        name = url.rsplit("/", 1)[1]
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def terminate(self, database: str) -> int:
        """End every other session connected to ``database`` (what a database restart does to clients); how many."""
        rows = self.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid != pg_backend_pid()",
                            (database,))
        return sum(1 for (ended,) in rows if ended)


def _memory_folder() -> str | None:
    """/dev/shm when it has room: a database per test is copied in ~10 ms there, ten times slower on a disk."""
    shm = "/dev/shm"
    try:
        room = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK | os.X_OK) and room.f_bavail * room.f_frsize > 1 << 30:
        return shm
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PgServerError(f"cannot run {command[0]}: {error}") from None


def _stop(bindir: Path, data: Path) -> None:
    try:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "stop", "-w", "-m", "immediate", "-D", str(data)]),
                       capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired, PgServerError):
        pass


def _sweep(parent: Path, bindir: Path) -> None:
    """Stop the servers of test processes that were killed before they could (their folders name their pid)."""
    for folder in parent.glob("pgtest-*"):
        try:
            owner = int((folder / "owner").read_text())
            os.kill(owner, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge
        if (folder / "data" / "postmaster.pid").exists():
            _stop(bindir, folder / "data")
        if not (folder / "data" / "postmaster.pid").exists():  # stopped (a server still running keeps its folder)
            shutil.rmtree(folder, ignore_errors=True)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_server_user(command: list[str]) -> list[str]:
    """The command as the `postgres` account when we are root (PostgreSQL will not run as root), else as is."""
    if not _running_as_root():
        return command
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PgServerError(f"running as root and there is no '{SERVER_USER}' account to run PostgreSQL as"
                            " (PostgreSQL refuses to run as root); create it, or run the tests as another user") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SERVER_USER, "--", *command]
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", " ".join(_quoted(part) for part in command)]


def _quoted(part: str) -> str:
    return "'" + part.replace("'", "'\\''") + "'"


def _give_to_server_user(folder: Path) -> None:
    """Under root, the server's folder belongs to the `postgres` account (mkdtemp made it 0700 for us)."""
    if _running_as_root():
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PgServerError(f"running as root and there is no '{SERVER_USER}' account to run PostgreSQL as") from None
        os.chown(folder, account.pw_uid, account.pw_gid)
        parent = folder.parent
        if not os.stat(parent).st_mode & 0o001:
            raise PgServerError(f"{parent} is not searchable by the '{SERVER_USER}' account; set TMPDIR to a folder it can enter")
