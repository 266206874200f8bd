"""Wire the receiver: settings, the one route and its answers, and the commands."""

import logging
import os
import re
import time
from collections.abc import Mapping

import gevent
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from receiver import on_event
from receiver.commands import register_commands
from receiver.errors import DeliveryError, UnavailableError
from receiver.events import Event, parse_event
from receiver.keys import SigningKeys
from receiver.logs import EVENTS_LOGGER, LOGGED, JsonText, configure_logging
from receiver.settings import SECRETS, connections_per_worker, library_problem, server_problem
from receiver.signatures import DT_ISSUER, Verifier
from receiver.store import EventStore

MAX_BODY_BYTES = 256 * 1024  # DT events are a few KB; this bounds what one request can make a worker hold
# DT waits 10 s for an answer; every delivery is answered within this, whatever it waits on.
DEADLINE_SECONDS = 7.0
# The pool's own wait ends this much before the deadline, so a queued delivery hears why.
POOL_MARGIN_SECONDS = 0.5
# An uptime monitor's check answers within this.
HEALTH_SECONDS = 3.0
HINT = "DT Data Connector receiver is up: point a Data Connector at this URL (it accepts POST).\n"

log = logging.getLogger("receiver")
event_log = logging.getLogger(EVENTS_LOGGER)


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """Build the receiver from a mapping of settings, or from the environment."""
    settings = os.environ if config is None else config
    configure_logging()
    app = Flask(__name__)
    # One byte over: Werkzeug cuts a chunked body silently at the limit, and the extra byte shows it was cut.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    problem = server_problem(settings) or library_problem(settings)
    verifier = None if problem else build_verifier(settings)
    store = None if problem else build_store(settings)
    app.extensions.update(dt_events_store=store, dt_receiver_problem=problem)
    register_routes(app, verifier, store, problem)
    register_commands(app, settings)
    return app


def build_verifier(settings: Mapping[str, str]) -> Verifier:
    """Return a verifier for the signatures the settings require."""
    names = SECRETS if settings.get("DT_SIGNATURE_SECRET") else ()
    organization_id = settings.get("DT_ORGANIZATION_ID")
    return Verifier(
        secrets=tuple(settings[name] for name in names if settings.get(name)),
        organization_id=organization_id or None,
        keys=SigningKeys(settings.get("DT_ISSUER") or DT_ISSUER) if organization_id else None,
    )


def build_store(settings: Mapping[str, str]) -> EventStore | None:
    """Return the Postgres store when DATABASE_URL is set, with this worker's share of the connections."""
    database_url = settings.get("DATABASE_URL")
    return EventStore(database_url, connections_per_worker(settings)) if database_url else None


def register_routes(app: Flask, verifier: Verifier | None, store: EventStore | None, problem: str | None) -> None:
    """Add the one route and the answers for everything the receiver turns away."""

    @app.get("/")
    def hint() -> Response:
        return plain_text(HINT, 200)

    @app.get("/health")
    def health() -> Response:
        with gevent.Timeout(HEALTH_SECONDS, False):  # an unanswered check is a failed one
            problems = {"configuration": "the receiver is not configured"} if problem else {}
            if store is not None and (fault := store.check(HEALTH_SECONDS - POOL_MARGIN_SECONDS)):
                # The fixed forms may name the configured database; an open endpoint shows no setting.
                problems["database"] = re.sub(r'database "[^"]*"', "the database", fault)
            if verifier is not None and verifier.keys is not None and not verifier.keys.held():
                problems["signing_keys"] = "DT's signing keys could not be fetched"
            return jsonify(ok=not problems, problems=problems), 503 if problems else 200
        return jsonify(ok=False, problems={"health": f"checks took over {HEALTH_SECONDS:g} s"}), 503

    @app.post("/")
    def receive() -> Response:
        deadline = time.monotonic() + DEADLINE_SECONDS
        with gevent.Timeout(DEADLINE_SECONDS, UnavailableError(f"no answer within {DEADLINE_SECONDS:g} s")):
            if problem:
                log.error("receiver is not configured", extra={"fields": {"problem": problem}})
                raise UnavailableError("receiver is not configured: see its log")
            body = read_body()
            verifier.verify(request.headers, body)
            event = parse_event(body)
            outcome = "logged" if store is None else keep(event, store, deadline)
            run_event_handler(event)
            write_event_line(event, outcome)
        return plain_text(outcome + "\n", 200)

    @app.errorhandler(DeliveryError)
    def turn_away(error: DeliveryError) -> Response:
        response = rejection(error.status, str(error))
        if isinstance(error, UnavailableError):
            response.headers["Retry-After"] = str(error.retry_after_seconds)
        return response

    @app.errorhandler(HTTPException)
    def turn_away_http(error: HTTPException) -> Response:
        reasons = {413: f"body is larger than {MAX_BODY_BYTES} bytes",
                   404: "no such path: point the Data Connector at this app's root URL, /"}
        reason = reasons.get(error.code, error.name.lower())
        response = rejection(error.code, reason)
        response.headers.update({k: v for k, v in error.get_headers() if k == "Allow"})
        return response


def read_body() -> bytes:
    """Return the request's body, or refuse one over the limit."""
    body = request.get_data(cache=False)
    if len(body) > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    return body


def keep(event: Event, store: EventStore, deadline: float) -> str:
    """Commit the event before the deadline; return "stored", or "duplicate" if it was stored before."""
    pool_wait = deadline - time.monotonic() - POOL_MARGIN_SECONDS
    return "stored" if store.save(event, pool_wait) else "duplicate"


def write_event_line(event: Event, outcome: str) -> None:
    """Write the accepted event's log line, or refuse the delivery if it cannot be written."""
    try:
        event_log.info(f"event {outcome}", extra={"fields": event_fields(event)})
    except OSError:  # stdout closed or full: without its line, a log-only event would be lost
        raise UnavailableError("log line could not be written") from None
    request.environ[LOGGED] = True


def run_event_handler(event: Event) -> None:
    """Give the event to the user's code; if it fails, DT is told to retry."""
    try:
        on_event.on_event(event)
    except DeliveryError:
        raise  # the delivery's deadline, not the handler's own failure
    except Exception as error:
        log.warning("event handler failed", extra={"fields": {"event_id": event.event_id, "error": type(error).__name__}})
        raise UnavailableError(f"event handler failed: {type(error).__name__}") from None


def event_fields(event: Event) -> dict:
    """Return what the log line of an accepted event says."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "device_id": event.device_id,
        "project_id": event.project_id,
        "timestamp": event.timestamp,
        "request_id": request.headers.get("X-Request-Id"),
        "body": JsonText.of(event),
    }


def rejection(status: int, reason: str) -> Response:
    """Log why a request is turned away and answer with the reason."""
    fields = {"status": status, "reason": reason, "request_id": request.headers.get("X-Request-Id")}
    log.warning("request rejected", extra={"fields": fields})  # a failed write never raises: only the event line's does
    request.environ[LOGGED] = True
    return plain_text(reason + "\n", status)


def plain_text(text: str, status: int) -> Response:
    """Return a short text/plain answer."""
    return Response(text, status=status, mimetype="text/plain")


app = create_app()
