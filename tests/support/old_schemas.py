"""The events table as releases 2 to 4 made it, and release 5's readings view, frozen: what the upgrade tests and
benchmarks start from."""

# Unpartitioned, keyed by event id alone; releases 2 to 4 add dt_schema (and 3 and 4 a view and a row) beside it.
EVENTS_TABLE_2 = """
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
CREATE INDEX dt_events_device_time ON dt_events (device_id, event_time);
CREATE INDEX dt_events_time ON dt_events (event_time);
"""

# Release 5's readings view: the second numbers' names read from dt_reading_kinds.
READINGS_VIEW_5 = """
DROP VIEW IF EXISTS dt_readings;
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
"""
