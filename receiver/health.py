"""GET /health: whether the receiver can do its job right now and events still arrive, for an uptime monitor."""

import re
import time
from datetime import timedelta

import gevent
from flask import Blueprint, Response, jsonify

from .components import components
from .durations import describe_age
from .errors import UnavailableError
from .store import EventStore
from .webhook import POOL_MARGIN_SECONDS

# An uptime monitor's check answers within this.
HEALTH_SECONDS = 3.0

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
def health() -> Response:
    """Answer 200 if a delivery would be accepted now and events keep arriving, else 503 naming each problem."""
    with gevent.Timeout(HEALTH_SECONDS, False):  # an unanswered check is a failed one
        problems = current_problems()
        return jsonify(ok=not problems, problems=problems), 503 if problems else 200
    return jsonify(ok=False, problems={"health": f"checks took over {HEALTH_SECONDS:g} s"}), 503


def current_problems() -> dict[str, str]:
    """Return what stops deliveries now (the configuration, the database, DT's signing keys), or events stopping."""
    parts = components()
    if parts.problem:
        return {"configuration": "the receiver is not configured"}
    problems = {}
    deadline = time.monotonic() + HEALTH_SECONDS - POOL_MARGIN_SECONDS
    if parts.store is not None and (fault := parts.store.check(deadline - time.monotonic())):
        problems["database"] = unnamed(fault)
    elif parts.store is not None and parts.stale_after is not None:
        if silence := silence_problem(parts.store, parts.stale_after, deadline - time.monotonic()):
            problems["events"] = silence
    if parts.verifier.keys is not None and not parts.verifier.keys.held():
        problems["signing_keys"] = "DT's signing keys could not be fetched"
    return problems


def silence_problem(store: EventStore, stale_after: timedelta, wait_seconds: float) -> str | None:
    """Return how long ago the last pushed event arrived if that is longer than allowed, else None."""
    try:
        age = store.last_arrival(wait_seconds)
    except UnavailableError as error:
        return unnamed(str(error))
    if age is None:
        return "no event from the Data Connector has been stored yet"
    return f"the last event arrived {describe_age(age)} ago" if age > stale_after else None


def unnamed(fault: str) -> str:
    """Return a database fault without the database's name (its fixed forms may hold it): it shows no setting."""
    return re.sub(r'database "[^"]*"', "the database", fault)
