"""The partitions of dt_events (a UTC day each) and dt_samples (a UTC month each): made ahead, dropped past retention.

Every step takes its locks within LOCK_TIMEOUT or gives up until the next round, so a delivery waits on it a
moment at most: a new partition is attached (which locks the parent for writes of no one), never created as
PARTITION OF the live table (which would lock the parent against every insert); a partition is dropped whole
(its space goes back to the disk); the rows before a cutoff in the DEFAULT partition, in the partition that
straddles the cutoff and in the table from before the partitions are deleted a few thousand at a time.
"""

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

EVENTS, SAMPLES = "dt_events", "dt_samples"
TIME_COLUMN = {EVENTS: "event_time", SAMPLES: "time"}
EVENT_DAYS_AHEAD = 7
SAMPLE_MONTHS_AHEAD = 1
LOCK_TIMEOUT = "500ms"
DELETE_BATCH_ROWS = 5000
# A past day (or month) with at least this many rows in DEFAULT (a backfill from before the partitions) gets a
# partition of its own, a few a round: DEFAULT stays small, since every attach reads all of it under its lock.
CARVE_AT_LEAST_ROWS = 1000
CARVE_PER_ROUND = 7
MIN_WINDOW = timedelta(seconds=1)

# Each partition of a table with its bounds: NULL for MINVALUE and MAXVALUE, and both NULL for the DEFAULT
# partition. The bounds are printed in the session's zone, with its offset, so they read back as the same instants.
PARTITIONS = r"""
SELECT c.relname, b[1] IS NULL AS is_default,
       CASE WHEN b[1] <> 'MINVALUE' THEN btrim(b[1], '''')::timestamptz END AS since,
       CASE WHEN b[2] <> 'MAXVALUE' THEN btrim(b[2], '''')::timestamptz END AS until,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits AS i
JOIN pg_class AS c ON c.oid = i.inhrelid
LEFT JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \((.+)\) TO \((.+)\)') AS b ON true
WHERE i.inhparent = to_regclass(%s)
ORDER BY b[1] IS NOT NULL, since NULLS FIRST
"""


class Partition(NamedTuple):
    """A partition: its name, whether it is DEFAULT, its bounds (None: unbounded, or DEFAULT), its bytes."""

    name: str
    is_default: bool
    since: datetime | None
    until: datetime | None
    bytes: int


class Plan(NamedTuple):
    """What removing a table's rows from before a cutoff takes: partitions to drop whole, and partitions to trim."""

    drop: list[Partition]
    trim: list[Partition]


def partitions(connection: psycopg.Connection, table: str) -> list[Partition]:
    """Return a table's partitions, DEFAULT first, then by their start; none if the table is not partitioned."""
    cursor = connection.cursor(row_factory=tuple_row)
    return [Partition(*row) for row in cursor.execute(PARTITIONS, (table,))]


def partition_name(table: str, day: date) -> str:
    """Return the name of the partition that holds a day: dt_events_p20261205, or dt_samples_p202612."""
    return f"{table}_p{day:%Y%m%d}" if table == EVENTS else f"{table}_p{day:%Y%m}"


def midnight(day: date) -> datetime:
    """Return the start of a UTC day."""
    return datetime.combine(day, time(), UTC)


def ahead(today: date) -> list[tuple[str, datetime, datetime]]:
    """Return the partitions that should exist from today on: events today to today + 7, samples this month and next."""
    wanted = [(EVENTS, midnight(today + timedelta(days=n)), midnight(today + timedelta(days=n + 1)))
              for n in range(EVENT_DAYS_AHEAD + 1)]
    month = today.replace(day=1)
    for _ in range(SAMPLE_MONTHS_AHEAD + 1):
        wanted.append((SAMPLES, midnight(month), midnight(next_month(month))))
        month = next_month(month)
    return wanted


def next_month(day: date) -> date:
    """Return the first day of the month after a day's."""
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def ensure_partitions(connection: psycopg.Connection, today: date) -> list[str]:
    """Make the partitions from today on that do not exist yet (see ahead()); return the names of those made.

    A partition whose range another one already covers (the table from before the partitions) is not made.
    """
    made = []
    for table, since, until in ahead(today):
        existing = partitions(connection, table)
        if not existing or any(overlaps(p, since, until) for p in existing):
            continue
        if attach_new_partition(connection, table, since, until):
            made.append(partition_name(table, since.date()))
    return made


def ensure_sample_months(connection: psycopg.Connection, since: datetime, until: datetime) -> list[str]:
    """Make the readings' partitions of the months from since to until that do not exist yet (the DEFAULT
    partition's rows of each moved in); return the names of those made. One made by another process at the same
    moment counts as there."""
    made, existing = [], partitions(connection, SAMPLES)
    month = since.astimezone(UTC).date().replace(day=1)
    while existing and midnight(month) < until:
        start, end = midnight(month), midnight(next_month(month))
        if not any(overlaps(partition, start, end) for partition in existing):
            try:
                if attach_new_partition(connection, SAMPLES, start, end):
                    made.append(partition_name(SAMPLES, month))
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
                pass
        month = next_month(month)
    return made


def overlaps(partition: Partition, since: datetime, until: datetime) -> bool:
    """Tell whether a partition other than DEFAULT holds some of a range."""
    return (not partition.is_default and (partition.since is None or partition.since < until)
            and (partition.until is None or partition.until > since))


def attach_new_partition(connection: psycopg.Connection, table: str, since: datetime, until: datetime) -> bool:
    """Create one partition beside the table, move into it the DEFAULT partition's rows of its range, and attach it.

    One transaction: the DEFAULT partition is locked first, so no delivery adds a row of the range between the
    move and the attach (which checks the DEFAULT partition holds none). False if a lock was not had in time.
    """
    name = partition_name(table, since.date())
    column = sql.Identifier(TIME_COLUMN[table])
    names = {"table": sql.Identifier(table), "new": sql.Identifier(name),
             "default": sql.Identifier(f"{table}_default"), "column": column}
    bounds = {"since": since, "until": until}
    try:
        with connection.transaction():
            connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            connection.execute(sql.SQL("CREATE TABLE {new} (LIKE {table} INCLUDING DEFAULTS)").format(**names))
            if to_regclass(connection, f"{table}_default"):
                connection.execute(sql.SQL("LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE").format(**names))
                connection.execute(sql.SQL(
                    "WITH moved AS (DELETE FROM {default} WHERE {column} >= %(since)s AND {column} < %(until)s "
                    "RETURNING *) INSERT INTO {new} SELECT * FROM moved").format(**names), bounds)
            connection.execute(sql.SQL("ALTER TABLE {table} ATTACH PARTITION {new} FOR VALUES FROM ({since}) TO "
                                       "({until})").format(since=sql.Literal(since), until=sql.Literal(until), **names))
    except psycopg.errors.LockNotAvailable:
        return False
    return True


def carve_default(connection: psycopg.Connection, table: str, today: date) -> list[str]:
    """Give past days (dt_events) or months (dt_samples) that hold many rows in DEFAULT partitions of their own,
    their rows moved in, oldest first, a few a round; return the names of those made. A move that does not end
    within the statement timeout is left for a later round (DEFAULT's rows stay where they are meanwhile)."""
    column, default = sql.Identifier(TIME_COLUMN[table]), sql.Identifier(f"{table}_default")
    if not to_regclass(connection, f"{table}_default"):
        return []
    first_after = sql.SQL("SELECT min({column}) FROM {default} WHERE {column} >= %s AND {column} < %s").format(
        column=column, default=default)
    rows_up_to = sql.SQL("SELECT count(*) FROM (SELECT FROM {default} WHERE {column} >= %s AND {column} < %s "
                         "LIMIT %s) AS found").format(column=column, default=default)
    made, after, end = [], datetime(1, 1, 2, tzinfo=UTC), midnight(today if table == EVENTS else today.replace(day=1))
    while len(made) < CARVE_PER_ROUND and (first := one_value(connection, first_after, (after, end))) is not None:
        day = first.astimezone(UTC).date()
        since = midnight(day if table == EVENTS else day.replace(day=1))
        until = midnight(day + timedelta(days=1) if table == EVENTS else next_month(day))
        after = until
        if one_value(connection, rows_up_to, (since, until, CARVE_AT_LEAST_ROWS)) < CARVE_AT_LEAST_ROWS or any(
                overlaps(partition, since, until) for partition in partitions(connection, table)):
            continue
        try:
            if not attach_new_partition(connection, table, since, until):
                break
        except psycopg.errors.QueryCanceled:
            break
        made.append(partition_name(table, since.date()))
    return made


def to_regclass(connection: psycopg.Connection, name: str) -> bool:
    """Tell whether a table of this name exists."""
    return one_value(connection, "SELECT to_regclass(%s) IS NOT NULL", (name,))


def one_value(connection: psycopg.Connection, query, params: tuple = ()):
    """Return the one value a query finds, whatever rows the connection makes."""
    return connection.cursor(row_factory=tuple_row).execute(query, params).fetchone()[0]


def plan_removal(connection: psycopg.Connection, table: str, before: datetime) -> Plan:
    """Return which partitions of a table lie wholly before a time (dropped), and which hold rows on both sides."""
    found = partitions(connection, table)
    drop = [p for p in found if not p.is_default and p.until is not None and p.until <= before]
    trim = [p for p in found if p.is_default or p not in drop and (p.since is None or p.since < before)]
    return Plan(drop, trim)


def planned_rows(connection: psycopg.Connection, table: str, partition: Partition,
                 before: datetime | None = None) -> int:
    """Return how many rows the planner expects a partition to hold (from before a time): it reads none to say so.
    A partition never analyzed (a new one, or the table from before the partitions) is analyzed first: a sample."""
    name = sql.Identifier(partition.name)
    if one_value(connection, "SELECT reltuples < 0 FROM pg_class WHERE oid = to_regclass(%s)", (partition.name,)):
        connection.execute(sql.SQL("ANALYZE {}").format(name))
    query = sql.SQL("EXPLAIN (FORMAT JSON) SELECT FROM {}").format(name)
    if before is not None:
        query += sql.SQL(" WHERE {} < {}").format(sql.Identifier(TIME_COLUMN[table]), sql.Literal(before))
    [explained] = one_value(connection, query)
    return round(explained["Plan"]["Plan Rows"])


def drop_partition(connection: psycopg.Connection, partition: Partition) -> bool:
    """Drop a partition, its space given back; False if its table's lock was not had in time (next round, then)."""
    try:
        with connection.transaction():
            connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            connection.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition.name)))
    except psycopg.errors.LockNotAvailable:
        return False
    return True


# One batch: at most DELETE_BATCH_ROWS rows of a window of time, oldest first. It starts where the last one stopped,
# so it never walks the index entries of rows already deleted; >= keeps rows that share the last batch's final time.
DELETE_ONE_BATCH = """
WITH gone AS (
    DELETE FROM {table} WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {table} WHERE {column} >= %(since)s AND {column} < %(until)s ORDER BY {column} LIMIT %(batch)s
    )) RETURNING {column}
)
SELECT count(*), max({column}) FROM gone
"""


def trim_partition(connection: psycopg.Connection, table: str, partition: Partition,
                   before: datetime) -> Iterator[int]:
    """Delete a partition's rows from before a time, oldest first, at most 5,000 per transaction; yield how many
    each deleted. Each batch looks in a window of time expected to hold about 5,000 rows (narrowed after a full
    batch, widened after a small one), so that it sorts few rows: dt_samples has no B-tree on time alone."""
    column = sql.Identifier(TIME_COLUMN[table])
    names = {"table": sql.Identifier(partition.name), "column": column}
    start = partition.since or one_value(connection, sql.SQL("SELECT min({column}) FROM {table} WHERE {column} < %s")
                                         .format(**names), (before,))
    if start is None or start >= before:
        return
    span = min(partition.until or before, before) - start
    width = max(span * DELETE_BATCH_ROWS / max(planned_rows(connection, table, partition, before), 1), MIN_WINDOW)
    delete = sql.SQL(DELETE_ONE_BATCH).format(**names)
    cursor = connection.cursor(row_factory=tuple_row)
    while start < before:
        end = min(start + width, before)
        deleted, reached = cursor.execute(delete, {"since": start, "until": end, "batch": DELETE_BATCH_ROWS}).fetchone()
        if deleted:
            yield deleted
        if deleted == DELETE_BATCH_ROWS:  # the window holds more: go on from the last time deleted, in a narrower one
            start, width = reached, max(width / 2, MIN_WINDOW)
        else:
            start, width = end, width * 2 if deleted < DELETE_BATCH_ROWS / 2 else width


def remove_before(connection: psycopg.Connection, table: str, before: datetime) -> dict:
    """Remove a table's rows from before a time: drop the partitions wholly before it, trim the others.

    Return what it did: partitions dropped (names), their bytes and about how many rows they held, partitions left
    for the next round (a lock not had), and rows deleted one by one.
    """
    plan = plan_removal(connection, table, before)
    done = {"dropped": [], "freed_bytes": 0, "dropped_rows": 0, "skipped": [], "deleted": 0}
    for partition in plan.drop:
        rows = planned_rows(connection, table, partition)
        if drop_partition(connection, partition):
            done["dropped_rows"] += rows
            done["dropped"].append(partition.name)
            done["freed_bytes"] += partition.bytes
        else:
            done["skipped"].append(partition.name)
    for partition in plan.trim:
        done["deleted"] += sum(trim_partition(connection, table, partition, before))
    return done
