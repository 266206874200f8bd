"""Measure the receiver's schema 5 (daily partitions of raw events, typed readings) beside schema 4's, at scale.
Issue 25's scale: 1,000 sensors, 14 days of generated DT events.

Run by hand, never in CI: `python tests/benchmark/year.py` (1,000 sensors × 14 days, 2,688,000 events), or small:
`python tests/benchmark/year.py --sensors 50 --days 2` (seconds). `--layout built|today|both` (default built):
`built` is the schema receiver.schema.migrate makes on a new database today; `today` is schema 4 as release 4
built it (schema4.py), for the side-by-side. Each layout gets a database of its own in a throwaway PostgreSQL
server (the tests' own, never the machine's), filled with the same events: per sensor a temperature and a
`networkStatus` heartbeat every 15 minutes, bodies shaped as DT sends them; in `built`, each event's readings in
dt_samples as the receiver's ingest writes them (checked against receiver.readings.samples_of). Then, per layout:
bytes per event and per reading, the chart queries of docs/database.md (medians of `--rounds`), the cost of
storing a new event with the receiver's own statements, and removing the raw events older than 7 days (than the
newest day, for fewer than 8 days) once, since it destroys what it measures. The table goes to stdout in markdown.
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]  # the receiver, the tests' support, schema4
from schema4 import SCHEMA_4  # noqa: E402
from schema4 import WRITE as RELEASE_4_WRITE  # noqa: E402
from schema4 import WRITE_ONE as RELEASE_4_WRITE_ONE  # noqa: E402
from support.postgres import PostgresServer, programs_missing, server_programs  # noqa: E402

from receiver.events import Event, parse_event  # noqa: E402
from receiver.partitions import ensure_partitions, remove_before  # noqa: E402
from receiver.readings import KIND_OF, samples_of  # noqa: E402
from receiver.sample import encode_body, sample_event  # noqa: E402
from receiver.schema import migrate  # noqa: E402
from receiver.store import DeviceNumbers, event_columns, sample_columns, write_of  # noqa: E402

PROJECT = "c0md3mm0c7bet3vico8g"
STAMP = """to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
# The two bodies, as DT's cloud writes them (compact JSON, its keys in its order), filled in by format().
TEMPERATURE_BODY = (
    '{"event":{"eventId":"%1$s","targetName":"projects/' + PROJECT + '/devices/%2$s","eventType":"temperature",'
    '"data":{"temperature":{"value":%3$s,"updateTime":"%4$s","samples":[{"value":%3$s,"sampleTime":"%4$s"}],'
    '"isBackfilled":false}},"timestamp":"%4$s"},"labels":{"name":"Sensor %5$s"},'
    '"metadata":{"deviceId":"%2$s","projectId":"' + PROJECT + '","deviceType":"temperature","productNumber":"102081"}}'
)
HEARTBEAT_BODY = (
    '{"event":{"eventId":"%1$s","targetName":"projects/' + PROJECT + '/devices/%2$s","eventType":"networkStatus",'
    '"data":{"networkStatus":{"signalStrength":%3$s,"rssi":%6$s,"updateTime":"%4$s","cloudConnectors":'
    '[{"id":"bdkjbo2v0000uk377c4g","signalStrength":%3$s,"rssi":%6$s}],"transmissionMode":"LOW_POWER_STANDARD_MODE"}},'
    '"timestamp":"%4$s"},"labels":{"name":"Sensor %5$s"},'
    '"metadata":{"deviceId":"%2$s","projectId":"' + PROJECT + '","deviceType":"temperature","productNumber":"102081"}}'
)
# Per sensor, slot of 15 minutes (numbered from `first`) and kind: one day of generated events, up to a few minutes
# past `end`, each with its readings' values; stored in time order, as they arrive (what a BRIN index relies on).
GENERATED = """
FROM generate_series(1, %(sensors)s) AS s
CROSS JOIN generate_series(0, %(slots)s - 1) AS k
CROSS JOIN unnest(ARRAY['temperature', 'networkStatus']) AS kind
CROSS JOIN LATERAL (SELECT substr(md5(s || '/' || (%(first)s + k) || kind), 1, 20) AS id,
                           'c' || substr(md5('device' || s), 1, 19) AS device,
                           round((20 + 4 * sin((%(first)s + k) / 15.0 + s))::numeric, 2) AS celsius,
                           40 + (s * 7 + k) %% 60 AS strength, -50 - (s * 3 + k) %% 45 AS rssi,
                           %(end)s - (%(slots)s - k) * interval '15 minutes' + (s %% 840) * interval '1 second'
                               + CASE kind WHEN 'temperature' THEN interval '0' ELSE interval '7 minutes' END AS at
                    ) AS chosen
"""
SEED_EVENTS = f"""
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
SELECT id, device, kind, at, CASE kind WHEN 'temperature' THEN format(%(temperature)s, id, device, celsius, stamp, s)
                                  ELSE format(%(heartbeat)s, id, device, strength, stamp, s, rssi) END
{GENERATED}
CROSS JOIN LATERAL (SELECT {STAMP} AS stamp) AS stamped
ORDER BY at
"""  # noqa: S608 (constant text only)
# The rows samples_of gives these bodies: a temperature's value; a heartbeat's signalStrength, and its rssi in value2.
# A numeric goes to double precision through its text, as the body's number does.
SEED_SAMPLES = f"""
INSERT INTO dt_samples (time, value, value2, device, kind, state, event_id)
SELECT at, CASE kind WHEN 'temperature' THEN celsius::float8 ELSE strength END,
       CASE kind WHEN 'temperature' THEN NULL ELSE rssi END, d.device,
       CASE kind WHEN 'temperature' THEN %(temperature_kind)s ELSE %(heartbeat_kind)s END, NULL, id
{GENERATED}
JOIN dt_devices AS d ON d.device_id = chosen.device
ORDER BY at
"""  # noqa: S608 (constant text only)

# The charts of docs/database.md, asked of dt_readings; {window} is the column each schema's docs filter on. A window
# over every sensor is in hours, as docs/database.md advises; one sensor's is in days, as its Dataclip example has it.
QUERIES = {
    "every sensor's hourly average, last day": """
        SELECT device_id, date_trunc('hour', time) AS hour, avg(value) FROM dt_readings
        WHERE name = 'temperature' AND {window} >= now() - interval '24 hours' GROUP BY device_id, hour""",
    "every sensor's hourly average, last 7 days": """
        SELECT device_id, date_trunc('hour', time) AS hour, avg(value) FROM dt_readings
        WHERE name = 'temperature' AND {window} >= now() - interval '168 hours' GROUP BY device_id, hour""",
    "one device's temperatures over a day": """
        SELECT time, value FROM dt_readings
        WHERE device_id = %(device)s AND name = 'temperature' AND {window} >= now() - interval '1 day'
        ORDER BY time""",
    "one device's hourly averages over a week": """
        SELECT date_trunc('hour', time) AS hour, avg(value) FROM dt_readings
        WHERE device_id = %(device)s AND name = 'temperature' AND {window} >= now() - interval '7 days'
        GROUP BY hour ORDER BY hour""",
    "the latest temperature of each device (last day)": """
        SELECT DISTINCT ON (device_id) device_id, time, value FROM dt_readings
        WHERE name = 'temperature' AND {window} >= now() - interval '24 hours'
        ORDER BY device_id, time DESC""",
    # Its other form: one short walk back along (device, time) per device, from dt_devices. Schema 5 only.
    "the latest temperature of each device, one index walk per device": {"built": """
        SELECT d.device_id, latest.time, latest.value FROM dt_devices AS d
        CROSS JOIN LATERAL (SELECT time, value FROM dt_readings AS r
                            WHERE r.device_id = d.device_id AND r.name = 'temperature'
                              AND r.time >= now() - interval '24 hours' ORDER BY r.time DESC LIMIT 1) AS latest"""},
}
WINDOW_COLUMN = {"today": "event_time", "built": "time"}
NEW_EVENTS = 400  # stored per round when timing the insert of new events
CHECKED_EVENTS = 500  # whose readings are compared with what the receiver's parse makes of their bodies


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000, help="sensors (default 1000)")
    parser.add_argument("--days", type=int, default=14, help="days of events (default 14)")
    parser.add_argument("--layout", choices=("built", "today", "both"), default="built",
                        help="built: the receiver's schema (default); today: schema 4; both")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each query and insert (default 3)")
    chosen = parser.parse_args()
    if chosen.days < 2 or chosen.sensors < 1 or chosen.rounds < 1:
        parser.error("--days must be at least 2, and --sensors and --rounds at least 1")
    return chosen


@contextmanager
def throwaway_server():
    """Yield a PostgreSQL server of this script's own, removed afterwards."""
    programs = server_programs()
    if programs is None:
        sys.exit(programs_missing())
    server = PostgresServer(programs, fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.remove()


def new_database(server: PostgresServer, name: str) -> str:
    """Create an empty database; return its URL."""
    with psycopg.connect(server.url(), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.url(name)


def seconds(action) -> float:
    """Run an action; return how long it took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def seed(connection: psycopg.Connection, statements: list[str], sensors: int, days: int, end: datetime) -> float:
    """Run each seeding statement for each day of slots, oldest day first; return the seconds it took."""
    params = {"temperature": TEMPERATURE_BODY, "heartbeat": HEARTBEAT_BODY, "sensors": sensors, "slots": 96,
              "temperature_kind": KIND_OF["temperature"].number, "heartbeat_kind": KIND_OF["networkStatus"].number}
    took = 0.0
    for day in range(days):
        day_params = {**params, "end": end - timedelta(days=days - 1 - day), "first": day * 96}
        for statement in statements:
            took += seconds(lambda text=statement, given=day_params: connection.execute(text, given))
    return took


def build_today(connection: psycopg.Connection, sensors: int, days: int, end: datetime) -> dict:
    """Make schema 4 as release 4 did on a new database, and fill it."""
    connection.execute(SCHEMA_4)
    return {"load seconds": seed(connection, [SEED_EVENTS], sensors, days, end)}


def build_built(connection: psycopg.Connection, sensors: int, days: int, end: datetime) -> dict:
    """Make the receiver's schema as a new database gets it, its partitions for every day of events (as its upkeep
    makes them ahead), its devices, then the events with their readings; check the readings against the parse."""
    migrate(connection)
    day = (end - timedelta(days=days + 1)).date()
    while day <= end.date():
        ensure_partitions(connection, day)
        day += timedelta(days=1)
    connection.execute("INSERT INTO dt_devices (device_id) SELECT 'c' || substr(md5('device' || s), 1, 19)"
                       " FROM generate_series(1, %s) AS s", (sensors,))
    figures = {"load seconds": seed(connection, [SEED_EVENTS, SEED_SAMPLES], sensors, days, end)}
    if differing := differing_readings(connection):
        sys.exit(f"year.py: the readings of event {differing[0]} are not what the receiver writes")
    return figures


def differing_readings(connection: psycopg.Connection, checked: int = CHECKED_EVENTS) -> list[str]:
    """Return the ids of those of `checked` random stored events whose readings in dt_samples are not what the
    receiver's ingest writes of their bodies."""
    devices = dict(connection.execute("SELECT device, device_id FROM dt_devices").fetchall())
    events = connection.execute("SELECT event FROM dt_events ORDER BY random() LIMIT %s", (checked,))
    differing = []
    for (text,) in events.fetchall():
        event = parse_event(text.encode())
        stored = connection.execute("SELECT time, value, value2, device, kind, state FROM dt_samples"
                                    " WHERE event_id = %s AND time = %s", (event.event_id, event.time)).fetchall()
        if [(at, value, value2, devices[device], kind, state)
                for at, value, value2, device, kind, state in stored] != written_readings(event):
            differing.append(event.event_id)
    return differing


def written_readings(event: Event) -> list[tuple]:
    """Return the readings the receiver's ingest writes of an event: (time, value, value2, device id, kind, state)."""
    return [(datetime.fromisoformat(s.time), s.value, s.value2, event.device_id, s.kind, s.state)
            for s in samples_of(event)]


def count(connection: psycopg.Connection, query: str) -> int:
    """Return the one number a query gives."""
    return connection.execute(query).fetchone()[0]


def table_bytes(connection: psycopg.Connection, table: str) -> float:
    """Return the bytes of a table with its indexes, summed over its partitions if it has any."""
    return connection.execute("""
        SELECT CASE WHEN relkind = 'p' THEN (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(oid)
                                             WHERE isleaf)
                    ELSE pg_total_relation_size(oid) END::float8
        FROM pg_class WHERE oid = %s::regclass""", (table,)).fetchone()[0]


def sizes(connection: psycopg.Connection, layout: str) -> dict:
    """Return bytes per raw event and per reading (tables, their partitions and indexes), and the counts."""
    events = count(connection, "SELECT count(*) FROM dt_events")
    readings = count(connection, "SELECT count(*) FROM dt_readings")
    figures = {"events": events, "readings": readings,
               "mean body bytes": count(connection, "SELECT avg(octet_length(event))::float8 FROM dt_events"),
               "database MB": count(connection, "SELECT pg_database_size(current_database())") / 1e6,
               "bytes per raw event": table_bytes(connection, "dt_events") / events}
    # A body this size is stored inline and uncompressed: a byte less of body is a byte less on disk.
    figures["bytes per raw event, 521-byte body"] = figures["bytes per raw event"] - figures["mean body bytes"] + 521
    if layout == "today":
        return figures
    typed = sum(table_bytes(connection, table) for table in ("dt_samples", "dt_devices", "dt_reading_kinds"))
    figures["bytes per reading"] = typed / readings
    figures["samples (rows)"] = count(connection, "SELECT count(*) FROM dt_samples")
    figures["rows in the DEFAULT partitions"] = count(
        connection, "SELECT (SELECT count(*) FROM dt_events_default) + (SELECT count(*) FROM dt_samples_default)")
    return figures


def device_name(sensor: int) -> str:
    """Return the generated device id of a sensor (as GENERATED makes it)."""
    return "c" + hashlib.md5(f"device{sensor}".encode()).hexdigest()[:19]  # noqa: S324 (an id, not security)


def time_queries(connection: psycopg.Connection, layout: str, rounds: int) -> dict:
    """Run each chart query `rounds` times; return its median milliseconds and its rows."""
    figures = {}
    for label, query in QUERIES.items():
        if isinstance(query, dict) and layout not in query:
            continue
        text = (query[layout] if isinstance(query, dict) else query).format(window=WINDOW_COLUMN[layout])
        runs, rows = [], 0
        for _ in range(rounds):
            started = time.perf_counter()
            rows = len(connection.execute(text, {"device": device_name(1)}).fetchall())
            runs.append(time.perf_counter() - started)
        figures[f"{label} (ms)"] = statistics.median(runs) * 1000
        figures[f"{label} (rows)"] = rows
    return figures


def new_events(count_of: int, sensors: int) -> list[Event]:
    """Return new events of existing sensors, half temperatures and half heartbeats, parsed as the receiver does."""
    events = []
    for number in range(count_of):
        kind = "temperature" if number % 2 else "networkStatus"
        events.append(parse_event(encode_body(sample_event(kind, uuid.uuid4().hex[:20], device_name(
            number % sensors + 1)))))
    return events


def rows_of(batch: list[Event]) -> list[tuple]:
    """Return the rows the receiver's store writes for these events (EventStore.save), readings included."""
    return [(event.event_id, event.device_id, event.event_type, event.time, event.text, samples_of(event))
            for event in batch]


def store_today(connection: psycopg.Connection, rows: list[tuple], devices: DeviceNumbers) -> None:
    """Store a batch as release 4 did: the events alone (its readings were parsed on every query), by event id."""
    rows = sorted(rows, key=lambda row: row[0])
    if len(rows) == 1:
        connection.execute(RELEASE_4_WRITE_ONE, rows[0][:5]).fetchall()
    else:
        connection.execute(RELEASE_4_WRITE, event_columns(rows)).fetchall()


def store_built(connection: psycopg.Connection, rows: list[tuple], devices: DeviceNumbers) -> None:
    """Store a batch with its readings as the receiver does (EventStore._insert), by event id: the devices' numbers,
    then one statement (WRITE for a batch, WRITE_ONE_SAMPLE for one event of one sample)."""
    rows = sorted(rows, key=lambda row: row[0])
    numbers = devices.numbers(connection, {row[1] for row in rows if row[5]})
    query, params = write_of(rows, sample_columns(rows, numbers))
    connection.execute(query, params).fetchall()


def time_stores(connection: psycopg.Connection, layout: str, sensors: int, rounds: int) -> dict:
    """Return the median microseconds per new event stored, alone and in batches of 100, and of the Python parse.

    A first round warms up (psycopg prepares a statement on its sixth run)."""
    store = store_today if layout == "today" else store_built
    devices = DeviceNumbers()
    runs: dict[str, list[float]] = {}
    for round_number in range(rounds + 1):
        for size in (1, 100):
            rows = rows_of(new_events(NEW_EVENTS, sensors))
            started = time.perf_counter()
            for first in range(0, len(rows), size):
                store(connection, rows[first:first + size], devices)
            took = time.perf_counter() - started
            if round_number:
                runs.setdefault(f"store a new event, batches of {size} (µs)", []).append(took / len(rows))
    figures = {name: statistics.median(each) * 1e6 for name, each in runs.items()}
    if layout == "built":
        events = new_events(NEW_EVENTS, sensors)
        each = [seconds(lambda: [samples_of(event) for event in events]) / len(events) for _ in range(rounds)]
        figures["Python parse of an event's readings, samples_of (µs)"] = statistics.median(each) * 1e6
    return figures


def time_lookup(connection: psycopg.Connection, rounds: int) -> dict:
    """Return the median milliseconds to find one stored event by its eventId alone (every partition)."""
    ids = [row[0] for row in connection.execute("SELECT event_id FROM dt_events ORDER BY random() LIMIT 200")]
    runs = [seconds(lambda: [connection.execute("SELECT 1 FROM dt_events WHERE event_id = %s", (id_,)).fetchall()
                             for id_ in ids]) / len(ids) for _ in range(rounds)]
    return {"find an event by eventId alone (ms)": statistics.median(runs) * 1000}


# Release 4's prune: 5,000 rows a transaction, each batch from where the last one stopped.
PRUNE_ONE_BATCH = """
WITH gone AS (
    DELETE FROM dt_events WHERE event_id IN (
        SELECT event_id FROM dt_events WHERE event_time >= %(after)s AND event_time < %(before)s
        ORDER BY event_time LIMIT 5000
    ) RETURNING event_time
)
SELECT count(*), max(event_time) FROM gone
"""


def prune_row_by_row(connection: psycopg.Connection, before: datetime):
    """Delete the events older than a time as release 4 did; yield how many each batch deleted."""
    params = {"after": "-infinity", "before": before}
    while (batch := connection.execute(PRUNE_ONE_BATCH, params).fetchone())[0]:
        params["after"] = batch[1]
        yield batch[0]


def drop_week(connection: psycopg.Connection, layout: str, end: datetime, days: int) -> dict:
    """Remove the raw events older than 7 days as each schema's prune does; return the time it took, and what the
    database gave back of what they held (their count times the bytes per event before)."""
    before_size = count(connection, "SELECT pg_database_size(current_database())")
    older = end - timedelta(days=min(7, days - 1))
    events = count(connection, "SELECT count(*) FROM dt_events")
    per_event = table_bytes(connection, "dt_events") / events
    started = time.perf_counter()
    if layout == "today":
        sum(prune_row_by_row(connection, older))
    else:  # what `prune --older-than` and the receiver's upkeep run
        remove_before(connection, "dt_events", older)
    took = time.perf_counter() - started
    deleted = events - count(connection, "SELECT count(*) FROM dt_events")
    connection.execute("CHECKPOINT")
    shrunk = before_size - count(connection, "SELECT pg_database_size(current_database())")
    removed, held = "raw events past 7 days removed: ", max(deleted * per_event, 1)
    return {removed + "events": deleted, removed + "seconds": took, removed + "MB they held": held / 1e6,
            removed + "database shrank (MB)": shrunk / 1e6, removed + "shrink / held": shrunk / held}


def measure(server: PostgresServer, layout: str, options: argparse.Namespace, end: datetime) -> dict:
    """Build one layout's database and take every figure of it."""
    url = new_database(server, f"year_{layout}")
    build = build_today if layout == "today" else build_built
    with psycopg.connect(url, autocommit=True) as connection:
        figures = build(connection, options.sensors, options.days, end)
        progress(f"{layout}: loaded")
        connection.execute("VACUUM ANALYZE")
        figures |= sizes(connection, layout)
        figures |= time_queries(connection, layout, options.rounds)
        figures |= time_lookup(connection, options.rounds)
        figures |= time_stores(connection, layout, options.sensors, options.rounds)
        figures |= drop_week(connection, layout, end, options.days)
    progress(f"{layout}: done")
    return figures


def progress(line: str) -> None:
    """Say what is happening, on stderr."""
    print(f"{datetime.now(UTC):%H:%M:%S} {line}", file=sys.stderr, flush=True)


def table(results: dict[str, dict]) -> str:
    """Return the figures of every layout side by side, as markdown."""
    layouts = list(results)
    names = list(dict.fromkeys(name for figures in results.values() for name in figures))
    lines = ["| measure | " + " | ".join(layouts) + " |", "|---|" + "---:|" * len(layouts)]
    for name in names:
        cells = [shown(results[layout].get(name)) for layout in layouts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shown(value) -> str:
    """Return a figure as the table shows it."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    """Measure the chosen layouts on one server and print the table."""
    options = arguments()
    layouts = ["today", "built"] if options.layout == "both" else [options.layout]
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    with throwaway_server() as server:
        with psycopg.connect(server.url()) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
        load = os.getloadavg()[0]
        results = {}
        for layout in layouts:
            progress(f"{layout}: {options.sensors} sensors × {options.days} days")
            results[layout] = measure(server, layout, options, end)
    print(f"{date.today():%Y-%m-%d}: {options.sensors} sensors × {options.days} days, medians of {options.rounds};"
          f" PostgreSQL {version} (fsync off, as in the tests); {os.cpu_count()} CPUs, load average {load:.1f}"
          f" before and {os.getloadavg()[0]:.1f} after\n")
    print(table(results))


if __name__ == "__main__":
    main()
