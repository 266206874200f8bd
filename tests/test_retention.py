"""Partitions made ahead and retention applied: by the receiver's own upkeep, by `prune`, and what `status` says."""

import logging
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from support.server import ROOT, Server, procfile_command
from support.signing import SECRET
from test_storage import keep_delivering

from receiver import partitions, retention
from receiver.commands import days_until_full
from receiver.durations import parse_duration
from receiver.schema import migrate

TODAY = datetime.now(UTC).date()
DAY = timedelta(days=1)
BODY = '{"event":{"data":{}}}' + " " * 500  # about what a DT event's body weighs


def scalar(database_url: str, query: str, params: tuple = ()):
    """Return the one value a query finds."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        return connection.execute(query, params).fetchone()[0]


def tables(database_url: str, parent: str) -> list[str]:
    """Return the names of a table's partitions, in order."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        return sorted(partition.name for partition in partitions.partitions(connection, parent))


def seed(database_url: str, days: int, per_day: int) -> None:
    """Migrate, make daily partitions for the last `days` days, and store `per_day` events a day in them, each
    with a reading, the newest an hour ago."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
        for back in range(days, -1, -1):
            partitions.ensure_partitions(connection, TODAY - back * DAY)
        connection.execute("INSERT INTO dt_devices (device_id) VALUES ('emuseed')")
        connection.execute(
            "INSERT INTO dt_events (event_id, device_id, event_type, event_time, event) "
            "SELECT 'seed-' || n, 'emuseed', 'temperature', now() - interval '1 hour' - n * %s::interval, %s "
            "FROM generate_series(0, %s) AS n", (DAY / per_day, BODY, days * per_day))
        connection.execute(
            "INSERT INTO dt_samples (time, value, device, kind, event_id) SELECT event_time, 21.5, "
            "(SELECT device FROM dt_devices WHERE device_id = 'emuseed'), "
            "(SELECT kind FROM dt_reading_kinds WHERE event_type = 'temperature'), event_id FROM dt_events")
        connection.execute("ANALYZE")


@contextmanager
def connected(database_url: str):
    """Lend an autocommit connection, as the store's pool lends them."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def test_durations_take_years():
    """`2y` is two years of 365 days, as EVENTS_RETENTION and READINGS_RETENTION take it."""
    assert parse_duration("2y") == timedelta(days=730)
    assert parse_duration("31d") == timedelta(days=31)


def test_partitions_are_made_ahead_by_attaching(database_url):
    """A round makes each event day's partition from today to today + 7 and the samples' of this month and next,
    as tables attached to the parent (each gets the parent's indexes)."""
    with connected(database_url) as connection:
        migrate(connection)
        later = TODAY + 30 * DAY
        made = partitions.ensure_partitions(connection, later)
    days = [later + n * DAY for n in range(8)]
    following = (later.replace(day=1) + timedelta(days=32)).replace(day=1)
    months = [f"dt_samples_p{later:%Y%m}", f"dt_samples_p{following:%Y%m}"]
    assert made[:8] == [f"dt_events_p{day:%Y%m%d}" for day in days] and set(made[8:]) <= set(months)
    assert set(made + months) <= set(tables(database_url, "dt_events") + tables(database_url, "dt_samples"))
    assert scalar(database_url, "SELECT count(*) FROM pg_indexes WHERE tablename = %s",
                  (f"dt_events_p{days[-1]:%Y%m%d}",)) == 3  # primary key, (device_id, event_time), (event_time)


def test_a_row_in_default_is_moved_into_its_new_partition(database_url):
    """An event stored before its day's partition existed (it went to DEFAULT) is moved into that partition when it
    is made, and stays stored once."""
    far = TODAY + 20 * DAY
    with connected(database_url) as connection:
        migrate(connection)
        connection.execute("INSERT INTO dt_events (event_id, event_time, event) VALUES ('early', %s, '{}')",
                           (datetime.combine(far, datetime.min.time(), UTC) + timedelta(hours=5),))
        assert scalar(database_url, "SELECT tableoid::regclass::text FROM dt_events") == "dt_events_default"
        made = partitions.ensure_partitions(connection, far - 7 * DAY)
    assert f"dt_events_p{far:%Y%m%d}" in made
    assert scalar(database_url, "SELECT array_agg(tableoid::regclass::text) FROM dt_events WHERE event_id = 'early'"
                  ) == [f"dt_events_p{far:%Y%m%d}"]


def test_a_round_drops_whole_partitions_past_retention_and_the_database_shrinks(database_url):
    """EVENTS_RETENTION=3d: each day's partition wholly older is dropped (the database shrinks by at least 90% of
    their size), the day that straddles the cutoff loses its older rows only, and every newer event stays."""
    seed(database_url, days=10, per_day=2000)
    now = datetime.now(UTC)
    cutoff = now - 3 * DAY
    kept = scalar(database_url, "SELECT count(*) FROM dt_events WHERE event_time >= %s", (cutoff,))
    old_bytes = scalar(database_url, "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree("
                                     "'dt_events') WHERE relid::text LIKE 'dt_events_p%%' AND relid::text < %s",
                       (f"dt_events_p{cutoff:%Y%m%d}",))
    before = scalar(database_url, "SELECT pg_database_size(current_database())")
    with connected(database_url) as connection:
        done = retention.run_round(connection, {"EVENTS_RETENTION": "3d"}, now)
    after = scalar(database_url, "SELECT pg_database_size(current_database())")
    assert done["dropped"] == [f"dt_events_p{day:%Y%m%d}" for day in
                               (cutoff.date() - n * DAY for n in range(10, 0, -1)) if day >= TODAY - 10 * DAY]
    assert done["deleted_events"] > 0 and "deleted_readings" not in done  # readings kept: READINGS_RETENTION unset
    assert scalar(database_url, "SELECT min(event_time) FROM dt_events") >= cutoff
    assert scalar(database_url, "SELECT count(*) FROM dt_events") == kept
    assert before - after >= 0.9 * old_bytes, f"shrank {before - after} of {old_bytes} bytes dropped"


def test_a_round_is_left_to_the_worker_holding_the_lock(database_url):
    """While another worker (or dyno) holds the upkeep's advisory lock, a round does nothing and says so."""
    seed(database_url, days=5, per_day=10)
    with connected(database_url) as holder, connected(database_url) as connection:
        holder.execute(retention.UPKEEP_LOCK)
        assert retention.run_round(connection, {"EVENTS_RETENTION": "1d"}, datetime.now(UTC)) is None
    assert scalar(database_url, "SELECT min(event_time) < now() - interval '4 days' FROM dt_events")


def test_a_drop_waits_a_moment_for_a_reader_then_leaves_it_for_the_next_round(database_url):
    """A partition a long query is reading is left, after the drop's lock timeout, for the next round; then dropped."""
    seed(database_url, days=5, per_day=10)
    oldest = f"dt_events_p{TODAY - 5 * DAY:%Y%m%d}"
    with connected(database_url) as reader, connected(database_url) as connection:
        reader.execute("BEGIN")
        reader.execute(f"SELECT count(*) FROM {oldest}")  # noqa: S608 (a name the test made)
        started = time.monotonic()
        done = partitions.remove_before(connection, "dt_events", datetime.now(UTC) - 2 * DAY)
        assert time.monotonic() - started < 5
        assert done["skipped"] == [oldest] and oldest not in done["dropped"] and done["dropped"]
        reader.execute("ROLLBACK")
        assert partitions.remove_before(connection, "dt_events", datetime.now(UTC) - 2 * DAY)["dropped"] == [oldest]


def test_retention_drops_partitions_while_deliveries_flow(start_server, database_url):
    """While four clients deliver without pause, removing 9 days of partitions answers every delivery 200 within
    10 s, and every event delivered is stored."""
    seed(database_url, days=12, per_day=5000)
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url, EVENTS_RETENTION="3d")
    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(keep_delivering, server, stop) for _ in range(4)]
        time.sleep(0.5)
        with connected(database_url) as connection:
            done = None
            while done is None:  # a worker's own boot round may hold the lock a moment
                done = retention.run_round(connection, {"EVENTS_RETENTION": "3d", "READINGS_RETENTION": "2d"},
                                           datetime.now(UTC))
        time.sleep(0.5)
        stop.set()
        answers = [one for client in running for one in client.result()]
    assert len(done["dropped"]) >= 9 and not done["skipped"], done
    assert Counter((one["status"], one["text"]) for one in answers) == {(200, "stored\n"): len(answers)}
    assert max(one["seconds"] for one in answers) < 10
    assert scalar(database_url, "SELECT count(*) FROM dt_events WHERE event_id = ANY(%s)",
                  ([one["event_id"] for one in answers],)) == len(answers)
    assert scalar(database_url, "SELECT min(event_time) >= now() - interval '3 days' FROM dt_events")


def test_the_server_makes_todays_partitions_at_boot(start_server, database_url):
    """A receiver that boots on a database without today's partition makes it at once, and one worker logs it."""
    with connected(database_url) as connection:
        migrate(connection)
        connection.execute(f"DROP TABLE dt_events_p{TODAY:%Y%m%d}")
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=database_url)
    deadline = time.monotonic() + 15
    while f"dt_events_p{TODAY:%Y%m%d}" not in tables(database_url, "dt_events") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"dt_events_p{TODAY:%Y%m%d}" in tables(database_url, "dt_events")
    time.sleep(0.5)
    rounds = [line for line in server.log_lines() if line["msg"].startswith("upkeep")]
    assert [line["msg"] for line in rounds].count("upkeep done") == 1, rounds
    assert f"dt_events_p{TODAY:%Y%m%d}" in next(line["created"] for line in rounds if line["msg"] == "upkeep done")


@pytest.mark.parametrize("name, value", [("EVENTS_RETENTION", "31 days"), ("READINGS_RETENTION", "0d")])
def test_a_bad_retention_stops_the_boot_with_one_line(tmp_path, name, value):
    """An EVENTS_RETENTION or READINGS_RETENTION that is no duration stops the server with one line naming it."""
    server = Server(tmp_path / "server.log", DT_SIGNATURE_SECRET=SECRET, **{name: value})
    completed = subprocess.run(procfile_command(), shell=True, executable="bash", cwd=ROOT,  # noqa: S602 (the Procfile)
                               env=server.env, capture_output=True, text=True, timeout=30)
    own = [line for line in (completed.stdout + completed.stderr).splitlines() if "[INFO]" not in line]
    assert completed.returncode != 0
    assert own == [f"receiver not started: {name} must be a duration such as 31d, 26w or 2y, not {value!r}"]


def test_the_loop_makes_partitions_at_boot_and_logs_a_fault_as_a_short_cause(database_url, caplog):
    """The worker's loop makes partitions as it starts; a round that meets a fault logs its cause and goes on."""
    with connected(database_url) as connection:
        migrate(connection)
        connection.execute(f"DROP TABLE dt_events_p{TODAY + 7 * DAY:%Y%m%d}")
    calls = []

    @contextmanager
    def lend(wait_seconds):
        calls.append(wait_seconds)
        if len(calls) > 1:
            raise psycopg.OperationalError("connection to server at \"db\", port 5432 failed: Connection refused")
        with connected(database_url) as connection:
            yield connection

    stopping = threading.Event()
    caplog.set_level(logging.INFO, logger="receiver")
    loop = threading.Thread(target=retention.keep_up, args=(lend, {}, stopping, 0.2, 0.2))
    loop.start()
    time.sleep(1.5)
    stopping.set()
    loop.join(5)
    assert not loop.is_alive()
    messages = [(record.getMessage(), getattr(record, "fields", {})) for record in caplog.records]
    assert messages[0][0] == "upkeep done" and f"dt_events_p{TODAY + 7 * DAY:%Y%m%d}" in messages[0][1]["created"]
    assert len(messages) >= 3 and all(message == ("upkeep failed", {"cause": "connection refused"})
                                      for message in messages[1:]), messages


def test_prune_readings_older_than_drops_months_and_trims_the_rest(make_app, database_url):
    """`prune --readings-older-than` removes readings before its cutoff (events untouched): whole months dropped."""
    seed(database_url, days=70, per_day=50)
    events = scalar(database_url, "SELECT count(*) FROM dt_events")
    runner = make_app(DATABASE_URL=database_url).test_cli_runner()
    dry = runner.invoke(args=["prune", "--readings-older-than", "40d", "--dry-run"])
    assert dry.exit_code == 0 and dry.stdout.startswith("prune: would delete "), dry.output
    result = runner.invoke(args=["prune", "--readings-older-than", "40d"])
    assert result.exit_code == 0, result.output
    cutoff = datetime.now(UTC) - 40 * DAY
    old_month = f"dt_samples_p{(TODAY - 70 * DAY):%Y%m}"
    assert f"{old_month}" not in tables(database_url, "dt_samples") or cutoff.month == (TODAY - 70 * DAY).month
    assert result.stdout.startswith("prune: removed "), result.stdout
    assert " readings from before " in result.stdout and "whole partitions dropped" in result.stdout
    assert scalar(database_url, "SELECT min(time) >= now() - interval '40 days' FROM dt_readings")
    assert scalar(database_url, "SELECT count(*) FROM dt_events") == events


def test_prune_needs_one_of_its_cutoffs(make_app, database_url):
    """`prune` with neither --older-than nor --readings-older-than is a usage error, in one line."""
    result = make_app(DATABASE_URL=database_url).test_cli_runner().invoke(args=["prune"])
    assert result.exit_code == 2 and "give --older-than (raw events), --readings-older-than" in result.output


def test_status_shows_retention_sizes_and_days_until_the_plan_is_full(make_app, database_url):
    """`status` names each retention, the sizes of events and readings, and with DATABASE_PLAN_MB the days until
    the plan is full at the last week's rate, events levelling off at their retention."""
    seed(database_url, days=10, per_day=2000)
    app = make_app(DATABASE_URL=database_url, DATABASE_PLAN_MB="1024", EVENTS_RETENTION="31d")
    result = app.test_cli_runner().invoke(args=["status"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "retention: events kept 31d (EVENTS_RETENTION), readings kept for ever (READINGS_RETENTION unset)" in lines
    size = next(line for line in lines if line.startswith("size: "))
    events_mb = scalar(database_url,
                       "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree('dt_events')")
    assert size.startswith(f"size: events {events_mb / 1e6:.1f} MB, readings "), size
    plan = next(line for line in lines if line.startswith("plan: "))
    assert plan.startswith("plan: full in about ") and " days at the last week's rate (events +" in plan, plan


def test_days_until_full_levels_off_each_stream_at_its_retention():
    """Streams grow until their retention's window is full, then stay: the plan fills later, or never."""
    assert days_until_full(100, [(10, None)]) == 10
    assert days_until_full(100, [(10, 5), (5, None)]) == 5 + (100 - 75) / 5
    assert days_until_full(100, [(10, 5)]) is None
    assert days_until_full(100, [(0, None)]) is None


def test_a_round_leaves_the_upgraded_table_until_wholly_past_then_drops_it(database_url):
    """A partition from MINVALUE (the table from before the partitions) is trimmed, then dropped once wholly past."""
    with connected(database_url) as connection:
        migrate(connection)
        cutoff = datetime.combine(TODAY - 5 * DAY, datetime.min.time(), UTC)
        for day in range(5, -1, -1):
            connection.execute(f"DROP TABLE IF EXISTS dt_events_p{TODAY - day * DAY:%Y%m%d}")
        connection.execute("CREATE TABLE dt_events_legacy (LIKE dt_events INCLUDING DEFAULTS)")
        connection.execute(psycopg.sql.SQL("ALTER TABLE dt_events ATTACH PARTITION dt_events_legacy FOR VALUES FROM "
                                           "(MINVALUE) TO ({})").format(psycopg.sql.Literal(cutoff)))
        connection.execute("INSERT INTO dt_events (event_id, event_time, event) SELECT 'old-' || n, "
                           "%s - n * interval '1 hour', '{}' FROM generate_series(1, 100) AS n", (cutoff,))
        trimmed = partitions.remove_before(connection, "dt_events", cutoff - 2 * DAY)
        assert trimmed["deleted"] == 100 - 48 and not trimmed["dropped"]
        dropped = partitions.remove_before(connection, "dt_events", cutoff)
    assert dropped["dropped"] == ["dt_events_legacy"]
    assert "dt_events_legacy" not in tables(database_url, "dt_events")



def test_a_round_gives_a_past_day_with_many_rows_in_default_a_partition_of_its_own(database_url):
    """Events older than the partitions (a backfill on a fresh deploy) land in DEFAULT; a round moves a past day
    holding many of them into a partition of its own, so that DEFAULT, which every attach reads, stays small. A day
    with a few stays in DEFAULT."""
    busy, quiet = TODAY - 10 * DAY, TODAY - 20 * DAY
    with connected(database_url) as connection:
        migrate(connection)
        for prefix, day, count in (("busy", busy, partitions.CARVE_AT_LEAST_ROWS + 500), ("quiet", quiet, 10)):
            connection.execute("INSERT INTO dt_events (event_id, event_time, event) SELECT %s || n, %s + n * "
                               "interval '1 s', '{}' FROM generate_series(1, %s) AS n",
                               (prefix, partitions.midnight(day), count))
        done = retention.run_round(connection, {}, datetime.now(UTC))
    assert f"dt_events_p{busy:%Y%m%d}" in done["created"] and f"dt_events_p{quiet:%Y%m%d}" not in done["created"]
    assert scalar(database_url, "SELECT count(*) FROM dt_events_default") == 10
    assert scalar(database_url, "SELECT count(*) FROM dt_events WHERE tableoid = %s::regclass",
                  (f"dt_events_p{busy:%Y%m%d}",)) == partitions.CARVE_AT_LEAST_ROWS + 500


def test_status_says_how_far_the_readings_of_an_upgrade_are_filled_in(make_app, database_url):
    """After an upgrade from an older schema, `status` says how far the readings of the older events have come."""
    from receiver.upgrade import FILL_TABLE, fill_one_window

    with connected(database_url) as connection:
        migrate(connection)
        connection.execute(FILL_TABLE)
        connection.execute("CREATE TABLE dt_events_legacy (LIKE dt_events)")
        connection.execute("INSERT INTO dt_readings_fill (switched_at, reached, events) VALUES "
                           "('2026-12-01T10:00:00Z', '2026-11-20T06:00:00Z', 1234)")
    status = make_app(DATABASE_URL=database_url).test_cli_runner()
    assert status.invoke(args=["status"]).stdout.splitlines()[-1] == (
        "readings of the events stored before the upgrade: filling in, newest first: 1234 events so far, every one "
        "from 2026-11-20 06:00:00 UTC on")
    # Retention drops the old rows before their turn: the fill is over, and says so, with no receiver running.
    with connected(database_url) as connection:
        connection.execute("DROP TABLE dt_events_legacy")
    assert status.invoke(args=["status"]).stdout.splitlines()[-1] == (
        "readings of the events stored before the upgrade: done, 1234 events filled in")
    with connected(database_url) as connection:
        assert fill_one_window(connection) == "done"
        assert scalar(database_url, "SELECT done FROM dt_readings_fill") is True
