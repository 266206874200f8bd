"""The webhook: POST / verifies a delivery, keeps its event, hands it to your code, and only then answers 200."""

import logging
import time

import gevent
from flask import Blueprint, Response, request
from gunicorn.http.errors import ParseException
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from . import on_event
from .budget import BodyBudget
from .components import Components, components
from .errors import DeliveryError, UnavailableError
from .events import Event, parse_event
from .logs import EVENT_LINES, LOGGED, JsonText, event_line
from .server import close_connection_after_answer
from .store import EventStore

MAX_BODY_BYTES = 256 * 1024  # DT events are a few KB; this bounds what one request can make a worker hold
# What the bodies of one worker's deliveries in flight may hold together: 64 bodies at the limit, or thousands of DT's.
BODIES_IN_FLIGHT = BodyBudget(16 * 1024 * 1024)
# A refused request's body of up to this size is read and dropped by gunicorn, so the connection stays open for the
# next; a larger or chunked one is left unread and the connection closed (see close_connection_after_answer).
DRAINED_BODY_BYTES = 8 * 1024
# Set in a request's environ once its whole body has been read.
BODY_READ = "receiver.body_read"
# DT waits 10 s for an answer; every delivery is answered within this, whatever it waits on.
DEADLINE_SECONDS = 7.0
DEADLINE_REASON = f"no answer within {DEADLINE_SECONDS:g} s"
# The pool's own wait ends this much before the deadline, so a queued delivery hears why.
POOL_MARGIN_SECONDS = 0.5
# The router's X-Request-Id header, as WSGI names it: read from the environ, with no headers object in between.
REQUEST_ID = "HTTP_X_REQUEST_ID"
# The reasons given for the HTTP errors a delivery may meet; any other is named as Werkzeug names it.
HTTP_REASONS = {413: f"body is larger than {MAX_BODY_BYTES} bytes",
                404: "no such path: point the Data Connector at this app's root URL, /"}
HINT = "DT Data Connector receiver is up: point a Data Connector at this URL (it accepts POST).\n"

log = logging.getLogger("receiver")
blueprint = Blueprint("webhook", __name__)


@blueprint.get("/")
def hint() -> Response:
    """Say what this URL is for, to a person who opens it."""
    return plain_text(HINT, 200)


@blueprint.post("/")
def receive() -> Response:
    """Answer a delivery that reached Flask: the app's own WSGI entry (receiver/deliveries.py) answers the others."""
    return plain_text(deliver(request.environ, components()) + "\n", 200)


def deliver(environ: dict, parts: Components) -> str:
    """Verify, keep, hand over and log one delivery within the deadline, its headers before its body is read.

    Return what became of its event ("logged", "stored" or "duplicate"); raise a DeliveryError or an
    HTTPException (413, a body cut short) to refuse it.
    """
    deadline = time.monotonic() + DEADLINE_SECONDS
    with gevent.Timeout(DEADLINE_SECONDS, UnavailableError(DEADLINE_REASON)):
        if parts.problem:
            log.error("receiver is not configured", extra={"fields": {"problem": parts.problem}})
            raise UnavailableError("receiver is not configured: see its log")
        size = body_size_to_reserve(environ)
        claims = parts.verifier.verify_headers(EnvironHeaders(environ))
        BODIES_IN_FLIGHT.reserve(size)
        try:  # no wait between the reservation and here, so no deadline can fire before its release is certain
            body = read_body(environ)
            parts.verifier.verify_body(claims, body)
            event = parse_event(body)
            outcome = "logged" if parts.store is None else keep(event, parts.store, deadline)
            run_event_handler(event)
            write_event_line(event, outcome, environ)
        finally:
            BODIES_IN_FLIGHT.release(size)
    return outcome


@blueprint.app_errorhandler(DeliveryError)
def turn_away(error: DeliveryError) -> Response:
    """Answer a delivery the receiver does not accept with its status and reason."""
    return answer_response(*refusal(request.environ, error))


@blueprint.app_errorhandler(HTTPException)
def turn_away_http(error: HTTPException) -> Response:
    """Answer a wrong path, method or size with a short reason, as other rejections are."""
    return answer_response(*refusal(request.environ, error))


def refusal(environ: dict, error: DeliveryError | HTTPException) -> tuple[str, int, tuple]:
    """Log why a request is turned away; return the answer's text, status and headers beyond the usual two."""
    if isinstance(error, DeliveryError):
        extra = (("Retry-After", str(error.retry_after_seconds)),) if isinstance(error, UnavailableError) else ()
        return rejection(environ, error.status, str(error)), error.status, extra
    reason = HTTP_REASONS.get(error.code, error.name.lower())
    extra = tuple((name, value) for name, value in error.get_headers() if name == "Allow")
    return rejection(environ, error.code, reason), error.code, extra


def body_size_to_reserve(environ: dict) -> int:
    """Return the most the body may hold: its Content-Length (413 over the limit), or the limit if it is chunked."""
    declared = get_content_length(environ)
    if declared is None:
        return MAX_BODY_BYTES + 1  # one byte over the limit: reading that much shows a chunked body is too large
    if declared > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    return declared


def read_body(environ: dict) -> bytes:
    """Return the request's body, or refuse one over the limit or cut short (as Werkzeug's request would)."""
    stream, declared = environ["wsgi.input"], get_content_length(environ)
    try:
        if "wsgi.input_terminated" in environ:  # the server ends the body (gunicorn's reader, chunked or not)
            body = stream.read(MAX_BODY_BYTES + 1)
        else:  # the stream may go on past the body: read what Content-Length declares, nothing without it
            body = stream.read(declared) if declared else b""
            if len(body) < (declared or 0):
                raise ClientDisconnected()
    except (OSError, ValueError, ParseException):  # the client went away, or its chunks are malformed
        raise ClientDisconnected() from None
    if len(body) > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    environ[BODY_READ] = True
    return body


@blueprint.after_app_request
def close_if_body_left_unread(response: Response) -> Response:
    """Close the connection after answering a request whose body was left unread, unless it is a few KB at most."""
    close_if_large_body_unread(request.environ)
    return response


def close_if_large_body_unread(environ: dict) -> None:
    """Have the server close the connection after its answer if a body that may be large was left unread."""
    if not environ.get(BODY_READ) and unread_body_may_be_large(environ):
        close_connection_after_answer()


def unread_body_may_be_large(environ: dict) -> bool:
    """Tell whether the request's body is chunked (its size unknown) or declared larger than a few KB."""
    declared = get_content_length(environ)  # None when chunked, or when there is no body
    if declared is None:
        return "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return declared > DRAINED_BODY_BYTES


def keep(event: Event, store: EventStore, deadline: float) -> str:
    """Commit the event before the deadline; return "stored", or "duplicate" if it was stored before."""
    pool_wait = deadline - time.monotonic() - POOL_MARGIN_SECONDS
    return "stored" if store.save(event, pool_wait) else "duplicate"


def run_event_handler(event: Event) -> None:
    """Give the event to the user's code; if it fails, DT is told to retry."""
    try:
        on_event.on_event(event)
    except DeliveryError:
        raise  # the delivery's deadline, not the handler's own failure
    except Exception as error:
        fields = {"event_id": event.event_id, "error": type(error).__name__}
        log.warning("event handler failed", extra={"fields": fields})
        raise UnavailableError(f"event handler failed: {type(error).__name__}") from None


def write_event_line(event: Event, outcome: str, environ: dict) -> None:
    """Write the accepted event's log line, or refuse the delivery if it cannot be written."""
    line = event_line(f"event {outcome}", event_fields(event, environ.get(REQUEST_ID)))
    try:
        EVENT_LINES.write(line)
    except OSError:  # stdout closed or full: without its line, a log-only event would be lost
        raise UnavailableError("log line could not be written") from None
    environ[LOGGED] = True


def event_fields(event: Event, request_id: str | None) -> dict:
    """Return what the log line of an accepted event says."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "device_id": event.device_id,
        "project_id": event.project_id,
        "timestamp": event.timestamp,
        "request_id": request_id,
        "body": JsonText.of(event),
    }


def rejection(environ: dict, status: int, reason: str) -> str:
    """Log why a request is turned away; return the answer's text."""
    fields = {"status": status, "reason": reason, "request_id": environ.get(REQUEST_ID)}
    log.warning("request rejected", extra={"fields": fields})  # a failed write never raises: only the event line's does
    environ[LOGGED] = True
    return reason + "\n"


def plain_text(text: str, status: int) -> Response:
    """Return a short text/plain answer."""
    return PlainText(text, status=status)


def answer_response(text: str, status: int, extra_headers: tuple = ()) -> Response:
    """Return a short text/plain answer with the headers given beyond its type and length."""
    response = PlainText(text, status=status)
    response.headers.extend(extra_headers)
    return response


class PlainText(Response):
    """A short text/plain answer, handed to the server as it was built.

    Werkzeug's own hand-over re-checks the headers for answers a short text never is (a redirect, a 204 or
    a 304, a body of unknown length), a tenth of what a delivery costs in Flask; a HEAD request still takes
    that path, which sends its headers without the body.
    """

    default_mimetype = "text/plain"

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        if environ.get("REQUEST_METHOD") == "HEAD":
            return super().__call__(environ, start_response)
        start_response(self.status, self.headers.to_wsgi_list())
        return self.response
