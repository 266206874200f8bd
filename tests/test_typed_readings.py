"""Schema 5 against real PostgreSQL: readings written once per new event, exactly once across partitions."""

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
from support.dt_api import rfc3339_ns
from support.server import deliver
from support.signing import SECRET, signed_delivery
from test_readings import all_types, dt_body

from receiver import queries
from receiver.sample import encode_body, sample_event, sign_body
from receiver.partitions import ensure_partitions
from receiver.schema import migrate


def rows(database_url: str, query: str, params: tuple = ()) -> list[tuple]:
    """Return what a query finds, as tuples."""
    with psycopg.connect(database_url) as connection:
        return connection.execute(query, params).fetchall()


def type_bodies(base: datetime) -> dict[str, dict]:
    """Return a body of each of DT's 19 event types, a minute apart, with the readings all_types expects."""
    bodies = {}
    for number, (event_type, (data, _)) in enumerate(all_types(base).items()):
        keyed = data if event_type == "labelsChanged" else {event_type: data}
        bodies[event_type] = dt_body(event_type, keyed, base + timedelta(minutes=number), event_id=f"type-{event_type}")
    return bodies


def samples_by_event(database_url: str) -> dict[str, int]:
    """Return how many dt_samples rows each event has."""
    return dict(rows(database_url, "SELECT event_id, count(*) FROM dt_samples GROUP BY event_id"))


def test_readings_of_every_type_are_written_once_whatever_comes_again(make_app, database_url):
    """Each of the 19 types' readings is written with its event; delivered again, delivered by two workers at once,
    or backfilled from DT's history, an event adds no event row and no reading."""
    base = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    bodies = type_bodies(base)
    first, second = make_app(DATABASE_URL=database_url), make_app(DATABASE_URL=database_url)
    for body in bodies.values():
        assert deliver(first.test_client(), *signed_delivery(body)) == (200, "stored\n")
    expected = {f"type-{event_type}": len({row[4] for row in readings})
                for event_type, (_, readings) in all_types(base).items() if readings}
    assert samples_by_event(database_url) == expected
    readings_before = rows(database_url, "SELECT * FROM dt_readings ORDER BY event_id, name, time")
    assert len(readings_before) == sum(len(readings) for _, readings in all_types(base).values())

    for body in bodies.values():  # redelivered, then raced by two workers, then backfilled
        assert deliver(first.test_client(), *signed_delivery(body)) == (200, "duplicate\n")
        answers = []
        racers = [threading.Thread(target=lambda app=app: answers.append(
            deliver(app.test_client(), *signed_delivery(body)))) for app in (first, second)]
        [racer.start() for racer in racers]
        [racer.join() for racer in racers]
        assert answers == [(200, "duplicate\n")] * 2
    with psycopg.connect(database_url, autocommit=True) as connection:
        assert queries.add_history(connection, [body["event"] for body in bodies.values()]) == 0
    assert rows(database_url, "SELECT count(*) FROM dt_events") == [(19,)]
    assert rows(database_url, "SELECT * FROM dt_readings ORDER BY event_id, name, time") == readings_before


def test_backfill_stores_the_readings_of_events_it_adds(database_url):
    """Events DT's history holds and the table does not are stored with their readings, once."""
    base = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=2)
    bodies = type_bodies(base)
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
        assert queries.add_history(connection, [body["event"] for body in bodies.values()]) == 19
        assert queries.add_history(connection, [body["event"] for body in bodies.values()]) == 0
    with psycopg.connect(database_url) as connection:
        readings = connection.execute("SELECT event_id, name, value, state, unit, time FROM dt_readings").fetchall()
    expected = [(f"type-{event_type}", *reading) for event_type, (_, found) in all_types(base).items()
                for reading in found]
    assert sorted(readings, key=str) == sorted(expected, key=str)
    assert rows(database_url, "SELECT DISTINCT source::text FROM dt_events") == [("history",)]


def partition_of(database_url: str, event_id: str) -> list[str]:
    """Return the partition (or partitions) holding an event id."""
    return [name for (name,) in rows(database_url, "SELECT tableoid::regclass::text FROM dt_events "
                                                   "WHERE event_id = %s", (event_id,))]


def test_duplicates_at_a_day_boundary_and_months_old_events_are_stored_once(make_app, database_url):
    """An event in the last microsecond of a day and one in the first of the next go to their own days' partitions;
    one four months old goes to the DEFAULT partition; each, delivered again or backfilled with its time written
    differently (+00:00 for Z, to the millisecond), is stored once with its readings once."""
    client = make_app(DATABASE_URL=database_url).test_client()
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    cases = {"last-of-today": midnight - timedelta(microseconds=1), "first-of-tomorrow": midnight,
             "months-old": midnight - timedelta(days=120, microseconds=123456)}
    bodies = {}
    for event_id, when in cases.items():
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        bodies[event_id] = dt_body("temperature", {"temperature": {"value": 5.5, "updateTime": stamp}}, when, event_id)
        bodies[event_id]["event"]["timestamp"] = stamp
        for answer in ("stored\n", "duplicate\n"):
            assert deliver(client, *signed_delivery(bodies[event_id])) == (200, answer)
    with psycopg.connect(database_url, autocommit=True) as connection:
        # DT's history may write the time otherwise: +00:00 for Z, milliseconds (another instant, so another key)
        history = [dict(body["event"], timestamp=body["event"]["timestamp"][:23] + "+00:00")
                   for body in bodies.values()]
        assert queries.add_history(connection, history) == 0
    assert partition_of(database_url, "last-of-today") == [f"dt_events_p{midnight - timedelta(days=1):%Y%m%d}"]
    assert partition_of(database_url, "first-of-tomorrow") == [f"dt_events_p{midnight:%Y%m%d}"]
    assert partition_of(database_url, "months-old") == ["dt_events_default"]
    assert samples_by_event(database_url) == dict.fromkeys(cases, 1)
    assert rows(database_url, "SELECT time FROM dt_readings WHERE event_id = 'months-old'") == [(cases["months-old"],)]


def test_an_event_past_events_retention_sent_again_is_stored_but_its_readings_are_not_written_twice(
        make_app, database_url):
    """Readings outlive raw events: once `prune --older-than` (as retention) has removed a months-old event's raw
    copy, a Synchronize sending it again, or a backfill fetching it again, stores the event but not its readings
    (one humidity sample: two readings); a fresh event from the same device still gets its own."""
    app = make_app(DATABASE_URL=database_url)
    old_at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=90)
    old = dt_body("humidity", {"humidity": {"temperature": 21.5, "relativeHumidity": 40,
                                            "updateTime": rfc3339_ns(old_at)}}, old_at, "synchronized")
    assert deliver(app.test_client(), *signed_delivery(old)) == (200, "stored\n")
    result = app.test_cli_runner().invoke(args=["prune", "--older-than", "31d"])
    assert result.exit_code == 0 and rows(database_url, "SELECT count(*) FROM dt_events") == [(0,)], result.output

    assert deliver(app.test_client(), *signed_delivery(old)) == (200, "stored\n")  # sent again by a Synchronize
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DELETE FROM dt_events")  # the next retention round
        assert queries.add_history(connection, [old["event"]]) == 1
    fresh_at = datetime.now(timezone.utc) - timedelta(minutes=5)
    fresh = dt_body("humidity", {"humidity": {"temperature": 22, "relativeHumidity": 41,
                                              "updateTime": rfc3339_ns(fresh_at)}}, fresh_at, "fresh")
    assert deliver(app.test_client(), *signed_delivery(fresh)) == (200, "stored\n")
    assert rows(database_url, "SELECT event_id, name, value FROM dt_readings ORDER BY event_id, name") == [
        ("fresh", "relativeHumidity", 41), ("fresh", "temperature", 22),
        ("synchronized", "relativeHumidity", 40), ("synchronized", "temperature", 21.5)]


def test_an_event_without_a_timestamp_delivered_twice_is_stored_once(make_app, database_url):
    """An event with no timestamp (stored at the time it arrives) or an unreadable one, delivered again, even by two
    workers at once, is found in whatever partition holds it: one row, its readings once."""
    apps = [make_app(DATABASE_URL=database_url) for _ in range(2)]
    now = datetime.now(timezone.utc)
    for event_id, timestamp in (("untimed", None), ("unreadable", "yesterday")):
        body = dt_body("touch", {"touch": {"updateTime": rfc3339_ns(now)}}, now, event_id)
        body["event"]["timestamp"] = timestamp
        assert deliver(apps[0].test_client(), *signed_delivery(body)) == (200, "stored\n")
        answers = []
        racers = [threading.Thread(target=lambda app=app: answers.append(
            deliver(app.test_client(), *signed_delivery(body)))) for app in apps]
        [racer.start() for racer in racers]
        [racer.join() for racer in racers]
        assert answers == [(200, "duplicate\n")] * 2
    assert rows(database_url, "SELECT event_id, count(*) FROM dt_events GROUP BY 1 ORDER BY 1") == [
        ("unreadable", 1), ("untimed", 1)]
    assert samples_by_event(database_url) == {"untimed": 1, "unreadable": 1}


def test_events_in_one_batch_keep_their_readings_apart(make_app, database_url):
    """Events handed over together (a batch) each get their own readings, their devices numbered once."""
    app = make_app(DATABASE_URL=database_url)
    store = app.extensions["receiver"].store
    events = [sample_event(event_id=f"batch-{n}", device_id=f"dev-{n % 3}") for n in range(30)]
    results = []
    threads = [threading.Thread(target=lambda body=body: results.append(deliver(app.test_client(),
                                                                                *signed_delivery(body))))
               for body in events]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert results == [(200, "stored\n")] * 30
    assert store is not None
    found = rows(database_url, "SELECT event_id, device_id, value FROM dt_readings ORDER BY event_id")
    stored = {row[0]: (row[1], row[2]) for row in found}
    assert stored == {body["event"]["eventId"]: (body["event"]["targetName"].rsplit("/", 1)[1],
                                                 body["event"]["data"]["temperature"]["value"]) for body in events}
    assert rows(database_url, "SELECT count(*) FROM dt_devices") == [(3,)]


def test_a_body_jsonb_refuses_gives_no_readings_but_is_stored(make_app, database_url):
    """A \\u0000 or a lone surrogate in the body: the event is stored as received, its readings are not."""
    client = make_app(DATABASE_URL=database_url).test_client()
    now = datetime.now(timezone.utc)
    for event_id, text in (("nul", b"\\u0000"), ("surrogate", b"\\ud800"), ("pair", b"\\ud83d\\ude00")):
        body = encode_body(dt_body("touch", {"touch": {"updateTime": rfc3339_ns(now)}}, now, event_id))
        body = body.replace(b'sensor"', b'sensor' + text + b'"')
        assert deliver(client, *signed_delivery_of(body)) == (200, "stored\n")
    assert rows(database_url, "SELECT event_id FROM dt_events ORDER BY 1") == [("nul",), ("pair",), ("surrogate",)]
    assert samples_by_event(database_url) == {"pair": 1}


def signed_delivery_of(body: bytes) -> tuple[bytes, dict]:
    """Return a body as it is, with the headers DT signs it with."""
    return body, {"Content-Type": "application/json", "X-Dt-Signature": sign_body(body, SECRET)}


def test_two_deliveries_of_an_untimed_event_racing_store_one_row(make_app, database_url):
    """Two workers delivering one event without a timestamp at the same moment (held at the lock on its id until
    both are there) store one row and one reading: one is answered stored, the other duplicate."""
    apps = [make_app(DATABASE_URL=database_url) for _ in range(2)]
    now = datetime.now(timezone.utc)
    body = dt_body("touch", {"touch": {"updateTime": rfc3339_ns(now)}}, now, "untimed-race")
    body["event"]["timestamp"] = None
    for app in apps:
        assert app.extensions["receiver"].store.check(10) is None
    answers = []
    racers = [threading.Thread(target=lambda app=app: answers.append(deliver(app.test_client(),
                                                                             *signed_delivery(body))))
              for app in apps]
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(hashtextextended('untimed-race', 0))")
        [racer.start() for racer in racers]
        give_up_at = time.monotonic() + 5
        while holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                             ).fetchone()[0] < 2 and len(answers) < 2 and time.monotonic() < give_up_at:
            time.sleep(0.01)
    [racer.join() for racer in racers]
    assert sorted(answers) == [(200, "duplicate\n"), (200, "stored\n")]
    assert rows(database_url, "SELECT count(*) FROM dt_events") == [(1,)]
    assert samples_by_event(database_url) == {"untimed-race": 1}


def test_a_row_in_default_inside_a_new_days_range_is_moved_into_that_day(database_url):
    """An event nine days ahead waits in the DEFAULT partition; making the partitions of two days later makes that
    day's too, and moves the event into it, so that neither a migration nor the upkeep fails for it."""
    today = datetime.now(timezone.utc).date()
    ahead = datetime.now(timezone.utc) + timedelta(days=9)
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
        connection.execute("INSERT INTO dt_events (event_id, event_time, event) VALUES ('ahead', %s, '{}')", (ahead,))
        ensure_partitions(connection, today + timedelta(days=2))
        made = {name for (name,) in connection.execute("SELECT relid::text FROM pg_partition_tree('dt_events')")}
    assert {f"dt_events_p{ahead:%Y%m%d}", f"dt_events_p{ahead - timedelta(days=1):%Y%m%d}"} <= made
    assert partition_of(database_url, "ahead") == [f"dt_events_p{ahead:%Y%m%d}"]
