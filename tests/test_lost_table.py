"""A table lost under a running server (a dropped table, `heroku pg:reset`) is prepared again without a restart."""

import json
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg import sql
from support.old_schemas import EVENTS_TABLE_2
from support.postgres import database_name
from support.signing import SECRET, signed_delivery

from receiver.sample import sample_event
from receiver.schema import VERSION

# Deliveries are stored again within this long of the loss.
RECOVERY_SECONDS = 10


def drop_table(postgres, database_url: str) -> None:
    """Drop the events table (and the view on it), as a restore without the table leaves the database."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DROP TABLE dt_events CASCADE")


def drop_arrival_table(postgres, database_url: str) -> None:
    """Drop the last arrival's table alone, which every delivery's insert writes."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DROP TABLE dt_last_arrival")


def reset_database(postgres, database_url: str) -> None:
    """Drop the database and create it again, empty, under its name, as `heroku pg:reset` does (DATABASE_URL kept)."""
    name = sql.Identifier(database_name(database_url))
    with psycopg.connect(postgres.url(), autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(name))


def health(server) -> tuple[int, dict]:
    """Return /health's status and problems."""
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + "/health", timeout=10) as answer:
            return answer.status, json.loads(answer.read())["problems"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["problems"]


def stored_ids(database_url: str) -> set[str]:
    """Return the ids of the stored events."""
    with psycopg.connect(database_url) as connection:
        return {event_id for (event_id,) in connection.execute("SELECT event_id FROM dt_events").fetchall()}


def restore_older_table(postgres, database_url: str) -> set[str]:
    """Put an older release's unpartitioned table, with an event, in place of the partitioned one (a restore of
    `pg_dump -t dt_events` from an older database), dt_schema still saying 5; return the event's id."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DROP TABLE dt_events CASCADE")
        connection.execute(EVENTS_TABLE_2.replace("CREATE TYPE dt_events_source AS ENUM ('connector', 'history');", ""))
        connection.execute("INSERT INTO dt_events (event_id, event_time, event) VALUES ('restored', now(), '{}')")
    return {"restored"}


# How the table is lost, and whether /health's own check (which reads dt_events, not dt_last_arrival) sees it.
LOSSES = {"DROP TABLE": (drop_table, True), "DROP TABLE dt_last_arrival": (drop_arrival_table, False),
          "pg:reset": (reset_database, True), "older table restored": (restore_older_table, False)}


@pytest.mark.parametrize("lose, health_sees", LOSSES.values(), ids=LOSSES.keys())
def test_a_lost_table_is_prepared_again_and_deliveries_are_stored_within_10_s(start_server, postgres, database_url,
                                                                              lose, health_sees):
    """After the table is lost under the Procfile's server, deliveries are stored again within 10 s without a
    restart, every event sent after the loss and answered 200 is in the new table, deliveries meanwhile are answered
    503 (never 200), and the log and /health name what happened."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    for n in range(4):
        assert server.post(*signed_delivery(sample_event(event_id=f"before-{n}")))[0] == 200
    ready_by = time.monotonic() + 10  # both workers, so that neither prepares the table for the first time after
    while len([line for line in server.log_lines() if line["msg"] == "database ready"]) < 2:
        assert time.monotonic() < ready_by, "a worker never became ready"
        time.sleep(0.05)
    kept = lose(postgres, database_url) or set()
    lost_at = time.monotonic()
    if health_sees:
        status, problems = health(server)  # the worker asked finds the table gone, or its connection ended
        assert status == 503 and set(problems) == {"database"}, problems

    answers, stored_again_at = [], None
    while time.monotonic() - lost_at < RECOVERY_SECONDS + 2:
        event_id = f"after-{len(answers)}"
        answers.append((event_id, *server.post(*signed_delivery(sample_event(event_id=event_id)))))
        if answers[-1][1] == 200 and stored_again_at is None:
            stored_again_at = time.monotonic()
        if len(answers) > 20 and all(status == 200 for _, status, _ in answers[-8:]):
            break
        time.sleep(0.1)


    assert stored_again_at is not None and stored_again_at - lost_at < RECOVERY_SECONDS, answers
    assert {status for _, status, _ in answers} <= {200, 503}, answers
    acknowledged = {event_id for event_id, status, _ in answers if status == 200}
    assert acknowledged | kept <= stored_ids(database_url)
    assert health(server) == (200, {})
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT version FROM dt_schema").fetchall() == [(VERSION,)]
        assert connection.execute("SELECT relkind FROM pg_class WHERE relname = 'dt_events'").fetchall() == [("p",)]
    lines = server.log_lines()

    causes = [line["cause"] for line in lines if line["msg"] == "database not ready"]
    assert any(cause.endswith(": preparing the table again") for cause in causes), causes
    assert len([line for line in lines if line["msg"] == "database ready"]) >= 3  # two at the start, then again
