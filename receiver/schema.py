"""Create and migrate the events table and its readings view: once per process, outside any delivery, in steps."""

import psycopg
from psycopg.rows import tuple_row

# The table as a new database gets it. Columns are in this order so that a typical event fills no
# alignment padding: twelve rows of a 560-byte event fit a page instead of eleven.
EVENTS_TABLE = """
CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
CREATE TABLE dt_events (
    event_id    text PRIMARY KEY,
    device_id   text,
    event_type  text,
    source      dt_events_source NOT NULL DEFAULT 'connector',
    event_time  timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL
);
-- one device over time; all devices over time (events, status, prune)
CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time);
CREATE INDEX dt_events_time ON dt_events (event_time);
"""

# dt_readings: one row per measured quantity per sample, read from the stored bodies, so that charts need no
# JSON paths. Only types with readings are parsed (the filter on event_type is on dt_events' own scan, before
# any parse), each body once (fields are joined to what dt_event_samples returned, so the planner cannot
# join them first and parse a body once per field), and a body or value it cannot read gives no row, never
# an error. Filters on the view's event_id, device_id, event_type and event_time reach dt_events' indexes.
# The functions are not PARALLEL SAFE: an exception block is a subtransaction, which parallel mode forbids.
READINGS_VIEW = r"""
CREATE FUNCTION dt_reading_time(given text, otherwise timestamptz) RETURNS timestamptz
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
CREATE FUNCTION dt_event_samples(body text, event_type text, event_time timestamptz)
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
CREATE FUNCTION dt_reading_number(field jsonb) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(field) = 'number' AND abs(field::numeric) < 1e308
                     AND (field::numeric = 0 OR abs(field::numeric) > 1e-307)
                THEN field::double precision END
$$;

-- What each type's data holds: a number (value), a state (state), or the event itself (a touch: value 1).
CREATE FUNCTION dt_reading_fields() RETURNS TABLE (event_type text, field text, name text, unit text, kind text)
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
CREATE VIEW dt_readings AS
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

# A new database gets the latest schema at once; an upgrade that replaces the view must change this too.
LATEST = EVENTS_TABLE + READINGS_VIEW

# An existing database runs the steps after its version, each once, in one transaction that records it.
# Add a column by appending a step (and changing LATEST to match); never edit a step that has shipped.
# A step that alters a column dt_readings reads must drop the view first and create it again.
UPGRADES = (
    # 1 -> 2: from the table as first released: the body as received, in text (smaller than jsonb, and it
    # holds what jsonb refuses); where each row came from; a time on every row; no columns the body
    # already holds; ascending indexes, which serve ORDER BY event_time DESC (DESC NULLS LAST ones did not).
    """
    CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
    UPDATE dt_events SET event_time = received_at WHERE event_time IS NULL;
    DROP INDEX dt_events_device_type_time, dt_events_device_time, dt_events_time;
    ALTER TABLE dt_events
        ALTER COLUMN event TYPE text USING event::text,
        ALTER COLUMN event_time SET NOT NULL,
        DROP COLUMN labels,
        DROP COLUMN project_id,
        ADD COLUMN source dt_events_source NOT NULL DEFAULT 'connector';
    CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time);
    CREATE INDEX dt_events_time ON dt_events (event_time);
    """,
    # 2 -> 3: the readings view (above).
    READINGS_VIEW,
)
VERSION = len(UPGRADES) + 1

# A deploy's migration waits this long for a table lock, then tries again later: deliveries keep flowing.
LOCK_TIMEOUT = "2s"


def schema_version(connection: psycopg.Connection) -> int:
    """Return the table's version: 0 for a new database, 1 for a table made before dt_schema existed."""
    if not table_exists(connection, "dt_schema"):
        return 1 if table_exists(connection, "dt_events") else 0
    return scalar(connection, "SELECT coalesce(max(version), 0) FROM dt_schema")


def migrate(connection: psycopg.Connection) -> int:
    """Bring the table up to the latest version, waiting briefly for locks; return the version reached."""
    if schema_version(connection) == VERSION:
        return VERSION  # the usual case: no lock taken
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        connection.execute("SET LOCAL statement_timeout = 0")  # a rewrite of a large table may take a while
        # Workers and dynos start together; one migrates, the others then find nothing to do.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dt_events schema'))")
        version = schema_version(connection)
        for step in [LATEST] if version == 0 else UPGRADES[version - 1:]:
            connection.execute(step)
        connection.execute("CREATE TABLE IF NOT EXISTS dt_schema (version integer NOT NULL)")
        connection.execute("DELETE FROM dt_schema")
        connection.execute("INSERT INTO dt_schema (version) VALUES (%s)", (VERSION,))
    return VERSION


def table_exists(connection: psycopg.Connection, name: str) -> bool:
    """Tell whether a table exists now (to_regclass may answer from a cache older than the lock just taken)."""
    query = "SELECT EXISTS (SELECT FROM pg_tables WHERE schemaname = current_schema() AND tablename = %s)"
    return scalar(connection, query, (name,))


def scalar(connection: psycopg.Connection, query: str, params: tuple = ()):
    """Return the one value a query finds, whatever rows the connection makes."""
    return connection.cursor(row_factory=tuple_row).execute(query, params).fetchone()[0]
