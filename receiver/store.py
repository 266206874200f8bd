"""Keep every event in PostgreSQL, once, committed before DT is told so."""

import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import gevent
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .errors import ConfigError, UnavailableError
from .events import Event
from .group_commit import GroupCommit
from .logs import database_fault
from .schema import NewerSchemaError, migrate

log = logging.getLogger("receiver")

# Each wait is bounded on its own; the delivery's deadline (receiver/webhook.py) bounds them all together.
CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 5000
# A peer that stops acknowledging (a partition) fails a write after this long, and an idle one is probed.
TCP_USER_TIMEOUT_MS = 5000
KEEPALIVE_SECONDS = 5
# The pool retries a failed connection for this long, then starts afresh on the next delivery: so
# deliveries store again within seconds of the database's return, instead of after a long back-off.
RECONNECT_SECONDS = 2
# A wait for a pooled connection ends this much before the wait it is part of (see _connection).
POOL_MARGIN_SECONDS = 0.25
# At start, until the table is ready, the schema check is retried this often.
PREPARE_RETRY_SECONDS = 2
# What a statement raises when the table, a column or its type is not there (a reset database, a restore
# without the table): the store prepares the table again.
SCHEMA_LOST = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedObject)

# Pushed events, a batch at a time (receiver/group_commit.py); their source is the column's default, 'connector'.
# Binary arrays: as text, every quote in every body would be escaped, at several times the cost of the rest.
INSERT = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
SELECT event_id, device_id, event_type, COALESCE(event_time, now()), event
FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
     AS batch (event_id, device_id, event_type, event_time, event)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
# A batch of one, the most common, costs less as a plain insert (about 25 us of the receiver's CPU, and the server's).
INSERT_ONE = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
VALUES (%s, %s, %s, COALESCE(%s, now()), %s)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""


def noting_arrival(insert: str) -> str:
    """Return an insert of pushed events that also notes, in dt_last_arrival, when one was new.

    At most once a second: an update locks the row until its commit, and a write that finds it being
    updated waits for that commit; a row already noted within the second is not locked at all."""
    return f"""
WITH inserted AS ({insert.strip()}),
noted AS (
    UPDATE dt_last_arrival SET received_at = now()
    WHERE (received_at IS NULL OR received_at < now() - interval '1 second') AND EXISTS (SELECT FROM inserted)
)
SELECT event_id FROM inserted
"""  # noqa: S608 (constant text only)


WRITE, WRITE_ONE = noting_arrival(INSERT), noting_arrival(INSERT_ONE)

# How long ago the Data Connector last pushed a new event (nothing if it never did), for /health and `status`:
# one row, so backfilled rows, however many and however new, are never read (DT's history says nothing about
# the connector), and an event dated in the future hides nothing.
LAST_ARRIVAL = "SELECT now() - received_at AS age FROM dt_last_arrival WHERE received_at IS NOT NULL"


class EventStore:
    """A per-process pool of connections to the events table, opened in the worker that uses it."""

    def __init__(self, database_url: str, max_connections: int):
        self._options = connection_options(database_url)
        self._max_connections = max_connections
        self._pool: ConnectionPool | None = None
        self._started = threading.Lock()
        self._ready = threading.Event()  # set once the table is at the latest schema
        self._attempted = threading.Event()  # set once the first try to reach the database has ended
        self._closed = threading.Event()
        self.last_fault = "its first check has not finished"
        self._reporting = threading.Lock()
        self._commits = GroupCommit(self._write)

    def start(self) -> None:
        """Open the pool and check the schema in the background; the caller does not wait."""
        with self._started:
            if self._pool is not None:
                return
            self._pool = ConnectionPool(
                kwargs={**self._options, "autocommit": True},  # each insert commits as it returns
                connection_class=type("Connection", (FaultNamingConnection,), {"store": self}),
                min_size=1,
                max_size=self._max_connections,
                # No check on every lend: it costs a round trip per event (Postgres sink 0.58 -> 0.65 of
                # log-only). A connection that broke while idle fails one delivery, 503, and is discarded.
                open=False,
                reconnect_timeout=RECONNECT_SECONDS,
                name="dt_events",
            )
            self._pool.open(wait=False)
        threading.Thread(target=self._prepare, name="dt_events schema", daemon=True).start()

    def save(self, event: Event, wait_seconds: float) -> bool:
        """Commit the event, together with those that wait beside it; return False if it was stored before."""
        self._wait_until_ready(wait_seconds)
        row = (event.event_id, event.device_id, event.event_type, event.time, event.text)
        return self._commits.save(row, len(event.text), wait_seconds)

    def check(self, wait_seconds: float) -> str | None:
        """Return None if the database answers a query within the wait, else why not."""
        try:
            with self._connection(wait_seconds) as connection:
                # Heroku revokes INSERT when a plan is full: a database that answers may still refuse events.
                may_insert = connection.execute("SELECT has_table_privilege('dt_events', 'INSERT')").fetchone()[0]
        except UnavailableError as error:
            return str(error)
        return None if may_insert else "database refuses new events: permission denied (is the plan full?)"

    def last_arrival(self, wait_seconds: float) -> timedelta | None:
        """Return how long ago the newest pushed event arrived, None if none has; raise UnavailableError if unsure."""
        with self._connection(wait_seconds) as connection:
            row = connection.execute(LAST_ARRIVAL).fetchone()
        return row[0] if row else None

    def note_fault(self, fault: str) -> None:
        """Remember why the database cannot be used; until the table is ready, log each new cause once."""
        with self._reporting:
            reported, self.last_fault = self.last_fault, fault
        self._attempted.set()
        if fault != reported and not self._ready.is_set() and not self._closed.is_set():
            log.warning("database not ready", extra={"fields": {"cause": fault}})

    def close(self) -> None:
        """Close every connection of this process, and stop trying to prepare the table."""
        self._closed.set()
        self._commits.close()
        if self._pool is not None:
            self._pool.close()

    def _write(self, rows: list[tuple], wait_seconds: float) -> list[bool]:
        """Commit rows in one statement within the wait; return, for each, whether it is new."""
        if len(rows) == 1:
            query, params = WRITE_ONE, rows[0]
        else:  # by event id, as backfill inserts: two inserts of the same ids never wait on each other in a cycle
            ordered = sorted(rows, key=lambda row: row[0])  # stable: of two rows with one id, the first is written
            query, params = WRITE, [list(column) for column in zip(*ordered, strict=True)]
        # A deadline of its own: a frozen server never answers, and no delivery's may cut short a batch others wait on.
        with gevent.Timeout(wait_seconds, UnavailableError("database unavailable: timeout")):
            with self._connection(wait_seconds) as connection:
                new = {event_id for (event_id,) in insert_keeping_odd_text(connection, query, params)}
        return first_of_each([escaped(row[0]) for row in rows], new)  # as written, if the text had to be escaped

    def _wait_until_ready(self, wait_seconds: float) -> None:
        """Until the table is ready, wait only for the first try to reach the database, then refuse at once."""
        if self._pool is None:
            self.start()
        if not self._ready.is_set() and not (self._attempted.wait(wait_seconds) and self._ready.is_set()):
            raise UnavailableError(f"database unavailable: {self.last_fault}")

    @contextmanager
    def _connection(self, wait_seconds: float) -> Iterator[psycopg.Connection]:
        """Lend a pooled connection; turn database faults into 503s that name their cause."""
        give_up_at = time.monotonic() + wait_seconds
        self._wait_until_ready(wait_seconds)
        try:
            # The pool gives up a moment before the write's own deadline, so that the 503 names the cause it saw.
            pool_wait = max(give_up_at - time.monotonic() - POOL_MARGIN_SECONDS, 0.01)
            with self._pool.connection(timeout=pool_wait) as connection:
                yield connection
        except PoolTimeout:
            raise UnavailableError(f"database unavailable: {self.last_fault}") from None
        except psycopg.Error as error:
            fault = database_fault(error)
            self.note_fault(fault)
            if isinstance(error, SCHEMA_LOST):
                self._prepare_again(fault)
            raise UnavailableError(f"database error: {fault}") from None

    def _prepare_again(self, fault: str) -> None:
        """The table (or its type) is gone, as after a reset or a restore without it: prepare it again, once."""
        with self._started:
            if not self._ready.is_set() or self._closed.is_set():
                return  # already preparing
            self._ready.clear()
        self.note_fault(f"{fault}: preparing the table again")
        threading.Thread(target=self._prepare, args=(True,), name="dt_events schema", daemon=True).start()

    def _prepare(self, again: bool = False) -> None:
        """Migrate the table (`again`: every step, a part having been lost), logging whether the database answered
        (and each new cause), until it is ready."""
        while not self._closed.is_set():
            try:
                # A pooled connection, so that the check counts against the dyno's connection budget.
                with self._pool.connection(timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                    version = migrate(connection, again)
            except PoolTimeout:
                self._attempted.set()  # the pool's own attempt has named the cause, if it failed
            except psycopg.Error as error:
                self.note_fault(database_fault(error))
            except NewerSchemaError as error:
                self.note_fault(str(error))
            else:
                self._ready.set()
                self._attempted.set()
                log.info("database ready", extra={"fields": {"schema_version": version}})
                return
            self._closed.wait(PREPARE_RETRY_SECONDS)


class FaultNamingConnection(psycopg.Connection):
    """A connection that tells the store why it could not connect, so 503s can say so."""

    store: EventStore | None = None

    @classmethod
    def connect(cls, *args, **kwargs):
        try:
            return super().connect(*args, **kwargs)
        except psycopg.Error as error:
            if cls.store is not None:
                cls.store.note_fault(database_fault(error))
            raise


def insert_keeping_odd_text(connection: psycopg.Connection, query: str, params) -> psycopg.Cursor:
    """Run an insert and return its cursor; if a NUL or a lone surrogate in any row stops it, run it again
    with those written as JSON escapes, so that an authentic event is kept all the same (and rows beside it)."""
    try:
        return connection.execute(query, params)
    except (psycopg.DataError, UnicodeEncodeError):
        return connection.execute(query, escaped(params))


def first_of_each(event_ids: list[str], new: set[str]) -> list[bool]:
    """Tell, for each event id in order, whether it is new: one of the ids written and not seen before it."""
    seen = set()
    flags = []
    for event_id in event_ids:
        flags.append(event_id in new and event_id not in seen)
        seen.add(event_id)
    return flags


def escaped(value):
    """Return text (also inside lists and tuples) with NULs and lone surrogates as JSON escapes; the rest as it is."""
    if isinstance(value, (list, tuple)):
        return type(value)(map(escaped, value))
    if not isinstance(value, str):
        return value
    return value.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def connection_options(database_url: str) -> dict:
    """Return connection settings for a DATABASE_URL in Heroku's form or libpq's."""
    try:
        options = psycopg.conninfo.conninfo_to_dict(database_url)
    except psycopg.ProgrammingError as error:  # its message quotes the part it could not read: maybe the password
        unknown = re.search(r'invalid URI query parameter: "(\w+)"', str(error))
        raise ConfigError(f"DATABASE_URL has a parameter libpq does not know: ?{unknown[1]}=" if unknown
                          else "DATABASE_URL cannot be read by libpq: check its %-escapes and its port") from None
    options.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    options.setdefault("application_name", "dt-receiver")
    options.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT_MS)
    options.setdefault("keepalives_idle", KEEPALIVE_SECONDS)
    options.setdefault("keepalives_interval", KEEPALIVE_SECONDS)
    options.setdefault("keepalives_count", 2)
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
