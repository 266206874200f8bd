"""Measure the receiver against the bare-Flask ceiling, in one run, and write the table to the README.

Run by hand, never in CI: `python tests/benchmark.py` (needs wrk, PostgreSQL's server programs and
taskset; about three minutes). Servers run pinned to core 0 and wrk to core 1, so they do not compete.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import ROOT, SECRET, Server, procfile_command  # noqa: E402
from postgres import PostgresServer, server_programs  # noqa: E402
from receiver.sample import encode_body, sample_event, sign_body  # noqa: E402

os.environ.setdefault("DT_SIGNATURE_SECRET", SECRET)  # app.py builds its app from the environment on import
from app import MAX_BODY_BYTES  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
DATABASE_CORE = LOAD_CORE  # on Heroku the database is another machine: keep it off the server's core
CEILING_COMMAND = "gunicorn --pythonpath tests ceiling:app"
README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
SIZES = {"1 KB": 1024, "64 KB": 64 * 1024, "256 KiB (the limit)": MAX_BODY_BYTES}


def body_of_size(size: int, number: int) -> bytes:
    """Return a realistic event padded, in a label, to exactly `size` bytes."""
    event = sample_event("temperature", event_id=f"bench-{number:08d}")
    event["labels"]["padding"] = ""
    padding = size - len(encode_body(event))
    event["labels"]["padding"] = "x" * padding
    return encode_body(event)


def write_deliveries(path: Path, size: int, count: int) -> None:
    """Write `count` distinct signed deliveries of one size, a line each, for wrk to replay."""
    with open(path, "w") as out:
        for number in range(count):
            body = body_of_size(size, number)
            out.write(f"{sign_body(body, SECRET)}\t{body.decode()}\n")


def run_wrk(url: str, deliveries: Path, seconds: int, connections: int) -> dict:
    """Drive a server with wrk from the load core; return its figures."""
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(ROOT / "tests" / "benchmark.lua"), url, "--", str(deliveries)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def worker_rss_mb(server: Server) -> float:
    """Return the largest resident set of the server's worker processes, in MB."""
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    sizes = []
    for pid in children:
        status = Path(f"/proc/{pid}/status").read_text()
        sizes.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))))
    return max(sizes) / 1024


def measure(label: str, command: str, deliveries: Path, settings: dict, args, folder: Path) -> dict:
    """Start one server, warm it, load it, and return its figures."""
    server = Server(folder / f"{label}.log", command=f"taskset -c {SERVER_CORE} {command}", DT_SIGNATURE_SECRET=SECRET,
                    WEB_CONCURRENCY=str(args.workers), WEB_THREADS=str(args.threads), **settings)
    server.start(wait=False)
    boot_seconds = server.wait_until_up()
    try:
        run_wrk(server.url, deliveries, args.warmup, args.connections)
        figures = run_wrk(server.url, deliveries, args.seconds, args.connections)
        figures.update(rss_mb=worker_rss_mb(server), boot_s=boot_seconds, label=label)
    finally:
        server.stop()
    figures["events_per_s"] = figures["requests"] / figures["seconds"]
    return figures


def pin_postgres(postgres: PostgresServer) -> None:
    """Pin the database server, and the backends it will fork, away from the servers' core."""
    pid = (postgres.data / "postmaster.pid").read_text().split()[0]
    subprocess.run(["taskset", "-a", "-p", "-c", DATABASE_CORE, pid], check=True, capture_output=True)


def table(results: list[dict]) -> str:
    """Return the results as a Markdown table with ratios to the ceiling of the same body size."""
    rows = ["| case | events/s | p50 ms | p99 ms | errors | RSS/worker MB | events/s vs ceiling | p99 vs ceiling |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ceilings = {}
    for result in results:
        size = result["label"].split(": ")[0]
        if result["label"].endswith("ceiling"):
            ceilings[size] = result
        ceiling = ceilings[size]
        rows.append(f"| {result['label']} | {result['events_per_s']:.0f} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} "
                    f"| {result['errors'] + result['non_2xx']} | {result['rss_mb']:.1f} "
                    f"| {result['events_per_s'] / ceiling['events_per_s']:.2f} | {result['p99_ms'] / ceiling['p99_ms']:.2f} |")
    return "\n".join(rows)


def write_readme(text: str) -> None:
    """Replace the README's performance table with this run's."""
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.index(README_START) + len(README_START), content.index(README_END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main() -> None:
    """Run every case and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measured run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--size", action="append", choices=SIZES, help="only these body sizes (repeatable)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the Postgres case")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dt-receiver-bench-"))
    postgres = PostgresServer(server_programs())
    postgres.start()
    pin_postgres(postgres)
    results = []
    try:
        for size_label, size in SIZES.items():
            if args.size and size_label not in args.size:
                continue
            count = max(30, min(80_000, 60_000_000 // size))  # distinct events: enough that 1 KB never repeats
            deliveries = folder / f"{size}.txt"
            write_deliveries(deliveries, size, count)
            results.append(measure(f"{size_label}: ceiling", CEILING_COMMAND, deliveries, {}, args, folder))
            results.append(measure(f"{size_label}: receiver, log only", procfile_command(), deliveries, {}, args, folder))
            if size_label == "1 KB" and not args.no_postgres:
                database = f"bench_{int(time.time())}"
                with psycopg.connect(postgres.url(), autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE {database}")
                results.append(measure(f"{size_label}: receiver, Postgres", procfile_command(), deliveries,
                                       {"DATABASE_URL": postgres.url(database)}, args, folder))
                with psycopg.connect(postgres.url(database)) as connection:
                    stored = connection.execute("SELECT count(*) FROM dt_events").fetchone()[0]
                results[-1]["rows"] = stored
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        postgres.remove()

    command = (f"python tests/benchmark.py --seconds {args.seconds} --connections {args.connections} "
               f"--workers {args.workers} --threads {args.threads}")
    by_label = {result["label"]: result for result in results}
    notes = [f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores: each server pinned to "
             f"core {SERVER_CORE}, wrk and PostgreSQL to core {LOAD_CORE}, {args.connections} keep-alive connections, "
             f"{args.workers} workers x {args.threads} threads, {args.seconds} s per case after {args.warmup} s of warm-up.",
             f"Boot to first 200: {max(result['boot_s'] for result in results):.2f} s at most."]
    if "1 KB: receiver, Postgres" in by_label:
        postgres, log_only = by_label["1 KB: receiver, Postgres"], by_label["1 KB: receiver, log only"]
        notes.append(f"Postgres sink / log-only: {postgres['events_per_s'] / log_only['events_per_s']:.2f} of the events/s, "
                     f"with {postgres['rows']} distinct events committed durably (synchronous_commit on).")
    report = table(results) + "\n\n" + " ".join(notes)
    print(report)
    if not args.no_readme:
        write_readme(report)


if __name__ == "__main__":
    main()
