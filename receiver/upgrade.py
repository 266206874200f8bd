"""The live upgrade of an events table of schema 3 or 4 to the partitioned layout, and its readings filled in behind.

Deliveries keep being stored throughout: the unique index is built CONCURRENTLY and the range CHECK validated
without blocking inserts (prepare_switch, outside any transaction), then one short transaction under the
migration's lock_timeout renames the table and attaches it to the new partitioned dt_events as the partition of
every time before a cutoff (switch); the readings of the rows stored before the switch are filled in afterwards,
newest first, an hour of event_time per transaction (fill_one_window), with progress in dt_readings_fill.
"""

from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from .partitions import ensure_sample_months

# The readings of one stored body, by the same rules as receiver/readings.py: for filling in behind (and for
# rows written by other tools: `INSERT INTO dt_samples SELECT ... FROM dt_events, dt_sample_rows(...)`).
SAMPLE_ROWS_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION dt_reading_time(given text, otherwise timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF given IS NULL THEN
        RETURN otherwise;
    END IF;
    IF given !~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$' THEN
        RETURN NULL;
    END IF;
    RETURN given::timestamptz;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION dt_reading_number(field jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(field) = 'number' AND abs(field::numeric) < 1e308
                     AND (field::numeric = 0 OR abs(field::numeric) > 1e-307)
                THEN field::double precision END
$$;

CREATE OR REPLACE FUNCTION dt_sample_rows(body text, type text, at timestamptz)
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
"""

FILL_TABLE = """
CREATE TABLE IF NOT EXISTS dt_readings_fill (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    switched_at timestamptz NOT NULL,  -- rows received before it have no readings yet
    reached     timestamptz NOT NULL,  -- every legacy row from here on has its readings
    events      bigint NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false
);
"""

# One window of legacy rows (an hour of event_time, ending where the last one began): their devices first, then
# their readings and the progress in one transaction, so that a window is filled exactly once whatever stops it.
FILL_DEVICES = """
INSERT INTO dt_devices (device_id)
SELECT DISTINCT device_id FROM dt_events_legacy
WHERE event_time >= %(since)s AND event_time < %(until)s AND received_at < %(switched_at)s AND device_id IS NOT NULL
ON CONFLICT (device_id) DO NOTHING
"""
FILL_SAMPLES = """
WITH filled AS (
    INSERT INTO dt_samples (time, value, value2, device, kind, state, event_id)
    SELECT r.sample_time, r.sample_value, r.sample_value2, d.device, r.sample_kind, r.sample_state, e.event_id
    FROM dt_events_legacy AS e JOIN dt_devices AS d USING (device_id)
    CROSS JOIN LATERAL dt_sample_rows(e.event, e.event_type, e.event_time) AS r
    WHERE e.event_time >= %(since)s AND e.event_time < %(until)s AND e.received_at < %(switched_at)s
      AND e.event_type IN (SELECT event_type FROM dt_reading_kinds)
    RETURNING event_id
)
SELECT count(DISTINCT event_id) FROM filled
"""
FILL_WINDOW_SECONDS = 3600
FILL_STATEMENT_TIMEOUT = "5min"


def is_partitioned(connection: psycopg.Connection) -> bool:
    """Tell whether dt_events is the partitioned table of schema 5 (a table restored without dt_schema is known
    by this)."""
    return one(connection, "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('dt_events')),"
                           " false)")


def prepare_switch(connection: psycopg.Connection) -> None:
    """Build what the switch needs without blocking inserts: a unique index on (event_id, event_time), built
    CONCURRENTLY (an invalid one an interrupted build left is dropped and built again), and a CHECK that every
    row is before a cutoff, added NOT VALID and then validated. Needs an autocommit connection."""
    if is_partitioned(connection):
        return
    connection.execute("SET statement_timeout = 0")
    try:
        valid = one(connection, "SELECT (SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                "to_regclass('dt_events_id_time'))")
        if valid is False:
            connection.execute("DROP INDEX CONCURRENTLY IF EXISTS dt_events_id_time")
        if not valid:
            connection.execute("CREATE UNIQUE INDEX CONCURRENTLY dt_events_id_time ON dt_events (event_id, event_time)")
        ensure_cutoff(connection)
    finally:
        connection.execute("RESET statement_timeout")


def ensure_cutoff(connection: psycopg.Connection) -> datetime:
    """Keep a CHECK (event_time < cutoff) on the old table, the cutoff a UTC midnight at least a day ahead (a
    new one if the switch missed the last: an event at or past it would be refused until the switch)."""
    found = cutoff_of(connection, "dt_events")
    if found is not None and found > datetime.now(UTC) + timedelta(hours=1) and constraint_valid(connection, found):
        return found
    cutoff = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=2)
    name = sql.Identifier(f"dt_events_before_{cutoff:%Y%m%d}")
    with connection.transaction():
        connection.execute("SET LOCAL lock_timeout = '2s'")
        if found is not None:
            connection.execute(sql.SQL("ALTER TABLE dt_events DROP CONSTRAINT IF EXISTS {}").format(
                sql.Identifier(f"dt_events_before_{found:%Y%m%d}")))
        connection.execute(sql.SQL("ALTER TABLE dt_events DROP CONSTRAINT IF EXISTS {}").format(name))
        connection.execute(sql.SQL("ALTER TABLE dt_events ADD CONSTRAINT {} CHECK (event_time < {}) NOT VALID").format(
            name, sql.Literal(cutoff)))
    connection.execute(sql.SQL("ALTER TABLE dt_events VALIDATE CONSTRAINT {}").format(name))
    return cutoff


def cutoff_of(connection: psycopg.Connection, table: str) -> datetime | None:
    """Return the cutoff a table's dt_events_before_YYYYMMDD constraint names, if it has one."""
    name = one(connection, "SELECT max(conname) FROM pg_constraint WHERE conrelid = to_regclass(%s) "
                           "AND conname ~ '^dt_events_before_[0-9]{8}$'", (table,))
    return datetime.strptime(name[-8:], "%Y%m%d").replace(tzinfo=UTC) if name else None


def constraint_valid(connection: psycopg.Connection, cutoff: datetime) -> bool:
    """Tell whether the cutoff's constraint has been validated (an interrupted upgrade may have left it not)."""
    return one(connection, "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass('dt_events') "
                           "AND conname = %s", (f"dt_events_before_{cutoff:%Y%m%d}",))


def switch(connection: psycopg.Connection, partitioned_events: str) -> None:
    """In the migration's transaction: the old table becomes dt_events_legacy, the partition of every time before
    the cutoff of a new partitioned dt_events (its CHECK spares the scan, its indexes are matched, not rebuilt).
    Nothing to do if dt_events is partitioned already."""
    if is_partitioned(connection):
        return
    cutoff = cutoff_of(connection, "dt_events")
    if cutoff is None or not constraint_valid(connection, cutoff) or cutoff <= datetime.now(UTC):
        raise psycopg.errors.LockNotAvailable("the upgrade's cutoff is not ready")  # prepare_switch again, then retry
    connection.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")
    switched_at = one(connection, "SELECT clock_timestamp()")
    connection.execute("DROP VIEW IF EXISTS dt_readings")
    connection.execute("ALTER TABLE dt_events RENAME TO dt_events_legacy")
    # The unique index built CONCURRENTLY becomes the old table's primary key (its columns are NOT NULL: no scan),
    # so that attaching matches it to the new table's instead of building one; the one on event_id alone goes.
    connection.execute("ALTER TABLE dt_events_legacy DROP CONSTRAINT IF EXISTS dt_events_pkey")
    connection.execute("ALTER TABLE dt_events_legacy ADD CONSTRAINT dt_events_legacy_pkey PRIMARY KEY "
                       "USING INDEX dt_events_id_time")
    for old, new in (("dt_events_device_time", "dt_events_legacy_device_time"),
                     ("dt_events_time", "dt_events_legacy_time")):
        connection.execute(sql.SQL("ALTER INDEX IF EXISTS {} RENAME TO {}").format(sql.Identifier(old),
                                                                                  sql.Identifier(new)))
    connection.execute(partitioned_events)
    connection.execute(sql.SQL("ALTER TABLE dt_events ATTACH PARTITION dt_events_legacy FOR VALUES FROM (MINVALUE) "
                               "TO ({})").format(sql.Literal(cutoff)))
    connection.execute(FILL_TABLE)
    connection.execute("INSERT INTO dt_readings_fill (switched_at, reached) VALUES (%s, %s) "
                       "ON CONFLICT (one) DO NOTHING", (switched_at, cutoff))


def fill_one_window(connection: psycopg.Connection) -> str:
    """Fill the readings of one window of legacy rows below the progress mark, one process at a time; return
    'filled', 'busy' (another process is filling) or 'done'. Needs an autocommit connection."""
    if one(connection, "SELECT to_regclass('dt_readings_fill') IS NULL"):
        return "done"  # no upgrade
    if one(connection, "SELECT to_regclass('dt_events_legacy') IS NULL"):
        connection.execute("UPDATE dt_readings_fill SET done = true WHERE NOT done")  # retention dropped the old rows
        return "done"
    if not one(connection, "SELECT pg_try_advisory_lock(hashtext('dt_readings fill'))"):
        return "busy"
    try:
        window = next_window(connection)
        if window is None:
            return "done"
        # Each in a commit of its own, before the window's: the devices, since a delivery's first event of one waits
        # for the commit that adds it; the partitions of the readings' months, since the upkeep, moving rows out of
        # DEFAULT into a new one, would fail a window's rows bound for DEFAULT.
        with connection.transaction():
            connection.execute(f"SET LOCAL statement_timeout = '{FILL_STATEMENT_TIMEOUT}'")
            connection.execute(FILL_DEVICES, window)
        ensure_sample_months(connection, window["since"], window["until"])
        with connection.transaction():
            connection.execute(f"SET LOCAL statement_timeout = '{FILL_STATEMENT_TIMEOUT}'")
            events = one(connection, FILL_SAMPLES, window)
            connection.execute("UPDATE dt_readings_fill SET reached = %s, events = events + %s",
                               (window["since"], events))
        return "filled"
    finally:
        connection.execute("SELECT pg_advisory_unlock(hashtext('dt_readings fill'))")


def next_window(connection: psycopg.Connection) -> dict | None:
    """Return the next window of legacy rows to fill (since, until, switched_at); None once every row is filled."""
    row = connection.cursor(row_factory=tuple_row).execute(
        "SELECT switched_at, reached, done FROM dt_readings_fill").fetchone()
    if row is None or row[2]:
        return None
    switched_at, reached, _ = row
    newest = one(connection, "SELECT max(event_time) FROM dt_events_legacy WHERE event_time < %s", (reached,))
    if newest is None:
        connection.execute("UPDATE dt_readings_fill SET done = true")
        return None
    return {"since": newest - timedelta(seconds=FILL_WINDOW_SECONDS), "until": reached, "switched_at": switched_at}


def fill_progress(connection: psycopg.Connection) -> dict | None:
    """Return how far the readings of an upgraded database's older events are filled in: done, the event_time
    reached (the readings of every older row still to come) and the events filled so far; None if no fill."""
    if one(connection, "SELECT to_regclass('dt_readings_fill') IS NULL"):
        return None
    row = connection.cursor(row_factory=tuple_row).execute(
        "SELECT done OR to_regclass('dt_events_legacy') IS NULL, reached, events FROM dt_readings_fill").fetchone()
    if row is None:
        return None
    return {"done": row[0], "reached": row[1], "events": row[2]}


def one(connection: psycopg.Connection, query: str, params: tuple = ()):
    """Return the one value a query finds, whatever rows the connection makes."""
    return connection.cursor(row_factory=tuple_row).execute(query, params).fetchone()[0]
