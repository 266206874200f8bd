"""GET /health: whether the receiver can do its job right now and events still arrive, for an uptime monitor."""

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import gevent
from flask import Blueprint, Response, current_app, jsonify

from .components import components
from .durations import describe_age
from .errors import UnavailableError
from .store import EventStore
from .webhook import POOL_MARGIN_SECONDS

# An uptime monitor's check answers within this.
HEALTH_SECONDS = 3.0
# A worker's answer is shared by every check for this long, so a flood of checks costs the database one round of
# queries a second, and cannot take the pool's connections from deliveries.
SHARED_SECONDS = 1.0
# Where each app keeps its shared answer, in app.extensions.
SHARED_ANSWER = "receiver.health"
TOO_SLOW = {"health": f"checks took over {HEALTH_SECONDS:g} s"}

blueprint = Blueprint("health", __name__)


class SharedAnswer:
    """The last answer of a check, shared while fresh; while one caller computes a new one, the others wait for it."""

    def __init__(self, compute: Callable[[], dict], seconds: float, clock: Callable[[], float] = time.monotonic):
        self._compute, self._seconds, self._clock = compute, seconds, clock
        self._answer: dict | None = None
        self._fresh_until = float("-inf")
        self._computing: threading.Event | None = None  # set when the answer being computed is ready
        self._lock = threading.Lock()

    def get(self, wait_seconds: float) -> dict | None:
        """Return the shared answer, computing it if it is stale; None if another caller's took over the wait."""
        with self._lock:
            if self._clock() < self._fresh_until:
                return self._answer
            computing, mine = self._computing, self._computing is None
            if mine:
                computing = self._computing = threading.Event()
        if not mine:
            computing.wait(wait_seconds)
            return self._answer if self._clock() < self._fresh_until else None
        try:
            answer = self._compute()
            with self._lock:
                self._answer, self._fresh_until = answer, self._clock() + self._seconds
            return answer
        finally:
            with self._lock:
                self._computing = None
            computing.set()


@blueprint.record_once
def share_answers(state) -> None:
    """Give the app its shared answer, made once when the blueprint is registered."""
    state.app.extensions[SHARED_ANSWER] = SharedAnswer(problems_within_deadline, SHARED_SECONDS)


@blueprint.get("/health")
def health() -> Response:
    """Answer 200 if a delivery would be accepted now and events keep arriving, else 503 naming each problem."""
    problems = current_app.extensions[SHARED_ANSWER].get(HEALTH_SECONDS)
    if problems is None:
        problems = TOO_SLOW
    return jsonify(ok=not problems, problems=problems), 503 if problems else 200


def problems_within_deadline() -> dict[str, str]:
    """Return the current problems, or that the checks took too long: an unanswered check is a failed one."""
    with gevent.Timeout(HEALTH_SECONDS, False):
        return current_problems()
    return TOO_SLOW


def current_problems() -> dict[str, str]:
    """Return what stops deliveries now (the configuration, the database, DT's signing keys), or events stopping."""
    parts = components()
    if parts.problem:
        return {"configuration": "the receiver is not configured"}
    problems = {}
    deadline = time.monotonic() + HEALTH_SECONDS - POOL_MARGIN_SECONDS
    if parts.store is not None and (fault := parts.store.check(deadline - time.monotonic())):
        problems["database"] = fault
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
        return str(error)
    if age is None:
        return "no event from the Data Connector has been stored yet"
    return f"the last event arrived {describe_age(age)} ago" if age > stale_after else None

