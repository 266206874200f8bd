"""Read, count, add, stream and prune stored events for the commands, on one short-lived connection."""

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.rows import dict_row, tuple_row

from . import partitions
from .events import parse_event
from .logs import database_fault
from .readings import samples_of
from .schema import migrate
from .store import (
    LAST_ARRIVAL,
    WRITE_HISTORY,
    DeviceNumbers,
    connection_options,
    event_columns,
    insert_keeping_odd_text,
    sample_columns,
)
from .upgrade import fill_progress

HISTORY_BATCH = 1000
# A person waits on a command, not DT: a statement may take this long (the deliveries' 5 s would end `status`
# and `prune` on a table of millions), and a lock that never frees still ends it.
COMMANDS_STATEMENT_TIMEOUT = "30min"
# Up to this many old rows `prune` counts exactly (milliseconds, through the time indexes); beyond, the planner guesses.
EXACT_COUNT_UP_TO = 10_000
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

OLD_ROWS_UP_TO = "SELECT count(*) FROM (SELECT FROM {} WHERE {} < %s LIMIT %s) AS old"
# The receiver's upkeep takes the same lock: a command waits for its round to end rather than drop what it drops.
UPKEEP_LOCK = "SELECT pg_advisory_lock(hashtextextended('dt-receiver upkeep', 0))"
UPKEEP_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('dt-receiver upkeep', 0))"


# A window of stored events (export, replay): by the events' own time, which dt_events_time serves (and
# dt_events_device_time, for devices), maybe of some devices and types only. dt_readings passes it all down.
WINDOW = """
WHERE event_time >= %(since)s AND event_time < %(until)s
  AND (%(devices)s::text[] IS NULL OR device_id = ANY(%(devices)s))
  AND (%(types)s::text[] IS NULL OR event_type = ANY(%(types)s))
"""

WINDOW_EVENTS = "SELECT count(*) FROM dt_events" + WINDOW  # noqa: S608 (constant text only)

# Readings as CSV wants them: times in UTC as RFC 3339, values as the shortest text that reads back exactly. The
# window is of the readings' own time, which dt_samples' partitions and indexes serve.
WINDOW_READINGS = """
SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), device_id, event_type, name,
       value::text, state, unit, event_id
FROM dt_readings""" + WINDOW.replace("event_time", "time") + "ORDER BY time, event_id, name"

WINDOW_BODIES = "SELECT event_id, event FROM dt_events" + WINDOW + "ORDER BY event_time, event_id"  # noqa: S608


class DatabaseError(Exception):
    """The database could not be reached or used; the message names the cause in a few words."""


@contextmanager
def connect(database_url: str) -> Iterator[psycopg.Connection]:
    """Open one autocommit connection with the table migrated; turn any database fault into one line."""
    try:
        with psycopg.connect(**connection_options(database_url), autocommit=True, row_factory=dict_row) as connection:
            connection.execute(f"SET statement_timeout = '{COMMANDS_STATEMENT_TIMEOUT}'")
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
    devices = DeviceNumbers()
    for batch in batches(events, HISTORY_BATCH):
        # The same columns a pushed event gets; the body is what DT's history holds: the event alone.
        # A lone surrogate (DT's JSON may escape one) is written back as that escape, as a pushed body keeps it.
        parsed = [parse_event(json.dumps({"event": event}, separators=(",", ":"), ensure_ascii=False)
                              .encode("utf-8", "backslashreplace")) for event in batch]
        # By event id, the order live batches insert in (no deadlock between them); of one id, the first.
        unique = sorted({event.event_id: event for event in reversed(parsed)}.values(), key=lambda e: e.event_id)
        rows = [(event.event_id, event.device_id, event.event_type, event.time, event.text, samples_of(event))
                for event in unique]
        numbers = devices.numbers(connection, {row[1] for row in rows if row[5] and row[1] is not None})
        params = event_columns(rows) + sample_columns(rows, numbers)
        added += insert_keeping_odd_text(connection, WRITE_HISTORY, params).fetchone()[0]
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


def prune_estimate(connection: psycopg.Connection, table: str, before: datetime) -> dict:
    """Return about how many rows of dt_events or dt_samples are older than a time (exactly, if few), the bytes of the
    partitions wholly older (given back to the disk), and about how many bytes the other old rows take.

    Nothing reads every row: a few old rows are counted, more are the planner's estimate, partition by partition,
    and the bytes of a partition's old rows are their estimated share of its own.
    """
    column = sql.Identifier(partitions.TIME_COLUMN[table])
    counted = one_value(connection, sql.SQL(OLD_ROWS_UP_TO).format(sql.Identifier(table), column),
                        (before, EXACT_COUNT_UP_TO + 1))
    plan = partitions.plan_removal(connection, table, before)
    dropped = sum(partitions.planned_rows(connection, table, partition) for partition in plan.drop)
    trimmed, reused_bytes = 0, 0
    for partition in plan.trim:
        old = partitions.planned_rows(connection, table, partition, before)
        trimmed += old
        whole = max(partitions.planned_rows(connection, table, partition), old, 1)
        reused_bytes += round(partition.bytes * old / whole)
    exact = counted <= EXACT_COUNT_UP_TO
    return {"rows": counted if exact else dropped + trimmed, "exact": exact, "partitions": len(plan.drop),
            "freed_bytes": sum(partition.bytes for partition in plan.drop), "reused_bytes": reused_bytes}


def one_value(connection: psycopg.Connection, query, params: tuple = ()):
    """Return the one value a query finds."""
    return connection.cursor(row_factory=tuple_row).execute(query, params).fetchone()[0]


def prune(connection: psycopg.Connection, table: str, before: datetime) -> dict:
    """Remove the rows of dt_events or dt_samples older than a time (see partitions.remove_before), once the
    receiver's upkeep, if it is running a round, has ended; return what was done."""
    connection.execute(UPKEEP_LOCK)
    try:
        return partitions.remove_before(connection, table, before)
    finally:
        connection.execute(UPKEEP_UNLOCK)


NEWEST = "SELECT event_time, received_at, device_id, event_type FROM dt_events ORDER BY event_time DESC LIMIT 1"

RECENT_BY_TYPE = """
SELECT event_type, count(*) FILTER (WHERE event_time >= now() - interval '1 hour') AS last_hour, count(*) AS last_day
FROM dt_events WHERE event_time >= now() - interval '1 day'
GROUP BY event_type ORDER BY last_day DESC
"""

# A device is silent when its newest event of the last week is older than three of its usual intervals
# (and at least an hour): a sensor out of range or out of battery, or a connector that stopped. Each device
# id is found by one probe of dt_events_device_time (a loose index scan), then its week by another, so
# what it reads grows with the devices and a week's events, not with the table's age.
SILENT_DEVICES = """
WITH RECURSIVE devices (device_id) AS (
    (SELECT device_id FROM dt_events WHERE device_id IS NOT NULL ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT device_id FROM dt_events WHERE device_id > devices.device_id ORDER BY device_id LIMIT 1)
    FROM devices WHERE devices.device_id IS NOT NULL
)
SELECT devices.device_id, week.newest, week.usual_interval
FROM devices
CROSS JOIN LATERAL (
    SELECT count(*) AS events, max(event_time) AS newest,
           (max(event_time) - min(event_time)) / nullif(count(*) - 1, 0) AS usual_interval
    FROM dt_events WHERE device_id = devices.device_id AND event_time >= now() - interval '7 days'
) AS week
WHERE week.events > 1 AND now() - week.newest > greatest(3 * week.usual_interval, interval '1 hour')
ORDER BY week.newest
"""

SOURCES = """
SELECT count(*) FILTER (WHERE source = 'history') AS history, count(*) AS all_events
FROM dt_events WHERE event_time >= now() - interval '7 days'
"""

# A partitioned table's own size is 0: its partitions' are summed. Readings: the samples and the devices' numbers.
SIZES = """
SELECT (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('dt_events'))::bigint AS events_bytes,
       (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('dt_samples'))::bigint
       + pg_total_relation_size('dt_devices') AS readings_bytes,
       pg_database_size(current_database()) AS database_bytes
"""
OLDEST_EVENT = "SELECT now() - min(event_time) FROM dt_events"
WEEK_ROWS = "SELECT FROM {table} WHERE {column} >= now() - interval '7 days' AND {column} < now()"
ALL_ROWS = "SELECT FROM {table}"


def growth(connection: psycopg.Connection, sizes: dict) -> dict:
    """Return, for events and readings, how many bytes a day they grew by over the last week (over their age, if
    younger), and the age of their oldest rows: the planner's rows of the week over its rows of all, of the bytes."""
    event_age = one_value(connection, OLDEST_EVENT) or timedelta(0)
    days = min(max(event_age / timedelta(days=1), 1 / 24), 7)  # readings are made with their events: the same age
    rates = {}
    for what, table in (("events", partitions.EVENTS), ("readings", partitions.SAMPLES)):
        names = {"table": sql.Identifier(table), "column": sql.Identifier(partitions.TIME_COLUMN[table])}
        week = planned(connection, sql.SQL(WEEK_ROWS).format(**names))
        share = min(week / max(planned(connection, sql.SQL(ALL_ROWS).format(**names)), 1), 1)
        rates[what] = {"bytes_per_day": (sizes[f"{what}_bytes"] or 0) * share / days}
    rates["events"]["age"] = event_age
    rates["readings"]["age"] = oldest_readings(connection)
    return rates


def oldest_readings(connection: psycopg.Connection) -> timedelta | None:
    """Return how long ago the oldest month of readings that holds any began (precise enough to say when
    READINGS_RETENTION levels them off), or None if there are none."""
    for partition in partitions.partitions(connection, partitions.SAMPLES):
        if partition.since is not None and one_value(
                connection, sql.SQL("SELECT EXISTS (SELECT FROM {})").format(sql.Identifier(partition.name))):
            return one_value(connection, "SELECT now() - %s", (partition.since,))
    return None


def planned(connection: psycopg.Connection, query) -> int:
    """Return how many rows the planner expects a query to return (it reads no rows to say so)."""
    [explained] = one_value(connection, sql.SQL("EXPLAIN (FORMAT JSON) ") + query)
    return round(explained["Plan"]["Plan Rows"])


def status(connection: psycopg.Connection) -> dict:
    """Return what `status` reports: the newest event, its arrival, counts by type, silent devices, sources, sizes."""
    return {
        "newest": connection.execute(NEWEST).fetchone(),
        "last_arrival": connection.execute(LAST_ARRIVAL).fetchone(),
        "by_type": connection.execute(RECENT_BY_TYPE).fetchall(),
        "silent": connection.execute(SILENT_DEVICES).fetchall(),
        "sources": connection.execute(SOURCES).fetchone(),
        "sizes": (sizes := connection.execute(SIZES).fetchone()),
        "growth": growth(connection, sizes),
        "fill": fill_progress(connection),
    }
