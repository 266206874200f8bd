"""The commands people run (`flask --app app ...`): each works, or ends in one line naming what to fix."""

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import click
import psycopg
from flask import Flask

from . import queries
from .events import parse_timestamp
from .sample import SAMPLE_DATA, encode_body, sample_event, sign_body
from .settings import database_problem
from .signatures import SIGNATURE_HEADER

DURATION = re.compile(r"(\d+)\s*([smhdw])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Moment(click.ParamType):
    """A point in time: RFC 3339 (`2026-11-20T06:00:00Z`) or a duration back from now (`36h`, `3d`)."""

    name = "time"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        if match := DURATION.fullmatch(value.strip()):
            return datetime.now(timezone.utc) - timedelta(**{UNITS[match[2]]: int(match[1])})
        moment = parse_timestamp(value.strip().replace(" ", "T"))
        if moment is None:
            self.fail(f"{value!r} is neither an RFC 3339 time with a zone (2026-11-20T06:00:00Z) "
                      f"nor a duration back from now (90m, 36h, 3d, 2w)", param, ctx)
        return moment


def register_commands(app: Flask, settings: Mapping[str, str]) -> None:
    """Add the receiver's commands to `flask --app app`."""

    def database_url() -> str:
        """Return DATABASE_URL, or stop with one line saying how to set it."""
        problem = database_problem(settings)
        if problem:
            raise click.UsageError(problem)
        if not settings.get("DATABASE_URL"):
            raise click.UsageError("this command reads the database: set DATABASE_URL "
                                   "(on Heroku: heroku addons:create heroku-postgresql:essential-0)")
        return settings["DATABASE_URL"]

    @app.cli.command("send")
    @click.argument("url", default="http://localhost:5006/")
    @click.option("--type", "event_type", type=click.Choice(sorted(SAMPLE_DATA)), default="temperature")
    @click.option("--event-id", help="Reuse an id to see how a duplicate is answered.")
    @click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the answer.")
    def send(url: str, event_type: str, event_id: str | None, timeout: float) -> None:
        """Sign a sample event with DT_SIGNATURE_SECRET, as DT does, and POST it to URL."""
        secret = settings.get("DT_SIGNATURE_SECRET")
        if not secret:
            raise click.UsageError("send signs with DT_SIGNATURE_SECRET: set it to the receiver's secret")
        body = encode_body(sample_event(event_type, event_id))
        status, answer = post(url, body, {SIGNATURE_HEADER: sign_body(body, secret)}, timeout)
        click.echo(f"{status} {answer.strip()}")
        if not 200 <= status < 300:
            sys.exit(1)

    @app.cli.command("events")
    @click.option("--device", help="Only this device id.")
    @click.option("--type", "event_type", help="Only this event type.")
    @click.option("--since", type=Moment(), help="Only events from this time on: RFC 3339, or 36h, 3d back from now.")
    @click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for other tools.")
    def events(device: str | None, event_type: str | None, since: datetime | None, limit: int, as_json: bool) -> None:
        """List the newest stored events, newest first."""
        with database(database_url()) as connection:
            found = queries.latest(connection, device, event_type, since, limit)
        if not found:
            click.echo("no stored events match", err=True)
        for row in found:
            click.echo(json.dumps(as_record(row), default=str) if as_json else as_text(row))


def as_record(row: dict) -> dict:
    """Return a stored event as one plain object: its columns and its body."""
    return {"event_id": row["event_id"], "event_time": row["event_time"].isoformat(), "device_id": row["device_id"],
            "event_type": row["event_type"], "source": row["source"], "received_at": row["received_at"].isoformat(),
            "body": row["event"]}


def as_text(row: dict) -> str:
    """Return a stored event as one line for people: time, device, type, id, labels, data."""
    body = row["event"] if isinstance(row["event"], dict) else {}
    event = body.get("event") if isinstance(body.get("event"), dict) else {}
    labels = json.dumps(body.get("labels") or {}, ensure_ascii=False)
    data = json.dumps(event.get("data"), ensure_ascii=False)
    when = row["event_time"].isoformat(timespec="seconds")
    return f"{when}  {row['device_id']}  {row['event_type']}  {row['event_id']}  {labels}  {data}"


@contextmanager
def database(url: str) -> Iterator[psycopg.Connection]:
    """Lend the commands' connection, turning a database fault into one line."""
    try:
        with queries.connect(url) as connection:
            yield connection
    except queries.DatabaseError as error:
        raise click.ClickException(f"database unavailable: {error}") from None


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST a JSON body and return the status and text of the answer."""
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter("give an http:// or https:// URL", param_hint="URL")
    headers = {"Content-Type": "application/json", **headers}
    outgoing = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 (scheme checked above)
    try:
        with urllib.request.urlopen(outgoing, timeout=timeout) as answer:  # noqa: S310 (scheme checked above)
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read().decode(errors="replace")
    except urllib.error.URLError as error:
        raise click.ClickException(f"could not reach {url}: {error.reason}") from None
    except TimeoutError:
        raise click.ClickException(f"no answer from {url} within {timeout:g} s") from None
