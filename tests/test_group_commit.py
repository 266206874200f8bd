"""Group commit: deliveries waiting at once share one statement and one commit, and each hears its own outcome."""

import functools
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psycopg
import pytest
from support.server import deliver
from support.signing import SECRET, signed_delivery

from receiver.errors import UnavailableError
from receiver.events import parse_event
from receiver.group_commit import GroupCommit
from receiver.sample import sample_event
from receiver.store import EventStore

WAIT_SECONDS = 6.5


@functools.cache
def event(event_id: str):
    """Return a parsed event with this id (a NUL or a lone surrogate in it written as a JSON escape, as DT would),
    the same each time: DT delivers an event again as it was, with its time."""
    return parse_event(json.dumps(sample_event(event_id=event_id)).encode())


def committed(database_url: str) -> dict[str, int]:
    """Return each stored event id with the transaction that committed it."""
    with psycopg.connect(database_url) as connection:
        return dict(connection.execute("SELECT event_id, xmin::text::bigint FROM dt_events").fetchall())


@pytest.fixture
def store(database_url):
    """Return a ready event store of its own (plain threads, as the tests and commands run it)."""
    store = EventStore(database_url, 2)
    store.start()
    assert store.check(10) is None
    yield store
    store.close()


@contextmanager
def writer_held(database_url: str, store: EventStore, first_id: str):
    """Hold the writer inside its first batch (the table locked) until the block ends; yield that save's future."""
    with psycopg.connect(database_url) as blocker, ThreadPoolExecutor(1) as first:
        blocker.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")
        held = first.submit(store.save, event(first_id), WAIT_SECONDS)
        deadline = time.monotonic() + 5
        while not blocker.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
            assert time.monotonic() < deadline, "the first batch never reached the table"
            time.sleep(0.01)
        yield held
        blocker.commit()  # releases the lock: the first batch, then the rest


def save_all(store: EventStore, saves: list[tuple[str, float]]) -> list:
    """Save events from threads at once, each with its wait; return each outcome, or the error it raised."""
    def save(one):
        try:
            return store.save(event(one[0]), one[1])
        except UnavailableError as error:
            return str(error)
    pool = ThreadPoolExecutor(len(saves))
    futures = [pool.submit(save, one) for one in saves]
    pool.shutdown(wait=False)  # the caller lets the writer go on, then reads the outcomes
    deadline = time.monotonic() + 5
    while sum(len(batch.rows) for batch in store._commits._waiting) < len(saves):  # every row handed over
        assert time.monotonic() < deadline, "the rows never reached the writer"
        time.sleep(0.01)
    return futures


def test_rows_waiting_together_commit_together_and_each_hears_its_own_outcome(store, database_url):
    """Rows that arrive while a write is in flight go in one commit, each told stored or duplicate."""
    store.save(event("before"), WAIT_SECONDS)
    with writer_held(database_url, store, "first") as first:
        waiting = save_all(store, [(f"next-{n}", WAIT_SECONDS) for n in range(10)] + [("before", WAIT_SECONDS)] * 2)
    assert first.result() is True
    outcomes = [future.result() for future in waiting]
    assert outcomes == [True] * 10 + [False, False]
    transactions = committed(database_url)
    assert len({transactions[f"next-{n}"] for n in range(10)}) == 1  # one commit for the ten
    assert transactions["first"] != transactions["next-0"]


def test_same_new_event_twice_in_one_batch_is_stored_once(store, database_url):
    """Two deliveries of one new event in one batch: one is told stored, the other duplicate; one row."""
    with writer_held(database_url, store, "first"):
        waiting = save_all(store, [("twice", WAIT_SECONDS)] * 2)
    assert sorted(future.result() for future in waiting) == [False, True]
    assert list(committed(database_url)).count("twice") == 1


@pytest.mark.parametrize("odd_id", ["nul-\x00-id", "surrogate-\ud800-id"], ids=["NUL", "lone surrogate"])
def test_odd_text_in_one_row_fails_none_of_its_batch(store, database_url, odd_id):
    """A NUL or a lone surrogate in one row of a batch: that row is kept escaped, and every row beside it is stored."""
    with writer_held(database_url, store, "first"):
        waiting = save_all(store, [(f"plain-{n}", WAIT_SECONDS) for n in range(5)] + [(odd_id, WAIT_SECONDS)])
    assert [future.result() for future in waiting] == [True] * 6
    transactions = committed(database_url)
    escaped = odd_id.replace("\x00", "\\u0000").replace("\ud800", "\\ud800")
    assert escaped in transactions
    assert len({transactions[f"plain-{n}"] for n in range(5)} | {transactions[escaped]}) == 1  # one commit


def test_a_delivery_that_gives_up_loses_or_doubles_no_other_row(store, database_url):
    """One delivery gives up while its batch waits: it hears 503, the others are stored once, its retry is exact."""
    with writer_held(database_url, store, "first"):
        waiting = save_all(store, [("impatient", 0.1)] + [(f"patient-{n}", WAIT_SECONDS) for n in range(5)])
        assert waiting[0].result() == "database unavailable: timeout"
    assert [future.result() for future in waiting[1:]] == [True] * 5
    assert "impatient" not in committed(database_url)  # left out of its batch, which had not been taken
    assert store.save(event("impatient"), WAIT_SECONDS) is True
    assert sorted(committed(database_url)) == ["first", "impatient"] + [f"patient-{n}" for n in range(5)]


def test_row_whose_delivery_gave_up_is_left_out_of_its_batch():
    """A row whose delivery was answered 503 before the writer took its batch is never written, alone or with others."""
    release, written = threading.Event(), []

    def write(rows, seconds):
        written.append([row[0] for row in rows])
        release.wait(5)
        return [True] * len(rows)

    commits = GroupCommit(write)
    first = ThreadPoolExecutor(1).submit(commits.save, ("first",), 1, WAIT_SECONDS)
    while not written:
        time.sleep(0.01)
    with pytest.raises(UnavailableError, match="^database unavailable: timeout$"):
        commits.save(("given-up",), 1, 0.1)
    release.set()
    assert first.result() is True and commits.save(("after",), 1, WAIT_SECONDS) is True
    assert written == [["first"], ["after"]]
    commits.close()


def test_sustained_concurrent_saves_are_all_stored_without_waiting_out_a_deadline(store, database_url):
    """16 threads saving 40 events each, one after another: every handover between writes finds its writer."""
    def save_many(thread: int) -> list:
        return [store.save(event(f"sustained-{thread}-{n}"), WAIT_SECONDS) for n in range(40)]
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = [outcome for outcomes in pool.map(save_many, range(16)) for outcome in outcomes]
    assert outcomes == [True] * 640 and len(committed(database_url)) == 640
    assert time.monotonic() - started < WAIT_SECONDS  # no save waited out its deadline


def test_burst_on_one_worker_is_committed_in_fewer_transactions(start_server, database_url):
    """32 deliveries at once to one worker of the real server: all stored, in fewer commits than deliveries."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, WEB_CONCURRENCY="1")
    assert deliver(server, *signed_delivery(sample_event(event_id="warm-up")))[0] == 200
    deliveries = [signed_delivery(sample_event(event_id=f"burst-{n}")) for n in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda one: deliver(server, *one), deliveries))
    assert Counter(answers) == {(200, "stored\n"): 32}
    transactions = committed(database_url)
    assert len(transactions) == 33 and len({transactions[f"burst-{n}"] for n in range(32)}) < 32


def batch_sizes(row_bytes: list[int]) -> list[int]:
    """Return how many rows each write took when rows of these sizes wait behind a write in flight."""
    release, written = threading.Event(), []

    def write(batch, seconds):
        written.append(len(batch))
        release.wait(10)
        return [True] * len(batch)

    commits = GroupCommit(write)
    rows = len(row_bytes)
    pool = ThreadPoolExecutor(rows + 1)
    first = pool.submit(commits.save, ("first",), 1, WAIT_SECONDS)
    while not written:
        time.sleep(0.01)
    waiting = [pool.submit(commits.save, (f"row-{n}",), size, WAIT_SECONDS) for n, size in enumerate(row_bytes)]
    deadline = time.monotonic() + 10
    while sum(len(batch.rows) for batch in commits._waiting) < rows:  # every row handed over
        assert time.monotonic() < deadline, "the rows never reached the writer"
        time.sleep(0.01)
    release.set()
    assert first.result() is True and [future.result() for future in waiting] == [True] * rows
    pool.shutdown()
    commits.close()
    return written[1:]


def test_a_batch_holds_at_most_500_rows():
    """501 small rows waiting at once are written as a batch of 500, then one of 1."""
    assert batch_sizes([100] * 501) == [500, 1]


def test_a_batch_holds_at_most_1_mb_of_bodies():
    """Four bodies of 256 KiB and one of a byte, waiting at once: a batch of the four (1 MB exactly), then the byte."""
    assert batch_sizes([256 * 1024] * 4 + [1]) == [4, 1]


def test_batch_write_is_given_the_latest_of_its_deliveries_waits():
    """A batch of a delivery waiting 0.5 s and one waiting 6.5 s is written with about 6.5 s: no one cuts it short."""
    release, given = threading.Event(), []

    def write(rows, seconds):
        given.append(seconds)
        release.wait(5)
        return [True] * len(rows)

    commits = GroupCommit(write)
    pool = ThreadPoolExecutor(3)
    first = pool.submit(commits.save, ("first",), 1, WAIT_SECONDS)
    while not given:
        time.sleep(0.01)
    waiting = []
    for row, wait in (("short", 0.5), ("long", WAIT_SECONDS)):  # in this order: the longer wait joins last
        waiting.append(pool.submit(commits.save, (row,), 1, wait))
        while sum(len(batch.rows) for batch in commits._waiting) < len(waiting):
            time.sleep(0.001)
    release.set()
    assert first.result() is True and [future.result() for future in waiting] == [True, True]
    assert WAIT_SECONDS - 1 < given[1] <= WAIT_SECONDS
    pool.shutdown()
    commits.close()
