"""The Procfile's web command run for real on a loopback port, and the one way tests post a delivery."""

import http.client
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

ROOT = Path(__file__).resolve().parents[2]


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


def deliver(target, body: bytes, headers: dict, timeout: float = 30) -> tuple[int, str]:
    """POST a delivery to an app's test client or to a running Server; return the status and the answer's text."""
    if isinstance(target, Server):
        return target.post(body, headers, timeout)
    answer = target.post("/", data=body, headers=headers)
    return answer.status_code, answer.text


def raw_exchange(server: Server, request: bytes) -> tuple[int, str]:
    """Send raw bytes to the server and return the status and text of its answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(request)
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        return answer.status, answer.read().decode(errors="replace").strip()
