"""The schema in both directions: an older release's lower version healed, a newer schema left as it is, a table
restored without dt_schema known by its columns, and every step harmless to run again."""

import time

import psycopg
import pytest
from psycopg.rows import dict_row
from support.old_schemas import EVENTS_TABLE_2, READINGS_VIEW_5
from support.signing import signed_delivery

from receiver.sample import sample_event
from receiver.schema import COMPATIBLE_FROM, LATEST, UPGRADES, VERSION, migrate, schema_version

# The events table as versions 2 to 4 have it, without dt_schema or the view: what `pg_dump -t dt_events` restores
# (the enum type is not in such a dump; the database it is restored into has it from before).
RESTORED_TABLE = EVENTS_TABLE_2 + """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
VALUES ('restored-1', 'emurestored', 'touch', now(), '{"event": {"data": {"touch": {}}}}');
"""


def query(database_url: str, text: str, *params) -> list[dict]:
    """Return the rows a query finds, as dicts, on a connection of its own."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as connection:
        cursor = connection.execute(text, params)
        return cursor.fetchall() if cursor.description else []


def deliver(app, event_id: str) -> tuple[int, str]:
    """Deliver a signed event through an in-process app; return the status and the reason."""
    answer = app.test_client().post("/", data=(delivery := signed_delivery(sample_event(event_id=event_id)))[0],
                                    headers=delivery[1])
    return answer.status_code, answer.text.strip()


def older_release_connects(database_url: str, version: int) -> None:
    """Do what an older release's migrate (version 2, or today's 3) does on a database newer than it knows: it has no
    step to run, and writes its own version over the newer one (a Scheduler job or `heroku run` on the old slug)."""
    query(database_url, "DELETE FROM dt_schema")
    query(database_url, "INSERT INTO dt_schema (version) VALUES (%s)", version)


@pytest.mark.parametrize("older", [2, 3])
def test_a_version_lowered_by_an_older_release_is_healed_by_running_the_steps_again(make_app, database_url, older,
                                                                                     log_lines):
    """After an older release wrote its lower version over this one's, this release's next start runs the steps
    after it again without an error, records its own version again, keeps every row and stores."""
    assert deliver(make_app(DATABASE_URL=database_url), "before-rollback") == (200, "stored")
    older_release_connects(database_url, older)

    assert deliver(make_app(DATABASE_URL=database_url), "after-rollback") == (200, "stored")
    assert query(database_url, "SELECT version, compatible_from FROM dt_schema") == [
        {"version": VERSION, "compatible_from": COMPATIBLE_FROM}]
    assert [row["event_id"] for row in query(database_url, "SELECT event_id FROM dt_events ORDER BY 1")] == [
        "after-rollback", "before-rollback"]
    assert [line["schema_version"] for line in log_lines() if line["msg"] == "database ready"] == [VERSION] * 2
    assert not [line for line in log_lines() if line["msg"] == "database not ready"]


def test_every_step_and_the_new_database_sql_run_again_without_changing_the_schema(database_url):
    """Each upgrade step, and what a new database gets, run again on the latest schema without an error and leave
    the table, its indexes and the view as they were."""
    shape = ("SELECT (SELECT array_agg(column_name || ' ' || data_type ORDER BY ordinal_position) FROM "
             "information_schema.columns WHERE table_name = 'dt_events') AS columns, (SELECT array_agg(indexdef "
             "ORDER BY indexname) FROM pg_indexes WHERE tablename = 'dt_events') AS indexes, "
             "pg_get_viewdef('dt_readings') AS view")
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
    before = query(database_url, shape)
    with psycopg.connect(database_url, autocommit=True) as connection:
        for step in [LATEST, *(step.sql for step in UPGRADES)]:
            step(connection) if callable(step) else connection.execute(step)
    assert query(database_url, shape) == before
    with psycopg.connect(database_url) as connection:
        assert schema_version(connection) == VERSION


NEWER = f"the database's schema is version {VERSION + 1}, newer than this release's {VERSION}: deploy the newer release"


def test_a_newer_schema_this_release_may_not_write_to_is_left_alone_with_503_and_one_line(make_app, database_url):
    """A schema a newer release made, recorded as writable only by releases from that version on, is left as it
    is: deliveries are answered 503 naming it, /health says so, and a command ends in that one line."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
    query(database_url, "UPDATE dt_schema SET version = %s, compatible_from = %s", VERSION + 1, VERSION + 1)
    app = make_app(DATABASE_URL=database_url)

    assert deliver(app, "too-new") == (503, f"database unavailable: {NEWER}")
    assert app.test_client().get("/health").json["problems"] == {"database": f"database unavailable: {NEWER}"}
    result = app.test_cli_runner().invoke(args=["status"])
    assert (result.exit_code, result.output) == (1, f"Error: {NEWER}\n")
    assert query(database_url, "SELECT version, compatible_from FROM dt_schema") == [
        {"version": VERSION + 1, "compatible_from": VERSION + 1}]
    assert query(database_url, "SELECT count(*) FROM dt_events") == [{"count": 0}]


def test_a_newer_schema_that_lets_this_release_write_is_worked_with_and_left_untouched(make_app, database_url,
                                                                                       log_lines):
    """A newer schema that only added (here a column with a default) and says releases from this one on may still
    write is used as it is: deliveries are stored, commands work, and dt_schema keeps the newer version."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
    query(database_url, "ALTER TABLE dt_events ADD COLUMN added_later text DEFAULT 'newer'")
    query(database_url, "UPDATE dt_schema SET version = %s, compatible_from = %s", VERSION + 1, VERSION)
    app = make_app(DATABASE_URL=database_url)

    assert deliver(app, "into-newer") == (200, "stored")
    assert "into-newer" in app.test_cli_runner().invoke(args=["events", "--json"]).output
    assert query(database_url, "SELECT version, compatible_from FROM dt_schema") == [
        {"version": VERSION + 1, "compatible_from": VERSION}]
    assert query(database_url, "SELECT event_id, added_later FROM dt_events") == [
        {"event_id": "into-newer", "added_later": "newer"}]
    assert [line["schema_version"] for line in log_lines() if line["msg"] == "database ready"] == [VERSION + 1]


def test_a_table_restored_without_dt_schema_is_known_by_its_columns(make_app, database_url):
    """A table of version 2 or later restored alone (no dt_schema, no view) is read as version 2, not as the first
    release's: the steps after it run, its rows are kept and readable through the view, and deliveries are stored."""
    query(database_url, RESTORED_TABLE)
    with psycopg.connect(database_url) as connection:
        assert schema_version(connection) == 2

    assert deliver(make_app(DATABASE_URL=database_url), "after-restore") == (200, "stored")
    assert query(database_url, "SELECT version FROM dt_schema") == [{"version": VERSION}]
    filled_by = time.monotonic() + 30  # the restored rows' readings are filled in behind the upgrade
    while not query(database_url, "SELECT done FROM dt_readings_fill")[0]["done"]:
        assert time.monotonic() < filled_by, "the restored rows' readings were not filled in within 30 s"
        time.sleep(0.05)
    assert query(database_url, "SELECT event_id, name FROM dt_readings ORDER BY event_id") == [
        {"event_id": "after-restore", "name": "temperature"}, {"event_id": "restored-1", "name": "touch"}]
    assert [row["event_id"] for row in query(database_url, "SELECT event_id FROM dt_events ORDER BY 1")] == [
        "after-restore", "restored-1"]


def last_arrival(database_url: str) -> list[dict]:
    """Return dt_last_arrival's row."""
    return query(database_url, "SELECT received_at FROM dt_last_arrival")


def test_the_last_arrival_row_is_caught_up_from_pushed_rows_at_the_upgrade_and_after_a_rollback(make_app, database_url):
    """Upgrading a version-3 table fills dt_last_arrival from its newest pushed row (not a newer backfilled one), and
    after an older release stored pushed events without noting them, the next start of this release catches up."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
        connection.execute("DROP TABLE dt_last_arrival")
        connection.execute("UPDATE dt_schema SET version = 3, compatible_from = NULL")
        for event_id, source, age in (("pushed", "connector", "3 hours"), ("backfilled", "history", "1 hour")):
            connection.execute("INSERT INTO dt_events (event_id, source, event_time, received_at, event) "
                               "VALUES (%s, %s, now() - %s::interval, now() - %s::interval, '{}')",
                               (event_id, source, age, age))
        migrate(connection)
    [pushed] = query(database_url, "SELECT received_at FROM dt_events WHERE event_id = 'pushed'")
    assert last_arrival(database_url) == [pushed]

    older_release_connects(database_url, 3)  # and stores a pushed event, as version 3 does: the row is not noted
    query(database_url, "INSERT INTO dt_events (event_id, event_time, event) VALUES ('by-older', now(), '{}')")
    assert last_arrival(database_url) == [pushed]
    with psycopg.connect(database_url, autocommit=True) as connection:
        migrate(connection)
    [by_older] = query(database_url, "SELECT received_at FROM dt_events WHERE event_id = 'by-older'")
    assert last_arrival(database_url) == [by_older]


def test_release_5s_view_is_replaced_in_place_and_a_dashboards_grant_stays(make_app, database_url):
    """A schema-5 database with release 5's view and a dashboard's credential granted SELECT on it is brought to this
    release's view (a chart of temperatures no longer joins the second numbers' kinds) and keeps the grant, also
    when the table is lost and prepared again; its readings read the same."""
    role = f"dashboard_{abs(hash(database_url)) % 10**8}"
    query(database_url, f"DROP ROLE IF EXISTS {role}")
    query(database_url, f"CREATE ROLE {role}")
    try:
        with psycopg.connect(database_url, autocommit=True) as connection:
            migrate(connection)
            connection.execute(READINGS_VIEW_5)
            connection.execute(f"GRANT SELECT ON dt_readings TO {role}")
            connection.execute("UPDATE dt_schema SET version = 5, compatible_from = 5")
        app = make_app(DATABASE_URL=database_url)
        assert deliver(app, "under-5") == (200, "stored")
        readings = query(database_url, "SELECT * FROM dt_readings ORDER BY name")
        for again in (False, True):
            with psycopg.connect(database_url, autocommit=True) as connection:
                assert migrate(connection, again) == VERSION
            assert query(database_url, "SELECT version, compatible_from FROM dt_schema") == [
                {"version": VERSION, "compatible_from": COMPATIBLE_FROM}]
            assert "name2" not in query(database_url, "SELECT pg_get_viewdef('dt_readings') AS d")[0]["d"]
            assert query(database_url, "SELECT has_table_privilege(%s, 'dt_readings', 'SELECT') AS p", role) == [
                {"p": True}]
            assert query(database_url, "SELECT * FROM dt_readings ORDER BY name") == readings and readings
    finally:
        query(database_url, f"DROP OWNED BY {role}")
        query(database_url, f"DROP ROLE {role}")
