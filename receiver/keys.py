"""DT's published signing keys: one fetch at a time, shared by every delivery that needs it, kept through outages."""

import http.client
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import jwt

from .errors import SignatureError, UnavailableError

log = logging.getLogger("receiver")

MAX_DOCUMENT_BYTES = 64 * 1024
# The discovery document and the key set together, read to the end: inside a delivery's 7 s deadline.
FETCH_SECONDS = 5.0
# After a failed fetch, or with no key held, the next try comes sooner than the usual interval.
RETRY_SECONDS = 5.0


class SigningKeys:
    """The issuer's keys by `kid`, from its OpenID discovery document and JWKS.

    A delivery whose key is held never waits. One whose key is not held waits for the fetch in
    flight, or starts one if the last attempt is old enough: so made-up key ids cost DT's endpoint
    at most one fetch per refresh interval, and deliveries that arrive together share one fetch.
    The fetch runs in its own thread (a greenlet under gunicorn's gevent worker, which patches
    threading), so no delivery's deadline can cut short a fetch that others are waiting for.
    """

    def __init__(self, issuer: str, refresh_interval: float = 30.0, max_age: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.issuer = issuer
        self._refresh_interval = refresh_interval
        self._max_age = max_age  # so keys DT retires stop being trusted
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._last_failed = False
        self._in_flight: threading.Event | None = None  # set when the fetch under way ends
        self._lock = threading.Lock()

    def key_for(self, kid: str) -> jwt.PyJWK:
        """Return the key with this id; an unknown id waits for a fetch, an old set is refreshed in the background."""
        if kid not in self._keys:
            self._wait_for(self._fetch_if_due())
        elif self._clock() - self._fetched_at > self._max_age:
            self._fetch_if_due()
        key = self._keys.get(kid)
        if key is not None:
            return key
        if not self._keys or self._last_failed:  # the key may be real: DT should retry, not hear "forged"
            raise UnavailableError("DT's signing keys could not be fetched")
        raise SignatureError("token is signed by an unknown key")

    def held(self) -> bool:
        """Tell whether any key is held, fetching the set first if none is."""
        if not self._keys:
            self._wait_for(self._fetch_if_due())
        return bool(self._keys)

    def _fetch_if_due(self) -> threading.Event | None:
        """Return the fetch in flight, or start one if the last attempt is old enough; None if neither."""
        with self._lock:
            if self._in_flight is None and self._refresh_is_due():
                self._attempted_at = self._clock()
                self._in_flight = threading.Event()
                threading.Thread(target=self._refresh, args=(self._in_flight,), name="DT signing keys",
                                 daemon=True).start()
            return self._in_flight

    def _refresh_is_due(self) -> bool:
        interval = self._refresh_interval
        if not self._keys or self._last_failed:
            interval = min(interval, RETRY_SECONDS)
        return self._clock() - self._attempted_at >= interval

    @staticmethod
    def _wait_for(fetch: threading.Event | None) -> None:
        if fetch is not None:
            fetch.wait(FETCH_SECONDS + 1)  # the fetch ends by itself within FETCH_SECONDS

    def _refresh(self, done: threading.Event) -> None:
        attempted_at = self._attempted_at
        try:
            keys = fetch_signing_keys(self.issuer, time.monotonic() + FETCH_SECONDS)
        except (OSError, ValueError, http.client.HTTPException, jwt.PyJWTError) as error:
            # The keys fetched before, if any, stay in use through the outage.
            self._last_failed = True
            log.warning("could not fetch DT's signing keys", extra={"fields": {"error": type(error).__name__}})
        else:
            self._keys = keys  # one assignment: readers see the old set or the new one
            self._fetched_at, self._last_failed = attempted_at, False
            log.info("fetched DT's signing keys", extra={"fields": {"kids": sorted(keys)}})
        finally:
            with self._lock:
                self._in_flight = None
            done.set()


def fetch_signing_keys(issuer: str, deadline: float) -> dict[str, jwt.PyJWK]:
    """Return the issuer's signing keys by kid, from its discovery document and key set, read before the deadline."""
    discovery = read_json(issuer.rstrip("/") + "/.well-known/openid-configuration", deadline)
    jwks_uri = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
    if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
        raise ValueError("discovery document names no jwks_uri")
    key_set = read_json(jwks_uri, deadline)
    if not isinstance(key_set, dict):
        raise ValueError("key set is not a JSON object")
    keys = jwt.PyJWKSet.from_dict(key_set).keys
    return {key.key_id: key for key in keys if key.key_id and key.public_key_use in ("sig", None)}


def read_json(url: str, deadline: float) -> Any:
    """Return the JSON document at a URL, read whole before the deadline and within the size limit."""
    body = bytearray()
    # A per-read timeout alone would let an endpoint that trickles a byte at a time hold the fetch forever.
    timeout = max(deadline - time.monotonic(), 0.01)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an http(s) URL of the issuer's)
        while chunk := response.read1(16 * 1024):
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ValueError(f"document over {MAX_DOCUMENT_BYTES} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError("document not read within the fetch's deadline")
    return json.loads(body)
