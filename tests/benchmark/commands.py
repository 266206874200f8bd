"""Time the commands (`status`, `events`, `export`, `prune`) on a table of millions of events (docs/database.md).

Run by hand, never in CI: `python tests/benchmark/commands.py` (10 million events: about ten minutes on two
cores, and 9 GB of disk in a temporary folder; `--events 200000` runs in 15 s). It starts a throwaway PostgreSQL
of its own (the tests' tests/support/postgres.py, default settings but fsync off), creates the table as a
worker does (receiver.schema), and loads a project of `--sensors` sensors, each sending a reading and a
networkStatus heartbeat every 15 minutes, up to now, as DT's compact JSON bodies of about 520 bytes,
then vacuums and analyzes the table as autovacuum would have. Each command then runs as a person runs it,
`flask --app app ...` in a subprocess with DATABASE_URL set, output to /dev/null, and is timed from start
to exit (Python and Flask's own start included: the first row measures it alone). Each read-only command
runs `--rounds` times and the table gives the median; the prune of the oldest month runs once, last,
since it deletes what it times. The table is printed as markdown.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
from support.postgres import PostgresServer, programs_missing, server_programs  # noqa: E402
from support.server import ROOT  # noqa: E402

from receiver.schema import migrate  # noqa: E402

SLOT = timedelta(minutes=15)  # each sensor's reading and heartbeat interval
LOAD_CHUNK = 500_000  # rows per INSERT ... SELECT, each its own transaction
PROJECT = "c0md3mm0c7bet3vico8g"

# Event n is sensor n % sensors's reading (even n / sensors) or heartbeat (odd), in slot n / (2 * sensors)
# back from the newest; bodies as DT sends them (compact JSON, its key order), labels and metadata included.
# Six sensors in ten measure temperature, two humidity, one CO2 and one is a door (contact).
LOAD = """
INSERT INTO dt_events (event_id, device_id, event_type, source, event_time, received_at, event)
SELECT id, device, kind, 'connector', at, at + interval '1.2 s',
       '{"event":{"eventId":"' || id || '","targetName":"projects/' || %(project)s || '/devices/' || device
       || '","eventType":"' || kind || '","data":{"' || kind || '":' || data || '},"timestamp":"' || stamp
       || '"},"labels":{"name":"Sensor ' || sensor || '"},'
       || '"metadata":{"deviceId":"' || device || '","projectId":"' || %(project)s || '","deviceType":"' || model
       || '","productNumber":"' || product || '"}}'
FROM generate_series(%(low)s::bigint, %(high)s::bigint) AS n
CROSS JOIN LATERAL (SELECT n %% %(sensors)s AS sensor, (n / %(sensors)s) %% 2 = 1 AS heartbeat,
                           %(newest)s::timestamptz - (n / (2 * %(sensors)s)) * interval '15 minutes'
                               - (n %% %(sensors)s) * interval '0.9 s' AS at,
                           substr(md5(n::text), 1, 20) AS id) AS slot
CROSS JOIN LATERAL (SELECT 'emu' || substr(md5('device' || sensor), 1, 20) AS device,
                           to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS stamp,
                           (ARRAY['temperature', 'temperature', 'temperature', 'temperature', 'temperature',
                                  'temperature', 'humidity', 'humidity', 'co2', 'contact'])[sensor %% 10 + 1] AS model
                   ) AS sensor
CROSS JOIN LATERAL (SELECT CASE WHEN heartbeat THEN 'networkStatus' ELSE model END AS kind,
                           CASE model WHEN 'co2' THEN '102068' WHEN 'contact' THEN '102058' ELSE '102081' END AS product
                   ) AS typed
CROSS JOIN LATERAL (SELECT CASE kind
    WHEN 'networkStatus' THEN '{"signalStrength":' || 40 + n %% 50 || ',"rssi":' || -50 - n %% 40 || ',"updateTime":"'
        || stamp || '","cloudConnectors":[{"id":"bdkjbo2v0000uk377c4g","signalStrength":' || 40 + n %% 50
        || ',"rssi":' || -50 - n %% 40 || '}],"transmissionMode":"LOW_POWER_STANDARD_MODE"}'
    WHEN 'temperature' THEN '{"value":' || 20 + n %% 7 || '.25,"updateTime":"' || stamp || '","samples":[{"value":'
        || 20 + n %% 7 || '.25,"sampleTime":"' || stamp || '"}],"isBackfilled":false}'
    WHEN 'humidity' THEN '{"temperature":' || 20 + n %% 7 || '.5,"relativeHumidity":' || 30 + n %% 40
        || ',"updateTime":"' || stamp || '","samples":[{"temperature":' || 20 + n %% 7 || '.5,"relativeHumidity":'
        || 30 + n %% 40 || ',"sampleTime":"' || stamp || '"}],"isBackfilled":false}'
    WHEN 'co2' THEN '{"ppm":' || 400 + n %% 600 || ',"updateTime":"' || stamp || '"}'
    ELSE '{"state":"' || CASE WHEN n %% 3 = 0 THEN 'OPEN' ELSE 'CLOSED' END || '","updateTime":"' || stamp || '"}'
    END AS data) AS shaped
"""


def read_arguments() -> argparse.Namespace:
    """Return the command line's choices."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events to load (default 10 million)")
    parser.add_argument("--sensors", type=int, default=1000, help="sensors sending them (default 1,000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each read-only command (the median counts)")
    return parser.parse_args()


def load(url: str, events: int, sensors: int) -> dict:
    """Create the table, load the events up to now in chunks, vacuum and analyze; return what it holds."""
    newest = datetime.now(UTC)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as connection:
        migrate(connection)
        for high in range(events - 1, -1, -LOAD_CHUNK):  # oldest first, as they arrived
            low = max(high - LOAD_CHUNK + 1, 0)
            connection.execute(LOAD, {"low": low, "high": high, "sensors": sensors, "newest": newest,
                                      "project": PROJECT})
            print(f"loaded {events - low:,} of {events:,} events, {time.monotonic() - started:.0f} s", file=sys.stderr)
        connection.execute("VACUUM (ANALYZE) dt_events")
        oldest, body_bytes, table_bytes = connection.execute(
            "SELECT min(event_time), avg(octet_length(event)), pg_total_relation_size('dt_events') FROM dt_events"
        ).fetchone()
    return {"oldest": oldest, "newest": newest, "body_bytes": float(body_bytes), "table_bytes": table_bytes,
            "load_seconds": time.monotonic() - started}


def timed(url: str, *arguments: str) -> tuple[float, str]:
    """Run `flask --app app ARGUMENTS` as a person would; return its seconds and its last line on stderr or stdout."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DT_", "DATABASE_", "HEALTH_"))},
           "DATABASE_URL": url}
    with tempfile.TemporaryFile("w+") as said:
        started = time.monotonic()
        done = subprocess.run(["flask", "--app", "app", *arguments], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
                              if arguments[0] in ("export", "events") else said, stderr=said, check=False)
        seconds = time.monotonic() - started
        said.seek(0)
        lines = [line for line in said.read().splitlines() if line.strip()]
    if done.returncode != 0:
        raise SystemExit(f"flask --app app {' '.join(arguments)} failed ({done.returncode}): {lines[-1:]}")
    return seconds, lines[-1].split("\r")[-1] if lines and "--help" not in arguments else ""


def measure(url: str, facts: dict, rounds: int) -> list[tuple[str, list[float], str]]:
    """Time each command; return (command, seconds of each run, its last line) in the table's order."""
    month_ago = facts["oldest"] + timedelta(days=30)
    cutoff = month_ago.astimezone(UTC).isoformat().replace("+00:00", "Z")
    commands = [("status", "--help"), ("status",), ("events", "--since", "1d"), ("export", "--since", "1d"),
                ("export", "--since", "1d", "--format", "jsonl"), ("prune", "--older-than", cutoff, "--dry-run")]
    results = {command: ([], "") for command in commands}
    for round_number in range(rounds):
        for command in commands:
            seconds, line = timed(url, *command)
            results[command][0].append(seconds)
            results[command] = (results[command][0], line)
            print(f"round {round_number + 1}: {' '.join(command)}: {seconds:.1f} s", file=sys.stderr)
    seconds, line = timed(url, "prune", "--older-than", cutoff)
    print(f"prune: {seconds:.1f} s", file=sys.stderr)
    return [(" ".join(command), runs, line) for command, (runs, line) in results.items()] + [
        (f"prune --older-than {cutoff}", [seconds], line)]


def report(arguments: argparse.Namespace, facts: dict, measured: list) -> None:
    """Print the table, and what was measured on, as markdown."""
    days = (facts["newest"] - facts["oldest"]).total_seconds() / 86400
    print(f"\n{arguments.events:,} events of {arguments.sensors:,} sensors over {days:.0f} days "
          f"(bodies {facts['body_bytes']:.0f} bytes on average; table and indexes {facts['table_bytes'] / 1e9:.2f} GB; "
          f"loaded, vacuumed and analyzed in {facts['load_seconds'] / 60:.0f} min); "
          f"`python tests/benchmark/commands.py --events {arguments.events} --sensors {arguments.sensors} "
          f"--rounds {arguments.rounds}`:\n")
    print("| `flask --app app ...` | median | runs | its last line |")
    print("|---|---:|---|---|")
    for command, runs, line in measured:
        shown = ", ".join(f"{one:.1f}" for one in runs)
        print(f"| `{command}` | {statistics.median(runs):.1f} s | {shown} | {line.replace('|', '/')} |")


def main() -> None:
    """Load the table in a throwaway PostgreSQL, time the commands on it, print the table."""
    arguments = read_arguments()
    programs = server_programs()
    if programs is None:
        raise SystemExit(programs_missing())
    server = PostgresServer(programs, fsync=False)
    try:
        server.start()
        with psycopg.connect(server.url(), autocommit=True) as connection:
            connection.execute("CREATE DATABASE commands_benchmark")
        url = server.url("commands_benchmark")
        facts = load(url, arguments.events, arguments.sensors)
        report(arguments, facts, measure(url, facts, arguments.rounds))
    finally:
        server.remove()


if __name__ == "__main__":
    main()
