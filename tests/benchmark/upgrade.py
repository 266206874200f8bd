"""Measure the live upgrade of a schema-3 database to the receiver's schema at issue 25's scale, deliveries flowing.

Run by hand, never in CI: `python tests/benchmark/upgrade.py` (1,000 sensors × 14 days, 2,688,000 events), or
small: `python tests/benchmark/upgrade.py --sensors 50 --days 2`. In a throwaway PostgreSQL server (the tests' own,
never the machine's), it builds the database release 3 left: the unpartitioned events table, its readings view and
version 3, filled as year.py fills it (per sensor a temperature and a `networkStatus` heartbeat every 15 minutes,
DT's body shapes, the days ending now). Then it starts the Procfile's server on it (two workers, one dyno's
default), which upgrades it as it boots, while a process of its own sends signed deliveries of new events of the
same sensors at a steady `--rate` a second, each on its schedule whatever the answers before it took, noting each
answer and how long after its due time it came. It watches dt_schema and dt_readings_fill until the readings of the
old events are filled in (or `--give-up` minutes pass), sends a few seconds more, and stops the server. Then it
checks that every delivered event is stored once with the readings the receiver's parse (samples_of) gives it, and
that every stored event has as many readings as samples_of gives its body. The PostgreSQL server logs every lock
wait longer than LOCK_WAIT_LOGGED_MS (log_lock_waits), with its statement: the longest wait of a delivery's
statement is reported, and of any other, with the statements that took over a second and the errors PostgreSQL
logged. `--logs FOLDER` keeps PostgreSQL's and the receiver's logs. The table goes to stdout in markdown, the
progress to stderr.
"""

import argparse
import http.client
import itertools
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]  # the receiver, the tests' support, year.py
from support.old_schemas import EVENTS_TABLE_2  # noqa: E402
from support.server import Server  # noqa: E402
from support.signing import SECRET  # noqa: E402
from year import (  # noqa: E402
    SEED_EVENTS,
    device_name,
    differing_readings,
    new_database,
    progress,
    seed,
    table,
    throwaway_server,
    written_readings,
)

from receiver.events import parse_event  # noqa: E402
from receiver.readings import samples_of  # noqa: E402
from receiver.sample import encode_body, sample_event, sign_body  # noqa: E402
from receiver.schema import READINGS_VIEW, VERSION, schema_version  # noqa: E402
from receiver.upgrade import fill_progress  # noqa: E402

# What release 3 left on a database: the table, the view parsing the bodies (as receiver/schema.py ships it), version 3.
VERSION_3 = EVENTS_TABLE_2 + """
CREATE TABLE dt_schema (version integer NOT NULL);
INSERT INTO dt_schema (version) VALUES (3);
""" + READINGS_VIEW
# Issue 25's targets: the readings complete within 10 minutes; no delivery answered later than DT waits (10 s);
# no lock a delivery waits on for longer than 2 s.
TARGET_FILL_SECONDS = 600
DT_WAITS_SECONDS = 10
TARGET_LOCK_WAIT_MS = 2000
LOCK_WAIT_LOGGED_MS = 100
SLOW_STATEMENT_MS = 1000  # statements that take longer are logged, and reported by their first words
SENDERS = 200  # threads: enough to keep the rate while every delivery of DT's 10 s is in flight
POLL_SECONDS = 0.5
AFTER_FILL_SECONDS = 5  # deliveries go on this long after the fill, into the upgraded schema
# A statement of a delivery (receiver/store.py's inserts and its device numbers) is known by these; the fill's,
# the migration's and the upkeep's have none of them.
DELIVERY_MARKS = ("unnest(", "new AS (", "FROM dt_devices WHERE device_id = ANY")


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=1000, help="sensors (default 1000)")
    parser.add_argument("--days", type=int, default=14, help="days of events before the upgrade (default 14)")
    parser.add_argument("--rate", type=float, default=20, help="deliveries a second during the upgrade (default 20)")
    parser.add_argument("--give-up", type=float, default=20, help="minutes the fill may take at most (default 20)")
    parser.add_argument("--logs", type=Path, help="a folder to keep PostgreSQL's and the receiver's logs in")
    chosen = parser.parse_args()
    if chosen.days < 1 or chosen.sensors < 1 or chosen.rate <= 0 or chosen.give_up <= 0:
        parser.error("--days and --sensors must be at least 1, --rate and --give-up above 0")
    return chosen


def log_lock_waits(url: str) -> None:
    """Have the server log each lock wait longer than LOCK_WAIT_LOGGED_MS, when it ends, with its statement, and
    each statement that takes longer than SLOW_STATEMENT_MS."""
    with psycopg.connect(url, autocommit=True) as connection:
        # log_min_error_statement's default, error, gives each lock wait's LOG line its statement too.
        for name, value in (("log_lock_waits", "on"), ("deadlock_timeout", f"{LOCK_WAIT_LOGGED_MS}ms"),
                            ("log_min_duration_statement", f"{SLOW_STATEMENT_MS}ms")):
            connection.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        connection.execute("SELECT pg_reload_conf()")


def build_version_3(url: str, sensors: int, days: int, end: datetime) -> dict:
    """Make the database as release 3 left it, filled, vacuumed and analyzed as a database in use is; return the
    load's seconds and the events."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(VERSION_3)
        took = seed(connection, [SEED_EVENTS], sensors, days, end)
        connection.execute("VACUUM ANALYZE")
        connection.execute("CHECKPOINT")
        events = connection.execute("SELECT count(*) FROM dt_events").fetchone()[0]
    return {"load seconds": took, "events before the upgrade": events}


def new_delivery(number: int, sensors: int) -> tuple[str, bytes]:
    """Return the id and body of a new event of one of the sensors: temperatures and heartbeats in turn."""
    kind = "temperature" if number % 2 else "networkStatus"
    event = sample_event(kind, f"upgrade-{number:07d}", device_name(number // 2 % sensors + 1))
    return event["event"]["eventId"], encode_body(event)


def deliver_steadily(port: int, rate: float, sensors: int, stopping, results) -> None:
    """In a process of its own: send a new signed event every 1/rate seconds until told to stop; then put every
    answer on `results`: (event id, body, due time (epoch seconds), status or error, seconds after its due time)."""
    answers: list[tuple] = []
    connections = threading.local()

    def send(number: int, due: float, due_at: float) -> None:
        event_id, body = new_delivery(number, sensors)
        headers = {"Content-Type": "application/json", "X-Dt-Signature": sign_body(body, SECRET)}
        if getattr(connections, "one", None) is None:
            connections.one = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connections.one.request("POST", "/", body, headers)
            answer = connections.one.getresponse()
            answer.read()
            status = answer.status
        except (OSError, http.client.HTTPException) as error:
            status = type(error).__name__
            connections.one.close()
            connections.one = None
        answers.append((event_id, body, due_at, status, time.monotonic() - due))

    with ThreadPoolExecutor(SENDERS) as senders:
        first, first_at = time.monotonic(), time.time()
        for number in itertools.count():
            due = first + number / rate
            if stopping.wait(max(0.0, due - time.monotonic())):
                break
            senders.submit(send, number, due, first_at + number / rate)
    results.put(answers)


def watch(url: str, started_at: float, give_up_seconds: float) -> dict:
    """Poll the schema's version and the fill's progress until the fill is done or the time is up; return the
    switch's time, the fill's end and events, and the longest the fill's progress stood still (all from start)."""
    found = {"switched": None, "done": None, "events filled": 0, "longest pause": 0.0}
    last_change, last_events, reported = None, -1, 0.0
    with psycopg.connect(url, autocommit=True) as connection:
        while (now := time.time()) - started_at < give_up_seconds:
            if schema_version(connection) >= VERSION and found["switched"] is None:
                switched_at = connection.execute("SELECT switched_at FROM dt_readings_fill").fetchone()[0]
                found["switched"] = switched_at.timestamp() - started_at
                progress(f"switched to schema {VERSION}, {found['switched']:.1f} s after the start")
            fill = fill_progress(connection)
            if fill is not None:
                if fill["events"] != last_events:
                    if last_change is not None:
                        found["longest pause"] = max(found["longest pause"], now - last_change)
                    last_change, last_events = now, fill["events"]
                found["events filled"] = fill["events"]
                if fill["done"]:
                    found["done"] = now - started_at
                    return found
                if now - reported >= 30:
                    reached = fill["reached"].astimezone(UTC)
                    progress(f"filled {fill['events']:,} events, back to {reached:%Y-%m-%d %H:%M} UTC")
                    reported = now
            time.sleep(POLL_SECONDS)
    return found


def upgrade_under_deliveries(url: str, options: argparse.Namespace, log_path: Path) -> tuple[dict, list[tuple]]:
    """Start the receiver on the database, deliver throughout its upgrade, and watch it; return what was watched
    and every delivery's answer."""
    spawned = multiprocessing.get_context("spawn")
    stopping, results = spawned.Event(), spawned.Queue()
    receiver = Server(log_path, DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=url)
    started_at = time.time()
    receiver.start()
    sender = spawned.Process(target=deliver_steadily, args=(receiver.port, options.rate, options.sensors,
                                                           stopping, results))
    sender.start()
    try:
        watched = watch(url, started_at, options.give_up * 60)
        time.sleep(AFTER_FILL_SECONDS)
    finally:
        stopping.set()
        answers = results.get(timeout=120)
        sender.join(30)
        receiver.stop()
    watched["started at"] = started_at
    return watched, answers


def answer_figures(answers: list[tuple], watched: dict) -> dict:
    """Return the deliveries' counts by answer and their answer times: overall, and before the switch, during the
    fill and after it."""
    statuses = Counter(status for _, _, _, status, _ in answers)
    seconds = sorted(took for _, _, _, _, took in answers)
    figures = {"deliveries sent": len(answers), "deliveries answered 200": statuses.pop(200, 0),
               "deliveries answered otherwise": ", ".join(f"{status}: {n}" for status, n in statuses.items()) or "0",
               f"deliveries answered after {DT_WAITS_SECONDS} s": sum(took > DT_WAITS_SECONDS for took in seconds),
               "answer time p50 (ms)": statistics.median(seconds) * 1000 if seconds else None,
               "answer time p99 (ms)": seconds[int(len(seconds) * 0.99)] * 1000 if seconds else None,
               "answer time max (ms)": seconds[-1] * 1000 if seconds else None}
    switched, done = (watched["started at"] + (watched[name] if watched[name] is not None else float("inf"))
                      for name in ("switched", "done"))
    for phase, since, until in (("before the switch", 0, switched), ("during the fill", switched, done),
                                ("after the fill", done, float("inf"))):
        during = [took for _, _, due, _, took in answers if since <= due < until]
        figures[f"answer time max, {phase} (ms)"] = max(during) * 1000 if during else None
    return figures


def stored_once(connection: psycopg.Connection, answers: list[tuple]) -> dict:
    """Return how many delivered events are stored once, more than once, or not at all, and how many of those
    answered 200 are missing."""
    counts = dict(connection.execute("SELECT event_id, count(*) FROM dt_events WHERE event_id = ANY(%s) GROUP BY 1",
                                     ([event_id for event_id, *_ in answers],)).fetchall())
    return {"delivered events stored exactly once": sum(counts.get(event_id) == 1 for event_id, *_ in answers),
            "delivered events stored more than once": sum(n > 1 for n in counts.values()),
            "delivered events answered 200 and not stored": sum(
                status == 200 and event_id not in counts for event_id, _, _, status, _ in answers)}


def delivered_readings(connection: psycopg.Connection, answers: list[tuple]) -> dict:
    """Return how many stored delivered events have readings other than what the receiver's parse gives them."""
    stored: dict[str, list[tuple]] = {}
    for event_id, *reading in connection.execute("""
            SELECT s.event_id, s.time, s.value, s.value2, d.device_id, s.kind, s.state
            FROM dt_samples AS s JOIN dt_devices AS d USING (device)
            JOIN unnest(%s::text[]) AS delivered (event_id) USING (event_id)""",
                                                  ([event_id for event_id, *_ in answers],)):
        stored.setdefault(event_id, []).append(tuple(reading))
    kept = {event_id for (event_id,) in connection.execute(
        "SELECT event_id FROM dt_events WHERE event_id = ANY(%s)", ([event_id for event_id, *_ in answers],))}
    differing = sum(sorted(stored.get(event_id, []), key=str) != sorted(written_readings(parse_event(body)), key=str)
                    for event_id, body, *_ in answers if event_id in kept)
    return {"delivered events whose readings differ from samples_of's": differing}


def every_event_readings(url: str) -> dict:
    """Read every stored event and count its readings; return how many events have another number of readings than
    samples_of gives their body, and the readings dt_readings holds against those samples_of gives."""
    expected_readings, differing, events = 0, 0, 0
    with psycopg.connect(url) as connection:
        connection.execute("SET work_mem = '256MB'")
        readings = connection.execute("SELECT count(*) FROM dt_readings").fetchone()[0]
        with connection.cursor(name="every_event") as cursor:
            cursor.itersize = 10000
            cursor.execute("""SELECT e.event, coalesce(s.samples, 0) FROM dt_events AS e
                              LEFT JOIN (SELECT event_id, count(*) AS samples FROM dt_samples GROUP BY event_id) AS s
                              USING (event_id)""")
            for body, samples in cursor:
                event = parse_event(body.encode())
                parsed = samples_of(event) if event.device_id is not None else []
                differing += samples != len(parsed)
                expected_readings += sum((s.value is not None or s.state is not None) + (s.value2 is not None)
                                         for s in parsed)
                events += 1
    return {"events after the upgrade": events,
            "events whose count of samples differs from samples_of's": differing,
            "readings in dt_readings": readings, "readings samples_of gives every stored event": expected_readings}


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(\d+)\] ([A-Z]+):  (.*)$")
DURATION = re.compile(r"duration: ([\d.]+) ms  (?:statement|execute [^:]*): (.*)", re.S)
ACQUIRED = re.compile(r"process \d+ acquired (\w+) on (.+?) after ([\d.]+) ms")
STILL_WAITING = re.compile(r"process \d+ still waiting for (\w+) on (.+?) after [\d.]+ ms")


def server_messages(text: str) -> list[dict]:
    """Return the PostgreSQL server log's messages: each a level, its text and its statement (if any), and pid."""
    messages: list[dict] = []
    part = None
    for line in text.splitlines():
        found = LOG_LINE.match(line)
        if found is None:
            if part is not None:
                part["text"] += "\n" + line
            continue
        pid, level, text = found.groups()
        if level in ("DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY") and messages and messages[-1]["pid"] == pid:
            part = {"text": text}
            messages[-1][level.lower()] = part
            continue
        part = {"pid": pid, "level": level, "text": text}
        messages.append(part)
    for message in messages:
        for key in ("statement", "detail"):
            if isinstance(message.get(key), dict):
                message[key] = message[key]["text"]
    return messages


def lock_wait_figures(log_text: str) -> dict:
    """Return the longest logged lock wait of a delivery's statement and of any other, what each waited for, and
    the waits that ended in an error instead (a timeout)."""
    messages = server_messages(log_text)
    longest = {"delivery": (0.0, "none logged"), "other": (0.0, "none logged")}
    ended_unmet = Counter()
    waiting: dict[str, str] = {}
    for message in messages:
        statement = message.get("statement", "")
        who = "delivery" if any(mark in statement for mark in DELIVERY_MARKS) else "other"
        if (acquired := ACQUIRED.search(message["text"])) is not None:
            waiting.pop(message["pid"], None)
            took = float(acquired[3])
            if took > longest[who][0]:
                longest[who] = (took, f"{acquired[1]} on {acquired[2]}, in: {first_words(statement)}")
        elif STILL_WAITING.search(message["text"]) is not None:
            waiting[message["pid"]] = who
        elif message["level"] == "ERROR" and message["pid"] in waiting:
            ended_unmet[f"{waiting.pop(message['pid'])}: {message['text']}"] += 1
    return {"longest lock wait of a delivery (ms)": longest["delivery"][0],
            "longest lock wait of a delivery: on what": longest["delivery"][1],
            "longest lock wait of another statement (ms)": longest["other"][0],
            "longest lock wait of another statement: on what": longest["other"][1],
            "lock waits ended by an error": "; ".join(f"{what} ({n})" for what, n in ended_unmet.items()) or "none"}


def slow_statements(log_text: str) -> str:
    """Return the statements that took longer than SLOW_STATEMENT_MS: how many of each kind, and the longest."""
    slow: dict[str, list[float]] = {}
    for message in server_messages(log_text):
        if (found := DURATION.search(message["text"])) is not None:
            slow.setdefault(first_words(found[2], 50), []).append(float(found[1]))
    return "; ".join(f"{what} ({len(took)}, longest {max(took):,.0f} ms)" for what, took in slow.items()) or "none"


def server_errors(log_text: str) -> str:
    """Return the errors PostgreSQL logged, counted by message and statement (a fill window that failed, say)."""
    counted = Counter(message["text"] + (f", in: {first_words(message['statement'], 50)}" if "statement" in message
                                         else f" ({first_words(message.get('detail', ''), 60)})")
                      for message in server_messages(log_text) if message["level"] in ("ERROR", "FATAL"))
    return "; ".join(f"{what} ({n})" for what, n in counted.items()) or "none"


def first_words(statement: str, length: int = 90) -> str:
    """Return a statement's first words, on one line."""
    words = " ".join(statement.split())
    return words[:length] + ("…" if len(words) > length else "")


def receiver_lines(receiver_log: str) -> dict:
    """Return the receiver's warning and error lines, counted by message, and its upkeep's lines."""
    counted = Counter()
    upkeep = []
    for line in receiver_log.splitlines():
        if line.startswith(('{"level": "warning"', '{"level": "error"')):
            counted[line[:160]] += 1
        elif '"msg": "upkeep done"' in line:
            upkeep.append(line)
    return {"receiver's warnings and errors": "; ".join(f"{line} ({n})" for line, n in counted.items()) or "none",
            "receiver's upkeep rounds": "; ".join(upkeep) or "none"}


def upgrade_figures(watched: dict) -> dict:
    """Return the times of the switch and of the fill, the fill's rate, and whether the fill met its target."""
    switched, done = watched["switched"], watched["done"]
    fill_seconds = done - switched if done is not None and switched is not None else None
    return {"switched to schema 5 (s after the receiver's start)": switched,
            "readings complete (s after the receiver's start)": done if done is not None else "not within the bound",
            "fill (s after the switch)": fill_seconds,
            "events filled": watched["events filled"],
            "events filled per second": watched["events filled"] / fill_seconds if fill_seconds else None,
            "longest the fill's progress stood still (s)": watched["longest pause"]}


def verdicts(figures: dict) -> dict:
    """Return whether each of issue 25's targets was met."""
    done = figures["readings complete (s after the receiver's start)"]
    return {"target: readings complete within 10 min": "met" if isinstance(done, float) and
            done <= TARGET_FILL_SECONDS else "missed",
            "target: no delivery lost or answered after 10 s": "met" if (
                figures[f"deliveries answered after {DT_WAITS_SECONDS} s"] == 0
                and figures["deliveries answered otherwise"] == "0"
                and figures["delivered events answered 200 and not stored"] == 0) else "missed",
            "target: no lock a delivery waits on for more than 2 s": "met" if (
                figures["longest lock wait of a delivery (ms)"] <= TARGET_LOCK_WAIT_MS) else "missed"}


def main() -> None:
    """Build the schema-3 database, upgrade it under deliveries, check what was stored, and print the table."""
    options = arguments()
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    with throwaway_server() as server, tempfile.TemporaryDirectory() as folder:
        with psycopg.connect(server.url()) as connection:
            version = connection.execute("SHOW server_version").fetchone()[0]
        url = new_database(server, "upgrade")
        progress(f"building a version-3 database of {options.sensors} sensors × {options.days} days")
        figures = build_version_3(url, options.sensors, options.days, end)
        log_lock_waits(server.url())  # from here on: the load's own statements are not the upgrade's
        load = os.getloadavg()[0]
        progress(f"{figures['events before the upgrade']:,} events; starting the receiver and the deliveries")
        watched, answers = upgrade_under_deliveries(url, options, Path(folder) / "receiver.log")
        progress(f"{len(answers):,} deliveries sent; checking what is stored")
        figures |= upgrade_figures(watched) | answer_figures(answers, watched)
        with psycopg.connect(url, autocommit=True) as connection:
            figures |= stored_once(connection, answers) | delivered_readings(connection, answers)
            figures["random stored events whose readings differ from samples_of's (of 500)"] = len(
                differing_readings(connection))
        figures |= every_event_readings(url)
        server_log = (server.folder / "server.log").read_text(errors="replace")
        figures |= lock_wait_figures(server_log)
        figures["statements over 1 s"] = slow_statements(server_log)
        figures["errors PostgreSQL logged"] = server_errors(server_log)
        figures |= receiver_lines((Path(folder) / "receiver.log").read_text())
        figures |= verdicts(figures)
        if options.logs:
            options.logs.mkdir(parents=True, exist_ok=True)
            (options.logs / "postgresql.log").write_text(server_log)
            shutil.copy(Path(folder) / "receiver.log", options.logs / "receiver.log")
    print(f"{date.today():%Y-%m-%d}: {options.sensors} sensors × {options.days} days, deliveries at {options.rate:g}/s;"
          f" PostgreSQL {version} (fsync off, as in the tests); {os.cpu_count()} CPUs, load average {load:.1f}"
          f" before the upgrade and {os.getloadavg()[0]:.1f} after\n")
    print(table({"value": figures}))


if __name__ == "__main__":
    main()
