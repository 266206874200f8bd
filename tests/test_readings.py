"""dt_readings against real PostgreSQL: every DT event type's readings, odd bodies, the 2 -> 3 step, a read-only role."""

import json
import time
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from support.dt_api import PROJECT, rfc3339_ns
from support.old_schemas import EVENTS_TABLE_2
from support.signing import SECRET, signed_delivery

from receiver.events import parse_event
from receiver.readings import samples_of
from receiver.sample import encode_body, sign_body
from receiver.schema import VERSION
from receiver.upgrade import fill_progress

# The events table and dt_schema as version 2 shipped them (a frozen copy: later steps may change the schema).
VERSION_2 = EVENTS_TABLE_2 + """
CREATE TABLE dt_schema (version integer NOT NULL);
INSERT INTO dt_schema (version) VALUES (2);
"""

READING = "SELECT name, value, state, unit, time FROM dt_readings WHERE event_id = %s ORDER BY name, time"


def dt_body(event_type: str, data, when: datetime, event_id: str, device_id: str | None = None) -> dict:
    """Return a body shaped like a pushed DT event of this type, with this `data`, timestamped `when`."""
    device_id = device_id or f"emu{event_type.lower()}"
    return {
        "event": {"eventId": event_id, "targetName": f"projects/{PROJECT}/devices/{device_id}", "eventType": event_type,
                  "data": data, "timestamp": rfc3339_ns(when, nanoseconds=123)},
        "labels": {"name": f"{event_type} sensor"},
        "metadata": {"deviceId": device_id, "projectId": PROJECT, "deviceType": event_type, "productNumber": "102081"},
    }


def all_types(base: datetime) -> dict[str, tuple[dict, list[tuple]]]:
    """Return, per DT event type, a data object as DT sends it (updateTime a second before the timestamp) and
    the readings dt_readings must give for it: (name, value, state, unit, time)."""
    u = base - timedelta(seconds=1)
    t = rfc3339_ns(u, 123)

    def ago(minutes: int) -> tuple[str, datetime]:
        return rfc3339_ns(u - timedelta(minutes=minutes), 123), u - timedelta(minutes=minutes)

    (t5, u5), (t10, u10) = ago(5), ago(10)
    ccon = [{"id": "bdkjbo2v0000uk377c4g", "signalStrength": 73, "rssi": -71}]
    return {
        "touch": ({"updateTime": t}, [("touch", 1, None, None, u)]),
        "temperature": ({"value": 21.5, "updateTime": t, "isBackfilled": False, "samples": [
            {"value": 21.5, "sampleTime": t}, {"value": 21.25, "sampleTime": t5}, {"value": 20.75, "sampleTime": t10}]},
            [("temperature", 20.75, None, "°C", u10), ("temperature", 21.25, None, "°C", u5),
             ("temperature", 21.5, None, "°C", u)]),
        "humidity": ({"temperature": 22.5, "relativeHumidity": 41.5, "updateTime": t, "isBackfilled": False, "samples": [
            {"temperature": 22.5, "relativeHumidity": 41.5, "sampleTime": t},
            {"temperature": 22.25, "relativeHumidity": 42, "sampleTime": t5}]},
            [("relativeHumidity", 42, None, "%", u5), ("relativeHumidity", 41.5, None, "%", u),
             ("temperature", 22.25, None, "°C", u5), ("temperature", 22.5, None, "°C", u)]),
        "objectPresent": ({"state": "PRESENT", "updateTime": t}, [("state", None, "PRESENT", None, u)]),
        "objectPresentCount": ({"total": 17, "updateTime": t}, [("count", 17, None, None, u)]),
        "touchCount": ({"total": 4, "updateTime": t}, [("count", 4, None, None, u)]),
        "waterPresent": ({"state": "NOT_PRESENT", "updateTime": t}, [("state", None, "NOT_PRESENT", None, u)]),
        "co2": ({"ppm": 412, "updateTime": t}, [("co2", 412, None, "ppm", u)]),
        "pressure": ({"pascal": 101325.5, "updateTime": t}, [("pressure", 101325.5, None, "Pa", u)]),
        "motion": ({"state": "MOTION_DETECTED", "updateTime": t}, [("state", None, "MOTION_DETECTED", None, u)]),
        "deskOccupancy": ({"state": "OCCUPIED", "remarks": [], "updateTime": t}, [("state", None, "OCCUPIED", None, u)]),
        "contact": ({"state": "OPEN", "updateTime": t}, [("state", None, "OPEN", None, u)]),
        "probeWireStatus": ({"state": "THREE_WIRE", "updateTime": t}, [("state", None, "THREE_WIRE", None, u)]),
        "networkStatus": ({"signalStrength": 73, "rssi": -71, "updateTime": t, "cloudConnectors": ccon,
                           "transmissionMode": "LOW_POWER_STANDARD_MODE"},
                          [("rssi", -71, None, "dBm", u), ("signalStrength", 73, None, "%", u)]),
        "batteryStatus": ({"percentage": 96, "updateTime": t}, [("battery", 96, None, "%", u)]),
        "labelsChanged": ({"added": {"room": "2"}, "modified": {}, "removed": ["floor"]}, []),
        "connectionStatus": ({"connection": "CELLULAR", "available": ["CELLULAR", "ETHERNET"], "updateTime": t},
                             [("connection", None, "CELLULAR", None, u)]),
        "ethernetStatus": ({"macAddress": "f0:b5:b7:00:0a:08", "ipAddress": "10.0.0.7", "errors": [], "updateTime": t},
                           []),
        "cellularStatus": ({"signalStrength": 55, "errors": [], "updateTime": t}, [("signalStrength", 55, None, "%", u)]),
    }


def readings(database_url: str, event_id: str) -> list[tuple]:
    """Return the readings dt_readings gives for one event, by name and time."""
    with psycopg.connect(database_url) as connection:
        return [tuple(row) for row in connection.execute(READING, (event_id,)).fetchall()]


def deliver(client, body: bytes) -> None:
    """Deliver a body signed as DT signs it through an in-process app, and check it was stored."""
    answer = client.post("/", data=body, headers={"Content-Type": "application/json",
                                                  "X-Dt-Signature": sign_body(body, SECRET)})
    assert (answer.status_code, answer.text) == (200, "stored\n")


def test_every_event_type_through_the_server_gives_its_readings(start_server, database_url):
    """Each of DT's 19 event types, delivered to the Procfile's server, gives its readings: name, value or state,
    unit and time (each sample's own), and labelsChanged and ethernetStatus none."""
    base = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    cases = all_types(base)
    assert len(cases) == 19
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    for number, (event_type, (data, _)) in enumerate(cases.items()):
        keyed = data if event_type == "labelsChanged" else {event_type: data}  # the one type with flat data
        body = dt_body(event_type, keyed, base + timedelta(minutes=number), event_id=f"type-{event_type}")
        assert server.post(*signed_delivery(body)) == (200, "stored\n"), event_type
    found = {event_type: readings(database_url, f"type-{event_type}") for event_type in cases}
    expected = {event_type: sorted(rows, key=lambda row: (row[0], row[4])) for event_type, (_, rows) in cases.items()}
    assert found == expected
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        [row] = connection.execute("SELECT * FROM dt_readings WHERE event_id = 'type-co2'").fetchall()
    assert (row["device_id"], row["event_type"]) == ("emuco2", "co2")


def odd(event_type: str, data, when: datetime, event_id: str) -> bytes:
    """Return the compact body of an event with this `data` (keyed by its type), as DT would write it."""
    return encode_body(dt_body(event_type, {event_type: data}, when, event_id))


# Each: the body's data (or a replacement of its text), and the readings left; the good event beside them keeps its own.
ODD_BODIES = {
    "a \\u0000 in a label (jsonb refuses the body)": ("touch", {"updateTime": "{t}"}, (b'sensor"', b'\\u0000"'), 0),
    "a lone surrogate in a label": ("touch", {"updateTime": "{t}"}, (b'sensor"', b'\\ud800"'), 0),
    "a number beyond numeric's range": ("co2", {"ppm": 1, "updateTime": "{t}"}, (b'"ppm":1', b'"ppm":1e1000000'), 0),
    "a number beyond double precision": ("co2", {"ppm": 1, "updateTime": "{t}"}, (b'"ppm":1', b'"ppm":1e400'), 0),
    "a number too near zero for double precision": ("co2", {"ppm": 1, "updateTime": "{t}"},
                                                     (b'"ppm":1', b'"ppm":1e-400'), 0),
    "a number as a string": ("co2", {"ppm": "412", "updateTime": "{t}"}, None, 0),
    "a state that is a number": ("contact", {"state": 1, "updateTime": "{t}"}, None, 0),
    "an updateTime that is not a time": ("contact", {"state": "OPEN", "updateTime": "yesterday"}, None, 0),
    "an updateTime with no zone": ("contact", {"state": "OPEN", "updateTime": "2026-11-20T06:00:00"}, None, 0),
    "an updateTime of 'now'": ("contact", {"state": "OPEN", "updateTime": "now"}, None, 0),
    "a month 13": ("contact", {"state": "OPEN", "updateTime": "2026-13-20T06:00:00Z"}, None, 0),
    "an updateTime that is a number": ("contact", {"state": "OPEN", "updateTime": 1732000000}, None, 0),
    "one of two samples with a bad time": ("temperature", {"value": 1.5, "updateTime": "{t}", "samples": [
        {"value": 1.5, "sampleTime": "{t}"}, {"value": 2.5, "sampleTime": "2026-11-31T06:00:00Z"}]}, None, 1),
    "samples that are not objects": ("temperature", {"value": 1.5, "updateTime": "{t}", "samples": [1.5, "x", None]},
                                     None, 0),
    "samples that are not a list (data itself is read)": ("temperature", {"value": 1.5, "updateTime": "{t}",
                                                                          "samples": {"value": 9}}, None, 1),
    "data of the type that is a string": ("contact", "OPEN", None, 0),
    "data of the type that is a list": ("contact", [{"state": "OPEN"}], None, 0),
    "data of the type that is null": ("contact", None, None, 0),
    "no data of the event's type": ("contact", {}, (b'"data":{"contact":{}}', b'"data":{"touch":{}}'), 0),
    "data that is a string": ("contact", {}, (b'"data":{"contact":{}}', b'"data":"OPEN"'), 0),
    "a type DT has not made yet": ("futureType", {"value": 1, "updateTime": "{t}"}, None, 0),
}


@pytest.mark.parametrize("event_type, data, change, left", ODD_BODIES.values(), ids=ODD_BODIES.keys())
def test_odd_body_gives_no_readings_and_no_error(make_app, database_url, event_type, data, change, left):
    """A stored event whose body or data dt_readings cannot read gives no row (or only the rows it can read),
    never an error: a query over the whole view still answers, with the other event's readings."""
    client = make_app(DATABASE_URL=database_url).test_client()
    now = datetime.now(timezone.utc)
    deliver(client, odd("contact", {"state": "CLOSED", "updateTime": rfc3339_ns(now)}, now, "good-1"))
    text = json.dumps(data).replace("{t}", rfc3339_ns(now))
    body = odd(event_type, json.loads(text), now, "odd-1")
    deliver(client, body.replace(*change) if change else body)
    with psycopg.connect(database_url) as connection:
        found = connection.execute("SELECT event_id, count(*) FROM dt_readings GROUP BY event_id").fetchall()
    assert dict(found) == ({"good-1": 1, "odd-1": left} if left else {"good-1": 1})


# Each: the number written in the body (and a label beside it), and the value of the reading it gives, if any.
NEAR_LIMITS = {
    "a zero": ("0.0", "plain", 0.0),
    "a zero beside a label that writes a tiny exponent": ("0.0", "1e-400", 0.0),
    "a number Python reads as zero": ("1e-400", "plain", None),
    "a tiny exponent with leading zeros": ("-1E-0400", "plain", None),
    "a number below double precision's normal range": ("1e-310", "plain", None),
    "the largest double, over 1e308": ("1.7976931348623157e308", "plain", None),
    "a number that reads as 1e308 only when rounded": ("99999999999999999999" + "0" * 388 + "e-100", "plain", 1e308),
    "an ordinary number beside a tiny exponent": ("21.5", "1e-400", 21.5),
}


@pytest.mark.parametrize("number, label, value", NEAR_LIMITS.values(), ids=NEAR_LIMITS.keys())
def test_numbers_near_the_limits_are_read_exactly(number, label, value):
    """A number is read as the JSON text writes it, not as Python rounds it: one that rounds to zero or to a double
    over the range gives no reading, a real zero does, and a tiny exponent elsewhere in the body changes nothing,
    in the first number of a sample and in its second (networkStatus's rssi) alike."""
    now = datetime.now(UTC)
    for event_type, data, field in (("co2", {"ppm": 1, "updateTime": rfc3339_ns(now)}, "ppm"),
                                    ("networkStatus", {"signalStrength": 73, "rssi": 1, "updateTime": rfc3339_ns(now)},
                                     "rssi")):
        body = odd(event_type, data, now, "near-1").replace(f'"{field}":1,'.encode(), f'"{field}":{number},'.encode())
        body = body.replace(f'"{event_type} sensor"'.encode(), f'"{label}"'.encode())
        samples = samples_of(parse_event(body))
        readings_of_field = [sample.value if field == "ppm" else sample.value2 for sample in samples]
        # co2 has no reading without its number; networkStatus keeps its signalStrength, with no rssi
        assert readings_of_field == ([] if value is None and field == "ppm" else [value]), event_type


def test_body_that_is_not_json_gives_no_readings(make_app, database_url):
    """A row whose body is not JSON at all (written by another tool) gives no readings; the others still answer."""
    client = make_app(DATABASE_URL=database_url).test_client()
    now = datetime.now(timezone.utc)
    deliver(client, odd("touch", {"updateTime": rfc3339_ns(now)}, now, "good-1"))
    with psycopg.connect(database_url) as connection:
        connection.execute("INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) "
                           "VALUES ('broken-1', 'd', 'touch', now(), '{\"event\": {\"data\": {\"touch\": ')")
        found = connection.execute("SELECT event_id FROM dt_readings").fetchall()
    assert found == [("good-1",)]


def test_time_falls_back_to_update_time_then_to_the_event_time(make_app, database_url):
    """A sample without sampleTime takes data's updateTime; data without updateTime takes the event's own time."""
    client = make_app(DATABASE_URL=database_url).test_client()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    update = now - timedelta(seconds=30)
    deliver(client, odd("temperature", {"value": 3.5, "updateTime": rfc3339_ns(update), "samples": [{"value": 3.5}]},
                        now, "no-sample-time"))
    deliver(client, odd("touch", {}, now, "no-update-time"))
    assert readings(database_url, "no-sample-time") == [("temperature", 3.5, None, "°C", update)]
    assert readings(database_url, "no-update-time") == [("touch", 1, None, None, now)]


def test_readings_are_stored_typed_and_the_view_reads_no_body(make_app, database_url):
    """Each reading is a row of dt_samples written with its event (networkStatus's two numbers in one row, humidity's
    two samples in two), none for a type without readings (labelsChanged, ethernetStatus, a new type), and reading
    the whole view reads no stored body: dt_events is not scanned at all."""
    client = make_app(DATABASE_URL=database_url).test_client()
    now = datetime.now(timezone.utc)
    cases = all_types(now)
    for event_type in ("networkStatus", "humidity", "ethernetStatus"):
        deliver(client, odd(event_type, cases[event_type][0], now, event_type))
    deliver(client, encode_body(dt_body("labelsChanged", cases["labelsChanged"][0], now, "labelsChanged")))
    deliver(client, odd("futureType", {"value": 1}, now, "futureType"))
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM dt_readings").fetchone()[0] == 6
        assert connection.execute("SELECT event_id, count(*) FROM dt_samples GROUP BY 1 ORDER BY 1").fetchall() == [
            ("humidity", 2), ("networkStatus", 1)]
        [[plan]] = connection.execute("EXPLAIN (FORMAT JSON) SELECT * FROM dt_readings").fetchone()
    assert "dt_events" not in json.dumps(plan)


def test_version_2_database_gets_the_view_with_readings_of_rows_stored_before(make_app, database_url):
    """A database at version 2 (before dt_readings) is brought to the latest version by the next worker to start,
    and the view gives the events stored before it existed, once their readings are filled in behind."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    body = encode_body(dt_body("temperature", {"temperature": {"value": 4.5, "updateTime": rfc3339_ns(now)}}, now,
                               "before-3")).decode()
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(VERSION_2)
        connection.execute("INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) "
                           "VALUES ('before-3', 'emutemperature', 'temperature', %s, %s)", (now, body))
    client = make_app(DATABASE_URL=database_url).test_client()
    deliver(client, odd("touch", {"updateTime": rfc3339_ns(now)}, now, "after-3"))  # the worker migrates first
    with psycopg.connect(database_url, autocommit=True) as connection:
        give_up_at = time.monotonic() + 10  # the readings of rows stored before are filled in behind
        while not (fill_progress(connection) or {}).get("done"):
            assert time.monotonic() < give_up_at, "the readings were not filled in"
            time.sleep(0.05)
        assert connection.execute("SELECT version FROM dt_schema").fetchall() == [(VERSION,)]
        found = connection.execute("SELECT event_id, name, value, time FROM dt_readings ORDER BY event_id").fetchall()
    assert VERSION >= 3  # the view came with version 3
    assert found == [("after-3", "touch", 1, now), ("before-3", "temperature", 4.5, now)]


def test_a_role_granted_only_the_view_reads_readings_and_not_the_table(make_app, database_url):
    """A reader granted USAGE on the schema and SELECT on dt_readings alone (as docs/database.md says for a
    dashboard's credential) reads the readings, and is refused dt_events."""
    now = datetime.now(timezone.utc)
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    reader = f"reader_{name}"[:63]
    deliver(make_app(DATABASE_URL=database_url).test_client(), odd("touch", {"updateTime": rfc3339_ns(now)}, now, "r-1"))
    with psycopg.connect(database_url, autocommit=True) as owner:
        owner.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(reader)))
        owner.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {0}; GRANT SELECT ON dt_readings TO {0}").format(
            sql.Identifier(reader)))
    with psycopg.connect(database_url.replace("postgres@", f"{reader}@"), autocommit=True) as connection:
        assert connection.execute("SELECT event_id, name, value FROM dt_readings").fetchall() == [("r-1", "touch", 1)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT count(*) FROM dt_events")
