"""The commands people run (`flask --app app ...`): each works, or ends in one line naming what to fix."""

import io
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import click
import psycopg
from flask import Flask, current_app
from flask.cli import with_appcontext

from . import exports, on_event, queries
from .durations import describe_age, parse_duration
from .errors import ConfigError
from .events import parse_event, parse_timestamp
from .sample import SAMPLE_DATA, encode_body, sample_event, sign_body
from .settings import database_problem, retention, retention_problem, stale_after, stale_problem
from .signatures import SIGNATURE_HEADER


class Moment(click.ParamType):
    """A point in time: RFC 3339 (`2026-11-20T06:00:00Z`) or a duration back from now (`36h`, `3d`)."""

    name = "time"

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        if (duration := parse_duration(value)) is not None:
            try:
                return datetime.now(UTC) - duration
            except OverflowError:  # before year 1
                self.fail(f"{value!r} reaches back before the year 1", param, ctx)
        moment = parse_timestamp(value.strip().replace(" ", "T"))
        if moment is None:
            self.fail(f"{value!r} is neither an RFC 3339 time with a zone (2026-11-20T06:00:00Z) "
                      f"nor a duration back from now (90m, 36h, 3d, 2w)", param, ctx)
        return moment


def init_app(app: Flask) -> None:
    """Add the receiver's commands to `flask --app app`."""
    for command in (send, events, backfill, prune, status, export, replay):
        app.cli.add_command(command)


def window_options(command):
    """Add the options that pick a window of stored events: --since, --until, and repeatable --device and --type."""
    options = (
        click.option("--since", type=Moment(), required=True,
                     help="Start of the window, by the events' own time: RFC 3339, or 36h, 3d back from now."),
        click.option("--until", type=Moment(),
                     help="End of the window (default: now), not in it: an event at exactly this time is left "
                          "for the next window, whose --since it is."),
        click.option("--device", "devices", multiple=True, help="Only this device id (repeatable)."),
        click.option("--type", "event_types", multiple=True, help="Only this event type (repeatable)."),
    )
    for option in reversed(options):
        command = option(command)
    return command


@click.command("send")
@click.argument("url", default="http://localhost:5006/")
@click.option("--type", "event_type", type=click.Choice(sorted(SAMPLE_DATA)), default="temperature")
@click.option("--event-id", help="Reuse an id to see how a duplicate is answered.")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the answer.")
@with_appcontext
def send(url: str, event_type: str, event_id: str | None, timeout: float) -> None:
    """Sign a sample event with DT_SIGNATURE_SECRET, as DT does, and POST it to URL."""
    secret = current_app.config.get("DT_SIGNATURE_SECRET")
    if not secret:
        raise click.ClickException("send signs with DT_SIGNATURE_SECRET: set it to the receiver's secret")
    # DT sends an event again as it was, timestamp and all: a given id is timed at the start of today (UTC), so
    # that sending it twice in a day is a redelivery, which the database answers as a duplicate.
    at = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) if event_id else None
    body = encode_body(sample_event(event_type, event_id, at=at))
    status, answer = post(url, body, {SIGNATURE_HEADER: sign_body(body, secret)}, timeout)
    click.echo(f"{status} {answer.strip()}")
    if not 200 <= status < 300:
        sys.exit(1)


@click.command("events")
@click.option("--device", help="Only this device id.")
@click.option("--type", "event_type", help="Only this event type.")
@click.option("--since", type=Moment(), help="Only events from this time on: RFC 3339, or 36h, 3d back from now.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for other tools.")
@with_appcontext
def events(device: str | None, event_type: str | None, since: datetime | None, limit: int, as_json: bool) -> None:
    """List the newest stored events, newest first."""
    with database() as connection:
        found = queries.latest(connection, device, event_type, since, limit)
    if not found:
        click.echo("no stored events match", err=True)
    for row in found:
        click.echo(json.dumps(as_record(row), default=str) if as_json else as_text(row))


@click.command("backfill")
@window_options
@click.option("--project", "projects", multiple=True,
              help="A project id (repeatable; default: every one the account sees).")
@with_appcontext
def backfill(since: datetime, until: datetime | None, devices: tuple[str, ...], event_types: tuple[str, ...],
             projects: tuple[str, ...]) -> None:
    """Store the events DT's history holds for a window that are not stored yet (after an outage)."""
    until = window_end(since, until)
    started = time.monotonic()
    tally = {"devices": 0, "fetched": 0, "new": 0}
    with database() as connection, dt_account() as (rest_api, account):
        targets = [(project, device) for project in projects or rest_api.list_project_ids(account)
                   for device in rest_api.list_device_ids(account, project, devices or None)]
        progress = "{devices} devices, {fetched} fetched, {new} new".format
        with click.progressbar(targets, label="backfill", file=sys.stderr,
                               item_show_func=lambda _: progress(**tally)) as bar:
            for project, device in bar:
                fetched = rest_api.iter_events(account, project, device, since, until, event_types or None)
                tally["new"] += queries.add_history(connection, counted(fetched, tally))
                tally["devices"] += 1
    click.echo(f"backfill: {tally['devices']} devices, {tally['fetched']} events fetched, {tally['new']} new, "
               f"{tally['fetched'] - tally['new']} already stored, {time.monotonic() - started:.1f} s")


@click.command("prune")
@click.option("--older-than", "older_than", type=Moment(),
              help="Remove raw events from before this time: a duration back from now (90d) or RFC 3339.")
@click.option("--readings-older-than", "readings_older_than", type=Moment(),
              help="Remove readings from before this time: a duration back from now (2y) or RFC 3339.")
@click.option("--dry-run", is_flag=True, help="Only say how many rows and bytes it would remove.")
@with_appcontext
def prune(older_than: datetime | None, readings_older_than: datetime | None, dry_run: bool) -> None:
    """Remove old events or readings: whole partitions dropped (their space given back), the rest in short batches."""
    targets = [(table, before, what) for table, before, what in (("dt_events", older_than, "events"),
                                                                  ("dt_samples", readings_older_than, "readings"))
               if before is not None]
    if not targets:
        raise click.UsageError("give --older-than (raw events), --readings-older-than (readings), or both")
    with database() as connection:
        for table, before, what in targets:
            cutoff = f"{utc_text(before, '%Y-%m-%d %H:%M:%S')} UTC"
            if dry_run:
                click.echo(estimate_line(queries.prune_estimate(connection, table, before), what, cutoff))
                continue
            click.echo(done_line(queries.prune(connection, table, before), what, cutoff))


def estimate_line(estimate: dict, what: str, cutoff: str) -> str:
    """Return what a prune would remove, for people."""
    rows = f"{estimate['rows']}" if estimate["exact"] else f"about {estimate['rows']} (the planner's estimate)"
    return (f"prune: would delete {rows} {what} from before {cutoff}, {megabytes(estimate['freed_bytes'])} given "
            f"back ({estimate['partitions']} whole partitions), about {megabytes(estimate['reused_bytes'])} left "
            "for new rows")


def done_line(done: dict, what: str, cutoff: str) -> str:
    """Return what a prune removed, for people: the rows of whole partitions dropped are the planner's count."""
    removed = done["dropped_rows"] + done["deleted"]
    line = (f"prune: removed {'about ' if done['dropped'] else ''}{removed} {what} from before {cutoff}: "
            f"{len(done['dropped'])} whole partitions dropped, {megabytes(done['freed_bytes'])} given back; "
            f"{done['deleted']} deleted in batches, their space reused by new rows")
    if done["skipped"]:  # a lock not had within the moment it waits: a long query was reading them
        line += f"; busy, left for the next run: {', '.join(done['skipped'])}"
    return line


@click.command("status")
@click.option("--connector", help="A Data Connector id: also show DT's delivery counters (needs a service account).")
@click.option("--project", help="The Data Connector's project id (with --connector).")
@with_appcontext
def status(connector: str | None, project: str | None) -> None:
    """Say whether events keep arriving (newest, recent counts, silent devices, backfilled), retention, sizes."""
    if connector and not project:
        raise click.UsageError("--connector needs --project: the id of the project the Data Connector is in")
    plan_bytes = plan_size()
    if problem := stale_problem(current_app.config) or retention_problem(current_app.config):
        raise click.ClickException(problem)
    with database() as connection:
        report = queries.status(connection)
    for line in status_lines(report, plan_bytes, stale_after(current_app.config), current_app.config):
        click.echo(line)
    if connector:
        with dt_account() as (rest_api, account):
            metrics = rest_api.fetch_metrics(account, project, connector)
        click.echo(f"connector {connector}, last 3 hours (DT's counters): {metrics.get('successCount', 0)} delivered, "
                   f"{metrics.get('errorCount', 0)} failed, p99 latency {metrics.get('latency99p', '-')}")


@click.command("export")
@window_options
@click.option("--format", "output_format", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True,
              help="csv: the window's readings (dt_readings); jsonl: each stored body exactly as received.")
@with_appcontext
def export(since: datetime, until: datetime | None, devices: tuple[str, ...], event_types: tuple[str, ...],
           output_format: str) -> None:
    """Write a window's readings as CSV, or its stored bodies as JSON lines, to stdout; progress on stderr."""
    window = window_params(since, until, devices, event_types)
    query, write, what = ((queries.WINDOW_READINGS, exports.write_readings, "{} readings of {} events")
                          if output_format == "csv" else (queries.WINDOW_BODIES, exports.write_bodies, "{} events"))
    started = time.monotonic()
    # Under `heroku run` stderr and stdout are one stream: progress there would end up in the file.
    quiet = exports.stderr_joins_stdout()
    with database() as connection, queries.window(connection, query, window) as (total, rows):
        with click.progressbar(length=total, label="export", file=io.StringIO() if quiet else sys.stderr,
                               update_min_steps=max(1, total // 200)) as bar, exports.stdout_text() as out:
            written, seen = write(rows, out, bar.update)
            bar.update(total - seen)  # the window's events without readings
    if not quiet:
        seconds = time.monotonic() - started
        click.echo(f"export: {what.format(written, seen)}, {describe_window(window)}, {seconds:.1f} s", err=True)


@click.command("replay")
@window_options
@with_appcontext
def replay(since: datetime, until: datetime | None, devices: tuple[str, ...], event_types: tuple[str, ...]) -> None:
    """Give every stored event of a window to on_event again, oldest first, each once (after fixing a handler)."""
    window = window_params(since, until, devices, event_types)
    started = time.monotonic()
    tally, first_failure = {"handled": 0, "failed": 0}, None
    with database() as connection, queries.window(connection, queries.WINDOW_BODIES, window) as (total, rows):
        progress = "{handled} handled, {failed} failed".format
        with click.progressbar(rows, length=total, label="replay", file=sys.stderr,
                               item_show_func=lambda _: progress(**tally)) as bar:
            for event_id, body in bar:
                if (error := hand_over(body)) is None:
                    tally["handled"] += 1
                    continue
                tally["failed"] += 1
                first_failure = first_failure or (event_id, error)
    click.echo(f"replay: {total} events, {tally['handled']} handled, {tally['failed']} failed, "
               f"{time.monotonic() - started:.1f} s")
    if first_failure:
        raise click.ClickException(f"{tally['failed']} of {total} events failed; the first, {first_failure[0]}, "
                                   f"raised {first_failure[1]}: fix on_event, then replay the window again")


def hand_over(body: str) -> str | None:
    """Give one stored body to on_event, as a delivery does; return the name of what it raised, or None."""
    try:
        on_event.on_event(parse_event(body.encode("utf-8")))
    except Exception as error:  # counted, and the replay goes on
        return type(error).__name__
    return None


def window_params(since: datetime, until: datetime | None, devices: tuple[str, ...],
                  event_types: tuple[str, ...]) -> dict:
    """Return a window's query parameters (until defaults to now), or stop if it ends before it starts."""
    return {"since": since, "until": window_end(since, until), "devices": list(devices) or None,
            "types": list(event_types) or None}


def window_end(since: datetime, until: datetime | None) -> datetime:
    """Return the window's end (default: now), or stop with one line if it is not after the start."""
    until = until or datetime.now(UTC)
    if since >= until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    return until


def describe_window(window: dict) -> str:
    """Return a window's times and filters for people."""
    text = f"{utc_text(window['since'], '%Y-%m-%d %H:%M')} to {utc_text(window['until'], '%Y-%m-%d %H:%M')} UTC"
    for name in ("devices", "types"):
        if window[name]:
            text += f", {name} {', '.join(window[name])}"
    return text


def plan_size() -> int | None:
    """Return the database plan's size in bytes from DATABASE_PLAN_MB, if set, or stop with one line."""
    plan_mb = current_app.config.get("DATABASE_PLAN_MB")
    if not plan_mb:
        return None
    if not (plan_mb.strip().isdigit() and int(plan_mb) > 0):
        raise click.ClickException("DATABASE_PLAN_MB must be your plan's size in whole MB (1024 for essential-0)")
    return int(plan_mb) * 1024 * 1024


def database_url() -> str:
    """Return DATABASE_URL, or stop with one line saying how to set it."""
    config = current_app.config
    problem = database_problem(config)
    if problem:
        raise click.ClickException(problem)
    if not config.get("DATABASE_URL"):
        raise click.ClickException("this command reads the database: set DATABASE_URL "
                                   "(on Heroku: heroku addons:create heroku-postgresql:essential-0)")
    return config["DATABASE_URL"]


@contextmanager
def database() -> Iterator[psycopg.Connection]:
    """Lend the commands' connection to DATABASE_URL, turning a database fault into one line."""
    url = database_url()
    try:
        with queries.connect(url) as connection:
            yield connection
    except queries.DatabaseError as error:
        raise click.ClickException(f"database unavailable: {error}") from None
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@contextmanager
def dt_account() -> Iterator[tuple]:
    """Lend DT's REST API and the service account; turn its faults into one line."""
    try:  # imported only by the commands that talk to DT: DT's client reads credentials files at import
        from . import rest_api
    except Exception as error:  # e.g. DT_CREDENTIALS_FILE names a missing file
        raise click.ClickException(f"DT's client could not start: {type(error).__name__}: {error}") from None
    try:
        yield rest_api, rest_api.load_account(current_app.config)
    except rest_api.ApiError as error:
        raise click.ClickException(str(error)) from None


def counted(events: Iterator[dict], tally: dict) -> Iterator[dict]:
    """Pass events through, counting them in the tally."""
    for event in events:
        tally["fetched"] += 1
        yield event


def status_lines(report: dict, plan_bytes: int | None, silence_limit: timedelta | None, config) -> list[str]:
    """Return the status report as lines for people."""
    newest = report["newest"]
    lines = [f"newest event: {utc_text(newest['event_time'])} UTC ({newest['event_type']}, device "
             f"{newest['device_id']}), arrived {utc_text(newest['received_at'])} UTC"
             if newest else "newest event: none stored yet"]
    lines += [f"  {row['event_type']}: {row['last_hour']} in the last hour, {row['last_day']} in the last day"
              for row in report["by_type"]] or ["  no events in the last day"]
    silent = report["silent"]
    note = " (newest event much older than their usual interval)" if silent else ""
    lines.append(f"silent devices: {len(silent)}{note}")
    lines += [f"  {row['device_id']}: newest {utc_text(row['newest'], '%Y-%m-%d %H:%M')} UTC, usually every "
              f"{row['usual_interval'].total_seconds() / 60:.0f} min" for row in silent[:20]]
    sources = report["sources"]
    lines.append(f"backfilled: {sources['history']} of the {sources['all_events']} events of the last 7 days "
                 "came from DT's history")
    lines.append(arrival_line(report["last_arrival"], silence_limit))
    lines.append(retention_line(config))
    sizes = report["sizes"]
    full = f", {sizes['database_bytes'] / plan_bytes:.0%} of the plan's {plan_bytes // 2**20} MB" if plan_bytes else ""
    lines.append(f"size: events {megabytes(sizes['events_bytes'])}, readings {megabytes(sizes['readings_bytes'])}, "
                 f"database {megabytes(sizes['database_bytes'])}{full}")
    if plan_bytes:
        lines.append(plan_line(report, plan_bytes, config))
    if report["fill"] is not None:
        lines.append(fill_line(report["fill"]))
    return lines


def fill_line(fill: dict) -> str:
    """Return how far the readings of the events stored before the upgrade to partitions have been filled in."""
    if fill["done"]:
        return f"readings of the events stored before the upgrade: done, {fill['events']} events filled in"
    return (f"readings of the events stored before the upgrade: filling in, newest first: {fill['events']} events "
            f"so far, every one from {utc_text(fill['reached'])} UTC on")


RETENTIONS = (("events", "EVENTS_RETENTION"), ("readings", "READINGS_RETENTION"))


def retention_line(config) -> str:
    """Return how long events and readings are kept, as set."""
    kept = [f"{what} kept {config[name].strip()} ({name})" if config.get(name)
            else f"{what} kept for ever ({name} unset)" for what, name in RETENTIONS]
    return "retention: " + ", ".join(kept)


def plan_line(report: dict, plan_bytes: int, config) -> str:
    """Return in how many days the database fills its plan at the last week's rate, each retention levelling off
    what it keeps once its oldest rows are as old as it."""
    growth, free = report["growth"], plan_bytes - report["sizes"]["database_bytes"]
    rates = ", ".join(f"{what} +{megabytes(growth[what]['bytes_per_day'])} a day" for what, _ in RETENTIONS)
    if free <= 0:
        return (f"plan: full, {megabytes(-free)} over: Heroku revokes INSERT and every delivery is refused; "
                "run prune, or set a shorter EVENTS_RETENTION")
    streams = []
    for what, name in RETENTIONS:
        kept_for, age = retention(config, name), growth[what]["age"] or timedelta(0)
        streams.append((growth[what]["bytes_per_day"], None if kept_for is None else max(kept_for - age, timedelta(0))
                        / timedelta(days=1)))
    days = days_until_full(free, streams)
    if days is None:
        return f"plan: does not fill at the last week's rate ({rates}, until each retention levels it off)"
    return f"plan: full in about {days:.0f} days at the last week's rate ({rates})"


def days_until_full(free_bytes: float, streams: list[tuple[float, float | None]]) -> float | None:
    """Return in how many days streams of bytes fill free_bytes, or None if they never do. Each stream grows by its
    bytes a day for its days (None: for ever), then levels off (its retention removes as much as arrives)."""
    elapsed = 0.0
    while True:
        growing = [(rate, days) for rate, days in streams if rate > 0 and (days is None or days > elapsed)]
        if not growing:
            return None
        rate = sum(rate for rate, _ in growing)
        next_stop = min((days for _, days in growing if days is not None), default=None)
        if next_stop is None or free_bytes <= rate * (next_stop - elapsed):
            return elapsed + free_bytes / rate
        free_bytes -= rate * (next_stop - elapsed)
        elapsed = next_stop


def arrival_line(last_arrival: dict | None, silence_limit: timedelta | None) -> str:
    """Return how long ago the newest pushed event arrived: the age /health compares with HEALTH_STALE_AFTER."""
    if last_arrival is None:
        return "last event from the Data Connector: none stored yet"
    age = last_arrival["age"]
    line = f"last event from the Data Connector: arrived {describe_age(age)} ago"
    if silence_limit is None:
        return line
    return line + (", longer than HEALTH_STALE_AFTER: /health answers 503" if age > silence_limit
                   else ", within HEALTH_STALE_AFTER")


def utc_text(moment: datetime, layout: str = "%Y-%m-%d %H:%M:%S") -> str:
    """Return a time as UTC text, whatever zone it is in (the session's, or the one a person typed)."""
    return moment.astimezone(UTC).strftime(layout)


def megabytes(size: int | None) -> str:
    """Return a byte count in MB for people."""
    return f"{(size or 0) / 1e6:.1f} MB"


def as_record(row: dict) -> dict:
    """Return a stored event as one plain object: its columns and its body."""
    return {"event_id": row["event_id"], "event_time": utc_iso(row["event_time"]), "device_id": row["device_id"],
            "event_type": row["event_type"], "source": row["source"], "received_at": utc_iso(row["received_at"]),
            "body": row["event"]}


def utc_iso(moment: datetime, timespec: str = "auto") -> str:
    """Return a time as RFC 3339 in UTC, ending in Z."""
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def as_text(row: dict) -> str:
    """Return a stored event as one line for people: time, device, type, id, labels, data."""
    body = row["event"] if isinstance(row["event"], dict) else {}
    event = body.get("event") if isinstance(body.get("event"), dict) else {}
    labels = json.dumps(body.get("labels") or {}, ensure_ascii=False)
    data = json.dumps(event.get("data"), ensure_ascii=False)
    when = utc_iso(row["event_time"], timespec="seconds")
    return f"{when}  {row['device_id']}  {row['event_type']}  {row['event_id']}  {labels}  {data}"


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    """POST a JSON body and return the status and text of the answer."""
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter("give an http:// or https:// URL", param_hint="URL")
    headers = {"Content-Type": "application/json", **headers}
    outgoing = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 (scheme checked)
    try:
        with urllib.request.urlopen(outgoing, timeout=timeout) as answer:  # noqa: S310 (scheme checked above)
            return answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read().decode(errors="replace")
    except urllib.error.URLError as error:
        raise click.ClickException(f"could not reach {url}: {error.reason}") from None
    except TimeoutError:
        raise click.ClickException(f"no answer from {url} within {timeout:g} s") from None
