"""The Postgres sink against a real server: rows, duplicates, outages and crashes."""

import http.client
import itertools
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import psycopg
import pytest
from support.docs import documented_queries
from support.postgres import database_name
from support.signing import SECRET, signed_delivery

from receiver.arrays import FloatArray, IntArray, SmallIntArray, TextArray, TimeArray
from receiver.sample import encode_body, sample_event, sign_body
from receiver.store import connection_options


def rows(database_url: str, query: str = "SELECT * FROM dt_events ORDER BY event_id", *params) -> list[dict]:
    """Return the rows a query finds, as dicts."""
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as connection:
        return connection.execute(query, params).fetchall()


def test_stored_row_matches_the_event(make_app, database_url, log_lines):
    """A verified event is committed with its columns and whole body before the 200."""
    client = make_app(DATABASE_URL=database_url).test_client()
    event = sample_event("temperature", event_id="row-1")
    body, headers = signed_delivery(event)
    answer = client.post("/", data=body, headers=headers)
    assert (answer.status_code, answer.text) == (200, "stored\n")
    [row] = rows(database_url)
    assert (row["event_id"], row["event_type"], row["device_id"], row["source"]) == (
        "row-1", "temperature", "emuc2f3h2lbr9a5ks2vncg0", "connector")
    assert row["event_time"] == datetime.fromisoformat(event["event"]["timestamp"])
    assert row["event"] == body.decode()  # the body exactly as received
    assert row["received_at"] is not None
    assert [line["msg"] for line in log_lines() if line["msg"].startswith("event")] == ["event stored"]


def test_the_stores_columns_reach_postgresql_as_their_array_types(database_url):
    """Each column class the store writes is sent as its PostgreSQL array type, whatever its values: small numbers
    as int4 all the same, NULLs, text in any script, and an empty column."""
    moment = datetime.fromisoformat("2026-12-05T10:00:00.123456+09:00")
    columns = [TextArray(["a", None, "Ålesund – ☃"]), FloatArray([21.45, None, -0.0]), IntArray([1, None, 2**31 - 1]),
               SmallIntArray([1, None, 17]), TimeArray([moment, None]), TextArray()]
    with psycopg.connect(database_url) as connection:
        found = connection.execute("SELECT " + ", ".join(["%b, pg_typeof(%b)::text"] * len(columns)),
                                   [value for column in columns for value in (column, column)]).fetchone()
    assert list(found) == [part for column, name in zip(columns, ("text[]", "double precision[]", "integer[]",
                                                                   "smallint[]", "timestamp with time zone[]",
                                                                   "text[]"), strict=True)
                           for part in (list(column), name)]


def test_heroku_style_url_works(make_app, database_url):
    """DATABASE_URL in Heroku's postgres:// form is accepted as it is."""
    client = make_app(DATABASE_URL=database_url.replace("postgresql://", "postgres://")).test_client()
    assert client.post("/", data=(delivery := signed_delivery())[0], headers=delivery[1]).text == "stored\n"


def test_duplicate_stores_nothing_new_and_answers_200(make_app, database_url, log_lines):
    """A redelivered event id answers 200, says duplicate in its log line and leaves one row."""
    client = make_app(DATABASE_URL=database_url).test_client()
    event = sample_event(event_id="dup-1")
    for _ in range(2):
        body, headers = signed_delivery(event)  # a new token each attempt, as DT does
        assert client.post("/", data=body, headers=headers).status_code == 200
    assert [line["msg"] for line in log_lines() if line["msg"].startswith("event")] == ["event stored", "event duplicate"]
    assert len(rows(database_url)) == 1


def test_concurrent_duplicates_on_two_servers_leave_one_row(start_server, database_url):
    """The same event racing on two servers (two dynos, two workers each) is stored once."""
    servers = [start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url) for _ in range(2)]
    body, headers = signed_delivery(sample_event(event_id="race-1"))
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda n: servers[n % 2].post(body, headers), range(32)))
    assert sorted(answers).count((200, "stored\n")) == 1
    assert sorted(answers).count((200, "duplicate\n")) == 31
    assert len(rows(database_url)) == 1


def test_schema_has_the_indexes_users_query_by(make_app, database_url):
    """The table is created when the worker starts, partitioned by time, unique on the event id within its time, with
    indexes for one device over time and for all devices over time."""
    client = make_app(DATABASE_URL=database_url).test_client()
    client.post("/", data=(delivery := signed_delivery())[0], headers=delivery[1])
    indexes = {row["indexdef"].split(" USING btree ")[1] for row in rows(
        database_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'dt_events'")}
    assert indexes == {"(event_id, event_time)", "(device_id, event_time)", "(event_time)"}


def test_each_worker_prepares_the_table_as_it_boots(start_server, postgres, database_url):
    """With no delivery sent, each of three workers connects, prepares the table and logs that the database is ready."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, WEB_CONCURRENCY="3")
    deadline = time.monotonic() + 15
    while len(ready := [line for line in server.log_lines() if line["msg"] == "database ready"]) < 3:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    assert len(ready) == 3 and [row["n"] for row in rows(database_url, "SELECT count(*) AS n FROM dt_events")] == [0]
    count = "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'dt-receiver' AND datname = %s"
    assert rows(postgres.url(), count, database_name(database_url))[0]["n"] >= 3  # a pool open in each worker
    assert not [line for line in server.log_lines() if "event" in line["msg"]]


UNUSUAL_BODIES = {
    "a \\u0000 escape, which jsonb refuses": (b'"name":"', b'"name":"\\u0000'),
    "a lone surrogate": (b'"name":"', b'"name":"\\ud800'),
    "NaN, which JSON itself does not allow": (b'"value":21.45', b'"value":NaN'),
    "a \\u0000 in the event id": (b'"eventId":"', b'"eventId":"\\u0000'),
}


@pytest.mark.parametrize("old, new", UNUSUAL_BODIES.values(), ids=UNUSUAL_BODIES.keys())
def test_authentic_event_jsonb_cannot_hold_is_kept(make_app, database_url, log_lines, old, new):
    """A signed event that jsonb cannot hold is committed exactly as received, answered 200, and listed by `events`."""
    app = make_app(DATABASE_URL=database_url)
    body = encode_body(sample_event(event_id="odd-1")).replace(old, new, 1)
    answer = app.test_client().post("/", data=body, headers={"X-Dt-Signature": sign_body(body, SECRET)})
    assert (answer.status_code, answer.text) == (200, "stored\n")
    [row] = rows(database_url)
    assert row["event"] == body.decode()
    assert log_lines()[-1]["msg"] == "event stored" and "odd-1" in log_lines()[-1]["event_id"]
    listed = app.test_cli_runner().invoke(args=["events", "--json"])
    assert json.loads(listed.output)["body"]["event"]["eventId"].endswith("odd-1")


def test_events_command_lists_and_filters(make_app, database_url):
    """`flask events` lists the newest stored events, by device or type."""
    app = make_app(DATABASE_URL=database_url)
    client = app.test_client()
    for event_type, device in (("temperature", "dev-a"), ("touch", "dev-a"), ("touch", "dev-b")):
        event = sample_event(event_type, device_id=device)
        client.post("/", data=(delivery := signed_delivery(event))[0], headers=delivery[1])
        time.sleep(0.01)  # distinct timestamps
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["events"]).output.splitlines()
    assert [line.split()[1:3] for line in listed] == [["dev-b", "touch"], ["dev-a", "touch"], ["dev-a", "temperature"]]
    assert len(runner.invoke(args=["events", "--device", "dev-a"]).output.splitlines()) == 2
    assert len(runner.invoke(args=["events", "--type", "touch", "--limit", "1"]).output.splitlines()) == 1
    assert '"value": 21.45' in listed[2]


def test_events_command_without_database_says_so(runner):
    """Without DATABASE_URL the listing command explains why it has nothing to show."""
    result = runner.invoke(args=["events"])
    assert result.exit_code != 0 and "set DATABASE_URL" in result.output


# What a delivery is told while the database is down: a pooled connection the shutdown ended, or no connection to be
# had, named by the last fault the worker saw (a lost connection, until a new one is refused).
OUTAGE_REASONS = {"database error: AdminShutdown", "database error: connection lost",
                  "database unavailable: connection refused", "database unavailable: connection lost",
                  "database unavailable: database shutting down", "database unavailable: database starting up"}


def test_database_outage_gives_503_then_recovers_without_restart(start_server, postgres, database_url):
    """With the database stopped the server answers 503 quickly, naming the fault, and logs it; once it is back, 200 again."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    assert server.post(*signed_delivery())[0] == 200
    postgres.stop("fast")
    try:
        started = time.monotonic()
        status, reason = server.post(*signed_delivery(sample_event(event_id="during-outage")))
        assert status == 503 and reason.strip() in OUTAGE_REASONS, reason
        assert time.monotonic() - started < 15
    finally:
        postgres.start()
    refused = [reason.strip()]
    deadline = time.monotonic() + 30
    while (answer := server.post(*signed_delivery(sample_event(event_id="during-outage"))))[0] != 200:
        assert answer[0] == 503 and answer[1].strip() in OUTAGE_REASONS and time.monotonic() < deadline, answer
        refused.append(answer[1].strip())
        time.sleep(0.5)
    assert answer == (200, "stored\n")
    assert [row["event_id"] for row in rows(database_url, "SELECT event_id FROM dt_events WHERE event_id = %s",
                                            "during-outage")] == ["during-outage"]
    assert [line["reason"] for line in server.log_lines() if line["msg"] == "request rejected"] == refused


def test_unreachable_database_at_start_still_serves_503(start_server, postgres):
    """A server whose database does not answer yet starts, and says 503 naming the refused connection, with Retry-After."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{postgres.port + 1}/x")
    body, headers = signed_delivery()
    request = urllib.request.Request(server.url, data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert (answer.value.code, answer.value.read().decode(), answer.value.headers["Retry-After"]) == (
        503, "database unavailable: connection refused\n", "10")
    rejected = [(line["status"], line["reason"]) for line in server.log_lines() if line["msg"] == "request rejected"]
    assert rejected == [(503, "database unavailable: connection refused")]


class Deliverer:
    """Clients that deliver new events one after another until told to stop, noting which were answered 200."""

    def __init__(self, server, clients: int):
        self.server = server
        self.sent: list[str] = []
        self.bodies: dict[str, dict] = {}  # each as sent: DT delivers an event again as it was
        self.acknowledged: set[str] = set()
        self.stopping = threading.Event()
        self._numbers = itertools.count()  # its next() is atomic: each number goes to one client
        self._pool = ThreadPoolExecutor(clients)
        self._clients = [self._pool.submit(self._deliver) for _ in range(clients)]

    def _deliver(self) -> None:
        while not self.stopping.is_set():
            event_id = f"kill-{next(self._numbers):05d}"
            self.sent.append(event_id)
            self.bodies[event_id] = sample_event(event_id=event_id)
            try:
                status, _ = self.server.post(*signed_delivery(self.bodies[event_id]), timeout=15)
            except (OSError, http.client.HTTPException):  # the server was killed mid-answer
                continue
            if status == 200:
                self.acknowledged.add(event_id)

    def stop(self) -> None:
        """Stop delivering and wait for the clients to end."""
        self.stopping.set()
        for client in self._clients:
            client.result(timeout=30)
        self._pool.shutdown()


WAITING_WRITE = "application_name = 'dt-receiver' AND wait_event_type = 'Lock'"


def wait_for_writes(connection: psycopg.Connection, kind: str) -> None:
    """Wait until one of the receiver's inserts ("any"), or a batch insert ("batch"), waits on a lock (autocommit: a
    transaction would see the same snapshot of pg_stat_activity throughout)."""
    query = f"SELECT count(*) FROM pg_stat_activity WHERE {WAITING_WRITE} AND (query LIKE '%% AS batch %%' OR %s)"
    deadline = time.monotonic() + 4  # within the statement timeout of the first waiting write
    while not connection.execute(query, (kind == "any",)).fetchone()[0]:
        assert time.monotonic() < deadline, f"no {kind} insert waits on the table"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_and_restart_lose_nothing_acknowledged(start_server, database_url):
    """Killed while deliveries and batches are in flight, the server has committed every event it answered 200."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    deliverer = Deliverer(server, clients=16)
    try:
        time.sleep(1)  # events stored and answered at full speed
        with psycopg.connect(database_url) as blocker, psycopg.connect(database_url, autocommit=True) as watcher:
            blocker.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")  # writes pile up behind it
            wait_for_writes(watcher, "any")  # each worker's write in flight: a batch, or a single row
            time.sleep(0.2)  # deliveries arriving meanwhile join batches behind the single-row writes
            watcher.execute(f"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE {WAITING_WRITE} "
                            "AND query NOT LIKE '%% AS batch %%'", ())  # so the batches go to the table, and wait there
            wait_for_writes(watcher, "batch")
            server.stop(signal.SIGKILL)
            committed = {row[0] for row in blocker.execute("SELECT event_id FROM dt_events")}
    finally:
        deliverer.stop()
    assert len(deliverer.acknowledged) > 50 and deliverer.acknowledged <= committed
    sent = sorted(set(deliverer.sent))
    assert len(sent) > len(deliverer.acknowledged)  # some were in flight at the kill
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(sent, pool.map(lambda event_id: server.post(
            *signed_delivery(deliverer.bodies[event_id]))[1], sent), strict=True))
    assert {answers[event_id] for event_id in deliverer.acknowledged} == {"duplicate\n"}
    assert set(answers.values()) <= {"stored\n", "duplicate\n"}
    assert [row["event_id"] for row in rows(database_url, "SELECT event_id FROM dt_events ORDER BY 1")] == sent


def test_sigterm_closes_every_database_connection(start_server, postgres, database_url):
    """After SIGTERM no connection of the receiver stays open on the server."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: server.post(*signed_delivery()), range(40)))
    count = "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'dt-receiver'"
    assert 2 <= rows(postgres.url(), count)[0]["n"] <= 8  # one pool per worker, within the dyno's budget of 8
    assert server.stop(signal.SIGTERM) == 0
    assert rows(postgres.url(), count)[0]["n"] == 0


@pytest.mark.parametrize("url, sslmode", [
    ("postgres://u:p@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d1", "require"),  # Heroku's form: SSL required
    ("postgresql://u@db.example.com/d?sslmode=verify-full", "verify-full"),  # the URL's own choice wins
    ("postgresql://postgres@127.0.0.1:5432/test", None),  # this machine
    ("postgresql://postgres@localhost:5432/test", None),  # this machine by name
    ("postgresql:///test?host=/var/run/postgresql", None),  # a socket directory
])
def test_connection_options_require_ssl_off_this_machine(url, sslmode, monkeypatch):
    """Connections to another host use SSL unless the URL or PGSSLMODE says otherwise; every wait is bounded."""
    monkeypatch.delenv("PGSSLMODE", raising=False)
    options = connection_options(url)
    assert options.get("sslmode") == sslmode
    assert options["connect_timeout"] == 3 and "statement_timeout=5000" in options["options"]
    assert options["tcp_user_timeout"] == 5000 and options["keepalives_idle"] == 5
    monkeypatch.setenv("PGSSLMODE", "disable")
    assert connection_options(url).get("sslmode") == (None if sslmode == "require" else sslmode)


def test_localhost_in_the_url_connects_without_ssl(make_app, database_url, monkeypatch):
    """A DATABASE_URL naming localhost reaches a local server that has no SSL, and the event is stored."""
    monkeypatch.delenv("PGSSLMODE", raising=False)
    client = make_app(DATABASE_URL=database_url.replace("@127.0.0.1:", "@localhost:")).test_client()
    answer = client.post("/", data=(delivery := signed_delivery(sample_event(event_id="via-localhost")))[0], headers=delivery[1])
    assert (answer.status_code, answer.text) == (200, "stored\n")
    assert [row["event_id"] for row in rows(database_url)] == ["via-localhost"]


def test_slow_database_gives_503_inside_the_router_timeout(make_app, database_url, log_lines):
    """A write stuck behind a lock is cancelled by the statement timeout and answered 503 well inside 30 s."""
    client = make_app(DATABASE_URL=database_url).test_client()
    assert client.post("/", data=(delivery := signed_delivery())[0], headers=delivery[1]).status_code == 200
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        answer = client.post("/", data=(delivery := signed_delivery())[0], headers=delivery[1])
        waited = time.monotonic() - started
    assert (answer.status_code, answer.text, answer.headers["Retry-After"]) == (503, "database error: timeout\n", "10")
    assert 4 < waited < 10
    assert log_lines()[-1]["reason"] == "database error: timeout"


def test_readme_example_queries_run(make_app, database_url):
    """The SQL examples in the README run against the real table and find what was stored."""
    client = make_app(DATABASE_URL=database_url).test_client()
    for event_type in ("temperature", "touch", "temperature"):
        client.post("/", data=(delivery := signed_delivery(sample_event(event_type)))[0], headers=delivery[1])
    queries = documented_queries(0, until="now() + interval '1 day'")
    latest_per_type, one_day = [rows(database_url, query) for query in queries]
    assert sorted(row["event_type"] for row in latest_per_type) == ["temperature", "touch"]
    assert [row["celsius"] for row in one_day] == [21.45, 21.45]
