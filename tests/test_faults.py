"""Every delivery answered within DT's deadline and every event kept once, while what the receiver needs misbehaves."""

import http.client
import itertools
import math
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from support.blackhole import Blackhole
from support.issuer import ORGANIZATION_ID, FakeClock
from support.signing import SECRET, dt_event, signed_delivery

from receiver.keys import SigningKeys
from receiver.sample import encode_body, sample_event
from receiver.signatures import verify_asymmetric_token

ANSWER_SECONDS = 8.0  # the receiver's promise; DT gives up on an answer after 10 s
RECOVERY_SECONDS = 5.0  # every worker stores again this soon after the database is back
ROUTER_SECONDS = 30  # Heroku's router gives up here; a client waiting this long sees how late an answer is
RETRY_SECONDS = 0.5  # DT waits 8 s before its first retry, then doubles; scaled down to keep the tests short
CONNECTIONS = 8  # DT's concurrent deliveries in the outage tests
FAULT_SECONDS = 10  # how long the database stays frozen or stopped: longer than the 7 s deadline
PARTITION_SECONDS = 12  # how long the network to the database stays silent: two attempts per connection


@dataclass
class Answer:
    """One delivery attempt as DT saw it."""

    event_id: str
    status: int | None  # None: no answer (refused, reset, timed out)
    text: str
    retry_after: str | None
    seconds: float  # from sending to the end of the answer
    at: float  # monotonic time the answer ended
    worker: int | None  # pid of the gunicorn worker that answered, if found


def post(server, event_id: str, timeout: float = ROUTER_SECONDS) -> Answer:
    """Deliver one event once, on a new connection, and time the answer."""
    body, headers = signed_delivery(dt_event(event_id))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.request("POST", "/", body, headers)
        response = connection.getresponse()
        text = response.read().decode()
        ended = time.monotonic()
        worker = serving_worker(server, connection.sock.getsockname()[1]) if connection.sock else None
        return Answer(event_id, response.status, text, response.getheader("Retry-After"), ended - started, ended, worker)
    except (OSError, http.client.HTTPException) as error:
        ended = time.monotonic()
        return Answer(event_id, None, type(error).__name__, None, ended - started, ended, None)
    finally:
        connection.close()


def died(pid: int, seconds: float = 5) -> float:
    """Return when a process just sent SIGKILL is gone (a zombie or reaped): until then it may still accept a
    connection, which its death then cuts off."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                break
        except (OSError, IndexError):
            break
        time.sleep(0.001)
    return time.monotonic()


def worker_pids(server) -> set[int]:
    """Return the pids of the server's gunicorn workers (the children of its master)."""
    found = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=False).stdout
    return {int(pid) for pid in found.split()}


def serving_worker(server, client_port: int) -> int | None:
    """Return the worker holding the server's end of one of our loopback connections (Linux /proc)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
            if (local_port, remote_port) == (server.port, client_port):
                sockets.add(f"socket:[{fields[9]}]")
    for pid in worker_pids(server):
        try:
            if any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:
            continue  # the worker exited meanwhile
    return None


class Connector:
    """DT's side: deliver each event until it is answered 200, and keep every answer."""

    def __init__(self, server, prefix: str):
        self.server = server
        self.prefix = prefix
        self.answers: list[Answer] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def new_event_id(self) -> str:
        """Return an event id not delivered before."""
        with self._lock:
            return f"{self.prefix}-{next(self._numbers):04d}"

    def post(self, event_id: str) -> Answer:
        """Deliver an event once and keep the answer."""
        answer = post(self.server, event_id)
        with self._lock:
            self.answers.append(answer)
        return answer

    def deliver(self, event_id: str, give_up_after: float = 60) -> Answer:
        """Deliver an event, retrying after every answer but 200, as DT does."""
        give_up_at = time.monotonic() + give_up_after
        while (answer := self.post(event_id)).status != 200 and time.monotonic() < give_up_at:
            time.sleep(RETRY_SECONDS)
        return answer

    def keep_delivering(self, until: threading.Event) -> None:
        """Deliver new events, one after another, until told to stop (finishing the one under way)."""
        while not until.is_set():
            self.deliver(self.new_event_id())

    def store_on_every_worker(self, since: float, limit: float = 20) -> dict[int, float]:
        """Post new events on several connections at once until each worker has stored one; return when each first did."""
        workers = worker_pids(self.server)
        first: dict[int, float] = {}
        stop_at = time.monotonic() + limit

        def probe() -> None:
            event_id = None
            while not workers <= first.keys() and time.monotonic() < stop_at:
                answer = self.post(event_id := event_id or self.new_event_id())
                if answer.status != 200:
                    time.sleep(0.1)  # and the same event again, as DT would send it
                    continue
                event_id = None
                if answer.worker is not None:
                    first.setdefault(answer.worker, answer.at - since)
            if event_id is not None:
                self.deliver(event_id)  # so that every event posted is stored in the end

        with ThreadPoolExecutor(CONNECTIONS) as pool:
            for running in [pool.submit(probe) for _ in range(CONNECTIONS)]:
                running.result()
        return {worker: first.get(worker, math.inf) for worker in workers}

    def through(self, fault, seconds: float) -> tuple[list[Answer], dict[int, float]]:
        """Keep delivering on CONNECTIONS connections through a fault held for `seconds`.

        Return the answers to attempts sent during the fault, and when each worker first stored after it.
        """
        stop, delivering = threading.Event(), []
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            try:
                with fault:
                    started = time.monotonic()
                    delivering = [pool.submit(self.keep_delivering, stop) for _ in range(CONNECTIONS)]
                    time.sleep(seconds)
                ended = time.monotonic()
                recovery = self.store_on_every_worker(ended)
            finally:
                stop.set()
            for running in delivering:
                running.result()
        return [answer for answer in self.answers if started <= answer.at - answer.seconds < ended], recovery

    def event_ids(self) -> set[str]:
        """Return every event id delivered at least once."""
        return {answer.event_id for answer in self.answers}


def late_or_unanswered(answers: list[Answer]) -> list[Answer]:
    """Return the attempts not answered within the deadline."""
    return [answer for answer in answers if answer.status is None or answer.seconds > ANSWER_SECONDS]


def assert_fast_and_clear(answers: list[Answer]) -> None:
    """Every attempt was answered within the deadline: 200, or 503 with Retry-After."""
    assert late_or_unanswered(answers) == []
    assert {answer.status for answer in answers} <= {200, 503}
    assert all(answer.retry_after and int(answer.retry_after) > 0 for answer in answers if answer.status == 503)


def assert_stored_once(server, database_url: str, event_ids: set[str]) -> None:
    """Each event delivered has exactly one row, and a replay of every one of them answers duplicate."""
    with psycopg.connect(database_url) as connection:
        stored = [row[0] for row in connection.execute("SELECT event_id FROM dt_events")]
    assert len(stored) == len(event_ids) and set(stored) == event_ids
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        replays = list(pool.map(lambda event_id: post(server, event_id), sorted(event_ids)))
    assert {(answer.status, answer.text) for answer in replays} == {(200, "duplicate\n")}
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM dt_events").fetchone()[0] == len(event_ids)


def report(capsys, name: str, answers: list[Answer], **figures) -> None:
    """Print what a fault test measured, for the record (pytest shows it without -s)."""
    worst = max((answer.seconds for answer in answers), default=0.0)
    statuses = sorted({str(answer.status) for answer in answers})
    shown = ", ".join(f"{key} {value}" for key, value in figures.items())
    with capsys.disabled():
        print(f"\n{name}: {len(answers)} answers ({'/'.join(statuses)}), worst {worst:.2f} s; {shown}")


def rounded(recovery: dict[int, float]) -> list[float]:
    """Return recovery times, one per worker, rounded for a report."""
    return sorted(round(seconds, 2) for seconds in recovery.values())


@pytest.mark.slow
def test_frozen_database_answers_in_time_and_stores_each_event_once(start_server, postgres, database_url, capsys):
    """With PostgreSQL frozen, every answer comes within 8 s, each worker stores within 5 s of the thaw, each event once."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    connector = Connector(server, "frozen")
    workers = worker_pids(server)
    assert max(connector.store_on_every_worker(time.monotonic()).values()) < 15  # both pools open and ready
    during, recovery = connector.through(postgres.frozen(), FAULT_SECONDS)
    report(capsys, "frozen database", connector.answers, during_freeze=len(during),
           refused=sum(answer.status == 503 for answer in during), recovery_per_worker=rounded(recovery))
    assert_fast_and_clear(connector.answers)
    assert sum(answer.status == 503 for answer in during) >= CONNECTIONS  # the freeze was felt
    assert worker_pids(server) == workers  # recovered without a restart
    assert max(recovery.values()) < RECOVERY_SECONDS
    assert_stored_once(server, database_url, connector.event_ids())


@pytest.mark.slow
def test_silent_network_answers_in_time_and_recovers(start_server, postgres, database_url, capsys):
    """With the database's network silent, every answer comes within 8 s and each worker stores within 5 s of its return."""
    link = Blackhole("127.0.0.1", postgres.port)
    try:
        server = start_server(DT_SIGNATURE_SECRET=SECRET,
                              DATABASE_URL=database_url.replace(f":{postgres.port}/", f":{link.port}/"))
        connector = Connector(server, "partition")
        assert max(connector.store_on_every_worker(time.monotonic()).values()) < 15
        during, recovery = connector.through(link.silenced(), PARTITION_SECONDS)
        report(capsys, "silent network", connector.answers, during_partition=len(during),
               refused=sum(answer.status == 503 for answer in during), recovery_per_worker=rounded(recovery))
        assert_fast_and_clear(connector.answers)
        assert sum(answer.status == 503 for answer in during) >= CONNECTIONS  # the partition was felt
        assert max(recovery.values()) < RECOVERY_SECONDS
        assert_stored_once(server, database_url, connector.event_ids())
    finally:
        link.close()


@pytest.mark.slow
def test_every_worker_stores_within_5_s_of_the_database_coming_back(start_server, postgres, database_url, capsys):
    """After 20 s with the database stopped (connections refused), each worker stores within 5 s of its return."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    connector = Connector(server, "outage")
    workers = worker_pids(server)
    assert max(connector.store_on_every_worker(time.monotonic()).values()) < 15
    # long enough for a reconnect back-off to outgrow the 5 s
    _, recovery = connector.through(postgres.stopped(), FAULT_SECONDS)
    report(capsys, "stopped database", connector.answers, recovery_per_worker=rounded(recovery))
    assert_fast_and_clear(connector.answers)
    # the pool's own wait ends before the write's, so a refused database is named, not only seen as a timeout
    assert "database unavailable: connection refused\n" in {answer.text for answer in connector.answers}
    assert worker_pids(server) == workers
    assert max(recovery.values()) < RECOVERY_SECONDS
    assert_stored_once(server, database_url, connector.event_ids())


class SlowClients:
    """Connections that send a POST's headers, then trickle its 2000-byte body a byte a second, reopened if closed."""

    HEAD = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Dt-Signature: trickle\r\nContent-Length: 2000\r\n\r\n")

    def __init__(self, port: int, count: int):
        self.port = port
        self.sockets = [self._open() for _ in range(count)]
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop trickling and close every connection."""
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(self.HEAD)
        return sock

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            for n, sock in enumerate(self.sockets):
                try:
                    sock.sendall(b" ")
                except OSError:  # the server gave up on it: a scanner would come back
                    sock.close()
                    self.sockets[n] = self._open()
                    self.reopened += 1


def test_slow_clients_leave_deliveries_fast(start_server, capsys):
    """With 48 clients trickling their bodies a byte a second, normal deliveries keep a p99 under 1 s."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET)  # log-only: no database in the way
    slow = SlowClients(server.port, 48)
    try:
        time.sleep(2)  # every slow client has sent its headers and begun its body
        answers: list[Answer] = []

        def deliver_some() -> None:
            for _ in range(16):
                answers.append(post(server, sample_event()["event"]["eventId"], timeout=3))
                time.sleep(0.2)

        with ThreadPoolExecutor(4) as pool:
            for running in [pool.submit(deliver_some) for _ in range(4)]:
                running.result()
    finally:
        slow.close()
    latencies = sorted(answer.seconds for answer in answers)
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
    report(capsys, "48 slow clients", answers, p99=f"{p99:.3f} s", slow_clients_reopened=slow.reopened)
    assert len(answers) >= 60
    assert p99 < 1.0
    assert {(answer.status, answer.text) for answer in answers} == {(200, "logged\n")}


@pytest.mark.slow
def test_locked_table_during_reconnects_does_not_stop_deliveries(start_server, database_url, capsys):
    """Under a maintenance lock on dt_events, reconnects and a new worker's schema check leave deliveries storing in time."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    connector = Connector(server, "locked")
    workers = worker_pids(server)
    assert max(connector.store_on_every_worker(time.monotonic()).values()) < 15
    stop, delivering = threading.Event(), []
    with psycopg.connect(database_url) as maintenance, psycopg.connect(database_url, autocommit=True) as admin:
        # What VACUUM and CREATE INDEX CONCURRENTLY hold: INSERT does not wait on it, CREATE INDEX does.
        maintenance.execute("LOCK TABLE dt_events IN SHARE UPDATE EXCLUSIVE MODE")
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            try:
                delivering = [pool.submit(connector.keep_delivering, stop) for _ in range(CONNECTIONS)]
                time.sleep(1)
                terminated_at = time.monotonic()
                terminated = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                           "WHERE application_name = 'dt-receiver'").fetchone()[0]
                after_terminate = connector.store_on_every_worker(terminated_at)
                victim = min(workers)
                os.kill(victim, signal.SIGKILL)
                killed_at = died(victim)
                while len(worker_pids(server) - workers) < 1 and time.monotonic() < killed_at + 10:
                    time.sleep(0.05)
                [new_worker] = worker_pids(server) - workers
                after_kill = connector.store_on_every_worker(killed_at)
                time.sleep(2)  # deliveries go on with the lock still held
                still_locked = admin.execute("SELECT count(*) FROM pg_locks WHERE relation = 'dt_events'::regclass "
                                             "AND mode = 'ShareUpdateExclusiveLock' AND granted").fetchone()[0]
            finally:
                stop.set()
            for running in delivering:
                running.result()
    cut_off = [answer for answer in connector.answers if answer.status is None]
    report(capsys, "locked table during reconnects", connector.answers, terminated=terminated,
           after_terminate=rounded(after_terminate), new_worker_after_kill=round(after_kill[new_worker], 2),
           cut_off_by_the_kill=len(cut_off), refused=sum(answer.status == 503 for answer in connector.answers))
    assert terminated >= 2 and still_locked == 1
    assert max(after_terminate.values()) < RECOVERY_SECONDS
    assert after_kill[new_worker] < RECOVERY_SECONDS  # a new worker boots, checks the schema and stores, under the lock
    # The only attempts not answered in time are those the SIGKILL cut off: at most one per connection.
    assert all(answer.at - answer.seconds < killed_at <= answer.at for answer in cut_off)
    assert len(cut_off) <= CONNECTIONS
    assert_fast_and_clear([answer for answer in connector.answers if answer.status is not None])
    assert sum(answer.status == 503 for answer in connector.answers) <= CONNECTIONS  # one retry per connection at most
    assert_stored_once(server, database_url, connector.event_ids())


BODY = encode_body(sample_event(event_id="keys-1"))


def timed(action) -> tuple[float, object]:
    """Run an action; return how long it took and what it returned or raised."""
    started = time.monotonic()
    try:
        outcome = action()
    except Exception as error:  # noqa: BLE001 (the outcome is asserted by the caller)
        outcome = error
    return time.monotonic() - started, outcome


def test_held_key_verifies_at_once_while_the_key_endpoint_is_slow(issuer):
    """With DT's key endpoint slow, held keys verify at once during a refresh; a new kid waits for that refresh only."""
    clock = FakeClock()
    keys = SigningKeys(issuer.url, max_age=60, clock=clock)
    verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID)
    issuer.add_key("k2")
    issuer.delay = 1.0  # each of the two requests of a fetch
    clock.now += 3600  # the held set is old: the next delivery starts a refresh
    held = [timed(lambda: verify_asymmetric_token(issuer.token(BODY, "k1"), BODY, keys, ORGANIZATION_ID))
            for _ in range(5)]
    assert [outcome for _, outcome in held] == [None] * 5
    assert max(seconds for seconds, _ in held) < 0.5
    # The refresh under way brings k2: a delivery that needs it waits for that fetch and starts no other.
    waited, outcome = timed(lambda: keys.key_for("k2"))
    assert outcome.key_id == "k2" and 1.0 < waited < 2.5
    assert issuer.fetches == 2
