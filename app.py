"""Receive Disruptive Technologies Data Connector events: verify, keep, log, then answer 200."""

import atexit
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

import click
import psycopg
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from receiver.errors import ConfigError, DeliveryError, UnavailableError
from receiver.events import Event, parse_event
from receiver.keys import SigningKeys
from receiver.sample import SAMPLE_DATA, encode_body, sample_event, sign_body
from receiver.signatures import DT_ISSUER, SIGNATURE_HEADER, Verifier
from receiver.store import EventStore

MAX_BODY_BYTES = 256 * 1024  # DT events are a few KB; this bounds what one request can make a worker hold
MIN_SECRET_BYTES = 32
HINT = "DT Data Connector receiver is up: point a Data Connector at this URL (it accepts POST).\n"

log = logging.getLogger("receiver")


def create_app(config: Mapping[str, str] | None = None) -> Flask:
    """Build the receiver from a mapping of settings, or from the environment."""
    settings = os.environ if config is None else config
    configure_logging()
    verifier = build_verifier(settings)
    store = build_store(settings)
    app = Flask(__name__)
    # One byte over: Werkzeug cuts a chunked body silently at the limit, and the extra byte shows it was cut.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES + 1
    register_routes(app, verifier, store)
    register_commands(app, settings, store)
    return app


def configure_logging() -> None:
    """Send the receiver's log lines, one JSON object each, to stdout."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if not any(handler.get_name() == "stdout" for handler in log.handlers):
        handler = logging.StreamHandler(sys.stdout)  # flushes after every line
        handler.set_name("stdout")
        handler.setFormatter(JsonLineFormatter())
        log.addHandler(handler)


class JsonLineFormatter(logging.Formatter):
    """Format a record and its `fields` as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname.lower(), "msg": record.getMessage(), **getattr(record, "fields", {})}
        return json.dumps(line, default=str)


def build_verifier(settings: Mapping[str, str]) -> Verifier:
    """Return a verifier for the signatures the settings require; refuse a configuration that requires none."""
    secret = settings.get("DT_SIGNATURE_SECRET")
    organization_id = settings.get("DT_ORGANIZATION_ID")
    if not secret and not organization_id:
        raise ConfigError(
            "set DT_SIGNATURE_SECRET (the Data Connector's Signature Secret), "
            "DT_ORGANIZATION_ID (to verify DT-Asymmetric-Signature), or both"
        )
    names = ("DT_SIGNATURE_SECRET", "DT_SIGNATURE_SECRET_PREVIOUS") if secret else ()
    secrets = {name: settings[name] for name in names if settings.get(name)}
    for name, value in secrets.items():
        if len(value.encode()) < MIN_SECRET_BYTES:
            log.warning(f"{name} is shorter than {MIN_SECRET_BYTES} bytes: use a longer random secret")
    return Verifier(
        secrets=tuple(secrets.values()),
        organization_id=organization_id or None,
        keys=SigningKeys(settings.get("DT_ISSUER") or DT_ISSUER) if organization_id else None,
    )


def build_store(settings: Mapping[str, str]) -> EventStore | None:
    """Return the Postgres store when DATABASE_URL is set, sized to the server's threads."""
    database_url = settings.get("DATABASE_URL")
    if not database_url:
        return None
    try:
        store = EventStore(database_url, max_connections=int(settings.get("WEB_THREADS") or 4))
    except (psycopg.ProgrammingError, ValueError) as error:
        raise ConfigError(f"DATABASE_URL or WEB_THREADS is unusable ({type(error).__name__})") from None
    atexit.register(store.close)
    return store


def register_routes(app: Flask, verifier: Verifier, store: EventStore | None) -> None:
    """Add the one route and the answers for everything the receiver turns away."""

    @app.get("/")
    def hint() -> Response:
        return plain_text(HINT, 200)

    @app.post("/")
    def receive() -> Response:
        body = request.get_data(cache=False)
        if len(body) > MAX_BODY_BYTES:
            raise RequestEntityTooLarge()
        verifier.verify(request.headers, body)
        event = parse_event(body)
        if store is None:
            outcome = "logged"
        else:
            outcome = "stored" if store.save(event) else "duplicate"
        log.info(f"event {outcome}", extra={"fields": event_fields(event)})
        return plain_text(outcome + "\n", 200)

    @app.errorhandler(DeliveryError)
    def turn_away(error: DeliveryError) -> Response:
        response = rejection(error.status, str(error))
        if isinstance(error, UnavailableError):
            response.headers["Retry-After"] = str(error.retry_after_seconds)
        return response

    @app.errorhandler(HTTPException)
    def turn_away_http(error: HTTPException) -> Response:
        reason = f"body is larger than {MAX_BODY_BYTES} bytes" if error.code == 413 else error.name.lower()
        response = rejection(error.code, reason)
        response.headers.update({k: v for k, v in error.get_headers() if k == "Allow"})
        return response


def event_fields(event: Event) -> dict:
    """Return what the log line of an accepted event says."""
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "device_id": event.device_id,
        "project_id": event.project_id,
        "timestamp": event.timestamp,
        "labels": event.labels,
        "data": event.data,
        "request_id": request.headers.get("X-Request-Id"),
    }


def rejection(status: int, reason: str) -> Response:
    """Log why a request is turned away and answer with the reason."""
    fields = {"status": status, "reason": reason, "request_id": request.headers.get("X-Request-Id")}
    log.warning("request rejected", extra={"fields": fields})
    return plain_text(reason + "\n", status)


def plain_text(text: str, status: int) -> Response:
    """Return a short text/plain answer."""
    return Response(text, status=status, mimetype="text/plain")


def register_commands(app: Flask, settings: Mapping[str, str], store: EventStore | None) -> None:
    """Add `flask --app app send` and `flask --app app events`."""

    @app.cli.command("send")
    @click.argument("url", default="http://localhost:5006/")
    @click.option("--type", "event_type", type=click.Choice(sorted(SAMPLE_DATA)), default="temperature")
    @click.option("--event-id", help="Reuse an id to see how a duplicate is answered.")
    def send(url: str, event_type: str, event_id: str | None) -> None:
        """Sign a sample event with DT_SIGNATURE_SECRET, as DT does, and POST it to URL."""
        secret = settings.get("DT_SIGNATURE_SECRET")
        if not secret:
            raise click.UsageError("send signs with DT_SIGNATURE_SECRET: set it to the receiver's secret")
        body = encode_body(sample_event(event_type, event_id))
        status, answer = post(url, body, {SIGNATURE_HEADER: sign_body(body, secret)})
        click.echo(f"{status} {answer.strip()}")
        if not 200 <= status < 300:
            sys.exit(1)

    @app.cli.command("events")
    @click.option("--device", help="Only this device id.")
    @click.option("--type", "event_type", help="Only this event type.")
    @click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
    def events(device: str | None, event_type: str | None, limit: int) -> None:
        """List the newest stored events, newest first."""
        if store is None:
            raise click.UsageError("no events are stored: DATABASE_URL is not set")
        for event_time, device_id, kind, event_id, data in store.latest(device, event_type, limit):
            when = event_time.isoformat(timespec="seconds") if event_time else "-"
            click.echo(f"{when}  {device_id}  {kind}  {event_id}  {json.dumps(data)}")


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """POST a JSON body and return the status and text of the answer."""
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter("give an http:// or https:// URL", param_hint="URL")
    headers = {"Content-Type": "application/json", **headers}
    outgoing = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 (scheme checked above)
    try:
        with urllib.request.urlopen(outgoing, timeout=30) as answer:  # noqa: S310 (scheme checked above)
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read().decode(errors="replace")
    except urllib.error.URLError as error:
        raise click.ClickException(f"could not reach {url}: {error.reason}") from None


app = create_app()
