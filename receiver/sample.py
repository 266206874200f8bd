"""Realistic DT events, signed exactly as DT signs them, for trying the receiver and for tests."""

import hashlib
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import jwt

TOKEN_LIFETIME_SECONDS = 3600

SAMPLE_DATA = {
    "temperature": lambda now: {
        "value": 21.45,
        "updateTime": now,
        "samples": [{"value": 21.45, "sampleTime": now}],
        "isBackfilled": False,
    },
    "touch": lambda now: {"updateTime": now},
    "objectPresent": lambda now: {"state": "PRESENT", "updateTime": now},
    "networkStatus": lambda now: {
        "signalStrength": 80,
        "rssi": -62,
        "updateTime": now,
        "cloudConnectors": [{"id": "bdkjbo2v0000uk377c4g", "signalStrength": 80, "rssi": -62}],
        "transmissionMode": "LOW_POWER_STANDARD_MODE",
    },
}


def sample_event(
    event_type: str = "temperature", event_id: str | None = None, device_id: str = "emuc2f3h2lbr9a5ks2vncg0",
    at: datetime | None = None,
) -> dict[str, Any]:
    """Return an event shaped like those DT forwards, with a fresh id unless one is given, timed now unless `at`."""
    now = (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    project_id = "c0md3mm0c7bet3vico8g"
    return {
        "event": {
            "eventId": event_id or uuid.uuid4().hex[:20],
            "targetName": f"projects/{project_id}/devices/{device_id}",
            "eventType": event_type,
            "data": {event_type: SAMPLE_DATA[event_type](now)},
            "timestamp": now,
        },
        "labels": {"name": "Fridge <kitchen> & \"store\" – Ålesund"},
        "metadata": {
            "deviceId": device_id,
            "projectId": project_id,
            "deviceType": event_type if event_type != "networkStatus" else "temperature",
            "productNumber": "102081",
        },
    }


def encode_body(event: dict[str, Any]) -> bytes:
    """Return the event as compact JSON, the way DT's cloud writes it."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def sign_body(body: bytes, secret: str, now: float | None = None) -> str:
    """Return an X-Dt-Signature token for these exact bytes, with the claims DT sets."""
    issued_at = int(time.time() if now is None else now)
    claims = {
        "checksum": hashlib.sha1(body).hexdigest(),  # noqa: S324 (DT's legacy claim, not a security choice of ours)
        "checksum_sha256": hashlib.sha256(body).hexdigest(),
        "iat": issued_at,
        "exp": issued_at + TOKEN_LIFETIME_SECONDS,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")
