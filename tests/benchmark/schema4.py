"""Schema 4 as release 4 built it on a new database (dt_events unpartitioned, dt_readings parsing the bodies),
and release 4's inserts, for tests/benchmark/year.py's side-by-side.

The table is the tests' frozen copy; the view and dt_last_arrival are the steps receiver/schema.py keeps for
upgrading such a database (they stay as shipped); release 4's inserts, which schema 5 replaced, are copied here.
"""

from support.old_schemas import EVENTS_TABLE_2

from receiver.schema import LAST_ARRIVAL_TABLE, READINGS_VIEW

SCHEMA_4 = EVENTS_TABLE_2 + READINGS_VIEW + LAST_ARRIVAL_TABLE

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
