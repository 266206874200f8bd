"""Floods a worker must outlast: bodies refused before they are read, the bodies-in-flight budget, the size limit's
edge, and /health's answer shared among its callers; each through the Procfile's real server."""

import http.client
import select
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.blackhole import Blackhole
from support.signing import SECRET, claims_for, signed_delivery, token_with

from receiver.sample import encode_body, sample_event, sign_body
from receiver.webhook import BODIES_IN_FLIGHT, DEADLINE_SECONDS, MAX_BODY_BYTES

OTHER_SECRET = "another-secret-than-the-receivers-0123456789"
TOO_LARGE = f"body is larger than {MAX_BODY_BYTES} bytes"


def body_of_size(size: int, event_id: str) -> bytes:
    """Return a DT event padded, in a label, to exactly `size` bytes."""
    event = sample_event("temperature", event_id=event_id)
    event["labels"]["padding"] = ""
    event["labels"]["padding"] = "x" * (size - len(encode_body(event)))
    return encode_body(event)


def send_head(server, headers: dict, first_bytes: bytes = b"", timeout: float = 10) -> socket.socket:
    """Open a connection and send a POST's head and the first bytes of its body; return the connection."""
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    connection.sendall(f"POST / HTTP/1.1\r\nHost: t\r\n{head}\r\n".encode() + first_bytes)
    return connection


def read_answer(connection: socket.socket) -> tuple[int, str, str]:
    """Read one answer from a connection; return its status, its text and its Connection header."""
    answer = http.client.HTTPResponse(connection)
    answer.begin()
    return answer.status, answer.read().decode().strip(), answer.getheader("Connection")


def closed_by_server(connection: socket.socket, seconds: float = 5) -> bool:
    """Tell whether the server closes the connection within a few seconds (rather than wait for more bytes)."""
    connection.settimeout(seconds)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def rejections(server) -> list[tuple[int, str]]:
    """Return the status and reason of each rejection the server logged."""
    return [(line["status"], line["reason"]) for line in server.log_lines() if line["msg"] == "request rejected"]


BODY = body_of_size(MAX_BODY_BYTES, "flood-1")
DECLARED = {"Content-Length": len(BODY)}
UNSIGNED = {
    "no token": (DECLARED, "missing X-Dt-Signature header"),
    "another secret": (DECLARED | {"X-Dt-Signature": sign_body(BODY, OTHER_SECRET)}, "signature does not verify"),
    "expired": (DECLARED | {"X-Dt-Signature": token_with(claims_for(BODY, iat=int(time.time()) - 7200,
                                                                    exp=int(time.time()) - 3600))},
                "token has expired"),
    "chunked, no token": ({"Transfer-Encoding": "chunked"}, "missing X-Dt-Signature header"),
}


@pytest.mark.parametrize("case", UNSIGNED)
def test_unsigned_large_body_is_refused_before_it_is_read(start_server, case):
    """Headers declaring 256 KiB (or a chunked body) with a token that fails, and the body's first 16 bytes:
    401 at once, and the connection closed rather than the rest of the body awaited."""
    headers, reason = UNSIGNED[case]
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    first_bytes = b"%x\r\n%s" % (len(BODY), BODY[:16]) if "Transfer-Encoding" in headers else BODY[:16]
    started = time.monotonic()
    with send_head(server, headers, first_bytes, timeout=5) as connection:
        assert read_answer(connection) == (401, reason, "close")
        assert time.monotonic() - started < 5  # the deadline is 7 s: an answer after waiting for the body comes later
        assert closed_by_server(connection)
    assert rejections(server) == [(401, reason)]


def test_refused_small_body_keeps_the_connection(start_server):
    """A refused request with a body of a few KB is answered `Connection: keep-alive`, and its connection
    serves the next delivery: DT's deliveries keep their connections when one is refused."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    body, headers = signed_delivery()
    refused = {**headers, "Content-Length": len(body), "X-Dt-Signature": sign_body(body, OTHER_SECRET)}
    with send_head(server, refused, body) as connection:
        assert read_answer(connection) == (401, "signature does not verify", "keep-alive")
        connection.sendall(b"POST / HTTP/1.1\r\nHost: t\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in {**headers, "Content-Length": len(body)}.items()).encode()
            + b"\r\n" + body)
        assert read_answer(connection) == (200, "logged", "keep-alive")


def test_checksum_mismatch_is_401_once_the_headers_pass(start_server):
    """A valid token for other bytes passes the header step; the body read after it does not match: 401."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    body, headers = signed_delivery()
    other = body.replace(b'"temperature"', b'"temperatur3"')
    with send_head(server, {**headers, "Content-Length": len(other)}, other) as connection:
        assert read_answer(connection) == (401, "body does not match the token's checksum_sha256", "keep-alive")
    assert rejections(server) == [(401, "body does not match the token's checksum_sha256")]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("size", "answer"), [(MAX_BODY_BYTES, (200, "logged")),
                                              (MAX_BODY_BYTES + 1, (413, TOO_LARGE))])
def test_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(start_server, chunked, size, answer):
    """A signed body of exactly 256 KiB is accepted; one byte more is 413, sent with its length or chunked."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)
    body = body_of_size(MAX_BODY_BYTES, "edge-1") + b" " * (size - MAX_BODY_BYTES)  # JSON allows trailing space
    headers = {"X-Dt-Signature": sign_body(body, SECRET), "Connection": "close"}
    if chunked:
        halves = (body[: size // 2], body[size // 2 :])
        framed = b"".join(b"%x\r\n%s\r\n" % (len(half), half) for half in halves) + b"0\r\n\r\n"
        connection = send_head(server, {**headers, "Transfer-Encoding": "chunked"}, framed)
    else:
        connection = send_head(server, {**headers, "Content-Length": size}, body)
    with connection:
        assert read_answer(connection)[:2] == answer


def hold_bodies(server, count: int) -> list[tuple[socket.socket, bytes]]:
    """Open connections that each send a signed delivery's head declaring 256 KiB and half its body, then wait;
    return each connection with the rest of its body."""
    held = []
    for number in range(count):
        body = body_of_size(MAX_BODY_BYTES, f"held-{number}")
        headers = {"Content-Length": len(body), "X-Dt-Signature": sign_body(body, SECRET)}
        held.append((send_head(server, headers, body[: len(body) // 2]), body[len(body) // 2 :]))
    return held


def refused_for_the_budget(server, seconds: float = 10) -> tuple[int, str, str | None]:
    """Send small signed deliveries until one is refused (the budget full), for at most a few seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body, headers = signed_delivery()
        with send_head(server, {**headers, "Content-Length": len(body)}, body) as connection:
            answer = http.client.HTTPResponse(connection)
            answer.begin()
            if answer.status != 200:
                return answer.status, answer.read().decode().strip(), answer.getheader("Retry-After")
    raise AssertionError(f"no delivery was refused within {seconds} s")


def test_bodies_in_flight_beyond_the_budget_get_503_and_the_budget_comes_back(start_server):
    """With 64 signed 256 KiB bodies arriving at once (16 MB), the next delivery gets 503 with Retry-After; once
    they end (one by one, by disconnecting, or at the deadline) a full budget's worth fits again, and 200s follow."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, WEB_CONCURRENCY="1")
    fits = BODIES_IN_FLIGHT.limit_bytes // MAX_BODY_BYTES
    busy = (503, f"too many bodies in flight (over {BODIES_IN_FLIGHT.limit_bytes // 2**20} MB): retry later", "10")
    held = hold_bodies(server, fits)
    assert refused_for_the_budget(server) == busy
    for connection, rest in held[: fits // 2]:  # these send the rest of their bodies and are answered
        connection.sendall(rest)
        assert read_answer(connection)[:2] == (200, "logged")
    for connection, _ in held[fits // 2 : 3 * fits // 4]:  # these hang up
        connection.close()
    for connection, _ in held[3 * fits // 4 :]:  # these wait for the deadline
        assert read_answer(connection)[:2] == (503, f"no answer within {DEADLINE_SECONDS:g} s")
    again = hold_bodies(server, fits)
    assert refused_for_the_budget(server) == busy
    assert [connection for connection, _ in again if select.select([connection], [], [], 0)[0]] == []  # none refused
    for connection, rest in again:
        connection.sendall(rest)
        assert read_answer(connection)[:2] == (200, "logged")
    assert deliver_one(server) == 200
    for connection, _ in held + again:
        connection.close()


def deliver_one(server) -> int:
    """Post one signed delivery; return its status."""
    return server.post(*signed_delivery(), timeout=10)[0]


def get_health(url: str) -> int:
    """Return the status GET /health answers."""
    try:
        with urllib.request.urlopen(url + "health", timeout=10) as answer:  # noqa: S310 (the test server's URL)
            return answer.status
    except urllib.error.HTTPError as answer:
        return answer.code


def test_deliveries_alongside_200_concurrent_health_checks_are_all_200(start_server, postgres, database_url):
    """500 deliveries sent alongside 200 connections checking /health over and over, to one worker with one
    connection to a database 10 ms away: every delivery and every check is answered 200, since the checks share
    one answer a second instead of queueing for the connection (two queries each) ahead of the deliveries."""
    link = Blackhole("127.0.0.1", postgres.port, answer_delay=0.01)
    try:
        server = start_server(DT_SIGNATURE_SECRET=SECRET, WEB_CONCURRENCY="1", DATABASE_MAX_CONNECTIONS="1",
                              DATABASE_URL=database_url.replace(f":{postgres.port}/", f":{link.port}/"),
                              HEALTH_STALE_AFTER="1h")
        assert deliver_one(server) == 200  # a pushed event, so that /health also asks when the last one arrived
        deliveries, health_statuses = deliver_beside_health_checks(server, deliveries=500, checkers=200)
    finally:
        link.close()
    assert (deliveries.count(200), len(deliveries)) == (500, 500)
    assert health_statuses.count(200) == len(health_statuses) >= 200


def deliver_beside_health_checks(server, deliveries: int, checkers: int) -> tuple[list[int], list[int]]:
    """Send deliveries from 50 threads while each checker asks /health in turn, until they are sent (or for 60 s);
    return the statuses of both."""
    done = threading.Event()
    give_up_at = time.monotonic() + 60

    def check_health() -> list[int]:
        statuses = []
        while not done.is_set() and time.monotonic() < give_up_at:
            statuses.append(get_health(server.url))
        return statuses

    with ThreadPoolExecutor(checkers) as checking, ThreadPoolExecutor(50) as sending:
        checks = [checking.submit(check_health) for _ in range(checkers)]
        time.sleep(1)
        try:
            statuses = list(sending.map(lambda _: deliver_one(server), range(deliveries)))
        finally:
            done.set()
        return statuses, [status for check in checks for status in check.result()]
