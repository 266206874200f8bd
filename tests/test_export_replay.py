"""`export` (readings as CSV, bodies as JSON lines) and `replay` (stored events to on_event again) over a window."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from support.dt_api import rfc3339_ns
from support.server import ROOT
from support.signing import SECRET, signed_delivery

from receiver import on_event, queries
from receiver.sample import encode_body, sample_event, sign_body

HEADER = ["time", "device_id", "event_type", "name", "value", "state", "unit", "event_id"]
REPLAYED = re.compile(r"replay: (\d+) events, (\d+) handled, (\d+) failed, \d+\.\d s")


def event_at(event_type: str, when: datetime, event_id: str, device_id: str = "emudev1") -> dict:
    """Return a sample event of this type whose timestamp, updateTime and sample times are `when`."""
    event = sample_event(event_type, event_id=event_id, device_id=device_id)
    stamp = rfc3339_ns(when, 123)
    event["event"]["timestamp"] = stamp
    data = event["event"]["data"][event_type]
    data["updateTime"] = stamp
    for sample in data.get("samples", []):
        sample["sampleTime"] = stamp
    return event


def store(client, *events: dict) -> None:
    """Deliver events to an in-process receiver and check each was stored."""
    for event in events:
        body, headers = signed_delivery(event)
        assert client.post("/", data=body, headers=headers).text == "stored\n"


def run(app, *args: str):
    """Run a command as `flask --app app ...` would; check no exception escaped it."""
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def at(moment: datetime) -> str:
    """Return a time as the commands take it."""
    return moment.isoformat()


@pytest.fixture
def window(make_app, database_url):
    """Store six events over five hours (two devices, three types, one pretty-printed body); return the app and times."""
    app = make_app(DATABASE_URL=database_url)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    store(app.test_client(),
          event_at("touch", now - timedelta(hours=5), "too-old"),
          event_at("temperature", now - timedelta(hours=3), "t-1"),
          event_at("networkStatus", now - timedelta(hours=2, minutes=30), "n-1", device_id="emudev2"),
          event_at("touch", now - timedelta(hours=2), "touch-1"),
          event_at("temperature", now - timedelta(minutes=30), "too-new"))
    pretty = json.dumps(event_at("objectPresent", now - timedelta(hours=1, minutes=30), "pretty-1"), indent=1,
                        ensure_ascii=False).replace("Ålesund", "Ålesund\u2028")  # raw line breaks of every kind
    answer = app.test_client().post("/", data=pretty.encode(), headers={"X-Dt-Signature": sign_body(pretty.encode(), SECRET)})
    assert answer.text == "stored\n"
    return app, now, pretty


def test_export_csv_gives_the_readings_of_the_window_oldest_first(window):
    """`export` writes a header and, oldest first, each reading of the window's events to stdout; a summary on stderr."""
    app, now, _ = window
    result = run(app, "export", "--since", at(now - timedelta(hours=4)), "--until", at(now - timedelta(hours=1)))
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    t1, n1, touch, pretty = (rfc3339_ns(now - delta) for delta in (timedelta(hours=3), timedelta(hours=2.5),
                                                                   timedelta(hours=2), timedelta(hours=1.5)))
    assert rows == [
        HEADER,
        [t1[:-4] + "Z", "emudev1", "temperature", "temperature", "21.45", "", "°C", "t-1"],
        [n1[:-4] + "Z", "emudev2", "networkStatus", "rssi", "-62", "", "dBm", "n-1"],
        [n1[:-4] + "Z", "emudev2", "networkStatus", "signalStrength", "80", "", "%", "n-1"],
        [touch[:-4] + "Z", "emudev1", "touch", "touch", "1", "", "", "touch-1"],
        [pretty[:-4] + "Z", "emudev1", "objectPresent", "state", "", "PRESENT", "", "pretty-1"],
    ]
    assert re.fullmatch(r"export\nexport: 5 readings of 4 events, \S+ \S+ to \S+ \S+ UTC, \d+\.\d s\n", result.stderr)


def test_export_csv_keeps_to_the_devices_and_types_asked_for(window):
    """`--device` and `--type`, each repeatable, narrow the readings to those devices and types."""
    app, now, _ = window
    since = at(now - timedelta(hours=6))
    by_device = run(app, "export", "--since", since, "--device", "emudev2", "--device", "nowhere")
    by_type = run(app, "export", "--since", since, "--type", "touch", "--type", "objectPresent")
    assert [row[-1] for row in csv.reader(io.StringIO(by_device.stdout))] == ["event_id", "n-1", "n-1"]
    assert [row[-1] for row in csv.reader(io.StringIO(by_type.stdout))] == ["event_id", "too-old", "touch-1", "pretty-1"]
    assert ", devices emudev2, nowhere, " in by_device.stderr


def test_export_jsonl_gives_each_body_as_received_one_per_line(window, database_url):
    """`--format jsonl` writes each stored body of the window exactly as received, oldest first, one per line; a
    body holding raw line breaks is that body re-serialised, on one line, as the event log writes it."""
    app, now, pretty = window
    result = run(app, "export", "--since", at(now - timedelta(hours=4)), "--until", at(now - timedelta(hours=1)),
                 "--format", "jsonl")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 5
    ids = ["t-1", "n-1", "touch-1"]
    bodies = {event_id: encode_body(event_at(kind, now - delta, event_id, device)).decode() for kind, delta, event_id, device
              in (("temperature", timedelta(hours=3), "t-1", "emudev1"),
                  ("networkStatus", timedelta(hours=2.5), "n-1", "emudev2"),
                  ("touch", timedelta(hours=2), "touch-1", "emudev1"))}
    assert lines[:3] == [bodies[event_id] for event_id in ids]  # sample_event's ids and labels are fixed by these
    assert json.loads(lines[3]) == json.loads(pretty) and "\u2028" not in lines[3]
    assert re.fullmatch(r"export\nexport: 4 events, \S+ \S+ to \S+ \S+ UTC, \d+\.\d s\n", result.stderr)


def test_export_into_the_stream_stderr_shares_holds_only_the_data(window, database_url, tmp_path):
    """When stderr is the file stdout writes to (`heroku run ... > readings.csv`: Heroku joins them), the file holds
    the CSV alone: no progress, no summary."""
    _, now, _ = window
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DT_", "DATABASE_"))}, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "flask", "--app", "app", "export", "--since", at(now - timedelta(hours=4)),
               "--until", at(now - timedelta(hours=1))]
    with open(tmp_path / "joined.csv", "w+b") as joined:
        subprocess.run(command, cwd=ROOT, env=env, stdout=joined, stderr=joined, check=True, timeout=60)
    apart = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True, timeout=60)
    text = (tmp_path / "joined.csv").read_bytes()
    assert text == apart.stdout and text.startswith(b"time,device_id,") and text.count(b"\n") == 6
    assert apart.stderr.decode().startswith("export\nexport: 5 readings of 4 events, ")


@pytest.mark.parametrize("args, words", [
    (["export", "--since", "1h", "--until", "2h"], "--since must be before --until"),
    (["export", "--since", "1h", "--format", "xlsx"], "'xlsx' is not one of 'csv', 'jsonl'"),
    (["replay"], "Missing option '--since'"),
    (["replay", "--since", "9999999999w"], "neither an RFC 3339 time"),
])
def test_a_mistaken_window_is_a_usage_error(make_app, database_url, args, words):
    """A window that ends before it starts, an unknown format or a missing or impossible --since is one usage line."""
    result = run(make_app(DATABASE_URL=database_url), *args)
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output


def test_export_and_replay_without_a_database_say_how_to_set_it(make_app):
    """Without DATABASE_URL both commands end in one line saying how to set it."""
    for command in ("export", "replay"):
        result = run(make_app(), command, "--since", "1h")
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: this command reads the database: set DATABASE_URL"), result.stderr


class Handler:
    """A stand-in for the user's on_event that records each event and fails on the ids it is told to."""

    def __init__(self, failing: set[str]):
        self.seen, self.failing = [], failing

    def __call__(self, event) -> None:
        self.seen.append(event.event_id)
        if event.event_id in self.failing:
            raise ValueError("the handler's own bug")


def test_replay_gives_each_event_of_the_window_once_oldest_first_and_goes_on_after_a_failure(window, monkeypatch):
    """`replay` hands every event of the window to on_event, oldest first, each once; the one it fails on is
    counted, the rest are still handled, and the exit status and last line name that event and its error."""
    app, now, _ = window
    handler = Handler(failing={"n-1"})
    monkeypatch.setattr(on_event, "on_event", handler)
    result = run(app, "replay", "--since", at(now - timedelta(hours=4)), "--until", at(now - timedelta(hours=1)))
    assert handler.seen == ["t-1", "n-1", "touch-1", "pretty-1"]
    assert result.exit_code == 1
    assert REPLAYED.fullmatch(result.stdout.strip()).groups() == ("4", "3", "1")
    assert result.stderr.splitlines()[-1] == ("Error: 1 of 4 events failed; the first, n-1, raised ValueError: "
                                              "fix on_event, then replay the window again")


def test_replay_of_a_fixed_handler_succeeds_and_keeps_to_devices_and_types(window, monkeypatch):
    """With a handler that works, replay exits 0; `--device` and `--type` hand over only those events."""
    app, now, _ = window
    handler = Handler(failing=set())
    monkeypatch.setattr(on_event, "on_event", handler)
    result = run(app, "replay", "--since", "6h", "--device", "emudev1", "--type", "temperature", "--type", "touch")
    assert result.exit_code == 0, result.output
    assert handler.seen == ["too-old", "t-1", "touch-1", "too-new"]
    assert REPLAYED.fullmatch(result.stdout.strip()).groups() == ("4", "4", "0")


def test_replay_of_a_backfilled_event_gives_the_handler_the_event_alone(make_app, database_url, monkeypatch):
    """An event stored from DT's history (the event object, no labels or metadata) reaches on_event like a pushed one."""
    app = make_app(DATABASE_URL=database_url)
    now = datetime.now(timezone.utc)
    event = event_at("touch", now - timedelta(minutes=5), "history-1")["event"]
    with queries.connect(database_url) as connection:
        assert queries.add_history(connection, [event]) == 1
    received = []
    monkeypatch.setattr(on_event, "on_event", received.append)
    assert run(app, "replay", "--since", "1h").exit_code == 0
    [replayed] = received
    assert (replayed.event_id, replayed.event_type, replayed.device_id, replayed.labels) == (
        "history-1", "touch", "emudev1", None)


@pytest.mark.parametrize("command", ["export", "replay"])
def test_help_needs_no_setting(command):
    """`flask --app app export --help` and `replay --help` print their usage with no setting at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DT_", "DATABASE_"))}
    shown = subprocess.run([sys.executable, "-m", "flask", "--app", "app", command, "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout.startswith("Usage: ") and f" {command} [OPTIONS]" in shown.stdout and "--since" in shown.stdout


def test_export_to_a_reader_that_goes_away_ends_in_one_line(make_app, database_url):
    """`export | head -1`: when the reader closes the pipe, export stops with one line saying so, no traceback."""
    make_app(DATABASE_URL=database_url).test_client()  # nothing delivered: the table is made below
    now = datetime.now(timezone.utc)
    with queries.connect(database_url) as connection:  # migrates; stored as backfill stores them, with readings
        queries.add_history(connection, (event_at("touch", now - timedelta(seconds=n), f"many-{n}")["event"]
                                         for n in range(1, 5001)))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DT_", "DATABASE_"))}, "DATABASE_URL": database_url}
    export = subprocess.Popen([sys.executable, "-m", "flask", "--app", "app", "export", "--since", "1d"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert export.stdout.readline() == b"time,device_id,event_type,name,value,state,unit,event_id\n"
    export.stdout.close()  # far more than a pipe holds is still to come
    stderr = export.stderr.read().decode()
    assert export.wait(60) == 1
    assert stderr.splitlines() == ["export", "Error: stdout was closed before the export ended: the output is cut short"]


def test_export_and_replay_of_an_empty_window_succeed_with_nothing(make_app, database_url, monkeypatch):
    """A window without events gives the CSV header alone, no JSON lines, and a replay of nothing that exits 0."""
    app = make_app(DATABASE_URL=database_url)
    window = ["--since", "2001-01-01T00:00:00Z", "--until", "2001-01-02T00:00:00Z"]
    monkeypatch.setattr(on_event, "on_event", Handler(failing=set()))
    assert run(app, "export", *window).stdout == ",".join(HEADER) + "\n"
    assert run(app, "export", *window, "--format", "jsonl").stdout == ""
    assert REPLAYED.fullmatch(run(app, "replay", *window).stdout.strip()).groups() == ("0", "0", "0")


def test_a_window_holds_its_since_and_not_its_until_so_windows_in_a_row_hold_each_event_once(make_app, database_url,
                                                                                              monkeypatch):
    """An event at exactly --since is in the window and one at exactly --until is not: it is in the next window,
    whose --since that time is; export (CSV and JSON lines) and replay alike."""
    app = make_app(DATABASE_URL=database_url)
    start = datetime(2026, 11, 20, 6, 0, tzinfo=timezone.utc)
    middle, end, tick = start + timedelta(hours=1), start + timedelta(hours=2), timedelta(microseconds=1)
    moments = {"before-start": start - tick, "at-start": start, "before-middle": middle - tick, "at-middle": middle,
               "before-end": end - tick, "at-end": end}
    store(app.test_client(), *(event_at("touch", moment, event_id) for event_id, moment in moments.items()))
    first = ["--since", at(start), "--until", "2026-11-20T09:00:00+02:00"]  # the middle, written in another zone
    second = ["--since", at(middle), "--until", at(end)]
    in_first = run(app, "export", *first, "--format", "jsonl")
    exported = [json.loads(line)["event"]["eventId"] for line in in_first.stdout.splitlines()]
    assert exported == ["at-start", "before-middle"]
    assert ", 2026-11-20 06:00 to 2026-11-20 07:00 UTC, " in in_first.stderr
    assert [row[-1] for row in csv.reader(io.StringIO(run(app, "export", *second).stdout))] == [
        "event_id", "at-middle", "before-end"]
    handler = Handler(failing=set())
    monkeypatch.setattr(on_event, "on_event", handler)
    assert run(app, "replay", *first).exit_code == run(app, "replay", *second).exit_code == 0
    assert handler.seen == ["at-start", "before-middle", "at-middle", "before-end"]
