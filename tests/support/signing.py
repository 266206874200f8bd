"""DT's signatures made by hand for the tests: the secret, signed deliveries, tokens with any claims."""

import base64
import copy
import functools
import hashlib
import hmac
import json
import time

import jwt

from receiver.sample import encode_body, sample_event, sign_body

SECRET = "test-signature-secret-0123456789abcdef"


def dt_event(event_id: str) -> dict:
    """Return the sample event of this id, the same each time it is asked for: DT delivers an event again (a retry,
    a Synchronize) as it was, with its own timestamp, which schema 5 keys each event by with its id."""
    return copy.deepcopy(_first_event(event_id))


@functools.cache
def _first_event(event_id: str) -> dict:
    return sample_event(event_id=event_id)


def signed_delivery(event: dict | None = None, secret: str = SECRET, now: float | None = None) -> tuple[bytes, dict]:
    """Return a realistic body and the headers DT would send with it."""
    body = encode_body(event or sample_event())
    return body, {"Content-Type": "application/json", "X-Dt-Signature": sign_body(body, secret, now)}


def claims_for(body: bytes, **changes) -> dict:
    """Return the claims DT would sign for a body, with some changed (None removes one)."""
    now = int(time.time())
    claims = {
        "checksum": hashlib.sha1(body).hexdigest(),
        "checksum_sha256": hashlib.sha256(body).hexdigest(),
        "iat": now,
        "exp": now + 3600,
        "jti": "f0e1d2c3",
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def token_with(claims: dict, secret: str = SECRET, algorithm: str = "HS256", headers: dict | None = None) -> str:
    """Return an HS256 (or other) token with exactly these claims."""
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def hand_made_hs256(header: dict, claims: dict, key: bytes) -> str:
    """Return a token HMAC-SHA256-signed with any key under any header: what pyjwt refuses to make."""
    signing_input = base64url(json.dumps(header).encode()) + "." + base64url(json.dumps(claims).encode())
    return signing_input + "." + base64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())


def base64url(part: bytes) -> str:
    """Return bytes as unpadded base64url, as JWTs write them."""
    return base64.urlsafe_b64encode(part).rstrip(b"=").decode()
