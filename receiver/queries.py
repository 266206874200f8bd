"""Read, count, add, stream and prune stored events for the commands, on one short-lived connection."""

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime

import psycopg
from psycopg.rows import dict_row, tuple_row

from .events import parse_event
from .logs import database_fault
from .schema import migrate
from .store import LAST_ARRIVAL, connection_options, insert_keeping_odd_text

HISTORY_BATCH = 1000
PRUNE_BATCH = 5000
STREAM_BATCH = 2000  # rows a server-side cursor hands over per round trip

LATEST = """
SELECT event_time, received_at, device_id, event_type, event_id, source, event
FROM dt_events
WHERE (%(device)s::text IS NULL OR device_id = %(device)s)
  AND (%(type)s::text IS NULL OR event_type = %(type)s)
  AND (%(since)s::timestamptz IS NULL OR event_time >= %(since)s)
ORDER BY event_time DESC
LIMIT %(limit)s
"""

# One round trip per batch; ON CONFLICT keeps rows already there (pushed rows carry labels and metadata).
INSERT_HISTORY = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, source, event)
SELECT event_id, device_id, event_type, COALESCE(event_time, now()), 'history', event
FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
     AS batch (event_id, device_id, event_type, event_time, event)
ON CONFLICT (event_id) DO NOTHING
"""

PRUNE_ONE_BATCH = """
DELETE FROM dt_events WHERE event_id IN (
    SELECT event_id FROM dt_events WHERE event_time < %s ORDER BY event_time LIMIT %s
)
"""

# Rows, and their share of the table's bytes on disk (heap, TOAST and indexes), older than a time.
PRUNE_ESTIMATE = """
SELECT count(*) AS rows,
       (count(*) * pg_total_relation_size('dt_events') / greatest(
           (SELECT reltuples FROM pg_class WHERE oid = 'dt_events'::regclass), count(*), 1))::bigint AS bytes
FROM dt_events WHERE event_time < %s
"""


# A window of stored events (export, replay): by the events' own time, which dt_events_time serves (and
# dt_events_device_time, for devices), maybe of some devices and types only. dt_readings passes it all down.
WINDOW = """
WHERE event_time >= %(since)s AND event_time < %(until)s
  AND (%(devices)s::text[] IS NULL OR device_id = ANY(%(devices)s))
  AND (%(types)s::text[] IS NULL OR event_type = ANY(%(types)s))
"""

WINDOW_EVENTS = "SELECT count(*) FROM dt_events" + WINDOW  # noqa: S608 (constant text only)

# Readings as CSV wants them: times in UTC as RFC 3339, values as the shortest text that reads back exactly.
WINDOW_READINGS = """
SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), device_id, event_type, name,
       value::text, state, unit, event_id
FROM dt_readings""" + WINDOW + "ORDER BY event_time, event_id, time, name"

WINDOW_BODIES = "SELECT event_id, event FROM dt_events" + WINDOW + "ORDER BY event_time, event_id"  # noqa: S608


class DatabaseError(Exception):
    """The database could not be reached or used; the message names the cause in a few words."""


@contextmanager
def connect(database_url: str) -> Iterator[psycopg.Connection]:
    """Open one autocommit connection with the table migrated; turn any database fault into one line."""
    try:
        with psycopg.connect(**connection_options(database_url), autocommit=True, row_factory=dict_row) as connection:
            migrate(connection)
            yield connection
    except psycopg.Error as error:
        raise DatabaseError(database_fault(error)) from None


def latest(connection: psycopg.Connection, device: str | None, event_type: str | None, since: datetime | None,
           limit: int) -> list[dict]:
    """Return the newest stored events, newest first, with their bodies parsed."""
    params = {"device": device, "type": event_type, "since": since, "limit": limit}
    found = connection.execute(LATEST, params).fetchall()
    for row in found:
        row["event"] = json.loads(row["event"])
    return found


@contextmanager
def window(connection: psycopg.Connection, query: str, params: dict) -> Iterator[tuple[int, Iterator[tuple]]]:
    """Lend how many events a window holds and a query's rows over it, streamed from a server-side cursor.

    Both read one snapshot, so the count is of the events the rows come from. There is no statement
    timeout: a read holds up no delivery, and a window that must be sorted is sorted before its first row.
    """
    with connection.transaction():
        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        connection.execute("SET LOCAL statement_timeout = 0")
        events = connection.execute(WINDOW_EVENTS, params).fetchone()["count"]
        with connection.cursor(name="window", row_factory=tuple_row) as cursor:
            cursor.itersize = STREAM_BATCH
            yield events, cursor.execute(query, params)


def add_history(connection: psycopg.Connection, events: Iterable[dict]) -> int:
    """Store events from DT's history (an `event` object each) unless stored already; return how many are new."""
    added = 0
    for batch in batches(events, HISTORY_BATCH):
        # The same columns a pushed event gets; the body is what DT's history holds: the event alone.
        # A lone surrogate (DT's JSON may escape one) is written back as that escape, as a pushed body keeps it.
        parsed = [parse_event(json.dumps({"event": event}, separators=(",", ":"), ensure_ascii=False)
                              .encode("utf-8", "backslashreplace")) for event in batch]
        parsed.sort(key=lambda event: event.event_id)  # the order live batches insert in: no deadlock between them
        columns = [[event.event_id for event in parsed], [event.device_id for event in parsed],
                   [event.event_type for event in parsed], [event.time for event in parsed],
                   [event.text for event in parsed]]
        added += insert_keeping_odd_text(connection, INSERT_HISTORY, columns).rowcount
    return added


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Yield lists of at most `size` items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prune_estimate(connection: psycopg.Connection, before: datetime) -> dict:
    """Return how many rows are older than a time and about how many bytes deleting them frees."""
    return connection.execute(PRUNE_ESTIMATE, (before,)).fetchone()


def prune(connection: psycopg.Connection, before: datetime) -> Iterator[int]:
    """Delete events older than a time in short transactions; yield how many each one deleted."""
    while deleted := connection.execute(PRUNE_ONE_BATCH, (before, PRUNE_BATCH)).rowcount:
        yield deleted


NEWEST = "SELECT event_time, received_at, device_id, event_type FROM dt_events ORDER BY event_time DESC LIMIT 1"

RECENT_BY_TYPE = """
SELECT event_type, count(*) FILTER (WHERE event_time >= now() - interval '1 hour') AS last_hour, count(*) AS last_day
FROM dt_events WHERE event_time >= now() - interval '1 day'
GROUP BY event_type ORDER BY last_day DESC
"""

# A device is silent when its newest event of the last week is older than three of its usual intervals
# (and at least an hour): a sensor out of range or out of battery, or a connector that stopped.
SILENT_DEVICES = """
SELECT device_id, max(event_time) AS newest, (max(event_time) - min(event_time)) / (count(*) - 1) AS usual_interval
FROM dt_events WHERE event_time >= now() - interval '7 days' AND device_id IS NOT NULL
GROUP BY device_id HAVING count(*) > 1
   AND now() - max(event_time) > greatest(3 * (max(event_time) - min(event_time)) / (count(*) - 1), interval '1 hour')
ORDER BY newest
"""

SOURCES = """
SELECT count(*) FILTER (WHERE source = 'history') AS history, count(*) AS all_events
FROM dt_events WHERE event_time >= now() - interval '7 days'
"""

SIZES = """
SELECT pg_total_relation_size('dt_events') AS table_bytes, pg_database_size(current_database()) AS database_bytes
"""


def status(connection: psycopg.Connection) -> dict:
    """Return what `status` reports: the newest event, its arrival, counts by type, silent devices, sources, sizes."""
    return {
        "newest": connection.execute(NEWEST).fetchone(),
        "last_arrival": connection.execute(LAST_ARRIVAL).fetchone(),
        "by_type": connection.execute(RECENT_BY_TYPE).fetchall(),
        "silent": connection.execute(SILENT_DEVICES).fetchall(),
        "sources": connection.execute(SOURCES).fetchone(),
        "sizes": connection.execute(SIZES).fetchone(),
    }
