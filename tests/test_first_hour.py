"""What a newcomer sees in the first hour: every command and every mistake answers in one clear line (issue 11)."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from support.server import ROOT, Server, free_port, procfile_command
from support.signing import SECRET, dt_event, signed_delivery

from receiver import on_event
from receiver.sample import sample_event, sign_body

PASSWORD = "hunter2"
# A failed command may print click's usage header above its one line (for a UsageError); nothing else.
CLICK_USAGE = ("Usage: ", "Try '")
# Gunicorn's own lines keep their formats: its error log ("[time] [pid] [LEVEL] ...") and our access log format.
GUNICORN_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] |gunicorn method=")
# A mistake is answered before a newcomer wonders whether it hangs.
MISTAKE_SECONDS = 8


def with_password(url: str) -> str:
    """Return a URL of the tests' cluster with a password in it (trust auth ignores it), to prove it never leaks."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def flask(*args: str, **settings: str) -> subprocess.CompletedProcess:
    """Run `flask --app app ARGS` in a terminal with only these settings, as a newcomer would."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("DT_", "DATABASE_"))}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, env={**env, **settings},
                          capture_output=True, text=True, encoding="utf-8", timeout=60)


def error_line(completed: subprocess.CompletedProcess) -> str:
    """Return the one line a failed command printed, checking it failed with no traceback and nothing else."""
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert "Traceback" not in output, output
    assert completed.stdout == "", output
    own = [line for line in completed.stderr.splitlines() if line and not line.startswith(CLICK_USAGE)]
    assert len(own) == 1 and own[0].startswith("Error: "), output
    return own[0]


class NotJsonLineError(AssertionError):
    """A server printed a line that is neither one JSON object nor one of gunicorn's own."""


def assert_json_or_gunicorn(output: str) -> None:
    """Check every line is one JSON object, or one of gunicorn's own lines."""
    for line in output.splitlines():
        if GUNICORN_LINE.match(line):
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise NotJsonLineError(f"neither a JSON object nor gunicorn's: {line!r} in\n{output}")


def count_rows(database_url: str, event_id: str) -> int:
    """Return how many stored rows have this event id."""
    with psycopg.connect(database_url) as connection:
        return connection.execute("SELECT count(*) FROM dt_events WHERE event_id = %s", (event_id,)).fetchone()[0]


@pytest.fixture
def silent_port():
    """Return the port of a local server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in [*held, listener]:
        connection.close()


@pytest.fixture
def fill(request):
    """Return a filler of the mistakes table's blanks, starting only the servers a case names."""
    makers = {
        "closed": lambda: str(free_port()),
        "silent": lambda: str(request.getfixturevalue("silent_port")),
        "nodb": lambda: with_password(request.getfixturevalue("postgres").url("nodb")),
        "db": lambda: with_password(request.getfixturevalue("database_url")),
    }

    class Blanks(dict):
        def __missing__(self, name):
            self[name] = makers[name]()
            return self[name]

    blanks = Blanks()
    return lambda text: text.format_map(blanks)


COMMANDS = [[], ["send"], ["events"], ["backfill"], ["prune"], ["status"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(["flask --app app", *command, "--help"]))
def test_help_works_without_any_setting(command):
    """`--help` of the CLI and of each command prints its usage and exits 0 with no setting at all."""
    shown = flask(*command, "--help")
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout.startswith("Usage: ") and "Traceback" not in shown.stdout
    if not command:
        assert all(f"  {name} " in shown.stdout for name in ("send", "events", "backfill", "prune", "status"))


CLOSED_DATABASE = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{{closed}}/nodb"
NO_DATABASE_URL = "this command reads the database: set DATABASE_URL"
NO_SUCH_DATABASE = "the database DATABASE_URL names does not exist"
MISTAKES = [
    pytest.param(["send"], {}, ["send signs with DT_SIGNATURE_SECRET: set it"], id="send without secret"),
    pytest.param(["send", "http://127.0.0.1:{closed}/"], {"DT_SIGNATURE_SECRET": SECRET},
                 ["could not reach http://127.0.0.1:", "Connection refused"], id="send to a closed port"),
    pytest.param(["send", "http://127.0.0.1:{silent}/", "--timeout", "1"], {"DT_SIGNATURE_SECRET": SECRET},
                 ["no answer from http://127.0.0.1:", "within 1 s"], id="send to a server that never answers"),
    pytest.param(["send", "ftp://127.0.0.1/"], {"DT_SIGNATURE_SECRET": SECRET},
                 ["Invalid value for URL: give an http:// or https:// URL"], id="send to a bad scheme"),
    pytest.param(["events"], {}, [NO_DATABASE_URL], id="events without DATABASE_URL"),
    pytest.param(["status"], {}, [NO_DATABASE_URL], id="status without DATABASE_URL"),
    pytest.param(["prune", "--older-than", "90d"], {}, [NO_DATABASE_URL], id="prune without DATABASE_URL"),
    pytest.param(["backfill", "--since", "3d"], {}, [NO_DATABASE_URL], id="backfill without DATABASE_URL"),
    pytest.param(["events"], {"DATABASE_URL": "{nodb}"}, [f"database unavailable: {NO_SUCH_DATABASE}"],
                 id="events with a database that does not exist"),
    pytest.param(["status"], {"DATABASE_URL": "{nodb}"}, [f"database unavailable: {NO_SUCH_DATABASE}"],
                 id="status with a database that does not exist"),
    pytest.param(["events"], {"DATABASE_URL": CLOSED_DATABASE}, ["database unavailable: connection refused"],
                 id="events with the database down"),
    pytest.param(["events"], {"DATABASE_URL": CLOSED_DATABASE.replace("postgresql:", "postgress:")},
                 ["DATABASE_URL must start with postgres:// or postgresql://, not postgress://"],
                 id="events with a misspelt scheme"),
    pytest.param(["backfill", "--since", "3d"], {"DATABASE_URL": "{db}"},
                 ["set DT_SERVICE_ACCOUNT_KEY_ID and DT_SERVICE_ACCOUNT_SECRET and DT_SERVICE_ACCOUNT_EMAIL"],
                 id="backfill without service account"),
    pytest.param(["events", "--since", "yesterday"], {},
                 ["Invalid value for '--since': 'yesterday' is neither an RFC 3339 time", "nor a duration"],
                 id="events since yesterday"),
    pytest.param(["events"], {"DATABASE_URL": f"postgresql://postgres:{PASSWORD}@[::1/nodb"}, ["DATABASE_URL"],
                 id="events with an unclosed bracket in DATABASE_URL"),
    pytest.param(["events"], {"DATABASE_URL": CLOSED_DATABASE + "?sslmod=disable"}, ["DATABASE_URL", "sslmod"],
                 id="events with a misspelt URL parameter"),
]


@pytest.mark.parametrize("args, settings, expected", MISTAKES)
def test_mistake_ends_in_one_line(fill, args, settings, expected):
    """A command run with a setting missing or wrong, or a peer down, fails at once with one line naming what to fix."""
    settings = {name: fill(value) for name, value in settings.items()}
    started = time.monotonic()
    completed = flask(*map(fill, args), **settings)
    assert time.monotonic() - started < MISTAKE_SECONDS
    output = completed.stdout + completed.stderr
    assert PASSWORD not in output and SECRET not in output
    assert all(value not in output for value in settings.values())  # a database URL is never echoed whole
    line = error_line(completed)
    assert all(part in line for part in expected), line


REFUSED_DATABASE_URLS = [
    pytest.param(CLOSED_DATABASE.replace("postgresql:", "postgress:"),
                 "receiver not started: DATABASE_URL must start with postgres:// or postgresql://, not postgress://",
                 id="misspelt scheme"),
    pytest.param(f"postgresql://postgres:{PASSWORD}@[::1/nodb", "receiver not started: DATABASE_URL",
                 id="unclosed bracket"),
    pytest.param(CLOSED_DATABASE + "?sslmod=disable", "receiver not started: DATABASE_URL",
                 id="misspelt URL parameter"),
    pytest.param(CLOSED_DATABASE.replace(PASSWORD, PASSWORD + "%zz"), "receiver not started: DATABASE_URL",
                 id="bad escape in the password"),
]


@pytest.mark.parametrize("database_url, expected", REFUSED_DATABASE_URLS)
def test_server_refuses_an_unusable_database_url(tmp_path, fill, database_url, expected):
    """The Procfile's server with an unusable DATABASE_URL exits non-zero within 10 s with one line naming it."""
    server = Server(tmp_path / "server.log", DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=fill(database_url))
    started = time.monotonic()
    completed = subprocess.run(procfile_command(), shell=True, executable="bash", cwd=ROOT, env=server.env,
                               capture_output=True, text=True, timeout=15)
    output = completed.stdout + completed.stderr
    assert PASSWORD not in output
    assert "Traceback" not in output and completed.returncode != 0
    own = [line for line in output.splitlines() if not GUNICORN_LINE.match(line)]
    assert len(own) == 1 and own[0].startswith(expected), output
    assert time.monotonic() - started < 10


BOOTS = [
    pytest.param("nodb", (503, f"database unavailable: {NO_SUCH_DATABASE}\n"),
                 {"level": "warning", "msg": "database not ready", "cause": NO_SUCH_DATABASE},
                 id="database does not exist"),
    pytest.param("fresh", (200, "stored\n"), {"level": "info", "msg": "database ready"}, id="good database"),
]


@pytest.mark.parametrize("database, answer, boot", BOOTS)
def test_server_output_is_json_lines_and_says_how_the_database_answered(start_server, request, database, answer, boot):
    """The whole server log is JSON lines or gunicorn's own, a boot line says how the database answered, and no password shows."""
    url = with_password(request.getfixturevalue("postgres").url("nodb") if database == "nodb"
                        else request.getfixturevalue("database_url"))
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=url)
    with urllib.request.urlopen(server.url, timeout=5) as hint:  # the boot neither failed nor waited on the database
        assert hint.status == 200 and hint.read().startswith(b"DT Data Connector receiver is up")
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: server.post(*signed_delivery()), range(3)))
    assert answers == [answer] * 3
    assert server.stop() == 0
    output = server.output()
    assert any(boot.items() <= line.items() for line in server.log_lines()), output
    if answer[0] == 503:
        reasons = {line["reason"] for line in server.log_lines() if line["msg"] == "request rejected"}
        assert reasons == {answer[1].strip()}
    assert PASSWORD not in output and url not in output
    assert_json_or_gunicorn(output)  # last: a traceback is not JSON either


def test_failing_handler_gets_503_and_its_retry_200(make_app, database_url, monkeypatch, log_lines):
    """A handler that fails once makes the stored event's delivery 503 with Retry-After, and DT's retry 200 duplicate."""
    seen = []

    def fails_once(event):
        seen.append(event.event_id)
        if len(seen) == 1:
            raise RuntimeError(f"forwarding failed with {PASSWORD}")

    monkeypatch.setattr(on_event, "on_event", fails_once)
    client = make_app(DATABASE_URL=database_url).test_client()
    event = sample_event(event_id="flaky-1")
    first = client.post("/", data=(delivery := signed_delivery(event))[0], headers=delivery[1])
    assert (first.status_code, first.text) == (503, "event handler failed: RuntimeError\n")
    assert first.headers["Retry-After"].isdigit()
    assert count_rows(database_url, "flaky-1") == 1  # stored before the handler ran
    retry = client.post("/", data=(delivery := signed_delivery(event))[0], headers=delivery[1])
    assert (retry.status_code, retry.text) == (200, "duplicate\n")
    assert seen == ["flaky-1", "flaky-1"]
    [failed] = [line for line in log_lines() if line["msg"] == "event handler failed"]
    assert (failed["event_id"], failed["error"]) == ("flaky-1", "RuntimeError")
    assert PASSWORD not in json.dumps(log_lines())  # the exception's text may hold anything


@pytest.mark.parametrize("with_database", [False, True], ids=["log only", "with database"])
def test_delivery_whose_handler_fails_writes_no_event_line(make_app, request, monkeypatch, log_lines, with_database):
    """A delivery answered 503 because the handler raised logs the failure and the rejection, never `event logged` or `event stored`."""

    def fails(event):
        raise RuntimeError("forwarding failed")

    monkeypatch.setattr(on_event, "on_event", fails)
    settings = {"DATABASE_URL": request.getfixturevalue("database_url")} if with_database else {}
    client = make_app(**settings).test_client()
    answer = client.post("/", data=(delivery := signed_delivery(sample_event(event_id="unhandled-1")))[0], headers=delivery[1])
    assert (answer.status_code, answer.text) == (503, "event handler failed: RuntimeError\n")
    lines = [line for line in log_lines() if line["msg"] != "database ready"]
    assert [(line["msg"], line.get("event_id")) for line in lines] == [("event handler failed", "unhandled-1"),
                                                                       ("request rejected", None)]


@pytest.mark.parametrize("with_database", [False, True], ids=["log only", "with database"])
def test_handler_sees_each_verified_delivery_once_and_no_rejected_one(make_app, request, monkeypatch, with_database):
    """The handler gets each verified delivery's event once (a redelivery too) and never a rejected delivery."""
    seen = []
    monkeypatch.setattr(on_event, "on_event", lambda event: seen.append(event.event_id))
    settings = {"DATABASE_URL": request.getfixturevalue("database_url")} if with_database else {}
    client = make_app(**settings).test_client()
    forged = signed_delivery(sample_event(event_id="forged"), secret="another-secret-0123456789abcdef0123")
    unsigned = (signed_delivery(sample_event(event_id="unsigned"))[0], {"Content-Type": "application/json"})
    not_an_event = (b"not json", {"X-Dt-Signature": sign_body(b"not json", SECRET)})
    deliveries = [signed_delivery(dt_event("first")), signed_delivery(dt_event("first")),
                  forged, unsigned, not_an_event, signed_delivery(sample_event(event_id="last"))]
    answers = [client.post("/", data=body, headers=headers) for body, headers in deliveries]
    assert [answer.status_code for answer in answers] == [200, 200, 401, 401, 400, 200]
    assert [answers[0].text, answers[1].text] == (["stored\n", "duplicate\n"] if with_database else ["logged\n"] * 2)
    assert seen == ["first", "first", "last"]


def test_events_on_an_empty_table_says_nothing_matched(database_url):
    """`events` on a database with no events says so in one line and exits 0."""
    listed = flask("events", DATABASE_URL=with_password(database_url))
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "no stored events match\n")


@pytest.fixture
def stored_events(make_app, database_url):
    """Store a touch event from now and a temperature event from three hours ago; return the URL and the bodies."""
    recent = sample_event("touch", event_id="recent-1", device_id="dev-now")
    old = sample_event("temperature", event_id="old-1", device_id="dev-old")
    old["event"]["timestamp"] = (datetime.now(timezone.utc) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client = make_app(DATABASE_URL=database_url).test_client()
    for event in (old, recent):
        assert client.post("/", data=(delivery := signed_delivery(event))[0], headers=delivery[1]).text == "stored\n"
    return with_password(database_url), {"recent-1": recent, "old-1": old}


def test_events_text_shows_labels_newest_first(stored_events):
    """`events` prints one line per event, newest first, with its device, type, id, labels and data."""
    url, sent = stored_events
    listed = flask("events", DATABASE_URL=url)
    assert (listed.returncode, listed.stderr) == (0, "")
    lines = listed.stdout.splitlines()
    assert [line.split()[1:4] for line in lines] == [["dev-now", "touch", "recent-1"], ["dev-old", "temperature", "old-1"]]
    labels = json.dumps(sent["old-1"]["labels"], ensure_ascii=False)
    assert all(labels in line for line in lines) and '"value": 21.45' in lines[1]
    assert PASSWORD not in listed.stdout


def test_events_json_gives_one_object_per_line_with_the_body(stored_events):
    """`events --json` prints one JSON object per line, each carrying the event's body as sent."""
    url, sent = stored_events
    listed = flask("events", "--json", DATABASE_URL=url)
    assert (listed.returncode, listed.stderr) == (0, "")
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [record["event_id"] for record in records] == ["recent-1", "old-1"]
    assert all(record["body"] == sent[record["event_id"]] and record["source"] == "connector" for record in records)


@pytest.mark.parametrize("since", ["1h", "90m", "{one_hour_ago}"], ids=["1h", "90m", "RFC 3339"])
def test_events_since_leaves_older_events_out(stored_events, since):
    """`events --since` with a duration or an RFC 3339 time lists only the events from then on."""
    url, _ = stored_events
    one_hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
    listed = flask("events", "--since", since.format(one_hour_ago=one_hour_ago), "--json", DATABASE_URL=url)
    assert (listed.returncode, listed.stderr) == (0, "")
    assert [json.loads(line)["event_id"] for line in listed.stdout.splitlines()] == ["recent-1"]
