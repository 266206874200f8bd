"""Play DT against the receiver while it and its database are restarted and crashed underneath."""

import http.client
import itertools
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from support.signing import SECRET, dt_event, signed_delivery


MIN_EVENTS = 1000  # and more, until every kind of disruption has landed while events are in flight
CONCURRENCY = 16
FIRST_RETRY_SECONDS = 0.1  # DT waits 8 s, doubling up to an hour; scaled down to keep the test short
LONGEST_RETRY_SECONDS = 2.0
TIME_LIMIT_SECONDS = 240


class DataConnector:
    """Deliver events at least once, retrying every failure with exponential back-off, as DT does."""

    def __init__(self, server, database_url):
        self.server = server
        self.database_url = database_url
        self.deliveries = 0
        self.retries = 0
        self.answers = defaultdict(list)  # event id -> the text of every answer, whatever its status
        self.acknowledged = set()  # event ids answered 200
        self.unconfirmed = []  # acknowledged while the database could not be asked
        self.acknowledged_but_absent = []
        self.deadline = time.monotonic() + TIME_LIMIT_SECONDS  # then give up, as DT does after 12 hours
        self._lock = threading.Lock()
        self._probes = threading.local()  # each thread's connection for looking up rows

    def deliver(self, event_id: str) -> None:
        """Deliver one event until it is acknowledged; at each 200, check the row is committed before reading on."""
        wait = FIRST_RETRY_SECONDS
        for attempt in itertools.count():
            with self._lock:
                self.deliveries += 1
                self.retries += attempt > 0
            try:
                status, text = self._post(event_id)
            except (OSError, http.client.HTTPException):  # refused, reset or cut off mid-answer: a failure to DT
                status, text = None, ""
            with self._lock:
                self.answers[event_id].append(text)
            if status == 200:
                break
            if time.monotonic() > self.deadline:
                return
            time.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(wait * 2, LONGEST_RETRY_SECONDS)
        with self._lock:
            self.acknowledged.add(event_id)

    def _post(self, event_id: str) -> tuple[int, str]:
        """POST the event; on a 200, before its body is read, look for its row (the answer must follow the commit)."""
        body, headers = signed_delivery(dt_event(event_id))
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            connection.request("POST", "/", body=body, headers=headers)
            answer = connection.getresponse()  # the status line and headers only
            if answer.status == 200:
                self._confirm_committed(event_id)
            return answer.status, answer.read().decode()
        finally:
            connection.close()

    def _confirm_committed(self, event_id: str) -> None:
        try:
            connection = self._probe_connection()
            found = connection.execute("SELECT 1 FROM dt_events WHERE event_id = %s", (event_id,)).fetchone()
        except psycopg.OperationalError:  # the database is restarting: its row is looked for at the end
            self._probes.connection = None
            with self._lock:
                self.unconfirmed.append(event_id)
            return
        if not found:
            with self._lock:
                self.acknowledged_but_absent.append(event_id)

    def _probe_connection(self) -> psycopg.Connection:
        """Return this thread's open connection, so that a probe costs one round trip, not a connect."""
        connection = getattr(self._probes, "connection", None)
        if connection is None or connection.closed:
            connection = psycopg.connect(self.database_url, connect_timeout=2, autocommit=True)
            self._probes.connection = connection
        return connection


def stored_event_ids(database_url: str) -> list[str]:
    """Return the id of every row, in order."""
    with psycopg.connect(database_url) as connection:
        return [row[0] for row in connection.execute("SELECT event_id FROM dt_events ORDER BY event_id")]


def make_trouble(server, postgres) -> list[str]:
    """Restart and crash the receiver and the database in turn, a second apart; return what was done."""
    actions = {
        "receiver SIGTERM": lambda: (server.stop(signal.SIGTERM), server.start()),
        "receiver SIGKILL": lambda: (server.stop(signal.SIGKILL), server.start()),
        "database restart": lambda: (postgres.stop("fast"), time.sleep(0.5), postgres.start()),
        "database crash": lambda: (postgres.stop("immediate"), time.sleep(0.5), postgres.start()),
    }
    done = []
    for name, action in actions.items():
        time.sleep(1.0)
        action()
        done.append(name)
    return done


@pytest.mark.slow
def test_every_event_stored_exactly_once_through_restarts(start_server, postgres, database_url, capsys):
    """Thousands of events, delivered with retries through restarts and crashes, are all stored once."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    connector = DataConnector(server, database_url)
    trouble = ThreadPoolExecutor(1).submit(make_trouble, server, postgres)
    numbers = itertools.count()  # its next() is atomic: each number goes to one thread

    def deliver_until_the_trouble_ends() -> None:
        while (number := next(numbers)) < MIN_EVENTS or not trouble.done():
            connector.deliver(f"reliability-{number:05d}")

    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: deliver_until_the_trouble_ends(), range(CONCURRENCY)))
    actions = trouble.result(timeout=60)
    elapsed = time.monotonic() - started

    event_ids = sorted(connector.answers)
    stored = stored_event_ids(database_url)
    lost = len(event_ids) - len(set(stored) & set(event_ids))
    # Every answer of every attempt counts: an event told "stored" twice was committed twice as far as DT knows.
    stored_twice = sum(1 for texts in connector.answers.values() if texts.count("stored\n") > 1)
    late_confirmed_absent = [event_id for event_id in connector.unconfirmed if event_id not in set(stored)]
    # Once the last disruption has settled, a replay of every event must find each one already stored.
    settled_by = time.monotonic() + 30
    while (status := server.post(*signed_delivery(dt_event(event_ids[0])))[0]) != 200:
        assert status == 503 and time.monotonic() < settled_by
        time.sleep(0.5)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        replays = Counter(pool.map(lambda event_id: server.post(*signed_delivery(dt_event(event_id))),
                                   event_ids))
    with capsys.disabled():
        print(f"\nreliability: {len(event_ids)} events sent, {connector.deliveries} deliveries, {connector.retries} retries, "
              f"{len(stored)} rows stored, {lost} lost, {len(event_ids) - len(connector.acknowledged)} never acknowledged, "
              f"{stored_twice} stored twice, {len(connector.acknowledged_but_absent)} acknowledged before commit; "
              f"{len(actions)} disruptions ({', '.join(sorted(Counter(actions)))}) in {elapsed:.1f} s; "
              f"replay: {dict(replays)}")
    assert sorted(stored) == event_ids
    assert lost == stored_twice == 0
    assert connector.acknowledged == set(event_ids)
    assert connector.acknowledged_but_absent == late_confirmed_absent == []
    assert len(event_ids) >= MIN_EVENTS and replays == {(200, "duplicate\n"): len(event_ids)}
    assert len(stored_event_ids(database_url)) == len(event_ids)
    assert set(Counter(actions)) == {"receiver SIGTERM", "receiver SIGKILL", "database restart", "database crash"}
    assert connector.retries > 0
