"""A throwaway PostgreSQL server the tests own, so they can stop, crash and restart it."""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg
from psycopg import sql

from .server import free_port


def server_programs() -> Path | None:
    """Return the folder holding initdb and pg_ctl: PG_BINDIR, PATH, or Debian's place."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(path) for path in candidates if path and (Path(path) / "initdb").exists()), None)


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, listening on a free loopback port."""

    def __init__(self, programs: Path):
        self.programs = programs
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dt-receiver-pg-"))
        self.data = self.folder / "data"
        # PostgreSQL refuses to run as root; the postgres account that its package makes will do.
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def url(self, database: str = "postgres") -> str:
        """Return the URL of a database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` as a restart does, `immediate` as a crash does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def freeze(self) -> None:
        """Stop every process of the server with SIGSTOP, as a storage stall or a hung host looks from outside."""
        postmaster = self._postmaster()
        if postmaster is None:
            raise RuntimeError("the server is not running")
        os.kill(postmaster, signal.SIGSTOP)  # first, so it forks no new backend meanwhile
        for pid in self._children(postmaster):
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let every process of a frozen server run again (harmless on a running one)."""
        postmaster = self._postmaster()
        if postmaster is None:
            return
        for pid in [*self._children(postmaster), postmaster]:
            with suppress(ProcessLookupError):  # a backend may have ended since it was listed
                os.kill(pid, signal.SIGCONT)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Keep the server stopped for the block (connections refused); it starts again however the block ends."""
        self.stop("fast")
        try:
            yield
        finally:
            self.start()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Keep the server frozen for the block; it thaws however the block ends, since the cluster is shared."""
        try:
            self.freeze()
            yield
        finally:
            self.thaw()

    def _postmaster(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _children(pid: int) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
        return [int(child) for child in found]

    def remove(self) -> None:
        """Stop the server if it runs and delete its files."""
        self.thaw()  # a frozen server would never stop
        subprocess.run([*self.run_as, str(self.programs / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *arguments: str) -> None:
        subprocess.run([*self.run_as, str(self.programs / program), *arguments], check=True, capture_output=True,
                       cwd=self.folder)


def database_name(database_url: str) -> str:
    """Return the database a URL names."""
    return psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]


def own_role(postgres, database_url: str) -> str:
    """Give the database to a new role that is not a superuser, as Heroku's is; return the URL that logs in as it."""
    database = database_name(database_url)
    role = f"owner_{database}"[:63]
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(role)))
    return postgres.url(database).replace("postgres@", f"{role}@")
