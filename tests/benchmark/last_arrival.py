"""What finding the last pushed arrival costs with many newer backfilled rows, and what each way of keeping it fast
costs per event: an index of pushed rows, or the one-row table dt_last_arrival the receiver keeps (docs/database.md).

Run by hand: `python tests/benchmark/last_arrival.py` (after the test install; about a minute, and about 2 GB of
disk in a temporary folder). It starts a PostgreSQL of its own, as the tests do, and measures:
1. bytes on disk per event of a partial index of pushed rows (`dt_events_connector_time`), over pushed events
   of a typical body, beside the rest of the table; and dt_last_arrival's after an update per event;
2. the write-ahead log and the time per single-event insert (a delivery alone): the bare insert, with the
   index, and the receiver's own (which notes dt_last_arrival at most once a second): medians of rounds,
   as ratios to the bare insert;
3. the last arrival's time with 2 million backfilled rows newer than the last pushed one: dt_last_arrival's row
   (LAST_ARRIVAL), and the newest pushed row by the partial index and by dt_events_time (as before version 4).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
from support.postgres import PostgresServer, programs_missing, server_programs  # noqa: E402

from receiver.sample import encode_body, sample_event  # noqa: E402
from receiver.schema import migrate  # noqa: E402
from receiver.store import INSERT_ONE, LAST_ARRIVAL, WRITE_ONE  # noqa: E402

# A pushed event's body with its id and time left to format(): 521 bytes once filled, as in docs/database.md.
PUSHED = encode_body(sample_event("temperature", event_id="ID", device_id="emuc2f3h2lbr9a5ks2vncg0")).decode()
PUSHED = PUSHED.replace('"ID"', '"%1$s"').replace("Fridge <kitchen> & \\\"store\\\" – Ålesund", "Fridge")
SEED = """
INSERT INTO dt_events (event_id, device_id, event_type, event_time, source, event)
SELECT %(prefix)s || n, 'emu' || lpad((n %% 1000)::text, 20, '0'), 'temperature',
       now() - %(back)s::interval - (%(rows)s - n) * %(step)s::interval,
       %(source)s, format(%(body)s, %(prefix)s || n)
FROM generate_series(1, %(rows)s) AS n
"""
# The newest pushed row's arrival, as LAST_ARRIVAL read it before version 4: by an index on event_time.
NEWEST_PUSHED = """
SELECT now() - received_at AS age FROM dt_events
WHERE source = 'connector' AND event_time <= now() + interval '5 minutes'
ORDER BY event_time DESC LIMIT 1
"""
CONNECTOR_INDEX = "CREATE INDEX dt_events_connector_time ON dt_events (event_time) WHERE source = 'connector'"


def seed(connection, prefix: str, rows: int, source: str, back: str, step: str) -> None:
    """Insert rows of a typical body, oldest first as they arrive, one `step` apart, the newest `back` before now."""
    connection.execute(SEED, {"prefix": prefix, "rows": rows, "source": source, "back": back, "step": step,
                              "body": PUSHED})


def bytes_per_event(connection, pushed: int) -> None:
    """Print each part's bytes on disk per pushed event, and dt_last_arrival's after an update per event."""
    connection.execute(CONNECTOR_INDEX)
    seed(connection, "pushed-", pushed, "connector", "1 day", "1 second")
    connection.execute("VACUUM ANALYZE dt_events")
    body = connection.execute("SELECT round(avg(octet_length(event))) FROM dt_events").fetchone()[0]
    print(f"bytes on disk per event, {pushed:,} pushed events of a {body}-byte body:")
    sizes = dict(connection.execute(
        "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
        "WHERE indrelid = 'dt_events'::regclass UNION ALL SELECT 'all of dt_events', "
        "pg_total_relation_size('dt_events')").fetchall())
    sizes["all of dt_events but the partial index"] = sizes["all of dt_events"] - sizes["dt_events_connector_time"]
    for name, size in sorted(sizes.items()):
        print(f"  {name:<40} {size / pushed:7.1f}")
    for _ in range(pushed):  # the worst case: an update per event; HOT pruning keeps it a page or two
        connection.execute("UPDATE dt_last_arrival SET received_at = now()")
    size = connection.execute("SELECT pg_total_relation_size('dt_last_arrival')").fetchone()[0]
    print(f"  {'dt_last_arrival':<40} {size / pushed:7.1f}  ({size:,} bytes after {pushed:,} updates)")


def write_costs(connection, events: int, rounds: int) -> None:
    """Print the WAL bytes and the microseconds per single-event insert, each way, as medians of rounds."""
    ways = {"bare insert": (INSERT_ONE, False), "partial index": (INSERT_ONE, True),
            "dt_last_arrival": (WRITE_ONE, False)}
    results = {way: ([], []) for way in ways}
    body = PUSHED.replace("%1$s", "w")
    for round_number in range(rounds):
        for way, (statement, indexed) in ways.items():
            connection.execute("DROP INDEX IF EXISTS dt_events_connector_time")
            if indexed:
                connection.execute(CONNECTOR_INDEX)
            wal_before = connection.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            started = time.perf_counter()
            for n in range(events):
                connection.execute(statement, (f"w{round_number}-{way}-{n}", "emuw", "temperature", None, body))
            seconds = time.perf_counter() - started
            wal = connection.execute("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (wal_before,)).fetchone()[0]
            results[way][0].append(float(wal) / events)
            results[way][1].append(seconds / events * 1e6)
    connection.execute("DELETE FROM dt_events WHERE event_id LIKE 'w%'")  # newer than the backfill to come
    base = statistics.median(results["bare insert"][1])
    print(f"per single-event insert, medians of {rounds} rounds of {events:,}:")
    for way, (wal, micros) in results.items():
        print(f"  {way:<16} WAL {statistics.median(wal):6.0f} bytes, {statistics.median(micros):6.0f} us "
              f"({statistics.median(micros) / base:.2f} of the bare insert)")


def read_costs(connection, history: int, tries: int) -> None:
    """Print the last arrival's median time, each way, with that many backfilled rows newer than the last pushed one."""
    print(f"adding {history:,} backfilled rows newer than the last pushed one ...", flush=True)
    seed(connection, "history-", history, "history", "0 s", "20 milliseconds")
    connection.execute("VACUUM ANALYZE dt_events")

    def median_ms(statement: str, count: int) -> float:
        timings = []
        for _ in range(count):
            started = time.perf_counter()
            connection.execute(statement).fetchall()
            timings.append((time.perf_counter() - started) * 1000)
        return statistics.median(timings)

    print(f"the last arrival with {history:,} newer backfilled rows (median of {tries}):")
    print(f"  dt_last_arrival's row (LAST_ARRIVAL)        {median_ms(LAST_ARRIVAL, tries):9.2f} ms")
    print(f"  newest pushed row by the partial index      {median_ms(NEWEST_PUSHED, tries):9.2f} ms")
    with connection.transaction(force_rollback=True):
        connection.execute("DROP INDEX dt_events_connector_time")
        print(f"  newest pushed row by dt_events_time (3)     {median_ms(NEWEST_PUSHED, max(3, tries // 10)):9.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushed", type=int, default=100_000, help="pushed events for the bytes (default 100,000)")
    parser.add_argument("--history", type=int, default=2_000_000, help="newer backfilled rows (default 2,000,000)")
    parser.add_argument("--inserts", type=int, default=3000, help="single inserts per way per round (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of inserts (default 5)")
    arguments = parser.parse_args()
    programs = server_programs()
    if programs is None:
        sys.exit(programs_missing())
    server = PostgresServer(programs, fsync=False)
    server.start()
    try:
        with psycopg.connect(server.url(), autocommit=True) as connection:
            connection.execute("CREATE DATABASE last_arrival")
        with psycopg.connect(server.url("last_arrival"), autocommit=True) as connection:
            migrate(connection)
            print(connection.execute("SELECT version()").fetchone()[0].split(" on ")[0], flush=True)
            bytes_per_event(connection, arguments.pushed)
            write_costs(connection, arguments.inserts, arguments.rounds)
            connection.execute(CONNECTOR_INDEX)
            read_costs(connection, arguments.history, 50)
    finally:
        server.remove()


if __name__ == "__main__":
    main()
