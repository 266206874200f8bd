"""Group commit: the rows of deliveries waiting on the database go in one statement and one commit."""

import threading
from collections import deque

import psycopg

from .errors import UnavailableError

# The most rows one statement carries; more wait for the next writer (each delivery with a connection is one).
MOST_ROWS = 100

# Pushed events: its source is the column's default, 'connector'.
INSERT = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
VALUES (%s, %s, %s, COALESCE(%s, now()), %s)
ON CONFLICT (event_id) DO NOTHING
"""

# Many at once; RETURNING names the rows that are new.
INSERT_MANY = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
SELECT event_id, device_id, event_type, COALESCE(event_time, now()), event
FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[])
     AS batch (event_id, device_id, event_type, event_time, event)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""


class PendingRow:
    """One delivery's row, from the moment it is queued until a writer says whether it was new."""

    def __init__(self, row: tuple):
        self.row = row
        self.taken = False  # a writer has it
        self.new: bool | None = None
        self.error: UnavailableError | None = None
        self.done = threading.Event()

    def finish(self, new: bool | None = None, error: UnavailableError | None = None) -> None:
        """Record the outcome and wake the delivery waiting for it."""
        self.new, self.error = new, error
        self.done.set()


class CommitQueue:
    """The rows queued by a worker's deliveries, taken oldest first by whichever delivery holds a connection."""

    def __init__(self):
        self._rows: deque[PendingRow] = deque()

    def add(self, row: tuple) -> PendingRow:
        """Queue a delivery's row."""
        pending = PendingRow(row)
        self._rows.append(pending)
        return pending

    def take(self) -> list[PendingRow]:
        """Take the oldest queued rows, at most MOST_ROWS."""
        batch = []
        while self._rows and len(batch) < MOST_ROWS:
            pending = self._rows.popleft()
            pending.taken = True
            batch.append(pending)
        return batch

    def withdraw(self, pending: PendingRow) -> None:
        """Take back a row whose delivery gave up before any writer took it, so nothing writes it later."""
        try:
            self._rows.remove(pending)
        except ValueError:
            pass  # a writer has it: its outcome no longer matters to anyone


def write(connection: psycopg.Connection, batch: list[PendingRow]) -> None:
    """Commit a batch in one statement and tell each row whether it was new."""
    if len(batch) == 1:
        batch[0].finish(new=insert_keeping_odd_text(connection, INSERT, batch[0].row) == 1)
        return
    columns = [list(column) for column in zip(*(pending.row for pending in batch), strict=True)]
    try:
        inserted = {event_id for (event_id,) in connection.execute(INSERT_MANY, columns)}
    except (psycopg.DataError, UnicodeEncodeError):  # a NUL or a lone surrogate: every row again, that text escaped
        inserted = {event_id for (event_id,) in connection.execute(INSERT_MANY, escaped(columns))}
    for pending in batch:
        event_id = escaped(pending.row[0])  # as it is stored
        pending.finish(new=event_id in inserted)
        inserted.discard(event_id)  # the same event twice in one batch: the first is new, the second a duplicate


def fail_unfinished(batch: list[PendingRow], error: UnavailableError) -> None:
    """Tell every row of a batch that no outcome came of why the writer failed."""
    for pending in batch:
        if not pending.done.is_set():
            pending.finish(error=error)


def insert_keeping_odd_text(connection: psycopg.Connection, query: str, params) -> int:
    """Run an insert and return its row count; if a NUL or a lone surrogate in a key column stops it, run it
    again with those written as JSON escapes, so that an authentic event is kept all the same."""
    try:
        return connection.execute(query, params).rowcount
    except (psycopg.DataError, UnicodeEncodeError):
        return connection.execute(query, escaped(params)).rowcount


def escaped(value):
    """Return text (also inside lists and tuples) with NULs and lone surrogates as JSON escapes; the rest as it is."""
    if isinstance(value, (list, tuple)):
        return type(value)(map(escaped, value))
    if not isinstance(value, str):
        return value
    return value.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")
