"""The PROPOSED layout of issue 25 (a proposal, not the receiver's schema): its SQL, its partitions, its parse.

Raw events: `dt_events` as today, partitioned by day on event_time, unique on (event_id, event_time).
Readings: `dt_samples`, one narrow row per sample of an event with readings (one or two numbers, or a state),
partitioned by month on the sample's time; `dt_readings` is a view over it with today's columns.
"""

import math
import re
import time
from datetime import date, datetime, timedelta

import psycopg
from psycopg import sql

# Each type with readings: its number, what its data holds (a number, a state, or the event itself: a
# touch), the field of the first value, its name and unit, and a second number's (humidity, networkStatus).
KINDS = (
    (1, "temperature", "number", "value", "temperature", "°C", None, None, None),
    (2, "humidity", "number", "temperature", "temperature", "°C", "relativeHumidity", "relativeHumidity", "%"),
    (3, "co2", "number", "ppm", "co2", "ppm", None, None, None),
    (4, "pressure", "number", "pascal", "pressure", "Pa", None, None, None),
    (5, "touch", "event", None, "touch", None, None, None, None),
    (6, "touchCount", "number", "total", "count", None, None, None, None),
    (7, "objectPresentCount", "number", "total", "count", None, None, None, None),
    (8, "objectPresent", "state", "state", "state", None, None, None, None),
    (9, "waterPresent", "state", "state", "state", None, None, None, None),
    (10, "motion", "state", "state", "state", None, None, None, None),
    (11, "deskOccupancy", "state", "state", "state", None, None, None, None),
    (12, "contact", "state", "state", "state", None, None, None, None),
    (13, "probeWireStatus", "state", "state", "state", None, None, None, None),
    (14, "networkStatus", "number", "signalStrength", "signalStrength", "%", "rssi", "rssi", "dBm"),
    (15, "cellularStatus", "number", "signalStrength", "signalStrength", "%", None, None, None),
    (16, "batteryStatus", "number", "percentage", "battery", "%", None, None, None),
    (17, "connectionStatus", "state", "connection", "connection", None, None, None, None),
)
KIND_OF = {kind[1]: kind for kind in KINDS}

# Columns in this order so a row pads nothing: a temperature sample is a 72-byte tuple, a heartbeat 80.
PROPOSED = """
CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
CREATE TABLE dt_events (
    event_id    text NOT NULL,
    device_id   text,
    event_type  text,
    source      dt_events_source NOT NULL DEFAULT 'connector',
    event_time  timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL,
    PRIMARY KEY (event_id, event_time)
) PARTITION BY RANGE (event_time);
CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time);
CREATE INDEX dt_events_time ON dt_events (event_time);
CREATE TABLE dt_events_default PARTITION OF dt_events DEFAULT;

CREATE TABLE dt_devices (
    device    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id text NOT NULL UNIQUE
);
CREATE TABLE dt_reading_kinds (
    kind smallint PRIMARY KEY, event_type text NOT NULL UNIQUE, shape text NOT NULL,
    field text, name text NOT NULL, unit text, field2 text, name2 text, unit2 text
);
CREATE TABLE dt_samples (
    time     timestamptz NOT NULL,
    value    double precision,
    value2   double precision,
    device   integer NOT NULL,
    kind     smallint NOT NULL,
    state    text,
    event_id text NOT NULL
) PARTITION BY RANGE (time);
CREATE INDEX dt_samples_device_time ON dt_samples (device, time);
CREATE INDEX dt_samples_time ON dt_samples USING brin (time);
CREATE TABLE dt_samples_default PARTITION OF dt_samples DEFAULT;

-- The second number of a sample (humidity's relativeHumidity, a heartbeat's rssi) is a branch of its own, so
-- that a filter on name drops a branch or joins few kinds, rather than unnesting every row.
CREATE VIEW dt_readings AS
SELECT s.event_id, d.device_id, k.event_type, s.time, k.name, s.value, s.state, k.unit
FROM dt_samples AS s
JOIN dt_devices AS d ON d.device = s.device
JOIN dt_reading_kinds AS k ON k.kind = s.kind
WHERE s.value IS NOT NULL OR s.state IS NOT NULL
UNION ALL
SELECT s.event_id, d.device_id, k.event_type, s.time, k.name2, s.value2, NULL, k.unit2
FROM dt_samples AS s
JOIN dt_devices AS d ON d.device = s.device
JOIN dt_reading_kinds AS k ON k.kind = s.kind
WHERE s.value2 IS NOT NULL;
""" + r"""
CREATE FUNCTION dt_reading_time(given text, otherwise timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF given IS NULL THEN
        RETURN otherwise;
    END IF;
    IF given NOT LIKE '____-__-__T__:__:__%' OR NOT (given LIKE '%Z' OR given LIKE '%+__:__' OR given LIKE '%-__:__')
    THEN
        RETURN NULL;
    END IF;
    RETURN given::timestamptz;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END $$;

CREATE FUNCTION dt_reading_number(field jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(field) = 'number' AND abs(field::numeric) < 1e308
                     AND (field::numeric = 0 OR abs(field::numeric) > 1e-307)
                THEN field::double precision END
$$;

-- The sample rows of one stored body, as the Python parse makes them at ingest: for filling in behind.
CREATE FUNCTION dt_sample_rows(body text, type text, at timestamptz)
RETURNS TABLE (sample_time timestamptz, sample_value double precision, sample_value2 double precision,
               sample_kind smallint, sample_state text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k dt_reading_kinds;
    data jsonb;
BEGIN
    SELECT * INTO k FROM dt_reading_kinds AS r WHERE r.event_type = type;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    BEGIN
        data := body::jsonb -> 'event' -> 'data' -> type;
    EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
        RETURN;
    END;
    IF jsonb_typeof(data) IS DISTINCT FROM 'object' THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT * FROM (
        SELECT t.time, CASE k.shape WHEN 'number' THEN dt_reading_number(s.sample -> k.field) WHEN 'event' THEN 1 END,
               dt_reading_number(s.sample -> k.field2), k.kind,
               CASE WHEN k.shape = 'state' AND jsonb_typeof(s.sample -> k.field) = 'string'
                    THEN s.sample ->> k.field END
        FROM jsonb_array_elements(CASE WHEN jsonb_typeof(data -> 'samples') = 'array' AND data -> 'samples' <> '[]'
                                       THEN data -> 'samples' ELSE jsonb_build_array(data) END) AS s (sample)
        CROSS JOIN LATERAL dt_reading_time(coalesce(s.sample ->> 'sampleTime', data ->> 'updateTime'), at) AS t (time)
        WHERE jsonb_typeof(s.sample) = 'object' AND t.time IS NOT NULL
    ) AS r (time, value, value2, kind, state)
    WHERE r.value IS NOT NULL OR r.value2 IS NOT NULL OR r.state IS NOT NULL;
END $$;
"""  # noqa: S608 (constant text only)

SAMPLE_COLUMNS = "time, value, value2, device, kind, state, event_id"
NEW_EVENTS = """
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
    ON CONFLICT (event_id, event_time) DO NOTHING
"""
INSERT_EVENTS = f"WITH new AS ({NEW_EVENTS} RETURNING event_id) SELECT event_id FROM new"  # noqa: S608
# One statement, one commit: the batch's events, and the readings (parsed in Python) of those that were new.
INSERT_WITH_READINGS = f"""
WITH new AS ({NEW_EVENTS} RETURNING event_id
), readings AS (
    INSERT INTO dt_samples ({SAMPLE_COLUMNS})
    SELECT time::timestamptz, value, value2, device, kind, state, event_id
    FROM unnest(%b::text[], %b::float8[], %b::float8[], %b::int4[], %b::int2[], %b::text[], %b::text[])
         AS r ({SAMPLE_COLUMNS})
    WHERE event_id IN (SELECT event_id FROM new)
)
SELECT event_id FROM new
"""  # noqa: S608 (constant text only)
# The alternative: the same statement parsing the new bodies in SQL.
INSERT_WITH_SQL_READINGS = f"""
WITH new AS ({NEW_EVENTS} RETURNING event_id, device_id, event_type, event_time, event
), readings AS (
    INSERT INTO dt_samples ({SAMPLE_COLUMNS})
    SELECT r.sample_time, r.sample_value, r.sample_value2, d.device, r.sample_kind, r.sample_state, new.event_id
    FROM new JOIN dt_devices AS d USING (device_id)
    CROSS JOIN LATERAL dt_sample_rows(new.event, new.event_type, new.event_time) AS r
)
SELECT event_id FROM new
"""  # noqa: S608 (constant text only)
# Filling in behind (the upgrade): the readings of stored events in a window of event_time.
READINGS_FROM_BODIES = f"""
INSERT INTO dt_samples ({SAMPLE_COLUMNS})
SELECT r.sample_time, r.sample_value, r.sample_value2, d.device, r.sample_kind, r.sample_state, e.event_id
FROM dt_events AS e JOIN dt_devices AS d USING (device_id)
CROSS JOIN LATERAL dt_sample_rows(e.event, e.event_type, e.event_time) AS r
WHERE e.event_time >= %(since)s AND e.event_time < %(until)s
  AND e.event_type IN (SELECT event_type FROM dt_reading_kinds)
ORDER BY r.sample_time
"""  # noqa: S608 (constant text only)
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def create_kinds(connection: psycopg.Connection) -> None:
    """Fill the lookup table of the types with readings."""
    with connection.cursor() as cursor:
        cursor.executemany("INSERT INTO dt_reading_kinds VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", KINDS)


def create_partitions(connection: psycopg.Connection, first: date, last: date) -> None:
    """Create a partition of events for each day and one of samples for each month from first to last."""
    day = first
    while day <= last:
        create_partition(connection, "dt_events", f"p{day:%Y%m%d}", day, day + timedelta(days=1))
        day += timedelta(days=1)
    month = first.replace(day=1)
    while month <= last:
        following = (month + timedelta(days=32)).replace(day=1)
        create_partition(connection, "dt_samples", f"p{month:%Y%m}", month, following)
        month = following


def create_partition(connection: psycopg.Connection, table: str, suffix: str, since: date, until: date) -> None:
    """Create one partition, in UTC days, unless it exists."""
    statement = sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(f"{table}_{suffix}"), sql.Identifier(table),
        sql.Literal(f"{since.isoformat()} 00:00+00"), sql.Literal(f"{until.isoformat()} 00:00+00"))
    connection.execute(statement)


def daily_partitions(connection: psycopg.Connection) -> list[tuple[str, date]]:
    """Return the daily partitions of dt_events with their days, oldest first."""
    rows = connection.execute("""
        SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'dt_events'::regclass AND c.relname ~ '^dt_events_p[0-9]{8}$' ORDER BY c.relname
    """).fetchall()
    return [(name, datetime.strptime(name[-8:], "%Y%m%d").date()) for (name,) in rows]


def drop_partitions_before(connection: psycopg.Connection, before: datetime) -> tuple[int, list[float]]:
    """Drop each daily partition of events wholly older than a time; return their bytes and each drop's seconds."""
    freed, seconds = 0, []
    for name, day in daily_partitions(connection):
        if datetime.combine(day + timedelta(days=1), datetime.min.time(), before.tzinfo) > before:
            break
        freed += connection.execute("SELECT pg_total_relation_size(%s)", (name,)).fetchone()[0]
        started = time.perf_counter()
        with connection.transaction():
            connection.execute("SET LOCAL lock_timeout = '500ms'")  # a delivery waits at most this, then it retries
            connection.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        seconds.append(time.perf_counter() - started)
    return freed, seconds


def readings_of(body: dict, device: int) -> list[tuple]:
    """Return the sample rows of a parsed body: (time, value, value2, device, kind, state, event_id) each."""
    event = body.get("event")
    kind = KIND_OF.get(event.get("eventType"))
    data = (event.get("data") or {}).get(kind[1]) if kind and isinstance(event.get("data"), dict) else None
    if not isinstance(data, dict):
        return []
    number, shape, field, field2 = kind[0], kind[2], kind[3], kind[6]
    samples = data.get("samples")
    samples = samples if isinstance(samples, list) and samples else [data]
    rows = []
    for sample in samples:
        if not isinstance(sample, dict):
            continue
        at = sample.get("sampleTime") or data.get("updateTime") or event.get("timestamp")
        if not isinstance(at, str) or not RFC3339.fullmatch(at):
            continue
        value = 1.0 if shape == "event" else as_number(sample.get(field)) if shape == "number" else None
        value2 = as_number(sample.get(field2)) if field2 else None
        state = sample.get(field) if shape == "state" and isinstance(sample.get(field), str) else None
        if value is not None or value2 is not None or state is not None:
            rows.append((at, value, value2, device, number, state, event["eventId"]))
    return rows


def as_number(field) -> float | None:
    """Return a JSON number as a float, exactly as Python read it; None for anything else or beyond float."""
    if isinstance(field, bool) or not isinstance(field, int | float):
        return None
    try:
        number = float(field)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
