"""The upgrades of a running receiver's database, deliveries flowing throughout: a version-3 events table to the
partitioned layout, and release 5's schema to this release's."""

import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import psycopg
from support.dt_api import rfc3339_ns
from support.old_schemas import READINGS_VIEW_5
from support.signing import SECRET, signed_delivery
from test_readings import VERSION_2, all_types, dt_body

from receiver.sample import encode_body, sample_event
from receiver.schema import READINGS_VIEW, VERSION, schema_version
from receiver.upgrade import fill_progress

OLD_EVENTS = 3000
# DT gives up on a delivery after 10 s.
LONGEST_ANSWER_SECONDS = 10


def version_3_database(database_url: str, now: datetime) -> dict[str, dict]:
    """Make the database as release 3 left it: the table, the view that parses bodies, version 3; with 3,000
    temperature events of the last two days and one event of each of DT's 19 types. Return the latter's bodies."""
    typed = {}
    for number, (event_type, (data, _)) in enumerate(all_types(now - timedelta(hours=5)).items()):
        keyed = data if event_type == "labelsChanged" else {event_type: data}
        typed[event_type] = dt_body(event_type, keyed, now - timedelta(hours=5) + timedelta(minutes=number),
                                    event_id=f"old-{event_type}")
    rows = []
    for n in range(OLD_EVENTS):
        when = now - timedelta(seconds=60 * n) if n else now - timedelta(days=40)  # one of a month without partitions
        body = sample_event(event_id=f"old-{n:05d}", device_id=f"emuold{n % 50:03d}")
        body["event"]["timestamp"] = body["event"]["data"]["temperature"]["updateTime"] = rfc3339_ns(when)
        body["event"]["data"]["temperature"]["samples"][0]["sampleTime"] = rfc3339_ns(when)
        rows.append(body)
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(VERSION_2)
        connection.execute(READINGS_VIEW)
        connection.execute("UPDATE dt_schema SET version = 3")
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) VALUES (%s, %s, %s, %s, %s)",
                [(body["event"]["eventId"], body["event"]["targetName"].rsplit("/", 1)[1], body["event"]["eventType"],
                  datetime.fromisoformat(body["event"]["timestamp"][:26] + "+00:00"), encode_body(body).decode())
                 for body in [*rows, *typed.values()]])
    return typed


def keep_delivering(server, stop: threading.Event, answers: list) -> None:
    """Deliver a new event about every 50 ms (20 a second) until told to stop, noting each answer and its time."""
    number = 0
    while not stop.is_set():
        body = sample_event(event_id=f"live-{threading.get_ident() % 1000}-{number:05d}")
        number += 1
        started = time.monotonic()
        try:
            status, text = server.post(*signed_delivery(body), timeout=30)
        except OSError as error:
            status, text = None, type(error).__name__
        answers.append((body["event"]["eventId"], status, text, time.monotonic() - started))
        time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))


def query(database_url: str, text: str, params: tuple = ()) -> list[tuple]:
    """Return what a query finds."""
    with psycopg.connect(database_url) as connection:
        return connection.execute(text, params).fetchall()


def wait_for(condition, seconds: float, what: str) -> None:
    """Poll a condition until it holds, or fail naming what did not happen."""
    give_up_at = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < give_up_at, f"{what} did not happen within {seconds} s"
        time.sleep(0.1)


def version_of(database_url: str) -> int:
    """Return the schema version of the database."""
    with psycopg.connect(database_url) as connection:
        return schema_version(connection)


def test_upgrade_from_version_3_while_deliveries_flow_loses_nothing_and_fills_every_reading(start_server, database_url):
    """A receiver started on a version-3 table stores deliveries at once, while its upgrade waits (here on a
    long transaction) to build its index; then switches to the partitioned table; every delivery meanwhile is
    answered 200 within 10 s and stored once; the old events' readings are filled in behind, as ingest writes them."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    typed = version_3_database(database_url, now)
    stop, answers = threading.Event(), []
    with psycopg.connect(database_url) as long_reader:
        long_reader.execute("SELECT count(*) FROM dt_events")  # a snapshot the index build must wait out
        server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, HEALTH_STALE_AFTER="1h")
        started = query(database_url, "SELECT now()")[0][0]
        deliverer = threading.Thread(target=keep_delivering, args=(server, stop, answers))
        deliverer.start()
        time.sleep(3)
        assert version_of(database_url) == 3  # the upgrade waits; deliveries are stored meanwhile
        assert [answer for answer in answers if answer[1] == 200], answers[:3]
        # ... and noted as arrivals, which /health reads.
        assert query(database_url, "SELECT received_at FROM dt_last_arrival")[0][0] > started
        with urllib.request.urlopen(server.url + "health", timeout=10) as health:
            assert health.status == 200
    wait_for(lambda: version_of(database_url) == VERSION, 30, "the switch to schema 5")
    time.sleep(4)  # deliveries after the switch
    stop.set()
    deliverer.join(30)
    with psycopg.connect(database_url) as connection:
        wait_for(lambda: (fill_progress(connection) or {}).get("done"), 60, "the readings filled in")

    late = [answer for answer in answers if answer[1] != 200 or answer[3] > LONGEST_ANSWER_SECONDS]
    assert not late and len(answers) > 80, late
    stored = query(database_url, "SELECT event_id, count(*) FROM dt_events GROUP BY 1")
    assert {event_id for event_id, _, _, _ in answers} <= {event_id for event_id, _ in stored}
    assert {count for _, count in stored} == {1}
    # Each sample event, old or delivered before or after the switch, has its one reading (old-temperature, three).
    without = query(database_url, "SELECT event_id FROM dt_events AS e WHERE event_type = 'temperature' AND "
                                  "event_id <> 'old-temperature' AND "
                                  "(SELECT count(*) FROM dt_samples AS s WHERE s.event_id = e.event_id) <> 1")
    assert without == []
    assert query(database_url, "SELECT count(*) FROM dt_events WHERE event_type = 'temperature'")[0][0] >= OLD_EVENTS
    # The fill gave that month's readings a partition before writing them: none wait in DEFAULT, for the upkeep to
    # move out of it while the fill writes there.
    assert query(database_url, "SELECT tableoid::regclass::text FROM dt_samples WHERE event_id = 'old-00000'") == [
        (f"dt_samples_p{now - timedelta(days=40):%Y%m}",)]
    assert query(database_url, "SELECT count(*) FROM dt_samples_default") == [(0,)]
    for event_type, (_, expected) in all_types(now - timedelta(hours=5)).items():
        found = query(database_url, "SELECT name, value, state, unit, time FROM dt_readings WHERE event_id = %s "
                                    "ORDER BY name, time", (f"old-{event_type}",))
        assert found == sorted(expected, key=lambda row: (row[0], row[4])), event_type
    assert typed


def test_upgrade_from_version_5_by_a_new_dyno_while_deliveries_flow_loses_nothing(start_server, database_url):
    """A database as release 5 leaves it (its readings view, version 5), receiving deliveries through a running
    server, is brought to this release's schema by a second server starting beside it (a deploy's new dyno): every
    delivery meanwhile is answered 200 within 10 s and stored once with its reading, through the new view."""
    first = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    assert first.post(*signed_delivery(sample_event(event_id="before-5")))[0] == 200
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(READINGS_VIEW_5)
        connection.execute("UPDATE dt_schema SET version = 5, compatible_from = 5")
    stop, answers = threading.Event(), []
    deliverer = threading.Thread(target=keep_delivering, args=(first, stop, answers))
    deliverer.start()
    try:
        time.sleep(1)
        start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
        wait_for(lambda: version_of(database_url) == VERSION, 30, "the upgrade to this release's schema")
        time.sleep(2)  # deliveries after it
    finally:
        stop.set()
        deliverer.join(30)

    late = [answer for answer in answers if answer[1] != 200 or answer[3] > LONGEST_ANSWER_SECONDS]
    assert not late and len(answers) > 20, late
    delivered = [event_id for event_id, _, _, _ in answers]
    stored = dict(query(database_url, "SELECT event_id, count(*) FROM dt_events WHERE event_id = ANY(%s) GROUP BY 1",
                        (delivered,)))
    assert stored == dict.fromkeys(delivered, 1)
    assert "name2" not in query(database_url, "SELECT pg_get_viewdef('dt_readings')")[0][0]
    readings = dict(query(database_url, "SELECT event_id, count(*) FROM dt_readings WHERE event_id = ANY(%s) "
                                        "GROUP BY 1", (delivered,)))
    assert readings == dict.fromkeys(delivered, 1)
