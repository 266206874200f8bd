"""Measure a year-scale layout of events and readings (issue 25) against today's, on generated DT traffic.

Run by hand, never in CI: `python tests/benchmark/year.py` (1,000 sensors × 14 days, 2,688,000 events: 8 to 10
minutes on 2 busy cores), or small: `python tests/benchmark/year.py --sensors 50 --days 2` (seconds).
`--layout today|proposed|both` (default both) chooses the layouts. Each layout gets a database of its own in
a throwaway PostgreSQL server (the tests' own, never the machine's), filled with the same events: per sensor
a temperature and a `networkStatus` heartbeat every 15 minutes, bodies shaped as DT sends them. Then, per
layout: bytes per event and per reading, the chart queries (medians of `--rounds`), the cost of storing an
event with its readings, and removing the raw events older than 7 days (than the newest day, for fewer than
8 days) once, since it destroys what it measures. The table goes to stdout in markdown.
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
from support.postgres import PostgresServer, programs_missing, server_programs  # noqa: E402
from year_layout import (  # noqa: E402
    INSERT_EVENTS,
    INSERT_WITH_READINGS,
    INSERT_WITH_SQL_READINGS,
    PROPOSED,
    READINGS_FROM_BODIES,
    create_kinds,
    create_partitions,
    readings_of,
)

from receiver.partitions import remove_before  # noqa: E402
from receiver.sample import encode_body, sample_event  # noqa: E402
from receiver.schema import migrate  # noqa: E402
from receiver.store import INSERT  # noqa: E402

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
# One day of generated events, per sensor, slot of 15 minutes (numbered from `first`) and kind, up to a few
# minutes past `end`; stored in time order, as they arrive, which is the order a BRIN index on time relies on.
SEED = f"""
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
SELECT id, device, kind, at, CASE kind WHEN 'temperature' THEN format(%(temperature)s, id, device, celsius, stamp, s)
                                  ELSE format(%(heartbeat)s, id, device, strength, stamp, s, rssi) END
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
CROSS JOIN LATERAL (SELECT {STAMP} AS stamp) AS stamped
ORDER BY at
"""  # noqa: S608 (constant text only)

# The charts, asked of dt_readings in each layout; {window} is the column its documented queries filter on.
QUERIES = {
    "every sensor's hourly average, last day": """
        SELECT device_id, date_trunc('hour', time) AS hour, avg(value) FROM dt_readings
        WHERE name = 'temperature' AND {window} >= now() - interval '1 day' GROUP BY device_id, hour""",
    "every sensor's hourly average, last 7 days": """
        SELECT device_id, date_trunc('hour', time) AS hour, avg(value) FROM dt_readings
        WHERE name = 'temperature' AND {window} >= now() - interval '7 days' GROUP BY device_id, hour""",
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
        WHERE name = 'temperature' AND {window} >= now() - interval '1 day'
        ORDER BY device_id, time DESC""",
    # Its other form: one short walk back along (device, time) per device. Proposed layout only.
    "the latest temperature of each device, one index walk per device": {"proposed": """
        SELECT d.device_id, latest.time, latest.value FROM dt_devices AS d
        CROSS JOIN LATERAL (SELECT time, value FROM dt_readings AS r
                            WHERE r.device_id = d.device_id AND r.name = 'temperature'
                              AND r.time >= now() - interval '1 day' ORDER BY r.time DESC LIMIT 1) AS latest"""},
}
WINDOW_COLUMN = {"today": "event_time", "proposed": "time"}
NEW_EVENTS = 400  # stored per round when timing the insert of new events


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000, help="sensors (default 1000)")
    parser.add_argument("--days", type=int, default=14, help="days of events (default 14)")
    parser.add_argument("--layout", choices=("today", "proposed", "both"), default="both")
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


def seed(connection: psycopg.Connection, sensors: int, days: int, end: datetime) -> float:
    """Store the generated events, one day of slots per statement; return the seconds it took."""
    params = {"temperature": TEMPERATURE_BODY, "heartbeat": HEARTBEAT_BODY, "sensors": sensors, "slots": 96}
    took = 0.0
    for day in range(days):
        day_params = {**params, "end": end - timedelta(days=days - 1 - day), "first": day * 96}
        took += seconds(lambda day_params=day_params: connection.execute(SEED, day_params))
    return took


def build_today(connection: psycopg.Connection, sensors: int, days: int, end: datetime) -> dict:
    """Make today's schema (receiver/schema.py) and fill it."""
    migrate(connection)
    return {"load seconds": seed(connection, sensors, days, end)}


def build_proposed(connection: psycopg.Connection, sensors: int, days: int, end: datetime) -> dict:
    """Make the proposed schema, fill its events, then its readings from the bodies day by day (as an upgrade)."""
    connection.execute(PROPOSED)
    create_kinds(connection)
    create_partitions(connection, (end - timedelta(days=days + 1)).date(), (end + timedelta(days=7)).date())
    figures = {"load seconds": seed(connection, sensors, days, end)}
    connection.execute("VACUUM ANALYZE dt_events")
    started = time.perf_counter()
    connection.execute("INSERT INTO dt_devices (device_id) SELECT DISTINCT device_id FROM dt_events"
                       " WHERE device_id IS NOT NULL ON CONFLICT DO NOTHING")
    day = end - timedelta(days=days + 1)
    while day <= end:
        connection.execute(READINGS_FROM_BODIES, {"since": day, "until": day + timedelta(days=1)})
        day += timedelta(days=1)
    figures["fill-in seconds"] = time.perf_counter() - started
    return figures


def count(connection: psycopg.Connection, query: str) -> int:
    """Return the one number a query gives."""
    return connection.execute(query).fetchone()[0]


def sizes(connection: psycopg.Connection, layout: str) -> dict:
    """Return bytes per raw event and per reading (tables, their partitions and indexes), and the counts."""
    events = count(connection, "SELECT count(*) FROM dt_events")
    readings = count(connection, "SELECT count(*) FROM dt_readings")
    every_partition = """
        SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::float8 FROM pg_partition_tree('{}') WHERE isleaf"""
    figures = {"events": events, "readings": readings,
               "mean body bytes": count(connection, "SELECT avg(octet_length(event))::float8 FROM dt_events"),
               "database MB": count(connection, "SELECT pg_database_size(current_database())") / 1e6}
    if layout == "today":
        figures["bytes per raw event"] = count(connection, "SELECT pg_total_relation_size('dt_events')") / events
    else:
        figures["bytes per raw event"] = count(connection, every_partition.format("dt_events")) / events
    # A body this size is stored inline and uncompressed: a byte less of body is a byte less on disk.
    figures["bytes per raw event, 521-byte body"] = figures["bytes per raw event"] - figures["mean body bytes"] + 521
    if layout == "today":
        return figures
    typed = count(connection, every_partition.format("dt_samples"))
    typed += count(connection, "SELECT pg_total_relation_size('dt_devices')"
                               " + pg_total_relation_size('dt_reading_kinds')")
    figures["bytes per reading"] = typed / readings
    figures["samples (rows)"] = count(connection, "SELECT count(*) FROM dt_samples")
    return figures


def device_name(sensor: int) -> str:
    """Return the generated device id of a sensor (as SEED makes it)."""
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


def new_events(count_of: int, sensors: int) -> list[dict]:
    """Return parsed bodies of new events of existing sensors, half temperatures and half heartbeats."""
    bodies = []
    for number in range(count_of):
        kind = "temperature" if number % 2 else "networkStatus"
        body = sample_event(kind, uuid.uuid4().hex[:20], device_name(number % sensors + 1))
        body["text"] = encode_body(body).decode()
        bodies.append(body)
    return bodies


def event_columns(bodies: list[dict]) -> list[list]:
    """Return the five arrays of dt_events' columns for a batch."""
    events = [body["event"] for body in bodies]
    return [[event["eventId"] for event in events], [event["targetName"].rsplit("/", 1)[1] for event in events],
            [event["eventType"] for event in events],
            [datetime.fromisoformat(event["timestamp"]) for event in events], [body["text"] for body in bodies]]


def store_today(connection: psycopg.Connection, batch: list[dict], devices: dict) -> None:
    """Store a batch as the receiver does today."""
    connection.execute(INSERT, event_columns(batch)).fetchall()


def store_events(connection: psycopg.Connection, batch: list[dict], devices: dict) -> None:
    """Store a batch in the partitioned table alone, without readings: what partitioning costs by itself."""
    connection.execute(INSERT_EVENTS, event_columns(batch)).fetchall()


def store_python(connection: psycopg.Connection, batch: list[dict], devices: dict) -> None:
    """Store a batch and its readings, parsed here, in one statement."""
    rows = [row for body in batch for row in readings_of(body, devices[body["metadata"]["deviceId"]])]
    readings = [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 7
    connection.execute(INSERT_WITH_READINGS, event_columns(batch) + readings).fetchall()


def store_sql(connection: psycopg.Connection, batch: list[dict], devices: dict) -> None:
    """Store a batch, its readings parsed by the database, in one statement."""
    connection.execute(INSERT_WITH_SQL_READINGS, event_columns(batch)).fetchall()


def time_stores(connection: psycopg.Connection, layout: str, sensors: int, rounds: int) -> dict:
    """Return the median microseconds per new event stored, alone and in batches of 100, for each way.

    A first round warms up (psycopg prepares a statement on its sixth run); the ways take turns in each round.
    """
    ways = {"today": {"as today": store_today},
            "proposed": {"events alone": store_events, "with readings parsed in Python": store_python,
                         "with readings parsed in SQL": store_sql}}[layout]
    devices = dict(connection.execute("SELECT device_id, device FROM dt_devices").fetchall()) \
        if layout == "proposed" else {}
    runs: dict[str, list[float]] = {}
    for round_number in range(rounds + 1):
        for way, store in ways.items():
            for size in (1, 100):
                bodies = new_events(NEW_EVENTS, sensors)
                started = time.perf_counter()
                for first in range(0, len(bodies), size):
                    store(connection, bodies[first:first + size], devices)
                took = time.perf_counter() - started
                if round_number:
                    runs.setdefault(f"store a new event {way}, batches of {size} (µs)", []).append(took / len(bodies))
    figures = {name: statistics.median(each) * 1e6 for name, each in runs.items()}
    if layout == "proposed":
        bodies = new_events(NEW_EVENTS, sensors)
        each = [seconds(lambda: [readings_of(body, 1) for body in bodies]) / len(bodies) for _ in range(rounds)]
        figures["Python parse of an event's readings (µs)"] = statistics.median(each) * 1e6
    return figures


def time_lookup(connection: psycopg.Connection, rounds: int) -> dict:
    """Return the median milliseconds to find one stored event by its eventId alone (every partition)."""
    ids = [row[0] for row in connection.execute("SELECT event_id FROM dt_events ORDER BY random() LIMIT 200")]
    runs = [seconds(lambda: [connection.execute("SELECT 1 FROM dt_events WHERE event_id = %s", (id_,)).fetchall()
                             for id_ in ids]) / len(ids) for _ in range(rounds)]
    return {"find an event by eventId alone (ms)": statistics.median(runs) * 1000}


# Today's release's prune: 5,000 rows a transaction, each batch from where the last one stopped.
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
    """Delete the events older than a time as today's release does; yield how many each batch deleted."""
    params = {"after": "-infinity", "before": before}
    while (batch := connection.execute(PRUNE_ONE_BATCH, params).fetchone())[0]:
        params["after"] = batch[1]
        yield batch[0]


def drop_week(connection: psycopg.Connection, layout: str, end: datetime, days: int) -> dict:
    """Remove raw events older than 7 days as each layout would; return the time and what the database gave back."""
    before_size = count(connection, "SELECT pg_database_size(current_database())")
    older = end - timedelta(days=min(7, days - 1))
    if layout == "today":
        per_event = count(connection, "SELECT pg_total_relation_size('dt_events')") / count(
            connection, "SELECT count(*) FROM dt_events")
        started = time.perf_counter()
        deleted = sum(prune_row_by_row(connection, older))
        took, freed = time.perf_counter() - started, deleted * per_event
    else:  # what `prune --older-than` and the receiver's retention run (receiver/partitions.py)
        deleted = count(connection, "SELECT count(*) FROM dt_events")
        started = time.perf_counter()
        freed = remove_before(connection, "dt_events", older)["freed_bytes"]
        took = time.perf_counter() - started
        deleted -= count(connection, "SELECT count(*) FROM dt_events")
    connection.execute("CHECKPOINT")
    shrunk = before_size - count(connection, "SELECT pg_database_size(current_database())")
    removed = "raw events past 7 days removed: "
    return {removed + "events": deleted, removed + "seconds": took, removed + "MB they held": freed / 1e6,
            removed + "database shrank (MB)": shrunk / 1e6,
            removed + "shrink / held": shrunk / freed}


def measure(server: PostgresServer, layout: str, options: argparse.Namespace, end: datetime) -> dict:
    """Build one layout's database and take every figure of it."""
    url = new_database(server, f"year_{layout}")
    build = build_today if layout == "today" else build_proposed
    with psycopg.connect(url, autocommit=True) as connection:
        figures = build(connection, options.sensors, options.days, end)
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
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def main() -> None:
    """Measure the chosen layouts on one server and print the table."""
    options = arguments()
    layouts = ["today", "proposed"] if options.layout == "both" else [options.layout]
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    with throwaway_server() as server:
        with psycopg.connect(server.url()) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
        load = os.getloadavg()[0]
        results = {}
        for layout in layouts:
            progress(f"{layout}: {options.sensors} sensors × {options.days} days")
            results[layout] = measure(server, layout, options, end)
    print(f"{options.sensors} sensors × {options.days} days, medians of {options.rounds}; PostgreSQL {version}"
          f" (fsync off, as in the tests); {os.cpu_count()} CPUs, load average {load:.1f} before and"
          f" {os.getloadavg()[0]:.1f} after\n")
    print(table(results))


if __name__ == "__main__":
    main()
