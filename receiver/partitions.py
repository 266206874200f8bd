"""Create the time partitions of dt_events (daily) and dt_samples (monthly) that deliveries will need.

The partition maintenance (the hourly job, retention, rows moved out of DEFAULT) is the retention work's part
of this file; ensure_partitions is what a new or upgraded database gets at once.
"""

from datetime import date, datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

EVENT_DAYS_AHEAD = 7  # today's partition and the next seven days'


def ensure_partitions(connection: psycopg.Connection, today: date) -> None:
    """Create, unless they exist, the events' partitions for today through today+7 and the samples' for this
    month and the next: each as a table of its own, then attached (deliveries do not wait on an attach)."""
    first = max(today, legacy_until(connection) or today)  # the upgraded table's old rows hold the days before
    for day in (today + timedelta(days=ahead) for ahead in range(EVENT_DAYS_AHEAD + 1)):
        if day >= first:
            attach_unless_blocked(connection, "dt_events", f"p{day:%Y%m%d}", day, day + timedelta(days=1))
    month = today.replace(day=1)
    for _ in range(2):
        following = next_month(month)
        attach_unless_blocked(connection, "dt_samples", f"p{month:%Y%m}", month, following)
        month = following


def attach_unless_blocked(connection: psycopg.Connection, table: str, suffix: str, since: date, until: date) -> None:
    """Attach a partition; leave it for the maintenance if rows in the DEFAULT partition are in its range (moving
    them is that job's part), so that a migration never fails for it."""
    try:
        attach_partition(connection, table, suffix, since, until)
    except psycopg.errors.CheckViolation:
        pass


def next_month(month: date) -> date:
    """Return the first day of the month after a month's first day."""
    return (month + timedelta(days=32)).replace(day=1)


def attach_partition(connection: psycopg.Connection, table: str, suffix: str, since: date, until: date) -> bool:
    """Create and attach one partition of UTC days [since, until) unless it exists; return whether it was made.

    CREATE TABLE ... PARTITION OF would lock the parent against every insert; ATTACH PARTITION takes a lock
    inserts do not wait on. A row in the DEFAULT partition inside the range stops the attach (retention's part)."""
    name = f"{table}_{suffix}"
    if partition_exists(connection, name):
        return False
    bounds = (sql.Literal(f"{since.isoformat()} 00:00+00"), sql.Literal(f"{until.isoformat()} 00:00+00"))
    column = sql.Identifier("event_time" if table == "dt_events" else "time")
    with connection.transaction():
        connection.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            sql.Identifier(name), sql.Identifier(table)))
        # Lets the attach skip its scan of the new table (empty here, but a partition made ahead may have rows).
        connection.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} >= {} AND {} < {})").format(
            sql.Identifier(name), sql.Identifier(f"{name}_range"), column, bounds[0], column, bounds[1]))
        connection.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(table), sql.Identifier(name), *bounds))
    return True


def partition_exists(connection: psycopg.Connection, name: str) -> bool:
    """Tell whether a table of that name exists in the current schema."""
    query = "SELECT EXISTS (SELECT FROM pg_tables WHERE schemaname = current_schema() AND tablename = %s)"
    return connection.cursor(row_factory=tuple_row).execute(query, (name,)).fetchone()[0]


def legacy_until(connection: psycopg.Connection) -> date | None:
    """Return the UTC day an upgraded database's old events table (dt_events_legacy, from MINVALUE) ends at, if
    there is one: its CHECK constraint, named by that day, is what let it be attached without a scan."""
    row = connection.cursor(row_factory=tuple_row).execute("""
        SELECT max(substring(conname FROM '^dt_events_before_([0-9]{8})$')) FROM pg_constraint
        WHERE conrelid = to_regclass('dt_events_legacy') AND conname ~ '^dt_events_before_[0-9]{8}$'""").fetchone()
    return datetime.strptime(row[0], "%Y%m%d").date() if row and row[0] else None
