"""Schema 4 as release 4 built it on a new database (dt_events unpartitioned, dt_readings parsing the bodies):
a frozen copy of receiver/schema.py's LATEST at version 4, for tests/benchmark/year.py's side-by-side.
"""

EVENTS_TABLE = """
DO $$ BEGIN
    IF to_regtype('dt_events_source') IS NULL THEN
        CREATE TYPE dt_events_source AS ENUM ('connector', 'history');
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS dt_events (
    event_id    text PRIMARY KEY,
    device_id   text,
    event_type  text,
    source      dt_events_source NOT NULL DEFAULT 'connector',
    event_time  timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL
);
-- one device over time; all devices over time (events, status, prune)
CREATE INDEX IF NOT EXISTS dt_events_device_time ON dt_events (device_id, event_time);
CREATE INDEX IF NOT EXISTS dt_events_time ON dt_events (event_time);
"""

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

SCHEMA_4 = EVENTS_TABLE + READINGS_VIEW + LAST_ARRIVAL_TABLE

# Release 4's inserts of pushed events (receiver/store.py then): a batch as arrays, one event as plain values, each
# noting in dt_last_arrival, at most once a second, that a new event arrived.
NOTE_ARRIVAL = """
noted AS (
    UPDATE dt_last_arrival SET received_at = now()
    WHERE (received_at IS NULL OR received_at < now() - interval '1 second') AND EXISTS (SELECT FROM inserted)
)
SELECT event_id FROM inserted
"""
WRITE = """
WITH inserted AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
    SELECT event_id, device_id, event_type, COALESCE(event_time, now()), event
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
         AS batch (event_id, device_id, event_type, event_time, event)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),""" + NOTE_ARRIVAL  # noqa: S608 (constant text only)
WRITE_ONE = """
WITH inserted AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
    VALUES (%s, %s, %s, COALESCE(%s, now()), %s)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
),""" + NOTE_ARRIVAL  # noqa: S608 (constant text only)
