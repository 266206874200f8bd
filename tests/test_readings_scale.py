"""dt_readings and `export` on 100,000 events: the documented queries' plans, and export's memory and time."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from support.docs import chart_queries, documented_queries, index_roots, plan_nodes
from support.server import ROOT

from receiver.schema import LAST_ARRIVAL_TABLE, migrate
from receiver.store import LAST_ARRIVAL

EVENTS = 100_000
# Half heartbeats (two readings each), a quarter temperatures (three samples each), an eighth touches and an
# eighth door contacts: 200,000 readings, over 30 days of 100 devices.
READINGS = 200_000
README_DEVICE = "emuc2f3h2lbr9a5ks2vncg0"  # a temperature sensor here, as in docs/database.md
# Export's peak memory may grow by at most this much between a tenth of the window and all of it.
MOST_MEMORY_GROWTH_MB = 10

STAMP = """to_char((%s) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
SEED = f"""
INSERT INTO dt_events (event_id, device_id, event_type, event_time, event)
SELECT 'scale-' || n, device, kind, at, jsonb_build_object(
    'event', jsonb_build_object('eventId', 'scale-' || n, 'targetName', 'projects/c0md3mm0c7bet3vico8g/devices/' || device,
                                'eventType', kind, 'data', jsonb_build_object(kind, data), 'timestamp', stamp),
    'labels', jsonb_build_object('name', 'Sensor ' || n %% 100),
    'metadata', jsonb_build_object('deviceId', device, 'projectId', 'c0md3mm0c7bet3vico8g', 'deviceType', kind))::text
FROM generate_series(1, %(events)s) AS n
CROSS JOIN LATERAL (SELECT CASE WHEN n %% 100 = 1 THEN '{README_DEVICE}'
                                ELSE 'emuscale' || lpad((n %% 100)::text, 3, '0') END AS device,
                           CASE WHEN n / 100 %% 2 = 0 THEN 'networkStatus'
                                ELSE (ARRAY['touch', 'temperature', 'contact', 'temperature'])[n %% 4 + 1] END AS kind,
                           now() - n * interval '26 seconds' AS at) AS chosen
CROSS JOIN LATERAL (SELECT {STAMP % "at"} AS stamp) AS stamped
CROSS JOIN LATERAL (SELECT CASE kind
    WHEN 'networkStatus' THEN jsonb_build_object('signalStrength', 40 + n %% 50, 'rssi', -50 - n %% 40,
                                                 'updateTime', stamp, 'transmissionMode', 'LOW_POWER_STANDARD_MODE')
    WHEN 'temperature' THEN jsonb_build_object('value', 21.5, 'updateTime', stamp, 'isBackfilled', false, 'samples',
        jsonb_build_array(jsonb_build_object('value', 21.5, 'sampleTime', stamp),
                          jsonb_build_object('value', 21.25, 'sampleTime', {STAMP % "at - interval '5 minutes'"}),
                          jsonb_build_object('value', 21.0, 'sampleTime', {STAMP % "at - interval '10 minutes'"})))
    WHEN 'contact' THEN jsonb_build_object('state', CASE WHEN n %% 3 = 0 THEN 'OPEN' ELSE 'CLOSED' END, 'updateTime', stamp)
    ELSE jsonb_build_object('updateTime', stamp) END AS data) AS shaped
"""

SEED_READINGS = """
INSERT INTO dt_devices (device_id) SELECT DISTINCT device_id FROM dt_events ON CONFLICT (device_id) DO NOTHING;
INSERT INTO dt_samples (time, value, value2, device, kind, state, event_id)
SELECT r.sample_time, r.sample_value, r.sample_value2, d.device, r.sample_kind, r.sample_state, e.event_id
FROM dt_events AS e JOIN dt_devices AS d USING (device_id)
CROSS JOIN LATERAL dt_sample_rows(e.event, e.event_type, e.event_time) AS r
ORDER BY r.sample_time;
"""


@pytest.fixture(scope="module")
def scale_table(postgres) -> str:
    """Return the URL of a database holding 100,000 events that give 200,000 readings, analyzed."""
    with psycopg.connect(postgres.url(), autocommit=True) as connection:
        connection.execute("CREATE DATABASE t_readings_scale")
    url = postgres.url("t_readings_scale")
    with psycopg.connect(url, autocommit=True) as connection:
        migrate(connection)
        connection.execute(SEED, {"events": EVENTS})
        connection.execute(SEED_READINGS)  # as ingest (and an upgrade's fill) writes them
        connection.execute("VACUUM ANALYZE dt_events, dt_samples, dt_devices")
    return url


def plan_outline(plan: dict, depth: int = 0) -> str:
    """Return an EXPLAIN ANALYZE plan as indented lines of node, index, relation or function, and rows."""
    line = "  " * depth + plan["Node Type"]
    if "Index Name" in plan:
        line += f" using {plan['Index Name']}"
    if "Relation Name" in plan or "Function Name" in plan:
        line += f" on {plan.get('Relation Name') or plan['Function Name']}"
    if plan.get("Parent Relationship") == "InitPlan":
        line += f" ({plan['Subplan Name']})"
    line += f": {plan['Actual Rows'] * plan['Actual Loops']} rows"
    return "\n".join([line] + [plan_outline(child, depth + 1) for child in plan.get("Plans", [])])


# Each documented query: its place in the block, the index it must use, and how many rows it finds in the seed:
# a day's samples of the device (three per temperature event); all 25 door sensors; 24 hours, and the ends of two.
DOCUMENTED = {"a device's temperatures over a day": (0, "dt_samples_device_time", range(48, 54)),
              "the latest state of every door": (1, "dt_samples_time", range(25, 26)),
              "touches per hour over a day": (2, "dt_samples_time", range(24, 27))}


@pytest.mark.parametrize("number, index, rows", DOCUMENTED.values(), ids=DOCUMENTED.keys())
def test_documented_readings_query_reads_dt_samples_through_its_index(scale_table, number, index, rows, capsys,
                                                                       request):
    """Each query docs/database.md shows for dt_readings reads dt_samples through an index, never a whole
    partition, reads no stored body (dt_events is not in the plan), and finds what the 100,000 events hold."""
    query = documented_queries(1)[number]
    with psycopg.connect(scale_table) as connection:
        [[[explained]]] = connection.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query).fetchall()
        found = connection.execute(query).fetchall()
        roots = index_roots(connection)
        holding = {name for (name,) in connection.execute(
            "SELECT relid::text FROM pg_partition_tree('dt_samples') JOIN pg_class ON oid = relid WHERE reltuples > 0")}
    plan = explained["Plan"]
    with capsys.disabled():
        print(f"\n{request.node.callspec.id} ({explained['Execution Time']:.0f} ms):\n{plan_outline(plan)}")
    # A partition with rows is read through its index (an empty one, next month's, may be read whole: nothing).
    scans = [node for node in plan_nodes(plan) if node.get("Relation Name") in holding]
    assert scans and all(node["Node Type"] != "Seq Scan" for node in scans), plan_outline(plan)
    assert not [node for node in plan_nodes(plan) if node.get("Relation Name", "").startswith("dt_events")]
    assert index in {roots.get(node.get("Index Name")) for node in plan_nodes(plan)}, plan_outline(plan)
    assert len(found) in rows, found


# Each chart query: its place among them, the index it must use, and how many rows it finds in the seed: the
# hours of a week with the device's temperatures; of 50 temperature sensors, the hours of the day with temperatures
# (about 19 each: the seed gives a device temperatures and heartbeats in turn, 100 events each).
CHARTS = {"one sensor's week": (0, "dt_samples_device_time", range(100, 170)),
          "every sensor's day": (1, "dt_samples_time", range(850, 1051))}


@pytest.mark.parametrize("number, index, rows", CHARTS.values(), ids=CHARTS.keys())
def test_a_chart_of_one_name_walks_the_samples_once(scale_table, number, index, rows, capsys, request):
    """Each chart of temperatures docs/database.md gives walks dt_samples once, through an index: the view's branch
    of second numbers (relativeHumidity, rssi) is not in the plan at all, so the planner weighs no second walk of
    the same samples (which led it to start parallel workers for one sensor's week); it finds what the seed holds."""
    query = chart_queries()[number]
    with psycopg.connect(scale_table) as connection:
        [[[explained]]] = connection.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query).fetchall()
        found = connection.execute(query).fetchall()
        roots = index_roots(connection)
    plan = explained["Plan"]
    with capsys.disabled():
        print(f"\n{request.node.callspec.id} ({explained['Execution Time']:.1f} ms):\n{plan_outline(plan)}")
    scanned = [node["Relation Name"] for node in plan_nodes(plan) if node.get("Relation Name", "").startswith(
        "dt_samples")]
    assert scanned and len(scanned) == len(set(scanned)), plan_outline(plan)
    assert "value2" not in json.dumps(plan), plan_outline(plan)
    assert index in {roots.get(node.get("Index Name")) for node in plan_nodes(plan)}, plan_outline(plan)
    assert len(found) in rows, found


# `python -m flask`, which writes its own peak memory (VmHWM, kB) to PEAK_FILE as it exits. The kernel's
# ru_maxrss would not do: a child's counts the memory of the (large) test process it was forked from.
FLASK_WITH_PEAK = ("import atexit, os, runpy, sys; atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w').write("
                   "open('/proc/self/status').read().split('VmHWM:')[1].split()[0])); sys.argv[0] = 'flask'; "
                   "runpy.run_module('flask', run_name='__main__', alter_sys=True)")


def measured(arguments: list[str], out: Path, database_url: str) -> tuple[float, float, str]:
    """Run `flask --app app` with these arguments, stdout to a file, as `heroku run ... > file` does; return its
    peak memory (RSS) in MB, its seconds and what it wrote on stderr."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DT_", "DATABASE_"))},
           "DATABASE_URL": database_url, "PEAK_FILE": str(out.with_suffix(".peak"))}
    started = time.monotonic()
    with open(out, "wb") as stdout:
        completed = subprocess.run([sys.executable, "-c", FLASK_WITH_PEAK, "--app", "app", *arguments], cwd=ROOT,
                                   env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=120)
    seconds = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr
    return int(out.with_suffix(".peak").read_text()) / 1024, seconds, completed.stderr.decode()


@pytest.mark.slow
@pytest.mark.parametrize("output_format, lines", [("csv", READINGS + 1), ("jsonl", EVENTS)])
def test_export_memory_stays_flat_over_200000_readings(scale_table, tmp_path, output_format, lines, capsys):
    """Exporting all 200,000 readings (or 100,000 bodies) takes no more memory than exporting a tenth of them:
    rows stream from a server-side cursor to stdout."""
    small = measured(["export", "--format", output_format, "--since", "3d"], tmp_path / "small", scale_table)
    whole = measured(["export", "--format", output_format, "--since", "31d"], tmp_path / "whole", scale_table)
    written = (tmp_path / "whole").stat().st_size / 1e6
    with capsys.disabled():
        print(f"\nexport --format {output_format}: a tenth of the window {small[0]:.1f} MB peak RSS, {small[1]:.1f} s; "
              f"all of it {whole[0]:.1f} MB, {whole[1]:.1f} s, {written:.1f} MB written; {whole[2].splitlines()[-1]}")
    assert (tmp_path / "whole").read_bytes().count(b"\n") == lines
    assert whole[0] - small[0] < MOST_MEMORY_GROWTH_MB, (small, whole)


# Backfilled rows newer than the newest pushed one (an outage healed by `backfill`): 20,000 over the last 20 s.
NEWER_HISTORY = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, source, event)
SELECT 'history-' || n, 'emuhistory', 'touch', now() - n * interval '1 millisecond', 'history', '{"event": {}}'
FROM generate_series(1, 20000) AS n
"""


def test_last_arrival_reads_one_row_whatever_the_backfilled_rows(scale_table):
    """The age /health and `status` report is read from dt_last_arrival's one row, with no scan of dt_events, however
    many backfilled rows are newer than the last pushed one; the upgrade fills that row from the newest pushed row."""
    with psycopg.connect(scale_table) as connection:  # the history rows are rolled back as the block ends
        connection.execute(NEWER_HISTORY)
        connection.execute(LAST_ARRIVAL_TABLE)  # as the upgrade to version 4 does
        connection.execute("ANALYZE dt_events")
        [[[explained]]] = connection.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + LAST_ARRIVAL).fetchall()
        [(newer,)] = connection.execute("SELECT count(*) FROM dt_events WHERE event_time > (SELECT max(event_time) "
                                        "FROM dt_events WHERE source = 'connector')").fetchall()
        [(noted, pushed)] = connection.execute(
            "SELECT (SELECT received_at FROM dt_last_arrival), (SELECT received_at FROM dt_events WHERE event_id = "
            "'scale-1')").fetchall()
        connection.rollback()
    relations = {node.get("Relation Name") for node in plan_nodes(explained["Plan"])} - {None}
    assert relations == {"dt_last_arrival"}, plan_outline(explained["Plan"])
    pages = explained["Plan"]["Shared Hit Blocks"] + explained["Plan"]["Shared Read Blocks"]
    assert explained["Plan"]["Actual Rows"] == 1 and pages < 5, pages
    assert newer == 20_000 and noted == pushed  # scale-1 is the newest pushed event
