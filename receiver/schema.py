"""Create and migrate the events table and its readings view: once per process, outside any delivery, in steps."""

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import psycopg
from psycopg.rows import tuple_row

from .errors import ConfigError
from .partitions import ensure_partitions
from .readings import KINDS
from .upgrade import SAMPLE_ROWS_FUNCTIONS, is_partitioned, prepare_switch, switch

# dt_readings of schemas 3 and 4 (step 2 -> 3): one row per measured quantity per sample, read from the stored
# bodies. Only types with readings are parsed (the filter on event_type is on dt_events' own scan, before any
# parse), each body once (fields are joined to what dt_event_samples returned, so the planner cannot join them
# first and parse a body once per field), and a body or value it cannot read gives no row, never an error.
# The functions are not PARALLEL SAFE: an exception block is a subtransaction, which parallel mode forbids.
READINGS_VIEW = r"""
CREATE OR REPLACE FUNCTION dt_reading_time(given text, otherwise timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF given IS NULL THEN
        RETURN otherwise;
    END IF;
    -- RFC 3339 with its zone: PostgreSQL would also take 'now', 'epoch' or a time in the session's zone
    IF given NOT LIKE '____-__-__T__:__:__%' OR NOT (given LIKE '%Z' OR given LIKE '%+__:__' OR given LIKE '%-__:__')
    THEN
        RETURN NULL;
    END IF;
    RETURN given::timestamptz;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END $$;

-- Each sample of data[event_type] (temperature and humidity carry `samples`), or data[event_type] itself,
-- with its time: the sample's, else data's updateTime, else the row's event_time. No rows for a body jsonb
-- refuses (not JSON, \u0000, a lone surrogate, a number beyond numeric) or data that is not an object.
CREATE OR REPLACE FUNCTION dt_event_samples(body text, event_type text, event_time timestamptz)
RETURNS TABLE (data_type text, sample jsonb, sample_time timestamptz)
LANGUAGE plpgsql STABLE COST 1000 ROWS 2 AS $$
DECLARE
    data jsonb;
BEGIN
    BEGIN
        data := body::jsonb -> 'event' -> 'data' -> event_type;
    EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
        RETURN;
    END;
    IF jsonb_typeof(data) IS DISTINCT FROM 'object' THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT event_type, s.sample, t.time
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(data -> 'samples') = 'array' AND data -> 'samples' <> '[]'
                                   THEN data -> 'samples' ELSE jsonb_build_array(data) END) AS s (sample)
    CROSS JOIN LATERAL dt_reading_time(coalesce(s.sample ->> 'sampleTime', data ->> 'updateTime'), event_time)
        AS t (time)
    WHERE jsonb_typeof(s.sample) = 'object' AND t.time IS NOT NULL;
END $$;

-- A JSON number as double precision; NULL for anything else, and for one beyond double precision's range.
CREATE OR REPLACE FUNCTION dt_reading_number(field jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(field) = 'number' AND abs(field::numeric) < 1e308
                     AND (field::numeric = 0 OR abs(field::numeric) > 1e-307)
                THEN field::double precision END
$$;

-- What each type's data holds: a number (value), a state (state), or the event itself (a touch: value 1).
CREATE OR REPLACE FUNCTION dt_reading_fields()
RETURNS TABLE (event_type text, field text, name text, unit text, kind text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ VALUES
    ('temperature', 'value', 'temperature', '°C', 'number'),
    ('humidity', 'temperature', 'temperature', '°C', 'number'),
    ('humidity', 'relativeHumidity', 'relativeHumidity', '%', 'number'),
    ('co2', 'ppm', 'co2', 'ppm', 'number'),
    ('pressure', 'pascal', 'pressure', 'Pa', 'number'),
    ('touch', NULL, 'touch', NULL, 'event'),
    ('touchCount', 'total', 'count', NULL, 'number'),
    ('objectPresentCount', 'total', 'count', NULL, 'number'),
    ('objectPresent', 'state', 'state', NULL, 'state'),
    ('waterPresent', 'state', 'state', NULL, 'state'),
    ('motion', 'state', 'state', NULL, 'state'),
    ('deskOccupancy', 'state', 'state', NULL, 'state'),
    ('contact', 'state', 'state', NULL, 'state'),
    ('probeWireStatus', 'state', 'state', NULL, 'state'),
    ('networkStatus', 'signalStrength', 'signalStrength', '%', 'number'),
    ('networkStatus', 'rssi', 'rssi', 'dBm', 'number'),
    ('cellularStatus', 'signalStrength', 'signalStrength', '%', 'number'),
    ('batteryStatus', 'percentage', 'battery', '%', 'number'),
    ('connectionStatus', 'connection', 'connection', NULL, 'state')
$$;

-- A function rather than a WITH list, so that the view stays one flat query the planner can order by
-- dt_events' indexes (a view with WITH is planned apart, and sorts what it returns).
CREATE OR REPLACE VIEW dt_readings AS
SELECT * FROM (
    SELECT e.event_id, e.device_id, e.event_type, e.event_time, s.sample_time AS time, f.name,
           CASE f.kind WHEN 'number' THEN dt_reading_number(s.sample -> f.field) WHEN 'event' THEN 1 END AS value,
           CASE WHEN f.kind = 'state' AND jsonb_typeof(s.sample -> f.field) = 'string'
                THEN s.sample ->> f.field END AS state,
           f.unit
    FROM dt_events AS e
    CROSS JOIN LATERAL dt_event_samples(e.event, e.event_type, e.event_time) AS s
    JOIN dt_reading_fields() AS f ON f.event_type = s.data_type
    WHERE e.event_type = ANY (ARRAY(SELECT event_type FROM dt_reading_fields()))
) AS readings
WHERE value IS NOT NULL OR state IS NOT NULL;

COMMENT ON VIEW dt_readings IS
    'One row per measured quantity per sample of the stored DT events; filter on event_time to use an index';
"""

# When the Data Connector last pushed a new event, for /health and `status`: one row, written by the inserts of
# pushed events (receiver/store.py), so that it is read at once however many backfilled rows are newer. An index
# of pushed rows would do as well, for about 22 bytes an event; this costs none (tests/benchmark/last_arrival.py).
# Created, or caught up after an older release wrote events without it, from the newest pushed row.
LAST_ARRIVAL_TABLE = """
CREATE TABLE IF NOT EXISTS dt_last_arrival (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    received_at timestamptz
);
INSERT INTO dt_last_arrival (received_at)
SELECT (SELECT received_at FROM dt_events WHERE source = 'connector' AND event_time <= now() + interval '5 minutes'
        ORDER BY event_time DESC LIMIT 1)
ON CONFLICT (one) DO UPDATE SET received_at = greatest(dt_last_arrival.received_at, excluded.received_at);
"""

# Version 5 (issue 25): the raw events in daily partitions of event_time, so that retention drops whole days and
# the database shrinks by what they held; unique on (event_id, event_time), since a partitioned table's keys must
# hold its partition key (a redelivery, a race, a backfill or a Synchronize carries the same timestamp, so the same
# partition). Partitions are named dt_events_pYYYYMMDD (UTC days); a row no partition holds goes to the DEFAULT one.
PARTITIONED_EVENTS = """
DO $$ BEGIN
    IF to_regtype('dt_events_source') IS NULL THEN
        CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS dt_events (
    event_id    text NOT NULL,
    device_id   text,
    event_type  text,
    source      dt_events_source NOT NULL DEFAULT 'connector',
    event_time  timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL,
    CONSTRAINT dt_events_pkey PRIMARY KEY (event_id, event_time)
) PARTITION BY RANGE (event_time);
CREATE INDEX IF NOT EXISTS dt_events_device_time ON dt_events (device_id, event_time);
CREATE INDEX IF NOT EXISTS dt_events_time ON dt_events (event_time);
CREATE TABLE IF NOT EXISTS dt_events_default PARTITION OF dt_events DEFAULT;
"""


def constant(part: str | int | None) -> str:
    """Return a kind's field as an SQL constant."""
    return "NULL" if part is None else str(part) if isinstance(part, int) else f"'{part}'"


def second_numbers() -> str:
    """Return the types with a second number as a UNION ALL of constant rows (kind, event_type, name, unit)."""
    return "\n    UNION ALL ".join(
        f"SELECT {kind.number}::smallint, {constant(kind.event_type)}::text, {constant(kind.name2)}::text, "
        f"{constant(kind.unit2)}::text" for kind in KINDS if kind.field2)


# The readings, typed at ingest (receiver/readings.py) in the same statement as their event: one narrow row per
# sample, a small number per device and per type, monthly partitions of the sample's time (dt_samples_pYYYYMM).
# A sample's second number (humidity's relativeHumidity, networkStatus's rssi) is in value2.
SAMPLE_TABLES = """
CREATE TABLE IF NOT EXISTS dt_devices (
    device    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id text NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS dt_reading_kinds (
    kind smallint PRIMARY KEY, event_type text NOT NULL UNIQUE, shape text NOT NULL,
    field text, name text NOT NULL, unit text, field2 text, name2 text, unit2 text
);
INSERT INTO dt_reading_kinds VALUES """ + ",\n    ".join(
    "(" + ", ".join(constant(part) for part in kind) + ")" for kind in KINDS) + """
ON CONFLICT (kind) DO NOTHING;
-- Columns in this order so a row pads nothing.
CREATE TABLE IF NOT EXISTS dt_samples (
    time     timestamptz NOT NULL,
    value    double precision,
    value2   double precision,
    device   integer NOT NULL,
    kind     smallint NOT NULL,
    state    text,
    event_id text NOT NULL
) PARTITION BY RANGE (time);
CREATE INDEX IF NOT EXISTS dt_samples_device_time ON dt_samples (device, time);
CREATE INDEX IF NOT EXISTS dt_samples_time ON dt_samples USING brin (time);
CREATE TABLE IF NOT EXISTS dt_samples_default PARTITION OF dt_samples DEFAULT;
DROP FUNCTION IF EXISTS dt_event_samples(text, text, timestamptz);
DROP FUNCTION IF EXISTS dt_reading_fields();
"""
# Release 2-4's view (whose columns differ) is dropped; the typed one is replaced in place, so that the grants a
# dashboard's credential was given on it stay.
TYPED_READINGS_VIEW = """
DO $$ BEGIN
    IF EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()
               AND table_name = 'dt_readings' AND column_name = 'event_time') THEN
        DROP VIEW dt_readings;
    END IF;
END $$;
-- dt_readings keeps its columns; a filter on time, device_id or name reaches dt_samples' indexes and reads no
-- body. The second number is a branch of its own, whose names are constants rather than dt_reading_kinds' name2:
-- a filter on a name or a type none of them has (a chart of temperatures) then drops the branch as the query is
-- planned. Costed as a second walk over the same samples, it would lead the planner to start parallel workers
-- for one sensor's chart, which cost more than the chart itself.
CREATE OR REPLACE VIEW dt_readings AS
SELECT s.event_id, d.device_id, k.event_type, s.time, k.name, s.value, s.state, k.unit
FROM dt_samples AS s
JOIN dt_devices AS d ON d.device = s.device
JOIN dt_reading_kinds AS k ON k.kind = s.kind
WHERE s.value IS NOT NULL OR s.state IS NOT NULL
UNION ALL
SELECT s.event_id, d.device_id, k.event_type, s.time, k.name, s.value2, NULL, k.unit
FROM dt_samples AS s
JOIN dt_devices AS d ON d.device = s.device
JOIN (""" + second_numbers() + """) AS k (kind, event_type, name, unit) ON k.kind = s.kind
WHERE s.value2 IS NOT NULL;
COMMENT ON VIEW dt_readings IS
    'One row per measured quantity per sample of the stored DT events; filter on time to use an index';
"""

SAMPLES = SAMPLE_TABLES + TYPED_READINGS_VIEW

# A new database gets the latest schema at once, and so does a partitioned one whose version is older (every part
# of it runs again without harm); an upgrade that replaces the view must change this too.
LATEST = PARTITIONED_EVENTS + SAMPLES + SAMPLE_ROWS_FUNCTIONS + LAST_ARRIVAL_TABLE


class Step(NamedTuple):
    """One upgrade, from the version before it to the next, and whether releases before it may still write after it.

    `sql` may be a function of the connection; `before`, if any, runs first, outside any transaction (an index
    built CONCURRENTLY), and must itself be harmless to run again."""

    sql: str | Callable[[psycopg.Connection], None]
    only_adds: bool  # True for a view, an index or a column with a default: an older release's inserts still work
    before: Callable[[psycopg.Connection], None] | None = None


# An existing database runs the steps after its version in one transaction that records it. Add a version by
# appending a step (and changing LATEST to match). Every step must be harmless to run again (IF NOT EXISTS,
# CREATE OR REPLACE, a DO block that checks first): an older release may write its lower version over a newer
# one, and a table restored without dt_schema is only known by its shape. A step that alters a column
# dt_readings reads must drop the view first and create it again.
UPGRADES = (
    # 1 -> 2: from the table as first released: the body as received, in text (smaller than jsonb, and it
    # holds what jsonb refuses); where each row came from; a time on every row; no columns the body
    # already holds; ascending indexes, which serve ORDER BY event_time DESC (DESC NULLS LAST ones did not).
    Step("""
    DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()
                       AND table_name = 'dt_events' AND column_name = 'source') THEN
            IF to_regtype('dt_events_source') IS NULL THEN
                CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
            END IF;
            UPDATE dt_events SET event_time = received_at WHERE event_time IS NULL;
            DROP INDEX IF EXISTS dt_events_device_type_time, dt_events_device_time, dt_events_time;
            ALTER TABLE dt_events
                ALTER COLUMN event TYPE text USING event::text,
                ALTER COLUMN event_time SET NOT NULL,
                DROP COLUMN IF EXISTS labels,
                DROP COLUMN IF EXISTS project_id,
                ADD COLUMN source dt_events_source NOT NULL DEFAULT 'connector';
            CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time);
            CREATE INDEX dt_events_time ON dt_events (event_time);
        END IF;
    END $$;
    """, only_adds=False),
    # 2 -> 3: the readings view (above); version 5 has its own, which an older table restored under it keeps.
    Step(lambda connection: None if table_exists(connection, "dt_samples") else connection.execute(READINGS_VIEW),
         only_adds=True),
    # 3 -> 4: the last arrival's row (above).
    Step(LAST_ARRIVAL_TABLE, only_adds=True),
    # 4 -> 5: the partitioned events and the typed readings (receiver/upgrade.py), deliveries flowing throughout.
    # Release 4's inserts name ON CONFLICT (event_id), which no unique index of the partitioned table matches.
    Step(lambda connection: switch_to_partitions(connection), only_adds=False, before=prepare_switch),
    # 5 -> 6: the view's second numbers named by constants (above), so that a chart of one name walks dt_samples once.
    Step(TYPED_READINGS_VIEW, only_adds=True),
)

VERSION = len(UPGRADES) + 1
PARTITIONED_FROM = 5  # the first version whose dt_events is partitioned


def oldest_writer(steps: tuple[Step, ...]) -> int:
    """Return the oldest release version that may still write to the schema these steps make."""
    version = len(steps) + 1
    while version > 1 and steps[version - 2].only_adds:
        version -= 1
    return version


# What dt_schema records beside the version: releases from this one on may write to the table (and work with it).
COMPATIBLE_FROM = oldest_writer(UPGRADES)

# A deploy's migration waits this long for a table lock, then tries again later: deliveries keep flowing.
LOCK_TIMEOUT = "2s"
# A process that finds another building the upgrade's index looks again this often, for at most this long.
UPGRADE_POLL_SECONDS = 0.5
UPGRADE_WAIT_SECONDS = 600


class NewerSchemaError(ConfigError):
    """The database's schema is newer than this release's, and this release may not write to it."""

    def __init__(self, found: int):
        super().__init__(f"the database's schema is version {found}, newer than this release's {VERSION}: "
                         "deploy the newer release")


def schema_version(connection: psycopg.Connection) -> int:
    """Return the table's version: 0 for a new database; recorded in dt_schema, else told by the table's columns."""
    return recorded(connection)[0]


def recorded(connection: psycopg.Connection) -> tuple[int, int]:
    """Return the table's version and the oldest release version that may write to it."""
    if not table_exists(connection, "dt_events"):
        return 0, 0
    if table_exists(connection, "dt_schema"):
        # to_jsonb: a dt_schema an older release made has no compatible_from column; NULL reads as the version.
        row = connection.cursor(row_factory=tuple_row).execute(
            "SELECT version, coalesce((to_jsonb(dt_schema) ->> 'compatible_from')::integer, version) FROM dt_schema "
            "ORDER BY version DESC LIMIT 1").fetchone()
        # A table restored from an older release's dump under a dt_schema of 5 or later is known by its shape.
        if row and (row[0] < PARTITIONED_FROM or is_partitioned(connection)):
            return row
    return (shape_version(connection),) * 2


def shape_version(connection: psycopg.Connection) -> int:
    """Return the version an existing table's shape tells: a partitioned one is version 5's (or later: LATEST runs
    again); an unpartitioned one without `source` is the first release's. The steps from 2 to 4 leave the columns
    as they are, and run again without harm (a table restored by pg_dump -t dt_events)."""
    if is_partitioned(connection):
        return PARTITIONED_FROM
    has_source = scalar(connection, "SELECT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = "
                                    "current_schema() AND table_name = 'dt_events' AND column_name = 'source')")
    return 2 if has_source else 1


def usable_version(connection: psycopg.Connection) -> int:
    """Return the table's version; raise NewerSchemaError if it is newer and this release may not write to it."""
    version, compatible_from = recorded(connection)
    if version > VERSION and compatible_from > VERSION:
        raise NewerSchemaError(version)
    return version


def migrate(connection: psycopg.Connection, again: bool = False, wait: bool = True) -> int:
    """Bring the table up to this release's version, waiting briefly for locks; return the version it is at.

    A newer schema is left as it is: worked with if it lets this release write, else NewerSchemaError.
    `again`: run the steps after the version the shape tells, whatever dt_schema says, since a part the
    schema made (the view, dt_last_arrival) was found missing. `wait`: if another process is running the steps'
    long parts (outside a transaction), wait for it; if not, return the version as it is, lower than this one's."""
    if (version := usable_version(connection)) > VERSION or (version == VERSION and not again):
        return version  # the usual case: no lock taken
    if 0 < version < VERSION and not run_before_steps(connection, UPGRADES[version - 1:], wait):
        return version
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        connection.execute("SET LOCAL statement_timeout = 0")  # a rewrite of a large table may take a while
        # Workers and dynos start together; one migrates, the others then find nothing to do.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dt_events schema'))")
        if (version := usable_version(connection)) > VERSION or (version == VERSION and not again):
            return version
        if version > 0 and (again or is_partitioned(connection)):
            version = shape_version(connection)  # a partitioned table lowered by an older release: LATEST again
        if 0 < version < PARTITIONED_FROM:
            # The switch's lock, taken before any step writes dt_last_arrival's row: a delivery that has inserted
            # into dt_events and then notes its arrival would otherwise wait on this transaction, and it on them.
            connection.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")
        for step in [LATEST] if version == 0 or version >= PARTITIONED_FROM else [
                step.sql for step in UPGRADES[version - 1:]]:
            step(connection) if callable(step) else connection.execute(step)
        ensure_partitions(connection, datetime.now(UTC).date())
        record_version(connection)
    return VERSION


def run_before_steps(connection: psycopg.Connection, steps: tuple[Step, ...], wait: bool) -> bool:
    """Run the steps' parts that go outside any transaction, one process at a time; return False if another
    process is running them and `wait` is False."""
    if not any(step.before for step in steps):
        return True
    # Tried, never waited for inside a statement: CREATE INDEX CONCURRENTLY waits for every statement running
    # when it starts, so one waiting for this lock would deadlock with it.
    give_up_at = time.monotonic() + (UPGRADE_WAIT_SECONDS if wait else 0)
    while not scalar(connection, "SELECT pg_try_advisory_lock(hashtext('dt_events upgrade'))"):
        if time.monotonic() >= give_up_at:
            return False
        time.sleep(UPGRADE_POLL_SECONDS)
    autocommit = connection.autocommit
    try:
        connection.commit()
        connection.autocommit = True
        for step in steps:
            if step.before:
                step.before(connection)
    finally:
        connection.execute("SELECT pg_advisory_unlock(hashtext('dt_events upgrade'))")
        connection.autocommit = autocommit
    return True


def may_store_before_switch(connection: psycopg.Connection) -> bool:
    """Tell whether deliveries may be stored in the unpartitioned table while the upgrade to partitions builds its
    index (a table of version 3 or 4); a version-3 table first gets the last arrival's row, which they note."""
    if not 3 <= usable_version(connection) < PARTITIONED_FROM:
        return False
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Workers start together, and two CREATE TABLE IF NOT EXISTS at once may both try to create it.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dt_last_arrival'))")
        connection.execute(LAST_ARRIVAL_TABLE)
    return True


def switch_to_partitions(connection: psycopg.Connection) -> None:
    """The 4 -> 5 step's transaction: the old table attached to a partitioned dt_events, the readings' tables."""
    switch(connection, PARTITIONED_EVENTS)
    connection.execute(SAMPLES)
    connection.execute(SAMPLE_ROWS_FUNCTIONS)
    connection.execute(LAST_ARRIVAL_TABLE)


def record_version(connection: psycopg.Connection) -> None:
    """Record this release's version, and the oldest release that may write to it, in dt_schema's one row."""
    connection.execute("CREATE TABLE IF NOT EXISTS dt_schema (version integer NOT NULL)")
    # Nullable: an older release, which knows nothing of it, inserts its version alone.
    connection.execute("ALTER TABLE dt_schema ADD COLUMN IF NOT EXISTS compatible_from integer")
    connection.execute("DELETE FROM dt_schema")
    connection.execute("INSERT INTO dt_schema (version, compatible_from) VALUES (%s, %s)", (VERSION, COMPATIBLE_FROM))


def table_exists(connection: psycopg.Connection, name: str) -> bool:
    """Tell whether a table exists now (to_regclass may answer from a cache older than the lock just taken)."""
    query = "SELECT EXISTS (SELECT FROM pg_tables WHERE schemaname = current_schema() AND tablename = %s)"
    return scalar(connection, query, (name,))


def scalar(connection: psycopg.Connection, query: str, params: tuple = ()):
    """Return the one value a query finds, whatever rows the connection makes."""
    return connection.cursor(row_factory=tuple_row).execute(query, params).fetchone()[0]
