"""Signing and server helpers shared by the tests."""

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import psycopg
from psycopg import sql

from receiver.sample import encode_body, sample_event, sign_body

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-signature-secret-0123456789abcdef"


def signed_delivery(event: dict | None = None, secret: str = SECRET, now: float | None = None) -> tuple[bytes, dict]:
    """Return a realistic body and the headers DT would send with it."""
    body = encode_body(event or sample_event())
    return body, {"Content-Type": "application/json", "X-Dt-Signature": sign_body(body, secret, now)}


def claims_for(body: bytes, **changes) -> dict:
    """Return the claims DT would sign for a body, with some changed (None removes one)."""
    now = int(time.time())
    claims = {
        "checksum": hashlib.sha1(body).hexdigest(),
        "checksum_sha256": hashlib.sha256(body).hexdigest(),
        "iat": now,
        "exp": now + 3600,
        "jti": "f0e1d2c3",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def token_with(claims: dict, secret: str = SECRET, algorithm: str = "HS256", headers: dict | None = None) -> str:
    """Return an HS256 (or other) token with exactly these claims."""
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def hand_made_hs256(header: dict, claims: dict, key: bytes) -> str:
    """Return a token HMAC-SHA256-signed with any key under any header: what pyjwt refuses to make."""
    signing_input = base64url(json.dumps(header).encode()) + "." + base64url(json.dumps(claims).encode())
    return signing_input + "." + base64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def base64url(part: bytes) -> str:
    """Return bytes as unpadded base64url, as JWTs write them."""
    return base64.urlsafe_b64encode(part).rstrip(b"=").decode()


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


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def procfile_command(process_type: str = "web") -> str:
    """Return the command the Procfile gives for a process type."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process_type:
            return command.strip()
    raise LookupError(f"Procfile has no {process_type} process")


class Server:
    """The Procfile's web command, run by bash as Heroku runs it, on a loopback port, output to a file."""

    def __init__(self, log_path: Path, command: str | None = None, **settings: str):
        self.command = command or procfile_command()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DT_", "DATABASE_URL"))}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PORT=str(self.port),
                   WEB_CONCURRENCY="2", PYTHONUNBUFFERED="1")
        env.update(settings)
        self.env = env
        self.process = None

    def start(self, wait: bool = True) -> "Server":
        """Start the server (with a new session, so signals reach it the way Heroku sends them)."""
        with open(self.log_path, "ab") as log:  # the server keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, shell=True, executable="bash", cwd=ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_until_up()
        return self

    def wait_until_up(self, seconds: float = 15) -> float:
        """Wait for the first answer to GET /; return how long it took."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=1):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server did not answer within {seconds} s:\n{self.output()}")

    def send_signal(self, signum: int) -> None:
        """Send a signal to every process of the server, as Heroku does on shutdown."""
        os.killpg(self.process.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, seconds: float = 30) -> int:
        """Signal the server and wait for it to exit; return its exit status."""
        if self.process.poll() is None:
            self.send_signal(signum)
        try:
            return self.process.wait(seconds)
        finally:
            if self.process.poll() is None:
                self.send_signal(signal.SIGKILL)
                self.process.wait()

    def post(self, body: bytes, headers: dict, timeout: float = 30) -> tuple[int, str]:
        """POST to the server and return the status and text of the answer."""
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as answer:
            return answer.code, answer.read().decode()

    def output(self) -> str:
        """Return everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """Return the receiver's own JSON log lines."""
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]
