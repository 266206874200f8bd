"""The table as first released, upgraded by the receiver as it starts: rows kept, locks waited for briefly, one migration at a time."""

import json
import threading
import time
from datetime import datetime, timezone

import psycopg
from psycopg.rows import dict_row
from support.postgres import database_name
from support.server import deliver
from support.signing import signed_delivery

from receiver.sample import sample_event
from receiver.schema import VERSION, migrate, schema_version
from receiver.store import PREPARE_RETRY_SECONDS

# The table the first release made (schema version 1, before dt_schema existed), and its insert.
VERSION_1 = """
CREATE TABLE dt_events (
    event_id    text PRIMARY KEY,
    event_type  text,
    device_id   text,
    project_id  text,
    event_time  timestamptz,
    labels      jsonb,
    event       jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time DESC NULLS LAST);
CREATE INDEX dt_events_device_type_time ON dt_events (device_id, event_type, event_time DESC NULLS LAST);
CREATE INDEX dt_events_time ON dt_events (event_time DESC NULLS LAST);
"""
VERSION_1_INSERT = """
INSERT INTO dt_events (event_id, event_type, device_id, project_id, event_time, labels, event, received_at)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, coalesce(%s, now()))
ON CONFLICT (event_id) DO NOTHING
"""
UNTIMED_ARRIVAL = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
# The receiver's own bound on a statement: what the first release's writes ran under, too.
OLD_RELEASE_OPTIONS = "-c statement_timeout=5000"


def insert_version_1(connection: psycopg.Connection, body: dict, received_at: datetime | None = None) -> None:
    """Store an event as the first release did: its columns, its labels and its body as jsonb."""
    event = body["event"]
    _, project, _, device = event["targetName"].split("/")
    connection.execute(VERSION_1_INSERT, (event["eventId"], event["eventType"], device, project, event.get("timestamp"),
                                          json.dumps(body["labels"]), json.dumps(body), received_at))


def version_1_database(database_url: str) -> dict[str, dict]:
    """Make the first release's table holding three events, one of them without a time; return the bodies by id."""
    bodies = {f"v1-{n}": sample_event(("temperature", "touch", "networkStatus")[n], event_id=f"v1-{n}") for n in range(3)}
    del bodies["v1-2"]["event"]["timestamp"]  # the first release stored NULL for an event without a usable time
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(VERSION_1)
        for event_id, body in bodies.items():
            insert_version_1(connection, body, UNTIMED_ARRIVAL if event_id == "v1-2" else None)
    return bodies


def rows(database_url: str, query: str = "SELECT * FROM dt_events ORDER BY event_id", *params) -> list[dict]:
    """Return the rows a query finds, as dicts."""
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute(query, params).fetchall()


def table_shape(connection: psycopg.Connection, schema: str) -> tuple[set, set]:
    """Return the events table's columns (name, type, nullability, default) and indexes (name, definition) in a schema."""
    connection.execute(f"SET search_path = {schema}")  # so that defaults show unqualified in either schema
    columns = connection.execute(
        "SELECT column_name, udt_name, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'dt_events'", (schema,)).fetchall()
    indexes = connection.execute(
        "SELECT indexname, split_part(indexdef, ' USING ', 2) FROM pg_indexes WHERE schemaname = %s AND tablename = 'dt_events'",
        (schema,)).fetchall()
    return set(columns), set(indexes)


def timed_delivery(client, body: dict) -> tuple[int, str, float]:
    """Deliver a signed event through the test client; return the status, the reason and how long the answer took."""
    started = time.monotonic()
    status, text = deliver(client, *signed_delivery(body))
    return status, text.strip(), time.monotonic() - started


def receiver_backends(database_url: str, waiting: bool) -> int:
    """Count the receiver's connections to the test's database (only those waiting for a lock, if asked)."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        return connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dt-receiver' AND datname = %s "
            "AND (NOT %s OR wait_event_type = 'Lock')", (database_name(database_url), waiting)).fetchone()[0]


def version_of(database_url: str) -> int:
    """Return the schema version of the test's database."""
    with psycopg.connect(database_url) as connection:
        return schema_version(connection)


def wait_for(condition, seconds: float, what: str) -> None:
    """Poll a condition every 20 ms until it holds, or fail naming what did not happen."""
    give_up_at = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up_at, f"{what} did not happen within {seconds} s"
        time.sleep(0.02)


def test_first_release_table_is_upgraded_keeping_every_row_and_then_stores(make_app, database_url, log_lines):
    """The receiver upgrades the first release's table to the latest version, keeps every row, times the untimed one by its arrival, and stores."""
    bodies = version_1_database(database_url)
    client = make_app(DATABASE_URL=database_url).test_client()

    assert timed_delivery(client, sample_event(event_id="after-upgrade"))[:2] == (200, "stored")
    assert timed_delivery(client, bodies["v1-0"])[:2] == (200, "duplicate")  # the primary key still holds

    assert rows(database_url, "SELECT version FROM dt_schema") == [{"version": VERSION}]
    stored = {row["event_id"]: row for row in rows(database_url)}
    assert sorted(stored) == ["after-upgrade", "v1-0", "v1-1", "v1-2"]
    for event_id, body in bodies.items():
        assert json.loads(stored[event_id]["event"]) == body, event_id  # the body, now text, is the same document
        assert stored[event_id]["source"] == "connector"
    assert stored["v1-2"]["event_time"] == stored["v1-2"]["received_at"] == UNTIMED_ARRIVAL
    assert stored["v1-0"]["event_time"] == datetime.fromisoformat(bodies["v1-0"]["event"]["timestamp"])
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("CREATE SCHEMA fresh")
        connection.execute("SET search_path = fresh")
        migrate(connection)  # what a new database gets
        assert table_shape(connection, "public") == table_shape(connection, "fresh")
    assert [line["schema_version"] for line in log_lines() if line["msg"] == "database ready"] == [VERSION]
    assert not [line for line in log_lines() if line["msg"] == "database not ready"]


def test_upgrade_behind_a_long_transaction_gives_way_and_completes_once_it_ends(make_app, database_url, log_lines):
    """An upgrade waiting on a long transaction gives up within seconds and tries again, so the old release's writes and
    new deliveries are answered meanwhile, and it completes once the transaction ends."""
    version_1_database(database_url)
    old_release = psycopg.connect(database_url, autocommit=True, options=OLD_RELEASE_OPTIONS)
    writes, answers = [], []
    with psycopg.connect(database_url) as report, old_release:
        report.execute("LOCK TABLE dt_events IN ACCESS SHARE MODE")  # a long report, or a psql session left open
        app = make_app(DATABASE_URL=database_url)
        app.extensions["receiver"].store.start()  # as a new release's worker does
        wait_for(lambda: receiver_backends(database_url, waiting=True) == 1, 5, "the upgrade's wait for the table")
        delivering = threading.Thread(target=lambda: answers.append(
            timed_delivery(app.test_client(), sample_event(event_id="during-upgrade"))))
        delivering.start()
        for n in range(10):  # the old release goes on storing what DT delivers to its dynos, for 2.5 s
            started = time.monotonic()
            try:
                insert_version_1(old_release, sample_event(event_id=f"old-release-{n}"))
            except psycopg.Error as error:
                writes.append(type(error).__name__)
                break
            writes.append(round(time.monotonic() - started, 2))
            time.sleep(max(0.0, 0.25 - (time.monotonic() - started)))
    delivering.join(15)

    assert len(writes) == 10 and all(isinstance(took, float) and took < 4 for took in writes), f"old release's writes: {writes}"
    [(status, reason, took)] = answers
    assert took < 10 and (status, reason) in {(200, "stored"), (503, "database unavailable: timeout")}, answers[0]
    # The upgrade's next try comes within PREPARE_RETRY_SECONDS; until then deliveries hear 503 at once and DT retries.
    wait_for(lambda: version_of(database_url) == VERSION, PREPARE_RETRY_SECONDS + 3,
             "the upgrade once the long transaction ended")
    assert timed_delivery(app.test_client(), sample_event(event_id="after-upgrade"))[:2] == (200, "stored")
    assert len(rows(database_url)) == 3 + 10 + (status == 200) + 1
    causes = {line["cause"] for line in log_lines() if line["msg"] == "database not ready"}
    assert causes == {"timeout"}, causes


def test_workers_upgrading_at_once_migrate_once_without_an_error(make_app, database_url, log_lines):
    """Three workers starting together on the first release's table upgrade it once, none logs a fault, and each stores."""
    version_1_database(database_url)
    with psycopg.connect(database_url) as report:
        # Holding the table while every worker begins its upgrade, so that all three are at it together: one
        # builds the index (and waits for this transaction), the others wait for it to finish.
        report.execute("LOCK TABLE dt_events IN ACCESS SHARE MODE")
        apps = [make_app(DATABASE_URL=database_url) for _ in range(3)]
        for app in apps:
            app.extensions["receiver"].store.start()
        wait_for(lambda: receiver_backends(database_url, waiting=True) == 1, 1.5, "one worker's index build")
        time.sleep(1)  # the other two try the upgrade meanwhile
    answers = [timed_delivery(app.test_client(), sample_event(event_id=f"worker-{n}"))[:2] for n, app in enumerate(apps)]

    assert answers == [(200, "stored")] * 3
    assert rows(database_url, "SELECT version FROM dt_schema") == [{"version": VERSION}]
    assert len(rows(database_url)) == 3 + 3
    assert not [line for line in log_lines() if line["msg"] == "database not ready"]
    assert [line["schema_version"] for line in log_lines() if line["msg"] == "database ready"] == [VERSION] * 3
