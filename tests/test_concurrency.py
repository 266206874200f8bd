"""Deliveries that arrive together, at the moments shared state changes: a start, a key rotation, an outage."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from support.issuer import ORGANIZATION_ID
from support.signing import SECRET, signed_delivery

from receiver.keys import RETRY_SECONDS
from receiver.sample import encode_body, sample_event

BURST = 32
REFRESH_INTERVAL = 30  # SigningKeys' default: the server is never told another
UNKNOWN_KEY = (401, "token is signed by an unknown key\n")
KEYS_UNAVAILABLE = (503, "DT's signing keys could not be fetched\n")


def burst(server, deliveries: list[tuple[bytes, dict]]) -> list[tuple[int, str]]:
    """Send every delivery at the same moment, each on its own connection; return the answers in order."""
    start = threading.Barrier(len(deliveries))

    def send(delivery):
        start.wait()
        return server.post(*delivery, timeout=20)

    with ThreadPoolExecutor(len(deliveries)) as pool:
        return list(pool.map(send, deliveries))


def asymmetric(issuer, kid: str, count: int = BURST, secret: str | None = None) -> list[tuple[bytes, dict]]:
    """Return deliveries signed by the issuer's key `kid` (and with the secret, if given)."""
    deliveries = []
    for _ in range(count):
        body, headers = signed_delivery(secret=secret or SECRET)
        headers = {**(headers if secret else {}), "DT-Asymmetric-Signature": issuer.token(body, kid)}
        deliveries.append((body, headers))
    return deliveries


def forged_kids(issuer, count: int) -> list[tuple[bytes, dict]]:
    """Return deliveries signed with a real key under made-up key ids."""
    bodies = [encode_body(sample_event()) for _ in range(count)]
    key = issuer.private_keys["k1"]
    return [(body, {"DT-Asymmetric-Signature": issuer.token(body, f"bogus-{n}", key=key)})
            for n, body in enumerate(bodies)]


def asymmetric_server(start_server, issuer, **settings):
    """Start the Procfile server requiring DT-Asymmetric-Signature from the stand-in issuer."""
    return start_server(**{"DT_SIGNATURE_SECRET": "", "DT_ORGANIZATION_ID": ORGANIZATION_ID,
                           "DT_ISSUER": issuer.url, **settings})


@pytest.mark.parametrize("signatures", ["asymmetric", "both"])
def test_deliveries_arriving_together_at_a_start_are_all_accepted(start_server, issuer, signatures):
    """At a cold start, 32 authentic deliveries sent at once share the first key fetch and all get 200."""
    secret = SECRET if signatures == "both" else None
    server = asymmetric_server(start_server, issuer, DT_SIGNATURE_SECRET=secret or "")
    deliveries = asymmetric(issuer, "k1", secret=secret)
    assert burst(server, deliveries) == [(200, "logged\n")] * BURST
    assert issuer.fetches <= 2  # one per worker
    # Lines written at once by one worker's greenlets stay whole: each parses, one per event.
    logged = [line["body"] for line in server.log_lines() if line["msg"] == "event logged"]
    assert sorted(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() for body in logged) == sorted(
        body for body, _ in deliveries)


def test_deliveries_arriving_together_at_a_start_with_a_database_are_all_stored(start_server, issuer, database_url):
    """At a cold start with a database, 32 deliveries at once wait for the keys and the schema, and all are stored."""
    server = asymmetric_server(start_server, issuer, DATABASE_URL=database_url)
    deliveries = asymmetric(issuer, "k1")
    assert burst(server, deliveries) == [(200, "stored\n")] * BURST
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM dt_events").fetchone()[0] == BURST


def test_deliveries_arriving_together_while_the_issuer_answers_slowly_are_all_accepted(start_server, issuer):
    """With DT's identity service taking 2 s per answer, 32 deliveries at a start wait for one fetch and get 200."""
    issuer.delay = 2.0
    server = asymmetric_server(start_server, issuer, WEB_CONCURRENCY="1")
    started = time.monotonic()
    assert burst(server, asymmetric(issuer, "k1")) == [(200, "logged\n")] * BURST
    assert time.monotonic() - started < 7  # discovery and key set: 4 s, inside the delivery's deadline
    assert issuer.fetches == 1


@pytest.mark.slow
def test_key_rotation_and_issuer_outage_with_deliveries_arriving_together(start_server, issuer):
    """Bursts at a start, of forged key ids, of a new key during an outage, and after it: one fetch each, none refused."""
    server = asymmetric_server(start_server, issuer, WEB_CONCURRENCY="1")
    assert burst(server, asymmetric(issuer, "k1")) == [(200, "logged\n")] * BURST
    first_fetch = time.monotonic()
    assert burst(server, forged_kids(issuer, 200)) == [UNKNOWN_KEY] * 200
    assert issuer.fetches == 1  # made-up key ids fetch at most once per interval

    issuer.available = False
    issuer.add_key("k2")  # DT rotates while its identity service is unreachable from here
    time.sleep(max(0.0, first_fetch + REFRESH_INTERVAL + 0.5 - time.monotonic()))
    answers = burst(server, asymmetric(issuer, "k2") + asymmetric(issuer, "k1", count=8))
    assert answers == [KEYS_UNAVAILABLE] * BURST + [(200, "logged\n")] * 8  # held keys verify through the outage
    assert issuer.fetches == 2

    issuer.available = True
    time.sleep(RETRY_SECONDS + 0.5)
    assert burst(server, asymmetric(issuer, "k2")) == [(200, "logged\n")] * BURST
    assert issuer.fetches == 3


def test_stalled_key_endpoint_is_answered_in_time_and_fetched_again_later(start_server, issuer):
    """A key endpoint that trickles its answer gets 503 within DT's wait, and a later fetch succeeds."""
    issuer.trickle = 0.5
    server = asymmetric_server(start_server, issuer, WEB_CONCURRENCY="1")
    started = time.monotonic()
    assert burst(server, asymmetric(issuer, "k1", count=8)) == [KEYS_UNAVAILABLE] * 8
    assert time.monotonic() - started < 8
    issuer.trickle = 0
    time.sleep(RETRY_SECONDS + 0.5)
    assert burst(server, asymmetric(issuer, "k1", count=8)) == [(200, "logged\n")] * 8
