"""Create and migrate the events table: once per process, outside any delivery, in numbered steps."""

import psycopg
from psycopg.rows import tuple_row

# A new database gets the latest table at once. Columns are in this order so that a typical event
# fills no alignment padding: twelve rows of a 560-byte event fit a page instead of eleven.
LATEST = """
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

# An existing database runs the steps after its version, each once, in one transaction that records it.
# Add a column by appending a step (and changing LATEST to match); never edit a step that has shipped.
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
