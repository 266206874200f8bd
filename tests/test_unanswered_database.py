"""A database that takes connections and never answers, met by the real gevent worker: its own deadlines end waits."""

import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import psycopg
import pytest
from support.signing import SECRET, signed_delivery

from receiver.health import SHARED_SECONDS
from receiver.sample import sample_event

RECEIVER_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = 'dt-receiver'"


def get_health(server, timeout: float = 15) -> tuple[int, dict]:
    """Return the status and parsed body of GET /health."""
    try:
        with urllib.request.urlopen(server.url + "health", timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as answer:
        return answer.code, json.loads(answer.read())


def wait_for_backend(admin: psycopg.Connection, condition: str, seconds: float = 5) -> int:
    """Return the pid of the receiver's backend that meets a condition on pg_stat_activity, once one does."""
    deadline = time.monotonic() + seconds
    while not (found := admin.execute(f"{RECEIVER_BACKENDS} AND {condition}").fetchall()):
        assert time.monotonic() < deadline, f"no receiver backend with {condition}"
        time.sleep(0.02)
    return found[0][0]


def test_health_answers_within_3_s_while_the_database_never_answers(start_server, postgres, database_url):
    """With PostgreSQL frozen once the pool connected (connections taken, queries unanswered), /health 503s in 3 s."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, WEB_CONCURRENCY="1")
    assert get_health(server) == (200, {"ok": True, "problems": {}})
    time.sleep(SHARED_SECONDS)  # the next check computes its own answer instead of sharing that one
    with postgres.frozen():
        started = time.monotonic()
        status, body = get_health(server)
        waited = time.monotonic() - started
    assert (status, body) == (503, {"ok": False, "problems": {"health": "checks took over 3 s"}})
    assert waited < 4


@pytest.mark.slow
def test_batch_writer_stuck_on_a_silent_backend_gives_up_at_its_deadline(start_server, database_url):
    """A batch whose backend stops answering mid-write is given up at its deliveries' deadline; the next one stores.

    The batch's write is made to wait on a lock, then its backend is frozen (SIGSTOP): the server never answers and
    its statement timeout cannot fire, so only the writer's own deadline frees the worker's one writer.
    """
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, WEB_CONCURRENCY="1",
                          DATABASE_MAX_CONNECTIONS="4")
    assert server.post(*signed_delivery(sample_event(event_id="warm-up")))[0] == 200
    frozen = None
    with psycopg.connect(database_url, autocommit=True) as admin, psycopg.connect(database_url) as blocker, \
            ThreadPoolExecutor(6) as clients:
        try:
            blocker.execute("LOCK TABLE dt_events IN ACCESS EXCLUSIVE MODE")
            alone = clients.submit(server.post, *signed_delivery(sample_event(event_id="alone")))
            alone_backend = wait_for_backend(admin, "wait_event_type = 'Lock'")
            batch = [clients.submit(server.post, *signed_delivery(sample_event(event_id=f"batch-{n}")))
                     for n in range(4)]
            time.sleep(0.5)  # the four join one batch behind the write in flight
            admin.execute("SELECT pg_cancel_backend(%s)", (alone_backend,))
            frozen = wait_for_backend(admin, "wait_event_type = 'Lock' AND query LIKE '%unnest%'")
            os.kill(frozen, signal.SIGSTOP)
            blocker.commit()
            started = time.monotonic()
            assert alone.result() == (503, "database error: timeout\n")
            assert [future.result() for future in batch] == [(503, "database unavailable: timeout\n")] * 4
            assert time.monotonic() - started < 8
            assert server.post(*signed_delivery(sample_event(event_id="after")), timeout=10) == (200, "stored\n")
        finally:
            if frozen is not None:
                with suppress(ProcessLookupError):
                    os.kill(frozen, signal.SIGCONT)
