"""Multi-row inserts in one order: a live batch and a backfill writing the same ids at once both complete."""

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from support.dt_api import history_event

from receiver import queries
from receiver.events import parse_event
from receiver.readings import samples_of
from receiver.sample import encode_body
from receiver.store import EventStore

IDS = [f"shared-{n:03d}" for n in range(40)]
MIDDLE = IDS[len(IDS) // 2]


def live_row(history: dict) -> tuple:
    """Return the row group commit hands the store's writer for the same event pushed (the same time: DT's event)."""
    event = parse_event(encode_body({"event": history}))
    return event.event_id, event.device_id, event.event_type, event.time, event.text, samples_of(event)


def waiting_on_locks(database_url: str, count: int) -> None:
    """Wait until this many statements wait for a lock (a row another transaction is inserting)."""
    give_up_at = time.monotonic() + 10
    with psycopg.connect(database_url, autocommit=True) as connection:
        while connection.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] < count:
            assert time.monotonic() < give_up_at, "the inserts never reached the held row"
            time.sleep(0.01)


@pytest.mark.parametrize("live_order", ["ascending", "descending"])
def test_a_live_batch_and_a_backfill_inserting_the_same_ids_in_opposite_orders_both_complete(database_url, live_order):
    """A batch of deliveries and a backfill handed the same ids in opposite orders meet at a row a third
    transaction holds; once it lets go, both complete (a deadlock would abort one) and each id is stored once."""
    live_ids = IDS if live_order == "ascending" else IDS[::-1]
    store = EventStore(database_url, 2)
    store.start()
    assert store.check(10) is None
    history = [history_event("p", "emushared", "touch", event_id=event_id) for event_id in live_ids[::-1]]
    live = {row[0]: row for row in map(live_row, history)}
    try:
        with psycopg.connect(database_url) as holder, ThreadPoolExecutor(2) as both:
            holder.execute("INSERT INTO dt_events (event_id, event_time, event) VALUES (%s, %s, '{}')",
                           (MIDDLE, live[MIDDLE][3]))
            batch = both.submit(store._write, [live[event_id] for event_id in live_ids], 15)

            def backfill() -> int:
                with queries.connect(database_url) as connection:
                    return queries.add_history(connection, history)

            backfilled = both.submit(backfill)
            waiting_on_locks(database_url, 2)
            holder.rollback()  # the middle row is free: without one order, each insert now waits on the other
            new_live, new_history = batch.result(20), backfilled.result(20)
    finally:
        store.close()

    assert sum(new_live) + new_history == len(IDS)
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(DISTINCT event_id), count(*) FROM dt_events").fetchone() == (
            len(IDS), len(IDS))
