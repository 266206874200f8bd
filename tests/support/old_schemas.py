"""The events table as releases 2 to 4 made it, frozen: what the upgrade tests and benchmarks start from."""

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
