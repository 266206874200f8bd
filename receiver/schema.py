"""Create and migrate the events table: once per process, outside any delivery, in numbered steps."""

import psycopg
from psycopg.rows import tuple_row

# Each step runs once per database, in order, in one transaction with the version it brings.
# Add a column by appending a step; never edit a step that has shipped.
MIGRATIONS = (
    # 1: the table as first released (a database made by that release already has it).
    """
    CREATE TABLE IF NOT EXISTS dt_events (
        event_id    text PRIMARY KEY,
        event_type  text,
        device_id   text,
        project_id  text,
        event_time  timestamptz,
        labels      jsonb,
        event       jsonb NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS dt_events_device_time ON dt_events (device_id, event_time DESC NULLS LAST);
    CREATE INDEX IF NOT EXISTS dt_events_device_type_time ON dt_events (device_id, event_type, event_time DESC NULLS LAST);
    CREATE INDEX IF NOT EXISTS dt_events_time ON dt_events (event_time DESC NULLS LAST);
    """,
    # 2: the body as received, in text (smaller than jsonb, and it holds what jsonb refuses); where each
    # row came from; a time on every row; no columns the body already holds; an index per documented query.
    """
    UPDATE dt_events SET event_time = received_at WHERE event_time IS NULL;
    ALTER TABLE dt_events
        ALTER COLUMN event TYPE text USING event::text,
        ALTER COLUMN event_time SET NOT NULL,
        DROP COLUMN labels,
        DROP COLUMN project_id,
        ADD COLUMN source text NOT NULL DEFAULT 'connector' CHECK (source IN ('connector', 'history'));
    DROP INDEX dt_events_device_type_time;
    """,
)

# A deploy's migration waits this long for a table lock, then tries again later: deliveries keep flowing.
LOCK_TIMEOUT = "2s"


def schema_version(connection: psycopg.Connection) -> int:
    """Return how many migration steps this database has had (0 for a new one)."""
    if scalar(connection, "SELECT to_regclass('dt_schema')") is None:
        # A table made before dt_schema existed is at step 1.
        return 1 if scalar(connection, "SELECT to_regclass('dt_events')") else 0
    return scalar(connection, "SELECT coalesce(max(version), 0) FROM dt_schema")


def scalar(connection: psycopg.Connection, query: str):
    """Return the one value a query finds, whatever rows the connection makes."""
    return connection.cursor(row_factory=tuple_row).execute(query).fetchone()[0]


def migrate(connection: psycopg.Connection) -> int:
    """Bring the table up to the latest step, waiting briefly for locks; return the version reached."""
    if schema_version(connection) == len(MIGRATIONS):
        return len(MIGRATIONS)  # the usual case: no lock taken
    with connection.transaction():
        connection.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        connection.execute("SET LOCAL statement_timeout = 0")  # a rewrite of a large table may take a while
        # Workers and dynos start together; one migrates, the others then find nothing to do.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dt_events schema'))")
        version = schema_version(connection)
        for step in MIGRATIONS[version:]:
            connection.execute(step)
        connection.execute("CREATE TABLE IF NOT EXISTS dt_schema (version integer NOT NULL)")
        connection.execute("DELETE FROM dt_schema")
        connection.execute("INSERT INTO dt_schema (version) VALUES (%s)", (len(MIGRATIONS),))
    return len(MIGRATIONS)
