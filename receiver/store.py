"""Keep every event in PostgreSQL, once, committed before DT is told so."""

import ipaddress
import os
from contextlib import contextmanager
from collections.abc import Iterator

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import UnavailableError, UnstorableEventError
from .events import Event

# Every wait is bounded so that DT hears 503 well inside Heroku's 30 s router timeout.
CONNECT_TIMEOUT_SECONDS = 5
POOL_WAIT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 5000

SCHEMA = """
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
-- one device over time, and the latest event of each type per device
CREATE INDEX IF NOT EXISTS dt_events_device_time ON dt_events (device_id, event_time DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS dt_events_device_type_time ON dt_events (device_id, event_type, event_time DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS dt_events_time ON dt_events (event_time DESC NULLS LAST);
"""

INSERT = """
INSERT INTO dt_events (event_id, event_type, device_id, project_id, event_time, labels, event)
VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (event_id) DO NOTHING
"""

LATEST = """
SELECT event_time, device_id, event_type, event_id, event -> 'event' -> 'data'
FROM dt_events
WHERE (%(device)s::text IS NULL OR device_id = %(device)s)
  AND (%(type)s::text IS NULL OR event_type = %(type)s)
ORDER BY event_time DESC NULLS LAST
LIMIT %(limit)s
"""


class EventStore:
    """A per-process pool of connections to the events table."""

    def __init__(self, database_url: str, max_connections: int):
        # Created closed: gunicorn forks workers after loading the app, and sockets must not be shared.
        self._pool = ConnectionPool(
            kwargs={**connection_options(database_url), "autocommit": True},  # the insert commits as it returns
            min_size=1,
            max_size=max_connections,
            open=False,
            timeout=POOL_WAIT_SECONDS,
            check=ConnectionPool.check_connection,
            configure=create_schema,
            name="dt_events",
        )

    def save(self, event: Event) -> bool:
        """Commit the event; return False if it was stored before."""
        row = (event.event_id, event.event_type, event.device_id, event.project_id, event.time,
               Jsonb(event.labels), event.text)
        with self._connection() as connection:
            return connection.execute(INSERT, row).rowcount == 1

    def latest(self, device_id: str | None, event_type: str | None, limit: int) -> list[tuple]:
        """Return the newest stored events, optionally of one device or type."""
        with self._connection() as connection:
            return connection.execute(LATEST, {"device": device_id, "type": event_type, "limit": limit}).fetchall()

    def close(self) -> None:
        """Close every connection of this process."""
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """Lend a connection that commits on leaving; turn database faults into 503 or 422."""
        if self._pool.closed:
            self._pool.open()  # first use in this process: after gunicorn's fork
        try:
            with self._pool.connection() as connection:
                yield connection
        except PoolTimeout:
            raise UnavailableError("database unavailable") from None
        except (psycopg.DataError, UnicodeEncodeError):
            raise UnstorableEventError("event holds text PostgreSQL cannot store") from None
        except psycopg.Error as error:
            raise UnavailableError(f"database error: {type(error).__name__}") from None


def create_schema(connection: psycopg.Connection) -> None:
    """Create the events table and its indexes unless they exist."""
    with connection.transaction():
        # Concurrent CREATE ... IF NOT EXISTS can still collide; one connection at a time.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('dt_events schema'))")
        connection.execute(SCHEMA)


def connection_options(database_url: str) -> dict:
    """Return connection settings for a DATABASE_URL in Heroku's form or libpq's."""
    options = psycopg.conninfo.conninfo_to_dict(database_url)  # raises ProgrammingError if malformed
    options.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    options.setdefault("application_name", "dt-receiver")
    options["options"] = f"{options.get('options', '')} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
    if "sslmode" not in options and "PGSSLMODE" not in os.environ and not is_local(options.get("host", "")):
        options["sslmode"] = "require"  # Heroku Postgres refuses plain connections
    return options


def is_local(host: str) -> bool:
    """Tell whether a libpq host is this machine (a socket directory or a loopback name)."""
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
