"""Every time a command prints is in UTC, whatever the database session's time zone (here Tokyo's, +09:00)."""

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from receiver.sample import encode_body, sample_event
from receiver.schema import migrate

SESSION_ZONE = "Asia/Tokyo"


@pytest.fixture
def tokyo(monkeypatch, database_url):
    """Make every connection of the test's, the commands' too, a session in Tokyo's zone (libpq reads PGTZ)."""
    monkeypatch.setenv("PGTZ", SESSION_ZONE)
    with psycopg.connect(database_url, autocommit=True) as connection:
        assert connection.execute("SHOW TimeZone").fetchone()[0] == SESSION_ZONE
        migrate(connection)
    return database_url


def insert(database_url: str, event_id: str, device_id: str, event_time: datetime, received_at: datetime) -> None:
    """Store a temperature event with these times, as a delivery does."""
    event = sample_event("temperature", event_id=event_id, device_id=device_id)
    event["event"]["timestamp"] = event_time.isoformat().replace("+00:00", "Z")
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("INSERT INTO dt_events (event_id, device_id, event_type, event_time, received_at, event) "
                           "VALUES (%s, %s, 'temperature', %s, %s, %s)",
                           (event_id, device_id, event_time, received_at, encode_body(event).decode()))


def utc_now() -> datetime:
    """Return now in UTC, to the second (as status prints it)."""
    return datetime.now(UTC).replace(microsecond=0)


def test_status_prints_its_times_in_utc(make_app, tokyo):
    """`status` prints the newest event's time and arrival, and a silent device's newest, in UTC."""
    newest = utc_now() - timedelta(minutes=10)
    insert(tokyo, "live-1", "emulive", newest, newest + timedelta(seconds=2))
    silent = [utc_now() - timedelta(hours=27, minutes=15 * n) for n in range(13)]
    for number, moment in enumerate(silent):
        insert(tokyo, f"silent-{number}", "emusilent", moment, moment)
    result = make_app(DATABASE_URL=tokyo).test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    arrived = newest + timedelta(seconds=2)
    assert lines[0] == (f"newest event: {newest:%Y-%m-%d %H:%M:%S} UTC (temperature, device emulive), "
                        f"arrived {arrived:%Y-%m-%d %H:%M:%S} UTC")
    assert f"  emusilent: newest {silent[0]:%Y-%m-%d %H:%M} UTC, usually every 15 min" in lines


@pytest.mark.parametrize("given, printed", [("2026-01-01T00:00:00Z", "2026-01-01 00:00:00"),
                                             ("2026-01-01T00:00:00+02:00", "2025-12-31 22:00:00")])
def test_prune_prints_the_cutoff_it_applies_in_utc(make_app, tokyo, given, printed):
    """`prune --older-than` with an RFC 3339 time prints that instant in UTC, deletes the events before it, and keeps
    the one at that very microsecond."""
    cutoff = datetime.fromisoformat(given)
    for event_id, moment in (("before", cutoff - timedelta(microseconds=1)), ("at", cutoff),
                             ("after", cutoff + timedelta(microseconds=1))):
        insert(tokyo, event_id, "emuprune", moment, moment)
    runner = make_app(DATABASE_URL=tokyo).test_cli_runner()
    dry_run = runner.invoke(args=["prune", "--older-than", given, "--dry-run"])
    assert dry_run.stdout.startswith(f"prune: would delete 1 events from before {printed} UTC, "), dry_run.output
    result = runner.invoke(args=["prune", "--older-than", given])
    assert (result.exit_code, result.stdout) == (
        0, f"prune: removed 1 events from before {printed} UTC: 0 whole partitions dropped, 0.0 MB given "
           "back; 1 deleted in batches, their space reused by new rows\n")
    with psycopg.connect(tokyo) as connection:
        kept = [event_id for event_id, in connection.execute("SELECT event_id FROM dt_events ORDER BY event_time")]
    assert kept == ["at", "after"]


def test_events_prints_its_times_in_utc(make_app, tokyo):
    """`events` prints each event's time in UTC, and `events --json` its time and arrival as RFC 3339 in UTC."""
    moment = datetime(2026, 11, 20, 6, 0, 0, 123456, tzinfo=UTC)
    insert(tokyo, "utc-1", "emuutc", moment, moment + timedelta(seconds=1))
    runner = make_app(DATABASE_URL=tokyo).test_cli_runner()
    text = runner.invoke(args=["events", "--since", "2026-11-20T00:00:00Z"])
    assert text.stdout.startswith("2026-11-20T06:00:00Z  emuutc  temperature  utc-1  "), text.output
    [record] = [json.loads(line) for line in runner.invoke(args=["events", "--json"]).stdout.splitlines()]
    assert (record["event_time"], record["received_at"]) == (
        "2026-11-20T06:00:00.123456Z", "2026-11-20T06:00:01.123456Z")
