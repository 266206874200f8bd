"""Silence as a health problem: HEALTH_STALE_AFTER, what /health and `status` say, and durations read in one place."""

import subprocess
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from support.dt_api import history_event
from support.server import ROOT, Server, procfile_command
from support.signing import SECRET, signed_delivery

from receiver import queries
from receiver.durations import describe_age, parse_duration
from receiver.health import SHARED_SECONDS
from receiver.sample import sample_event
from receiver.settings import server_problem, setting_warnings, stale_after


def deliver(client, event: dict | None = None) -> None:
    """Deliver a fresh event (or this one) through an in-process app and check it was stored."""
    body, headers = signed_delivery(event or sample_event("networkStatus"))
    assert client.post("/", data=body, headers=headers).text == "stored\n"


def health(client) -> tuple[int, dict]:
    """Return the status and the problems /health answers."""
    answer = client.get("/health")
    assert answer.json["ok"] == (answer.status_code == 200)
    return answer.status_code, answer.json["problems"]


def age_every_event(database_url: str, interval: str) -> None:
    """Make every stored event, and the last arrival, look as if they had arrived that long ago."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("UPDATE dt_events SET received_at = now() - %s::interval", (interval,))
        connection.execute("UPDATE dt_last_arrival SET received_at = now() - %s::interval", (interval,))


def test_health_turns_503_once_nothing_arrived_for_longer_and_200_on_the_next_event(make_app, database_url):
    """With HEALTH_STALE_AFTER=2s, /health is 200 after an event, 503 naming the silence two seconds later,
    and 200 again once the next event is stored and the worker's shared answer (a second old at most) renewed."""
    client = make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="2s").test_client()
    deliver(client)
    assert health(client) == (200, {})
    time.sleep(2.2)
    assert health(client) == (503, {"events": "the last event arrived 2 s ago"})
    deliver(client)
    time.sleep(SHARED_SECONDS)
    assert health(client) == (200, {})


def test_health_names_how_long_ago_in_hours_and_counts_no_backfilled_event(make_app, database_url):
    """An arrival 2 h 5 min ago is named so; an event fetched back from DT's history since then leaves it 503,
    since it says nothing about the Data Connector."""
    client = make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="1h").test_client()
    deliver(client)
    age_every_event(database_url, "2 hours 5 minutes")
    with queries.connect(database_url) as connection:
        queries.add_history(connection, [history_event("p", "emuhistory", "touch")])
    assert health(client) == (503, {"events": "the last event arrived 2 h 5 min ago"})


def test_an_event_dated_in_the_future_does_not_hide_later_arrivals(make_app, database_url):
    """An event dated a day ahead (a wrong clock) is left out of the age, so the events arriving after it count."""
    client = make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="1h").test_client()
    ahead = sample_event("touch", event_id="ahead-1")
    ahead["event"]["timestamp"] = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    deliver(client, ahead)
    age_every_event(database_url, "3 hours")
    deliver(client)
    assert health(client) == (200, {})


def test_health_before_any_event_and_without_the_setting(make_app, database_url):
    """With the setting and nothing stored yet, /health says so (503); without the setting, silence is no problem."""
    assert health(make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="30m").test_client()) == (
        503, {"events": "no event from the Data Connector has been stored yet"})
    assert health(make_app(DATABASE_URL=database_url).test_client()) == (200, {})


def test_health_without_a_database_ignores_the_setting_and_boot_warns(make_app):
    """Without DATABASE_URL, HEALTH_STALE_AFTER cannot be checked: /health stays 200 and the boot warns once."""
    assert health(make_app(HEALTH_STALE_AFTER="30m").test_client()) == (200, {})
    assert setting_warnings({"DT_SIGNATURE_SECRET": SECRET, "HEALTH_STALE_AFTER": "30m"}) == [
        "HEALTH_STALE_AFTER has no effect without DATABASE_URL: /health cannot see when events arrive"]
    assert setting_warnings({"DT_SIGNATURE_SECRET": SECRET, "HEALTH_STALE_AFTER": "30m", "DATABASE_URL": "x"}) == []


def test_server_with_an_invalid_stale_after_refuses_to_start_with_one_line(tmp_path):
    """The Procfile's server with HEALTH_STALE_AFTER=15 minutes exits non-zero at once, naming the variable."""
    server = Server(tmp_path / "server.log", DT_SIGNATURE_SECRET=SECRET, HEALTH_STALE_AFTER="15 minutes")
    completed = subprocess.run(procfile_command(), shell=True, executable="bash", cwd=ROOT, env=server.env,
                               capture_output=True, text=True, timeout=30)
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert [line for line in completed.stderr.splitlines() if "receiver not started" in line] == [
        "receiver not started: HEALTH_STALE_AFTER must be a duration such as 90s, 30m, 2h, 3d or 2w, not '15 minutes'"]


def run_status(app):
    """Run `status` and return its output lines, checking it exited 0."""
    result = app.test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def test_status_shows_the_age_health_compares(make_app, database_url):
    """`status` shows how long ago the last pushed event arrived and, with HEALTH_STALE_AFTER, which side of it."""
    app = make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="1h")
    assert "last event from the Data Connector: none stored yet" in run_status(app)
    deliver(app.test_client())
    assert "last event from the Data Connector: arrived 0 s ago, within HEALTH_STALE_AFTER" in run_status(app)
    age_every_event(database_url, "3 days 4 hours")
    assert ("last event from the Data Connector: arrived 3 d 4 h ago, longer than HEALTH_STALE_AFTER: "
            "/health answers 503") in run_status(app)
    assert "last event from the Data Connector: arrived 3 d 4 h ago" in run_status(make_app(DATABASE_URL=database_url))


def test_status_with_an_invalid_stale_after_is_one_line(make_app, database_url):
    """`status` with a HEALTH_STALE_AFTER that is not a duration ends in one line naming it."""
    result = make_app(DATABASE_URL=database_url, HEALTH_STALE_AFTER="soon").test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 1
    assert result.stderr == "Error: HEALTH_STALE_AFTER must be a duration such as 90s, 30m, 2h, 3d or 2w, not 'soon'\n"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), (" 2h ", 7200), ("3d", 259200),
                                           ("2w", 1209600), ("36 h", 129600), ("0s", 0), ("15 minutes", None),
                                           ("1.5h", None), ("-5m", None), ("2H", None), ("", None),
                                           ("99999999999d", None)])
def test_durations_are_read_one_way_for_settings_and_commands(text, seconds):
    """A duration is whole units of s, m, h, d or w; anything else (or more days than a timedelta holds) is none."""
    assert parse_duration(text) == (None if seconds is None else timedelta(seconds=seconds))


@pytest.mark.parametrize("value, problem", [("90s", False), ("2h", False), ("", False), ("0s", True),
                                            ("15 minutes", True), ("1e3s", True)])
def test_stale_after_setting_must_be_a_positive_duration(value, problem):
    """HEALTH_STALE_AFTER is a positive duration, or empty for off; the start-up check names anything else."""
    settings = {"DT_SIGNATURE_SECRET": SECRET, "HEALTH_STALE_AFTER": value}
    assert (server_problem(settings) is not None) == problem
    assert stale_after(settings) == (None if problem or not value else parse_duration(value))


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (45, "45 s"), (89, "89 s"), (90, "1 min"), (750, "12 min"),
                                           (5399, "89 min"), (5400, "1 h 30 min"), (7500, "2 h 5 min"),
                                           (172799, "47 h 59 min"), (172800, "2 d 0 h"), (273600, "3 d 4 h"),
                                           (-3, "0 s")])
def test_ages_are_written_in_their_two_largest_units(seconds, text):
    """An age reads as seconds up to 89, minutes up to 89, then hours and minutes, then days and hours."""
    assert describe_age(timedelta(seconds=seconds)) == text
