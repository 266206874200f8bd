"""The Procfile's web command, run for real on a loopback port and driven over HTTP."""

import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.issuer import ORGANIZATION_ID
from support.server import ROOT, Server, free_port, procfile_command
from support.signing import SECRET, signed_delivery

from receiver.sample import sample_event
from receiver.server import LOG_PIPE_BYTES
from receiver.settings import setting_warnings


def test_signed_event_through_the_procfile_server(start_server):
    """A signed event gets 200 and its log line; an unsigned one gets 401 and a line saying why; one line each."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    body, headers = signed_delivery(sample_event(event_id="e2e-1"))
    assert server.post(body, {**headers, "X-Request-Id": "router-7"}) == (200, "logged\n")
    assert server.post(body, {}) == (401, "missing X-Dt-Signature header\n")
    lines = server.log_lines()
    [accepted] = [line for line in lines if line["msg"] == "event logged"]
    assert (accepted["event_id"], accepted["request_id"]) == ("e2e-1", "router-7")
    [rejected] = [line for line in lines if line["msg"] == "request rejected"]
    assert rejected["reason"] == "missing X-Dt-Signature header"
    # A delivery's own line is its only line; other requests get gunicorn's access line.
    assert "gunicorn method=POST" not in server.output()
    urllib.request.urlopen(urllib.request.Request(server.url, headers={"X-Request-Id": "router-8"}), timeout=10).close()
    deadline = time.monotonic() + 5  # the access line follows the answer
    while "request_id=router-8" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'gunicorn method=GET path="/" status=200' in server.output()
    assert SECRET not in server.output() and headers["X-Dt-Signature"] not in server.output()


def test_start_without_secret_fails_at_once(tmp_path):
    """Without any verification setting the server exits non-zero, naming the variables, and never listens."""
    server = Server(tmp_path / "server.log")
    started = time.monotonic()
    completed = subprocess.run(procfile_command(), shell=True, executable="bash", cwd=ROOT, env=server.env, capture_output=True,
                               text=True, timeout=30)
    assert completed.returncode != 0
    assert "DT_SIGNATURE_SECRET" in completed.stderr and "DT_ORGANIZATION_ID" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert time.monotonic() - started < 10


def test_start_with_a_public_key_as_the_secret_fails_with_one_line(tmp_path):
    """A PEM public key pasted as DT_SIGNATURE_SECRET stops the server at boot with one line naming the variable."""
    public_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    server = Server(tmp_path / "server.log", DT_SIGNATURE_SECRET=public_pem)
    completed = subprocess.run(procfile_command(), shell=True, executable="bash", cwd=ROOT, env=server.env,
                               capture_output=True, text=True, timeout=30)
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert ("receiver not started: DT_SIGNATURE_SECRET looks like a public key or a certificate, not a shared secret"
            in completed.stderr)


def test_short_secret_warns_once_at_start(start_server):
    """A short secret gives one warning line at boot and nothing more per request."""
    server = start_server(DT_SIGNATURE_SECRET="short")
    for _ in range(4):
        assert server.post(*signed_delivery(secret="short"))[0] == 200
    warnings = [line for line in server.log_lines() if line["level"] == "warning"]
    assert len(warnings) == 1 and "shorter than 32 bytes" in warnings[0]["msg"]
    assert "InsecureKeyLengthWarning" not in server.output()


@pytest.mark.parametrize("name", ["DT_SIGNATURE_SECRET", "DT_SIGNATURE_SECRET_PREVIOUS"])
@pytest.mark.parametrize("secret, warned", [
    ("s" * 31, True), ("s" * 32, False),
    ("\u00e9" * 15 + "s", True), ("\u00e9" * 16, False),  # counted in bytes: 16 two-byte letters are 32 bytes
], ids=["31 bytes", "32 bytes", "31 bytes in 16 letters", "32 bytes in 16 letters"])
def test_short_secret_warning_starts_below_32_bytes(name, secret, warned):
    """A secret of 31 bytes is warned of at start, one of 32 bytes is not, whichever secret setting holds it."""
    expected = [f"{name} is shorter than 32 bytes: use a longer random secret"] if warned else []
    assert setting_warnings({"DT_SIGNATURE_SECRET": SECRET, name: secret}) == expected


def test_sigterm_lets_an_in_flight_request_finish(start_server):
    """A request whose body is still arriving when SIGTERM comes is answered 200 before the server exits."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    body, headers = signed_delivery(sample_event(event_id="in-flight"))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as connection:
        connection.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
        connection.sendall(body[:10])
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        time.sleep(1)
        connection.sendall(body[10:])
        answer = connection.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 200")
    assert server.process.wait(25) == 0
    assert any(line.get("event_id") == "in-flight" for line in server.log_lines())


def test_send_command_gets_an_event_through(start_server, tmp_path):
    """`flask --app app send`, as the README gives it, gets 200 from a running server, which logs the event."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    command = [sys.executable, "-m", "flask", "--app", "app", "send", server.url, "--type", "touch", "--event-id", "cli-1"]
    sent = subprocess.run(command, cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=60)
    assert (sent.returncode, sent.stdout) == (0, "200 logged\n")
    [line] = [line for line in server.log_lines() if line.get("event_id") == "cli-1"]
    assert line["event_type"] == "touch"
    wrong = subprocess.run(command, cwd=ROOT, env={**server.env, "DT_SIGNATURE_SECRET": "another-secret-0123456789abcdef0123"},
                           capture_output=True, text=True, timeout=60)
    assert (wrong.returncode, wrong.stdout) == (1, "401 signature does not verify\n")
    unreachable = subprocess.run([*command[:6], f"http://127.0.0.1:{free_port()}/"], cwd=ROOT, env=server.env,
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "could not reach" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_send_command_twice_with_one_id_is_stored_then_a_duplicate(start_server, database_url):
    """The README's `send --event-id same-1`, sent twice to a server with a database: `200 stored`, then `200 duplicate`."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    command = [sys.executable, "-m", "flask", "--app", "app", "send", server.url, "--event-id", "same-1"]
    answers = [subprocess.run(command, cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=60).stdout
               for _ in range(2)]
    assert answers == ["200 stored\n", "200 duplicate\n"]


def test_asymmetric_signature_through_the_procfile_server(start_server, issuer):
    """With only DT_ORGANIZATION_ID set, the real server fetches the issuer's keys and accepts DT's ES256 token."""
    server = start_server(DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url)
    body, _ = signed_delivery(sample_event(event_id="asym-e2e"))
    assert server.post(body, {"DT-Asymmetric-Signature": issuer.token(body, "k1")}) == (200, "logged\n")
    assert server.post(body, {"DT-Asymmetric-Signature": issuer.token(body, "k1", sub="org-other")}) == (
        403, "token is for another DT organization\n")
    assert issuer.fetches <= 2  # at most one fetch per worker


def test_server_answers_on_ipv4_and_ipv6(start_server):
    """Bound to [::]:$PORT, the server answers on both 127.0.0.1 and ::1."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, server.port), timeout=10) as connection:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert connection.makefile("rb").readline() == b"HTTP/1.1 200 OK\r\n"


def test_log_only_event_is_not_acknowledged_when_its_line_cannot_be_written(tmp_path):
    """In log-only mode the log line is the event's only copy: with stdout gone, the answer is 503, never 200."""
    server = Server(tmp_path / "unused.log", DT_SIGNATURE_SECRET=SECRET)
    reader = start_writing_to_a_pipe(server)
    try:
        server.wait_until_up()
        assert server.post(*signed_delivery())[0] == 200  # the pipe is read: the line is written
        os.read(reader, 1 << 20)
        os.close(reader)  # now every write to stdout fails
        assert server.post(*signed_delivery()) == (503, "log line could not be written\n")
    finally:
        server.stop()


def test_log_pipe_takes_a_large_event_line_while_nobody_reads_it(tmp_path):
    """On a pipe, as on a dyno, stdout holds 1 MB from the start: a 200 KB event's line is written without a wait."""
    server = Server(tmp_path / "unused.log", DT_SIGNATURE_SECRET=SECRET)
    reader = start_writing_to_a_pipe(server)
    try:
        server.wait_until_up()
        assert fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ) == LOG_PIPE_BYTES
        event = sample_event(event_id="large-line")
        event["labels"]["padding"] = "x" * 200_000
        # Nobody reads the pipe meanwhile: in 64 KB, the line would wait for a reader, and so would the answer.
        assert server.post(*signed_delivery(event), timeout=5) == (200, "logged\n")
        output = drain(reader)
        assert b'"event_id": "large-line"' in output and b"x" * 200_000 in output
    finally:
        drain(reader)  # a blocked write must not hold up the stop
        server.stop()
        os.close(reader)


def drain(descriptor: int) -> bytes:
    """Read what a pipe holds until nothing more arrives for 0.2 s; return it."""
    chunks = []
    while select.select([descriptor], [], [], 0.2)[0] and (chunk := os.read(descriptor, 1 << 20)):
        chunks.append(chunk)
    return b"".join(chunks)


def start_writing_to_a_pipe(server: Server) -> int:
    """Start the server with its output on a pipe, as a dyno's goes to the log router; return the reading end."""
    reader, writer = os.pipe()
    server.process = subprocess.Popen(server.command, shell=True, executable="bash", cwd=ROOT, env=server.env,
                                      stdout=writer, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(writer)
    return reader
