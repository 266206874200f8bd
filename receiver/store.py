"""Keep every event in PostgreSQL, once, committed before DT is told so."""

import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import gevent
import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from .arrays import FloatArray, IntArray, SmallIntArray, TextArray, TimeArray
from .errors import ConfigError, UnavailableError
from .events import Event
from .group_commit import GroupCommit
from .logs import database_fault
from .readings import samples_of
from .schema import VERSION, NewerSchemaError, may_store_before_switch, migrate
from .upgrade import fill_one_window

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
# The readings an upgrade left behind are filled in a window at a time, with this pause between windows (so that
# deliveries keep the database's time), and another process looks again this often in case the one filling stops.
FILL_PAUSE_SECONDS = 0.05
FILL_RETRY_SECONDS = 30
# What a statement raises when the table, a column or its type is not there (a reset database, a restore
# without the table), or when the table's key is not schema 5's (an older release's table restored under it):
# the store prepares the table again.
SCHEMA_LOST = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedObject,
               psycopg.errors.InvalidColumnReference)

# Schema 5: a batch of timed events and, in the same statement and commit, the readings (receiver/readings.py)
# of those that were new; a redelivered, raced or backfilled duplicate has the same time, so the same partition,
# and conflicts. Binary arrays: as text, every quote in every body would be escaped, at several times the cost.
SAMPLES_OF_NEW = """
readings AS (
    INSERT INTO dt_samples (time, value, value2, device, kind, state, event_id)
    SELECT COALESCE(time::timestamptz, now()), value, value2, device, kind, state, event_id
    FROM unnest(%b::text[], %b::float8[], %b::float8[], %b::int4[], %b::int2[], %b::text[], %b::text[])
         AS sample (time, value, value2, device, kind, state, event_id)
    WHERE event_id IN (SELECT event_id FROM new){unwritten}
)"""
# An event whose raw copy retention or `prune` has removed is new to dt_events when DT sends it again (Synchronize
# sends the newest event of each type, however old) or backfill fetches it again: its readings, kept longer, are
# not written twice. A look per sample, through dt_samples_device_time: so only for events older than this.
UNWRITTEN = """
      AND NOT EXISTS (SELECT FROM dt_samples AS kept WHERE kept.device = sample.device
                      AND kept.time = sample.time::timestamptz AND kept.kind = sample.kind
                      AND kept.event_id = sample.event_id)"""
LOOK_FOR_READINGS_BEFORE = timedelta(hours=1)
NEW_EVENTS = """
new AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, source, event)
    SELECT event_id, device_id, event_type, COALESCE(event_time, now()), '{source}', event
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
         AS batch (event_id, device_id, event_type, event_time, event)
    {unseen}
    ON CONFLICT (event_id, event_time) DO NOTHING
    RETURNING event_id
)"""
# A batch of one, the most common, costs less with the event as plain values.
NEW_EVENT = """
new AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) VALUES (%b, %b, %b, %b, %b)
    ON CONFLICT (event_id, event_time) DO NOTHING
    RETURNING event_id
)"""
# An event without a timestamp is stored at now(), so a redelivery would find no conflict: its own transaction,
# a lock on its id, and a look in every partition (rare; 0.2-0.4 ms).
LOCK_EVENT_ID = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
NEW_UNTIMED_EVENT = """
new AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
    SELECT %b, %b, %b, now(), %b WHERE NOT EXISTS (SELECT FROM dt_events WHERE event_id = %b)
    RETURNING event_id
)"""
NOTE_ARRIVAL = """
noted AS (
    UPDATE dt_last_arrival SET received_at = now()
    WHERE (received_at IS NULL OR received_at < now() - interval '1 second') AND EXISTS (SELECT FROM new)
)"""
# The dt_last_arrival row is noted at most once a second: an update locks the row until its commit, and a write
# that finds it being updated waits for that commit; a row already noted within the second is not locked at all.
PUSHED = NEW_EVENTS.format(source="connector", unseen="")
NEW_SAMPLES = SAMPLES_OF_NEW.format(unwritten="")
UNWRITTEN_SAMPLES = SAMPLES_OF_NEW.format(unwritten=UNWRITTEN)
WRITE = "WITH" + PUSHED + "," + NEW_SAMPLES + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
WRITE_OLD = "WITH" + PUSHED + "," + UNWRITTEN_SAMPLES + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
WRITE_ONE = "WITH" + NEW_EVENT + "," + NEW_SAMPLES + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
# Most events have one sample (a temperature, a heartbeat) or none: plain values cost less than arrays.
ONE_SAMPLE_OF_NEW = """
readings AS (
    INSERT INTO dt_samples (time, value, value2, device, kind, state, event_id)
    SELECT COALESCE(%b::timestamptz, now()), %b::float8, %b::float8, %b::int4, %b::int2, %b::text, event_id FROM new
)"""
WRITE_ONE_SAMPLE = "WITH" + NEW_EVENT + "," + ONE_SAMPLE_OF_NEW + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
WRITE_ONE_BARE = "WITH" + NEW_EVENT + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
WRITE_UNTIMED = "WITH" + NEW_UNTIMED_EVENT + "," + NEW_SAMPLES + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"
# DT's history may write a timestamp differently from the pushed event (a time of the same instant conflicts all
# the same), so backfill also looks for the id in every partition.
HISTORY = NEW_EVENTS.format(source="history",
                            unseen="WHERE NOT EXISTS (SELECT FROM dt_events AS s WHERE s.event_id = batch.event_id)")
WRITE_HISTORY = "WITH" + HISTORY + "," + UNWRITTEN_SAMPLES + "\nSELECT count(*) FROM new"

# Schemas 3 and 4, while the upgrade to 5 builds its index (receiver/upgrade.py): events alone, their readings
# filled in behind.
NEW_UNPARTITIONED = """
new AS (
    INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
    SELECT event_id, device_id, event_type, COALESCE(event_time, now()), event
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
         AS batch (event_id, device_id, event_type, event_time, event)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)"""
INSERT = "WITH" + NEW_UNPARTITIONED + "," + NOTE_ARRIVAL + "\nSELECT event_id FROM new"

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
        self._partitioned = True  # schema 5's statements; False while an upgrade from 3 or 4 runs
        self._devices = DeviceNumbers()

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
        row = (event.event_id, event.device_id, event.event_type, event.time, event.text, samples_of(event))
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

    def lend(self, wait_seconds: float):
        """Lend one of this process's pooled connections, for the receiver's upkeep (a context manager; faults
        as 503s that name their cause, as a delivery meets them)."""
        return self._connection(wait_seconds)

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
        """Commit rows (and their readings) within the wait; return, for each, whether it is new."""
        # A deadline of its own: a frozen server never answers, and no delivery's may cut short a batch others wait on.
        with gevent.Timeout(wait_seconds, UnavailableError("database unavailable: timeout")):
            with self._connection(wait_seconds) as connection:
                partitioned = self._partitioned
                try:
                    new = self._insert(connection, rows, partitioned)
                except psycopg.errors.InvalidColumnReference:
                    if partitioned:
                        raise
                    self._partitioned = True  # another process has switched to schema 5: its statements
                    new = self._insert(connection, rows, True)
        return first_of_each([escaped(row[0]) for row in rows], new)  # as written, if the text had to be escaped

    def _insert(self, connection: psycopg.Connection, rows: list[tuple], partitioned: bool) -> set[str]:
        """Insert rows, by event id as backfill inserts (two inserts of the same ids never wait on each other in a
        cycle); return the ids that were new. Of two rows with one id, the first is written."""
        unique = sorted({row[0]: row for row in reversed(rows)}.values(), key=lambda row: row[0])
        if not partitioned:
            return {event_id for (event_id,) in insert_keeping_odd_text(connection, INSERT, event_columns(unique))}
        devices = self._devices.numbers(connection, {row[1] for row in unique if row[5] and row[1] is not None})
        timed = [row for row in unique if row[3] is not None]
        new = set()
        if timed:
            query, params = write_of(timed, sample_columns(timed, devices))
            new.update(event_id for (event_id,) in insert_keeping_odd_text(connection, query, params))
        for row in unique:
            if row[3] is None:
                new.update(write_untimed(connection, row, devices))
        return new

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
        self._devices = DeviceNumbers()  # a lost dt_devices numbers them afresh
        threading.Thread(target=self._prepare, args=(True,), name="dt_events schema", daemon=True).start()

    def _prepare(self, again: bool = False) -> None:
        """Migrate the table (`again`: every step, a part having been lost), logging whether the database answered
        (and each new cause), until it is ready; then fill in the readings an upgrade left behind."""
        while not self._closed.is_set():
            try:
                # A pooled connection, so that the check counts against the dyno's connection budget.
                with self._pool.connection(timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                    if not self._ready.is_set() and may_store_before_switch(connection):
                        self._partitioned = False  # stores as before while the upgrade builds its index
                        self._ready.set()
                    # Storing already: leave the upgrade to the process running it, and look again later.
                    version = migrate(connection, again, wait=not self._ready.is_set())
            except PoolTimeout:
                self._attempted.set()  # the pool's own attempt has named the cause, if it failed
            except psycopg.Error as error:
                self.note_fault(database_fault(error))
            except NewerSchemaError as error:
                self.note_fault(str(error))
            else:
                if version >= VERSION:
                    self._partitioned = True
                    # Said before any delivery can be stored, so that the log reads in the order things happened.
                    log.info("database ready", extra={"fields": {"schema_version": version}})
                    self._ready.set()
                    self._attempted.set()
                    self._fill_readings()
                    return
                self._attempted.set()  # another process is upgrading: stored as before meanwhile
            self._closed.wait(PREPARE_RETRY_SECONDS)

    def _fill_readings(self) -> None:
        """Fill in, a window at a time, the readings of events an upgrade stored before it (one process works at
        a time; the others look again now and then, in case it stops)."""
        while not self._closed.is_set():
            try:
                with self._pool.connection(timeout=CONNECT_TIMEOUT_SECONDS) as connection:
                    state = fill_one_window(connection)
            except (PoolTimeout, psycopg.Error):
                state = "busy"
            if state == "done":
                return
            self._closed.wait(FILL_PAUSE_SECONDS if state == "filled" else FILL_RETRY_SECONDS)


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


class DeviceNumbers:
    """The number dt_devices gives each device id, cached in this process: a device seen before costs nothing."""

    def __init__(self):
        self._numbers: dict[str, int] = {}

    def numbers(self, connection: psycopg.Connection, device_ids: set[str]) -> dict[str, int]:
        """Return the numbers of these devices, adding those dt_devices does not hold yet, in a statement of its own."""
        missing = sorted(device_id for device_id in device_ids if device_id not in self._numbers)
        if missing:
            written = {escaped(device_id): device_id for device_id in missing}
            connection.execute("INSERT INTO dt_devices (device_id) SELECT unnest(%s::text[]) "
                               "ON CONFLICT (device_id) DO NOTHING", (list(written),))
            found = connection.cursor(row_factory=tuple_row).execute(
                "SELECT device_id, device FROM dt_devices WHERE device_id = ANY(%s)", (list(written),)).fetchall()
            self._numbers.update((written[device_id], device) for device_id, device in found)
        return self._numbers


def event_columns(rows: list[tuple]) -> list[list]:
    """Return the event columns of rows (event id, device id, type, time, body) as arrays."""
    event_ids, device_ids, event_types, times, bodies = zip(*(row[:5] for row in rows), strict=True)
    return [TextArray(event_ids), TextArray(device_ids), TextArray(event_types), TimeArray(times), TextArray(bodies)]


def sample_columns(rows: list[tuple], devices: dict[str, int]) -> list[list]:
    """Return the readings of rows as the arrays dt_samples takes: time, value, value2, device, kind, state,
    event id. An event with no device id has no readings (dt_readings names each reading's device)."""
    columns = [TextArray(), FloatArray(), FloatArray(), IntArray(), SmallIntArray(), TextArray(), TextArray()]
    for row in rows:
        device = devices.get(row[1]) if row[1] is not None else None
        for sample in row[5] if device is not None else ():
            for column, value in zip(columns, (sample.time, sample.value, sample.value2, device, sample.kind,
                                              sample.state, row[0]), strict=True):
                column.append(value)
    return columns


def write_of(timed: list[tuple], samples: list[list]) -> tuple[str, list]:
    """Return the statement that writes these timed rows with their readings, and its parameters."""
    if min(row[3] for row in timed) < datetime.now(UTC) - LOOK_FOR_READINGS_BEFORE:
        return WRITE_OLD, event_columns(timed) + samples
    if len(timed) > 1:
        return WRITE, event_columns(timed) + samples
    if len(samples[0]) > 1:
        return WRITE_ONE, list(timed[0][:5]) + samples
    if samples[0]:
        return WRITE_ONE_SAMPLE, list(timed[0][:5]) + [column[0] for column in samples[:6]]
    return WRITE_ONE_BARE, list(timed[0][:5])


def write_untimed(connection: psycopg.Connection, row: tuple, devices: dict[str, int]) -> set[str]:
    """Store an event without a (readable) timestamp at now(), unless its id is stored already; return it if new."""
    params = [row[0], row[1], row[2], row[4], row[0], *sample_columns([row], devices)]
    for attempt in (params, None):
        try:
            with connection.transaction():
                connection.execute(LOCK_EVENT_ID, (row[0],))
                return {event_id for (event_id,) in connection.execute(WRITE_UNTIMED, attempt or escaped(params))}
        except (psycopg.DataError, UnicodeEncodeError):
            if attempt is None:
                raise
    return set()


def insert_keeping_odd_text(connection: psycopg.Connection, query: str, params) -> psycopg.Cursor:
    """Run an insert and return its cursor; if a NUL or a lone surrogate in any row stops it, run it again
    with those written as JSON escapes, so that an authentic event is kept all the same (and rows beside it)."""
    cursor = connection.cursor(row_factory=tuple_row)
    try:
        return cursor.execute(query, params)
    except (psycopg.DataError, UnicodeEncodeError):
        return cursor.execute(query, escaped(params))


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
