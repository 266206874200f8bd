"""Group commit: the rows deliveries hand over while a write is in flight go together in the next one."""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import UnavailableError

log = logging.getLogger("receiver")

# Bounds on one statement, so that a backlog arriving at once cannot build a write the statement timeout cuts short.
MAX_ROWS = 500
MAX_BYTES = 1024 * 1024

# write(rows, seconds) commits the rows within the seconds and returns, for each, whether it is new.
Write = Callable[[list[tuple], float], list[bool]]


class Batch:
    """Rows written in one statement and one commit, and what became of them."""

    def __init__(self):
        self.rows: list[tuple | None] = []  # None: its delivery gave up before the batch was taken
        self.size = 0
        self.give_up_at = 0.0  # when the last of its deliveries stops waiting
        self.written = threading.Event()
        self.new: dict[int, bool] = {}  # by the row's place in the batch
        self.error: str | None = None  # why it was not written; each delivery raises an exception of its own

    def has_room(self, size: int) -> bool:
        """Tell whether a row of this many bytes may still join."""
        return not self.rows or (len(self.rows) < MAX_ROWS and self.size + size <= MAX_BYTES)


class GroupCommit:
    """Write a row at once if no write is in flight; else with every row that arrives meanwhile, once that write ends.

    A row handed over alone is written by its own delivery, so it waits for nothing more than its insert; the
    rows that wait go to the process's one writer, which writes each batch as soon as the last write has ended,
    never on a timer, so one delivery's deadline never interrupts a write that others wait on.
    """

    def __init__(self, write: Write):
        self._write = write
        self._waiting: deque[Batch] = deque()
        self._writing = False  # a write, of one row or of a batch, is in flight
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._started = False
        self._closed = False

    def save(self, row: tuple, size: int, wait_seconds: float) -> bool:
        """Hand over a row and wait for its commit; return whether it is new, or raise UnavailableError."""
        with self._lock:
            alone = not self._writing and not self._waiting
            if alone:
                self._writing = True
            else:
                batch, index = self._join(row, size, wait_seconds)
        if alone:
            try:
                return self._write([row], wait_seconds)[0]
            finally:
                self._end_write()
        self._wake.set()
        if not batch.written.wait(wait_seconds):
            self._give_up(batch, index)
            raise UnavailableError("database unavailable: timeout")
        if batch.error is not None:
            raise UnavailableError(batch.error)
        return batch.new[index]

    def _join(self, row: tuple, size: int, wait_seconds: float) -> tuple[Batch, int]:
        """Add a row to the newest waiting batch, or to a new one if that is full; return the batch and its index."""
        if not self._started:
            threading.Thread(target=self._run, name="dt_events writer", daemon=True).start()
            self._started = True
        if not self._waiting or not self._waiting[-1].has_room(size):
            self._waiting.append(Batch())
        batch = self._waiting[-1]
        batch.rows.append(row)
        batch.size += size
        batch.give_up_at = max(batch.give_up_at, time.monotonic() + wait_seconds)
        return batch, len(batch.rows) - 1

    def _give_up(self, batch: Batch, index: int) -> None:
        """Leave a row out of its batch if the writer has not taken it yet (else DT's retry finds it a duplicate)."""
        with self._lock:
            if batch in self._waiting:
                batch.rows[index] = None

    def _end_write(self) -> None:
        """Mark the write in flight ended, and let the writer take what has arrived meanwhile."""
        with self._lock:
            self._writing = False
        self._wake.set()

    def close(self) -> None:
        """Let the writer end once it has written what waits."""
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        """Write the waiting batches in turn, then sleep until a row arrives or a write ends."""
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while batch := self._next():
                self._commit(batch)
                self._end_write()

    def _next(self) -> Batch | None:
        """Take the oldest waiting batch unless a write is in flight; rows that arrive from now on start a new one."""
        with self._lock:
            if self._writing or not self._waiting:
                return None
            self._writing = True
            return self._waiting.popleft()

    def _commit(self, batch: Batch) -> None:
        """Write the rows of one batch whose deliveries still wait, and tell them."""
        places = [place for place, row in enumerate(batch.rows) if row is not None]
        try:
            if places:
                new = self._write([batch.rows[place] for place in places], batch.give_up_at - time.monotonic())
                batch.new = dict(zip(places, new, strict=True))
        except UnavailableError as error:
            batch.error = str(error)
        except Exception as error:  # the writer must outlive any one batch
            log.error("writing events failed", extra={"fields": {"error": type(error).__name__}})
            batch.error = f"database error: {type(error).__name__}"
        finally:
            batch.written.set()
