"""Recovering an outage from DT's event history and seeing a gap coming: `backfill`, `status` and `GET /health`."""

import json
import math
import re
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from psycopg.rows import dict_row
from support.dt_api import PROJECT, DTApi, history_event, hours_ago
from support.issuer import ORGANIZATION_ID
from support.postgres import own_role
from support.server import free_port
from support.signing import SECRET, signed_delivery

from receiver.sample import encode_body, sample_event
from receiver.schema import migrate

SUMMARY = re.compile(r"backfill: (\d+) devices, (\d+) events fetched, (\d+) new, (\d+) already stored, \d+\.\d s")
BENCHMARK_EVENTS = 100_000


def run(app, *args: str):
    """Run a command as `flask --app app ...` would; check no exception escaped (a terminal would show its traceback)."""
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def tally(result) -> tuple[int, int, int, int]:
    """Return devices, fetched, new and already stored from a successful backfill's one line of output."""
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    match = SUMMARY.fullmatch(line)
    assert match, line
    return tuple(int(number) for number in match.groups())


def error_line(result, exit_code: int = 1) -> str:
    """Return the one line a failed command printed about what to fix (after the usage text, for a usage error)."""
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and line != "backfill"]  # the progress label
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    if exit_code == 1:  # a ClickException: that line alone
        assert lines == errors, result.output
    return errors[0].removeprefix("Error: ")


def rows(database_url: str, query: str = "SELECT * FROM dt_events ORDER BY event_id", *params) -> list[dict]:
    """Return the rows a query finds, as dicts."""
    with psycopg.connect(database_url, row_factory=dict_row) as connection:
        return connection.execute(query, params).fetchall()


def stored_ids(database_url: str) -> set[str]:
    """Return the ids of the stored events, after checking none is stored twice."""
    ids = [row["event_id"] for row in rows(database_url, "SELECT event_id FROM dt_events")]
    assert len(ids) == len(set(ids))
    return set(ids)


def push(client, event: dict) -> dict:
    """Deliver a history event through the receiver as DT's Data Connector would; return the body sent."""
    device = event["targetName"].rsplit("/", 1)[1]
    body = sample_event(event["eventType"], event_id=event["eventId"], device_id=device)
    body["event"].update(timestamp=event["timestamp"], data=event["data"])  # the same event, with labels and metadata
    delivery = signed_delivery(body)
    answer = client.post("/", data=delivery[0], headers=delivery[1])
    assert (answer.status_code, answer.text) == (200, "stored\n")
    return body


# -- a long outage -------------------------------------------------------------------------------------

OUTAGE_DEVICES = ("emuoutage0000000000a0", "emuoutage0000000000b0")


def outage(make_app, database_url, dt_api):
    """Push events from before and after a 36-hour outage; DT's history holds those and the ones in between.

    Return the app, every event of the last 48 hours by id, and the pushed bodies by id.
    """
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    client = app.test_client()
    now = datetime.now(timezone.utc)
    window, pushed = {}, {}
    for device in OUTAGE_DEVICES:
        dt_api.add_device(PROJECT, device)
        events = [history_event(PROJECT, device, ("temperature", "touch")[n % 2], now - timedelta(minutes=30 * n),
                                event_id=f"{device}-{n:03d}") for n in range(1, 99)]  # every 30 min for 49 hours
        dt_api.add_events(PROJECT, device, events)
        for event, age in zip(events, range(1, 99)):
            if age < 96:  # within --since 48h
                window[event["eventId"]] = event
            if age < 8 or 80 < age < 96:  # answered before the receiver went down at 40 h ago and after it came back at 4 h
                pushed[event["eventId"]] = push(client, event)
    return app, window, pushed


def test_a_36_hour_outage_is_recovered_once_keeping_pushed_rows(make_app, database_url, dt_api):
    """After 36 hours down, `backfill --since 48h` stores each missed event once as history and leaves pushed rows as they were."""
    app, window, pushed = outage(make_app, database_url, dt_api)
    before = {row["event_id"]: row for row in rows(database_url)}
    assert set(before) == set(pushed)
    started = datetime.now(timezone.utc)

    result = run(app, "backfill", "--since", "48h")

    assert tally(result) == (2, 190, 190 - 44, 44)
    after = {row["event_id"]: row for row in rows(database_url)}
    assert set(after) == set(window)  # nothing older than the window, nothing twice
    for event_id, event in window.items():
        row = after[event_id]
        if event_id in pushed:
            assert row == before[event_id]  # not overwritten: body, source and arrival time as pushed
            assert row["source"] == "connector"
            body = json.loads(row["event"])
            assert body["labels"] and body["metadata"]["deviceId"] == row["device_id"]
            assert row["event"] == encode_body(pushed[event_id]).decode()
        else:
            assert row["source"] == "history"
            assert row["event"] == json.dumps({"event": event}, separators=(",", ":"))  # what DT's history holds
            assert (row["device_id"], row["event_type"]) == (event["targetName"].rsplit("/", 1)[1], event["eventType"])
            assert row["event_time"] == datetime.fromisoformat(event["timestamp"])
            assert row["received_at"] >= started - timedelta(seconds=1)


def test_a_rerun_adds_nothing(make_app, database_url, dt_api):
    """A second backfill over the same window finds every event already stored and changes no row."""
    app, _, _ = outage(make_app, database_url, dt_api)
    assert tally(run(app, "backfill", "--since", "48h"))[2] == 190 - 44
    stored = rows(database_url)

    assert tally(run(app, "backfill", "--since", "48h")) == (2, 190, 0, 190)
    assert rows(database_url) == stored


# -- many pages, and narrowing ----------------------------------------------------------------------------

def many_pages_api() -> tuple[DTApi, list[tuple[str, str, str, float, str]]]:
    """Return a stand-in paging 3 projects or devices and 7 events at a time, and its events as (project, device, type, age, id)."""
    stand_in = DTApi(default_page_size=3, max_page_size=7)
    events = []
    layout = {"c0projecta": 5, "c0projectb": 4, "c0projectc": 0, "c0projectd": 2, "c0hidden": 2}
    for project, device_count in layout.items():
        stand_in.add_project(project, member=project != "c0hidden")
        for number in range(device_count):
            device = f"emu{project[-1]}{number:02d}"
            stand_in.add_device(project, device)
            count = 8 + 5 * number  # 8 to 28 events: one to four pages of 7
            mine = [(project, device, ("temperature", "touch", "networkStatus")[n % 3], 1.3 + 46 * n / count,
                     f"{device}-{n:02d}") for n in range(count)]
            mine.append((project, device, "temperature", 50.0, f"{device}-old"))  # before --since 48h
            stand_in.add_events(project, device, [history_event(project, device, kind, hours_ago(age), event_id=event_id)
                                                  for _, _, kind, age, event_id in mine])
            events += mine
    return stand_in, events


NARROWINGS = {
    "every project the account sees": ([], lambda p, d, t, age: p != "c0hidden"),
    "two projects": (["--project", "c0projectb", "--project", "c0projectd"], lambda p, d, t, age: p in ("c0projectb", "c0projectd")),
    "two devices of a project": (["--project", "c0projecta", "--device", "emua01", "--device", "emua03"],
                                 lambda p, d, t, age: d in ("emua01", "emua03")),
    "a device in any project": (["--device", "emub02"], lambda p, d, t, age: d == "emub02"),
    "one type": (["--type", "touch"], lambda p, d, t, age: p != "c0hidden" and t == "touch"),
    "two types": (["--type", "touch", "--type", "networkStatus"],
                  lambda p, d, t, age: p != "c0hidden" and t in ("touch", "networkStatus")),
    "until 24 hours ago": (["--until", "24h"], lambda p, d, t, age: p != "c0hidden" and age > 24),
}


@pytest.mark.parametrize("options, wanted", NARROWINGS.values(), ids=NARROWINGS.keys())
def test_every_page_is_fetched_and_the_options_narrow_it(make_app, database_url, options, wanted):
    """Across pages of 3 projects, 3 devices and 7 events, backfill stores exactly the events its options select, once."""
    stand_in, events = many_pages_api()
    try:
        app = make_app(DATABASE_URL=database_url, **stand_in.settings())
        result = run(app, "backfill", "--since", "48h", *options)
        expected = {event_id for project, device, kind, age, event_id in events
                    if age < 48 and wanted(project, device, kind, age)}
        devices, fetched, new, already = tally(result)
        assert (fetched, new, already) == (len(expected), len(expected), 0)
        assert stored_ids(database_url) == expected
        if not options:
            assert devices == 11
            per_device = {}
            for project, device, _, age, _ in events:
                if project != "c0hidden":
                    per_device[device] = per_device.get(device, 0) + (age < 48)
            pages = sum(math.ceil(count / 7) for count in per_device.values())
            assert sum(1 for _, path, _ in stand_in.log if path.split("?")[0].endswith("/events")) == pages
            assert sum(1 for _, path, _ in stand_in.log if path.split("?")[0] == "/v2/projects") == 2
    finally:
        stand_in.close()


# -- DT answering 429 and 503 now and then ----------------------------------------------------------------

class FlakyDTApi(DTApi):
    """The stand-in, answering chosen requests to the API (counted from 1) with a fault."""

    def __init__(self, faults: dict[int, tuple[int, int | None]], **options):
        super().__init__(**options)
        self.faults = faults
        self.seen = 0

    def _answer(self, method, target, headers, body):
        if urlsplit(target).path != "/oauth2/token":
            self.seen += 1  # DT's client sends one request at a time
            if self.seen in self.faults:
                self.fail_next(1, *self.faults[self.seen])
        return super()._answer(method, target, headers, body)


def test_429_and_503_now_and_then_are_retried(make_app, database_url):
    """429s with Retry-After 1 and 503s (twice in a row once), on the token, device and event requests, cost retries but no event."""
    stand_in = FlakyDTApi({2: (503, None), 5: (429, 1), 7: (503, None), 8: (503, None), 11: (429, 1)}, max_page_size=5)
    try:
        stand_in.add_project(PROJECT)
        stand_in.fail_next(1, 503, endpoint="token")
        expected = set()
        for device in ("emuflaky0", "emuflaky1", "emuflaky2"):
            stand_in.add_device(PROJECT, device)
            events = [history_event(PROJECT, device, when=hours_ago(n / 2)) for n in range(1, 13)]  # 3 pages each
            stand_in.add_events(PROJECT, device, events)
            expected |= {event["eventId"] for event in events}
        app = make_app(DATABASE_URL=database_url, **stand_in.settings())

        started = time.monotonic()
        result = run(app, "backfill", "--since", "12h")

        assert tally(result) == (3, 36, 36, 0)
        assert stored_ids(database_url) == expected
        assert (stand_in.answered(429), stand_in.answered(503)) == (2, 4)
        assert 3 <= time.monotonic() - started < 10  # each 429 waited its Retry-After second, a second 503 in a row one
    finally:
        stand_in.close()


def test_a_run_cut_short_is_completed_by_the_next(make_app, database_url):
    """A run that fails part-way (DT answers 404 for one device) leaves what it stored, and a rerun completes the rest."""
    stand_in = FlakyDTApi({6: (404, None)}, max_page_size=5)
    try:
        stand_in.add_project(PROJECT)
        expected = set()
        for device in ("emucut0", "emucut1", "emucut2"):
            stand_in.add_device(PROJECT, device)
            events = [history_event(PROJECT, device, when=hours_ago(n / 2)) for n in range(1, 13)]
            stand_in.add_events(PROJECT, device, events)
            expected |= {event["eventId"] for event in events}
        app = make_app(DATABASE_URL=database_url, **stand_in.settings())

        message = error_line(run(app, "backfill", "--since", "12h"))
        assert message.startswith("DT does not know device emucut1 in project")
        partial = stored_ids(database_url)
        assert 0 < len(partial) < len(expected)

        assert tally(run(app, "backfill", "--since", "12h")) == (3, 36, 36 - len(partial), len(partial))
        assert stored_ids(database_url) == expected
    finally:
        stand_in.close()


SPOILERS = {  # how the event is spoiled, and what its stored text then holds in place of the odd character
    "a lone surrogate in the data": (lambda event: event["data"]["temperature"].update(note="\ud800"), '"note":"\\ud800"'),
    "a NUL in the event id": (lambda event: event.update(eventId=event["eventId"] + "\u0000"), '\\u0000","targetName"'),
}


@pytest.mark.parametrize("spoil, escape", SPOILERS.values(), ids=SPOILERS.keys())
def test_an_event_postgres_text_refuses_does_not_stop_the_run(make_app, database_url, dt_api, spoil, escape):
    """An event holding what PostgreSQL text refuses is kept under escaped text, as a pushed one is, and the run completes."""
    dt_api.add_device(PROJECT, "emuodd")
    events = [history_event(PROJECT, "emuodd", when=hours_ago(hours)) for hours in (1, 2, 3)]
    spoil(events[1])
    dt_api.add_events(PROJECT, "emuodd", events)
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    assert tally(run(app, "backfill", "--since", "5h")) == (1, 3, 3, 0)
    stored = rows(database_url, "SELECT * FROM dt_events ORDER BY event_time DESC")
    assert [row["event_id"] for row in stored] == [event["eventId"].replace("\u0000", "\\u0000") for event in events]
    assert escape in stored[1]["event"]
    for row, event in zip(stored, events):
        assert json.loads(row["event"]) == {"event": event}  # the text's escapes read back as what DT sent
        assert (row["device_id"], row["event_type"], row["source"]) == ("emuodd", "temperature", "history")


# -- what to fix ---------------------------------------------------------------------------------------

def without(*names):
    """Return a change to the settings that removes these variables."""
    return lambda settings, dt_api: {name: None for name in names}


def starting(text: str) -> re.Pattern:
    """Return a pattern matching a message that starts with this text."""
    return re.compile(re.escape(text))


FAILURES = {
    "wrong secret": (lambda settings, dt_api: {"DT_SERVICE_ACCOUNT_SECRET": "wrong-" + dt_api.secret}, [],
                     starting("DT refused the service account's credentials: check DT_SERVICE_ACCOUNT_KEY_ID, "
                              "DT_SERVICE_ACCOUNT_SECRET and DT_SERVICE_ACCOUNT_EMAIL")),
    "wrong key id": (lambda settings, dt_api: {"DT_SERVICE_ACCOUNT_KEY_ID": "c0wrongkey"}, [],
                     starting("DT refused the service account's credentials: check DT_SERVICE_ACCOUNT_KEY_ID, "
                              "DT_SERVICE_ACCOUNT_SECRET and DT_SERVICE_ACCOUNT_EMAIL")),
    "missing secret": (without("DT_SERVICE_ACCOUNT_SECRET"), [],
                       starting("set DT_SERVICE_ACCOUNT_SECRET: the key of a DT service account with access to the projects "
                                "(DT Studio, API Integrations > Service Accounts)")),
    "no credentials": (without("DT_SERVICE_ACCOUNT_KEY_ID", "DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL"), [],
                       starting("set DT_SERVICE_ACCOUNT_KEY_ID and DT_SERVICE_ACCOUNT_SECRET and DT_SERVICE_ACCOUNT_EMAIL: ")),
    "unknown project": (lambda settings, dt_api: {}, ["--project", "c0unknown"],
                        starting("DT does not know project c0unknown, or the service account has no access to it: "
                                 "check the ID and the account's membership of the project")),
    "project without access": (lambda settings, dt_api: {}, ["--project", "c0notmine"],
                               starting("DT does not know project c0notmine, or the service account has no access to it: ")),
    "API unreachable": (lambda settings, dt_api: {"DT_API_URL": f"http://127.0.0.1:{free_port()}/v2"}, [],
                        re.compile(r"cannot reach DT's API http://127.0.0.1:\d+/v2: gave up after 4 tries in \d+ s; "
                                   "check DT_API_URL and the network")),
}


@pytest.mark.parametrize("change, options, pattern", FAILURES.values(), ids=FAILURES.keys())
def test_a_failure_is_one_line_naming_what_to_fix(make_app, database_url, dt_api, change, options, pattern):
    """Bad or missing credentials, an unknown project or an unreachable DT end the run with one line, exit 1, no rows."""
    dt_api.add_project("c0notmine", member=False)
    dt_api.add_device(PROJECT, "emuerr0")
    dt_api.add_events(PROJECT, "emuerr0", [history_event(PROJECT, "emuerr0", when=hours_ago(1))])
    settings = dt_api.settings()
    settings.update(change(settings, dt_api))
    app = make_app(DATABASE_URL=database_url, **{name: value for name, value in settings.items() if value is not None})

    started = time.monotonic()
    message = error_line(run(app, "backfill", "--since", "3h", *options))

    assert pattern.match(message), message
    assert dt_api.secret not in message
    assert time.monotonic() - started < 10  # DT's client backs off 0 + 1 + 4 s on a refused connection
    assert rows(database_url) == []


@pytest.mark.parametrize("command", [["backfill", "--since", "3d"], ["status"]])
def test_without_database_url_the_command_says_to_set_it(make_app, dt_api, command):
    """Without DATABASE_URL, backfill and status stop at once with one line naming the variable, asking DT nothing."""
    result = run(make_app(**dt_api.settings()), *command)
    assert result.exit_code != 0
    assert error_line(result, exit_code=result.exit_code).startswith("this command reads the database: set DATABASE_URL")
    assert dt_api.requests == 0


# -- the window -------------------------------------------------------------------------------------------

SINCE_FORMS = {
    "36h": (["--since", "36h"], timedelta(hours=36), [35.8], [36.2]),
    "3d": (["--since", "3d"], timedelta(days=3), [71.8], [72.2]),
    "90m": (["--since", "90m"], timedelta(minutes=90), [1.3], [1.7]),
}


@pytest.mark.parametrize("options, back, inside, outside", SINCE_FORMS.values(), ids=SINCE_FORMS.keys())
def test_since_a_duration_back_from_now(make_app, database_url, dt_api, options, back, inside, outside):
    """`--since 36h`, `3d` and `90m` ask DT from that long ago until now, and store just the events in between."""
    dt_api.add_device(PROJECT, "emuwindow")
    events = {age: history_event(PROJECT, "emuwindow", when=hours_ago(age)) for age in inside + outside}
    dt_api.add_events(PROJECT, "emuwindow", list(events.values()))
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())

    asked = datetime.now(timezone.utc)
    result = run(app, "backfill", *options)

    assert tally(result)[1:3] == (len(inside), len(inside))
    assert stored_ids(database_url) == {events[age]["eventId"] for age in inside}
    [query] = [parse_qs(urlsplit(path).query) for _, path, _ in dt_api.log if "/events" in path]
    start, end = (datetime.fromisoformat(query[name][0]) for name in ("startTime", "endTime"))
    assert abs(start - (asked - back)) < timedelta(seconds=5)
    assert abs(end - asked) < timedelta(seconds=5)


@pytest.mark.parametrize("since, until", [("2026-11-20T06:00:00Z", "2026-11-20T12:00:00Z"),
                                          ("2026-11-20T08:00:00+02:00", "2026-11-20T14:00:00+02:00")])
def test_since_and_until_as_rfc_3339_times(make_app, database_url, dt_api, since, until):
    """`--since` and `--until` as RFC 3339 times (UTC or with an offset) select the events between them."""
    dt_api.add_device(PROJECT, "emuwindow")
    times = {"05:50": False, "06:10": True, "11:50": True, "12:10": False}
    events = {clock: history_event(PROJECT, "emuwindow", when=datetime.fromisoformat(f"2026-11-20T{clock}:00+00:00"))
              for clock in times}
    dt_api.add_events(PROJECT, "emuwindow", list(events.values()))
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())

    assert tally(run(app, "backfill", "--since", since, "--until", until))[1:3] == (2, 2)
    assert stored_ids(database_url) == {events[clock]["eventId"] for clock, inside in times.items() if inside}
    [path] = [path for _, path, _ in dt_api.log if "/events" in path]
    assert "startTime=2026-11-20T06%3A00%3A00.000000Z&endTime=2026-11-20T12%3A00%3A00.000000Z" in path


@pytest.mark.parametrize("options, words", [
    (["--since", "yesterday"], "Invalid value for '--since': 'yesterday' is neither an RFC 3339 time with a zone"),
    (["--since", "2026-11-20T06:00:00"], "Invalid value for '--since': '2026-11-20T06:00:00' is neither"),
    (["--since", "36"], "Invalid value for '--since': '36' is neither"),
    (["--since", "3d", "--until", "tomorrow"], "Invalid value for '--until': 'tomorrow' is neither"),
    (["--since", "2h", "--until", "3h"], "Invalid value for --since: --since must be before --until"),
    ([], "Missing option '--since'"),
])
def test_a_bad_window_is_a_usage_error(make_app, database_url, dt_api, options, words):
    """A time that is neither RFC 3339 with a zone nor a duration, a window ending before it starts, or no --since: exit 2, asking DT nothing."""
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    assert error_line(run(app, "backfill", *options), exit_code=2).startswith(words)
    assert dt_api.requests == 0


# -- 100,000 events --------------------------------------------------------------------------------------

def transactions(database_url: str) -> int:
    """Return how many transactions the database has committed, once the counts have settled."""
    name = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(database_url, autocommit=True) as connection:
        counts = []
        for _ in range(50):  # a closed connection reports its counts as its backend exits
            connection.execute("SELECT pg_stat_clear_snapshot()")
            counts.append(connection.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                                             (name,)).fetchone()[0])
            if len(counts) > 2 and counts[-1] == counts[-3]:
                return counts[-1]
            time.sleep(0.1)
    raise AssertionError(f"transaction counts did not settle: {counts}")


@pytest.mark.slow
def test_backfilling_many_events_takes_seconds_in_few_round_trips(make_app, database_url, capsys):
    """100,000 events from 50 devices are stored within 40 s, in about one statement per thousand events."""
    stand_in = DTApi()
    try:
        stand_in.add_project(PROJECT)
        per_device = BENCHMARK_EVENTS // 50
        now = datetime.now(timezone.utc)
        for number in range(50):
            device = f"emubench{number:03d}"
            stand_in.add_device(PROJECT, device)
            stand_in.add_events(PROJECT, device, [
                history_event(PROJECT, device, when=now - timedelta(seconds=(n + 1) * 5), event_id=f"{device}-{n:05d}")
                for n in range(per_device)])
        app = make_app(DATABASE_URL=database_url, **stand_in.settings())
        run(app, "status")  # the table exists before the count starts
        committed = transactions(database_url)

        started = time.monotonic()
        result = run(app, "backfill", "--since", "12h")
        seconds = time.monotonic() - started

        assert tally(result) == (50, BENCHMARK_EVENTS, BENCHMARK_EVENTS, 0)
        assert rows(database_url, "SELECT count(*) AS n FROM dt_events WHERE source = 'history'")[0]["n"] == BENCHMARK_EVENTS
        round_trips = transactions(database_url) - committed  # a few are the counting queries' own
        assert round_trips < BENCHMARK_EVENTS / 100
        with capsys.disabled():
            print(f"\nbackfill of {BENCHMARK_EVENTS} events from the stand-in into PostgreSQL: {seconds:.1f} s, "
                  f"{round_trips} transactions; {result.stdout.strip()}")
        assert seconds < 40
    finally:
        stand_in.close()


# -- status ---------------------------------------------------------------------------------------------

def test_status_shows_newest_counts_silent_devices_and_backfilled(make_app, database_url, dt_api):
    """After pushed and backfilled events of two types, status names the newest, counts by type, the silent device and the backfilled rows."""
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    client = app.test_client()
    for device in ("emulive", "emutouch", "emusilent", "emuonce"):
        dt_api.add_device(PROJECT, device)
    live = [history_event(PROJECT, "emulive", "temperature", hours_ago(minutes / 60)) for minutes in (40, 30, 20, 10, 0)]
    touches = [history_event(PROJECT, "emutouch", "touch", hours_ago(hours)) for hours in (2, 5, 8, 11)]
    silent = [history_event(PROJECT, "emusilent", "temperature", hours_ago(27 + n / 4)) for n in range(13)]
    once = [history_event(PROJECT, "emuonce", "touch", hours_ago(50))]
    for device, events in (("emulive", live), ("emutouch", touches), ("emusilent", silent), ("emuonce", once)):
        dt_api.add_events(PROJECT, device, events)
    for event in live:
        push(client, event)
    assert tally(run(app, "backfill", "--since", "3d"))[2:] == (18, 5)

    result = run(app, "status")

    assert result.exit_code == 0
    newest = datetime.fromisoformat(live[-1]["timestamp"])
    # read back in the session's zone (the test cluster's is not UTC), printed by status in UTC
    [arrived] = [row["received_at"].astimezone(timezone.utc) for row in rows(database_url)
                 if row["event_id"] == live[-1]["eventId"]]
    newest_silent = datetime.fromisoformat(silent[0]["timestamp"])
    lines = result.stdout.splitlines()
    assert lines[:-3] == [
        f"newest event: {newest:%Y-%m-%d %H:%M:%S} UTC (temperature, device emulive), arrived {arrived:%Y-%m-%d %H:%M:%S} UTC",
        "  temperature: 5 in the last hour, 5 in the last day",
        "  touch: 0 in the last hour, 4 in the last day",
        "silent devices: 1 (newest event much older than their usual interval)",
        f"  emusilent: newest {newest_silent:%Y-%m-%d %H:%M} UTC, usually every 15 min",
        "backfilled: 18 of the 23 events of the last 7 days came from DT's history",
    ]
    assert re.fullmatch(r"last event from the Data Connector: arrived \d+ s ago", lines[-3])  # the pushed ones
    assert lines[-2] == "retention: events kept for ever (EVENTS_RETENTION unset), readings kept for ever " \
                        "(READINGS_RETENTION unset)"
    assert re.fullmatch(r"size: events \d+\.\d MB, readings \d+\.\d MB, database \d+\.\d MB", lines[-1])


def test_status_of_an_empty_table_says_none_yet(make_app, database_url):
    """With nothing stored, status says so instead of failing."""
    result = run(make_app(DATABASE_URL=database_url), "status")
    assert result.stdout.splitlines()[:4] == ["newest event: none stored yet", "  no events in the last day",
                                              "silent devices: 0", "backfilled: 0 of the 0 events of the last 7 days came from DT's history"]


@pytest.mark.parametrize("plan_mb", ["1GB", "0"])
def test_status_names_a_bad_plan_size(make_app, database_url, plan_mb):
    """A DATABASE_PLAN_MB that is not a positive whole number is one line naming it, not a traceback."""
    result = run(make_app(DATABASE_URL=database_url, DATABASE_PLAN_MB=plan_mb), "status")
    assert result.exit_code in (1, 2)
    assert "DATABASE_PLAN_MB" in error_line(result, exit_code=result.exit_code)


def test_status_lists_as_silent_only_devices_heard_from_in_the_last_week(make_app, database_url):
    """A device whose events are all older than a week is no longer listed as silent; one quiet for a day is."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
        for device, newest_hours in (("emugone", 24 * 8), ("emuquiet", 24)):
            connection.execute("INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) "
                               "SELECT %(device)s || n, %(device)s, 'temperature', "
                               "now() - %(hours)s * interval '1 hour' - n * interval '15 minutes', '{}' "
                               "FROM generate_series(0, 12) AS n", {"device": device, "hours": newest_hours})
    lines = run(make_app(DATABASE_URL=database_url), "status").stdout.splitlines()
    assert [line for line in lines if line.startswith(("silent", "  emu"))] == [
        "silent devices: 1 (newest event much older than their usual interval)",
        lines[[line.startswith("  emuquiet: newest ") for line in lines].index(True)]]


def test_status_says_how_full_the_plan_is(make_app, database_url):
    """With DATABASE_PLAN_MB set, the size line adds the database's share of the plan, in whole percent (and a line
    follows on when it fills: tests/test_retention.py)."""
    result = run(make_app(DATABASE_URL=database_url, DATABASE_PLAN_MB="16"), "status")
    assert result.exit_code == 0, result.output
    found = re.fullmatch(r"size: events \d+\.\d MB, readings \d+\.\d MB, database ([\d.]+) MB, (\d+)% of the "
                         r"plan's 16 MB", result.stdout.splitlines()[-2])
    assert found, result.stdout
    share = float(found[1]) * 1e6 / (16 * 2**20) * 100  # the database's MB are rounded to 0.1: about 0.3% here
    assert abs(int(found[2]) - share) < 1.5, f"{found[2]}% printed, {share:.1f}% of 16 MB"


def test_status_with_the_database_down_is_one_line(make_app):
    """With the database unreachable, status exits 1 with one line naming the cause, not the URL's password."""
    url = f"postgresql://receiver:pw-s3cret-42@127.0.0.1:{free_port()}/events"
    result = run(make_app(DATABASE_URL=url), "status")
    assert error_line(result) == "database unavailable: connection refused"
    assert "pw-s3cret-42" not in result.output


def test_status_shows_the_data_connectors_counters_from_dt(make_app, database_url, dt_api):
    """`status --connector C --project P` adds DT's delivery counters of the Data Connector."""
    dt_api.add_data_connector(PROJECT, "c16eegpdidie7lltpefg", success_count=9, error_count=2, latency99p="0.411s")
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    result = run(app, "status", "--connector", "c16eegpdidie7lltpefg", "--project", PROJECT)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1] == (
        "connector c16eegpdidie7lltpefg, last 3 hours (DT's counters): 9 delivered, 2 failed, p99 latency 0.411s")


def test_status_names_a_connector_dt_does_not_know(make_app, database_url, dt_api):
    """An unknown connector ends the report with one line naming it, and exit status 1."""
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    result = run(app, "status", "--connector", "c404", "--project", PROJECT)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "newest event: none stored yet"  # the database's part still shown
    assert result.stderr.splitlines() == [
        (f"Error: DT does not know Data Connector c404 in project {PROJECT}, or the service account has no access to it: "
         "check the ID and the account's membership of the project")]


def test_status_connector_without_project_is_a_usage_error(make_app, database_url, dt_api):
    """`--connector` without `--project` is a usage error naming the missing option, before DT is asked."""
    app = make_app(DATABASE_URL=database_url, **dt_api.settings())
    assert error_line(run(app, "status", "--connector", "c16eegpdidie7lltpefg"), exit_code=2) == (
        "--connector needs --project: the id of the project the Data Connector is in")
    assert dt_api.requests == 0


# -- GET /health ---------------------------------------------------------------------------------------

def test_health_is_200_with_the_database_up_and_shows_no_data(make_app, database_url, dt_api):
    """With the database answering, /health is 200 {"ok": true}, and names no event, secret or setting."""
    client = make_app(DATABASE_URL=database_url, **dt_api.settings()).test_client()
    event = history_event(PROJECT, "emuhealthy")
    push(client, event)

    answer = client.get("/health")

    assert (answer.status_code, answer.json) == (200, {"ok": True, "problems": {}})
    for private in (event["eventId"], "emuhealthy", SECRET, dt_api.secret, database_url, str(urlsplit(database_url).port)):
        assert private not in answer.text


def test_health_is_503_within_3_s_with_the_database_down(make_app):
    """With the database's port closed, /health answers 503 naming the fault in a fixed form, within 3 s, without the URL."""
    port = free_port()
    url = f"postgresql://receiver:pw-s3cret-42@127.0.0.1:{port}/events"
    client = make_app(DATABASE_URL=url).test_client()

    started = time.monotonic()
    answer = client.get("/health")
    waited = time.monotonic() - started

    assert (answer.status_code, answer.json) == (
        503, {"ok": False, "problems": {"database": "database unavailable: connection refused"}})
    assert waited < 3.2
    for private in ("pw-s3cret-42", "receiver", "127.0.0.1", str(port), SECRET, url):
        assert private not in answer.text


def test_health_does_not_name_the_configured_database(make_app, postgres):
    """A DATABASE_URL naming a database that is not there gives 503 without the database's name."""
    client = make_app(DATABASE_URL=postgres.url("d8c5privatename")).test_client()
    answer = client.get("/health")
    assert answer.status_code == 503 and answer.json["problems"]["database"].startswith("database unavailable")
    assert "d8c5privatename" not in answer.text


def test_health_is_503_when_the_database_refuses_inserts(make_app, postgres, database_url):
    """With INSERT revoked, as Heroku does when a plan is full, /health is 503 naming the refusal, though the database answers."""
    owner_url = own_role(postgres, database_url)
    with psycopg.connect(owner_url, autocommit=True) as owner:
        migrate(owner)  # the table belongs to the receiver's own role, as on Heroku
        owner.execute("REVOKE INSERT ON dt_events FROM CURRENT_USER")
    answer = make_app(DATABASE_URL=owner_url).test_client().get("/health")
    assert (answer.status_code, answer.json) == (503, {"ok": False, "problems": {
        "database": "database refuses new events: permission denied (is the plan full?)"}})


def test_health_is_503_when_dts_signing_keys_cannot_be_fetched(make_app, issuer):
    """Verifying DT-Asymmetric-Signature with DT's key endpoint down and no key held, /health is 503 naming the signing keys."""
    client = make_app(DT_SIGNATURE_SECRET="", DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url).test_client()
    issuer.available = False
    answer = client.get("/health")
    assert (answer.status_code, answer.json) == (503, {"ok": False, "problems": {
        "signing_keys": "DT's signing keys could not be fetched"}})
