"""DT's published signing keys: fetched once, refreshed sparingly, kept through outages."""

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable

import jwt

from .errors import SignatureError, UnavailableError

log = logging.getLogger("receiver")

MAX_DISCOVERY_BYTES = 64 * 1024
EMPTY_RETRY_SECONDS = 5.0


class SigningKeys:
    """The issuer's keys by `kid`, from its OpenID discovery document and JWKS."""

    def __init__(
        self,
        issuer: str,
        refresh_interval: float = 30.0,
        max_age: float = 3600.0,
        timeout: float = 3.0,  # per request: discovery and key set together stay inside a delivery's 7 s
        clock: Callable[[], float] = time.monotonic,
    ):
        self.issuer = issuer
        self._refresh_interval = refresh_interval  # at most one fetch per interval, whatever kids arrive
        self._max_age = max_age  # so keys DT retires stop being trusted
        self._timeout = timeout
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = threading.Lock()

    def key_for(self, kid: str) -> jwt.PyJWK:
        """Return the key with this id, refreshing the set when it is unknown (waiting) or old (in the background)."""
        if kid not in self._keys:
            self._refresh_if_due()
        elif self._clock() - self._fetched_at > self._max_age and self._refresh_is_due():
            threading.Thread(target=self._refresh_if_due, name="DT signing keys", daemon=True).start()
        key = self._keys.get(kid)
        if key is not None:
            return key
        if not self._keys:
            raise UnavailableError("DT's signing keys could not be fetched")
        raise SignatureError("token is signed by an unknown key")

    def held(self) -> bool:
        """Tell whether any key is held, fetching the set first if none is."""
        if not self._keys:
            self._refresh_if_due()
        return bool(self._keys)

    def _refresh_is_due(self) -> bool:
        # With no key at all every delivery waits on the set: try again sooner than the usual interval.
        interval = self._refresh_interval if self._keys else min(self._refresh_interval, EMPTY_RETRY_SECONDS)
        return self._clock() - self._attempted_at >= interval

    def _refresh_if_due(self) -> None:
        # The lock only claims the attempt; the fetch runs outside it, so deliveries that the keys
        # already held can verify never wait on DT's endpoint.
        with self._lock:
            if not self._refresh_is_due():
                return
            now = self._attempted_at = self._clock()
        try:
            keys = self._fetch()
        except (OSError, ValueError, jwt.PyJWTError) as error:
            # The keys fetched before, if any, stay in use through the outage.
            log.warning("could not fetch DT's signing keys", extra={"fields": {"error": type(error).__name__}})
            return
        self._keys = {key.key_id: key for key in keys if key.key_id}  # one assignment: readers see old or new
        self._fetched_at = now
        log.info("fetched DT's signing keys", extra={"fields": {"kids": sorted(self._keys)}})

    def _fetch(self) -> list[jwt.PyJWK]:
        discovery_url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        with urllib.request.urlopen(discovery_url, timeout=self._timeout) as response:  # noqa: S310 (an https URL from configuration)
            discovery = json.loads(response.read(MAX_DISCOVERY_BYTES))
        jwks_uri = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
        if not isinstance(jwks_uri, str):
            raise ValueError("discovery document names no jwks_uri")
        client = jwt.PyJWKClient(jwks_uri, cache_jwk_set=False, cache_keys=False, timeout=self._timeout)
        return client.get_signing_keys()
