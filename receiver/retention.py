"""The receiver's own upkeep, in each worker: partitions made ahead and retention applied, hourly, one worker at a time.

Every worker of every dyno runs the loop; the one that gets the advisory lock does the round, the others skip it.
"""

import logging
import random
import threading
from collections.abc import Mapping
from datetime import UTC, datetime

import psycopg

from . import partitions
from .errors import UnavailableError
from .logs import database_fault
from .settings import retention

log = logging.getLogger("receiver")

# Held for the round, on the round's own pooled connection: a session lock, so it ends with the connection.
UPKEEP_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('dt-receiver upkeep', 0))"
UPKEEP_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('dt-receiver upkeep', 0))"
FIRST_ROUND_SECONDS = 60  # after boot, give or take a third, so that the workers of a restart do not all ask at once
ROUND_SECONDS = 3600
BOOT_RETRY_SECONDS = 5
CONNECTION_WAIT_SECONDS = 10
TABLES = ((partitions.EVENTS, "EVENTS_RETENTION", "events"), (partitions.SAMPLES, "READINGS_RETENTION", "readings"))


def run_round(connection: psycopg.Connection, settings: Mapping[str, str], now: datetime,
              remove: bool = True) -> dict | None:
    """Make the partitions ahead and (`remove`) those of past days that hold many rows in DEFAULT, and remove what
    each retention has passed; None if another worker holds the lock. Return what was done: partitions made and
    dropped, rows deleted, bytes given back."""
    if not partitions.one_value(connection, UPKEEP_LOCK):
        return None
    try:
        today = now.astimezone(UTC).date()
        done = {"created": partitions.ensure_partitions(connection, today), "dropped": [], "skipped": [],
                "freed_bytes": 0}
        if remove:
            done["created"] += [name for table in (partitions.EVENTS, partitions.SAMPLES)
                                for name in partitions.carve_default(connection, table, today)]
        for table, setting, what in TABLES:
            kept_for = retention(settings, setting)
            if not remove or kept_for is None:
                continue
            removed = partitions.remove_before(connection, table, now - kept_for)
            done["dropped"] += removed["dropped"]
            done["skipped"] += removed["skipped"]
            done["freed_bytes"] += removed["freed_bytes"]
            done[f"deleted_{what}"] = removed["deleted"]
        return done
    finally:
        connection.execute(UPKEEP_UNLOCK)


def log_round(done: dict | None) -> None:
    """Write the round's one line."""
    if done is None:
        log.info("upkeep skipped: another worker is doing it")
        return
    fields = {name: value for name, value in done.items() if value or name in ("created", "dropped")}
    fields["freed_mb"] = round(fields.pop("freed_bytes", 0) / 1e6, 1)
    log.info("upkeep done", extra={"fields": fields})


def guarded_round(lend, settings: Mapping[str, str], remove: bool = True) -> str | None:
    """Run one round on a connection the store lends, and write its line; return None, or the fault that ended it,
    as a short cause (a fault is never raised: the loop, and the worker, go on)."""
    try:
        with lend(CONNECTION_WAIT_SECONDS) as connection:
            done = run_round(connection, settings, datetime.now(UTC), remove)
        if remove or (done and done["created"]):  # at boot, only a worker that made partitions says so
            log_round(done)
        return None
    except UnavailableError as error:  # the store names its cause: "database unavailable: timeout"
        return str(error)
    except psycopg.Error as error:
        return database_fault(error)
    except Exception as error:  # a bug must not end the loop, nor the worker
        return type(error).__name__


def keep_up(lend, settings: Mapping[str, str], stopping: threading.Event,
            first_round: float = FIRST_ROUND_SECONDS, every: float = ROUND_SECONDS) -> None:
    """Make today's partitions as the worker boots (retried until the database is ready, within the first round's
    wait), then run a whole round soon after, and then every hour."""
    tries = max(1, int(first_round // BOOT_RETRY_SECONDS))
    for _ in range(tries):
        if (cause := guarded_round(lend, settings, remove=False)) is None or stopping.wait(BOOT_RETRY_SECONDS):
            break
    else:
        log.warning("upkeep failed", extra={"fields": {"cause": cause}})
    wait = first_round * random.uniform(2 / 3, 4 / 3)  # noqa: S311 (a spread, not a secret)
    while not stopping.wait(wait):
        if (cause := guarded_round(lend, settings)) is not None:
            log.warning("upkeep failed", extra={"fields": {"cause": cause}})
        wait = every


STOPPING = threading.Event()


def start(store, settings: Mapping[str, str]) -> None:
    """Start this worker's upkeep beside its store (see keep_up); it ends when stop() is called."""
    STOPPING.clear()
    # The store's own pooled connections: the round counts against the dyno's connection budget.
    threading.Thread(target=keep_up, args=(store.lend, settings, STOPPING), name="dt upkeep", daemon=True).start()


def stop() -> None:
    """End this worker's upkeep (its round in progress ends with the store's connections)."""
    STOPPING.set()


