"""Measure the receiver against the bare-Flask ceiling in interleaved rounds; write the table to docs/performance.md.

Run by hand, never in CI: `python tests/benchmark/benchmark.py` (needs wrk and taskset, and PostgreSQL's
server programs unless `--no-postgres`; about eight minutes, ten with `--compare`). Servers run pinned to
core 0 and wrk to core 1, so they do not compete.

Two runs of the same case can differ by a quarter, so no case is measured in one long run: each of
`--rounds` rounds runs every case once for `--seconds`, and the table gives each case's medians, with
ratios computed from those medians. A slow spell of the machine then hits every case alike, and the
order of the cases turns by one each round, so no case always follows the same neighbour. Each case's
server is started afresh in every round (boot, warm-up, measured run, stop) rather than kept up: only
one server is ever on the server core beside wrk, with no idle arbiters or heartbeats of the others, and
each round samples a new process (memory layout, hash seed), so the median covers that variation too.
Each run replays the signed deliveries from where the same case's last run stopped, and the Postgres case's
table is emptied before each of its runs, so no run sends an event its table holds (the Postgres sink skips
a repeated event id, which would flatter it).

Every server runs one worker on its one core (`--workers`): two would measure the kernel's scheduler
instead. A gevent worker owns its connections, so while the kernel runs one worker the other's wait
out its time slice: the bare ceiling alone answered with a p99 of 87-126 ms with two workers on one
core and 6-8 ms with one; given a core each, workers would not wait on each other. Every server also
gets what Heroku's Python buildpack sets for every app: GUNICORN_CMD_ARGS=--access-logfile - and
FORWARDED_ALLOW_IPS=*, and writes its output to a pipe that a reader on the load core drains.

`--compare DIR` adds any app directory as a case at every size: its Procfile's `web` command, run with
cwd=DIR from its own virtual environment (made once per requirements.txt and Python, under ~/.cache), pinned like
the others, given the same WEB_CONCURRENCY, the same signed deliveries and the same secret in
DT_SIGNATURE_SECRET (the variable DT's published example reads). That example answers no GET /, so
for that case any HTTP answer (a 405 too) means it is up. Every server binds 127.0.0.1 only.

`--baseline DIR` adds another checkout of this receiver (the commit before a change, say) as a Postgres case
at every size, run from this environment with a database of its own, so that a change to the stored path is
measured against what it changes in the same interleaved rounds: the table gives both against log only.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
from support.postgres import PostgresServer, server_programs  # noqa: E402
from support.server import ROOT, Server  # noqa: E402
from support.signing import SECRET  # noqa: E402

from receiver.sample import encode_body, sample_event, sign_body  # noqa: E402
from receiver.webhook import MAX_BODY_BYTES  # noqa: E402

SERVER_CORE, LOAD_CORE = "0", "1"
DATABASE_CORE = LOAD_CORE  # on Heroku the database is another machine: keep it off the server's core
CEILING_COMMAND = "gunicorn --pythonpath tests/benchmark ceiling:app"
LOG_ONLY, STORED = "receiver, log only", "receiver, Postgres"
TABLE_FILE = ROOT / "docs" / "performance.md"
TABLE_START, TABLE_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
SIZES = {"1 KB": 1024, "64 KB": 64 * 1024, "256 KiB (the limit)": MAX_BODY_BYTES}
VENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dt-receiver-bench"


@dataclass
class Case:
    """One server to measure at one body size, and the figures of its runs."""

    size: str
    name: str
    command: str
    deliveries: Path
    count: int
    folder: Path = ROOT
    settings: dict = field(default_factory=dict)
    any_answer: bool = False  # up on any HTTP answer to GET /, for apps that have no GET /
    position: int = 0  # the next delivery to replay
    runs: list = field(default_factory=list)

    @property
    def label(self) -> str:
        """Return the case's name in the table."""
        return f"{self.size}: {self.name}"


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


def web_command(folder: Path) -> str:
    """Return the `web` command of a folder's Procfile."""
    for line in (folder / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return command.strip()
    raise LookupError(f"{folder / 'Procfile'} has no web process")


def app_environment(folder: Path) -> Path:
    """Return a virtual environment with the folder's requirements installed, made once per requirements.txt."""
    requirements = (folder / "requirements.txt").read_bytes()
    key = hashlib.sha256(requirements + sys.version.encode()).hexdigest()[:16]
    venv = VENVS / f"venv-{key}"
    if not (venv / "installed").exists():  # absent also after an interrupted install: start over
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = subprocess.run([str(venv / "bin" / "pip"), "install", "-r", "requirements.txt"], cwd=folder,
                                 capture_output=True, text=True)
        if install.returncode:
            sys.exit(f"pip install -r {folder / 'requirements.txt'} failed:\n{install.stdout}{install.stderr}")
        (venv / "installed").write_text(requirements.decode())
    return venv


def comparison_case(folder: Path, size: str, deliveries: Path, count: int) -> Case:
    """Return the case that runs another app folder's Procfile web command from its own environment."""
    venv = app_environment(folder)
    path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return Case(size, folder.name, web_command(folder), deliveries, count, folder=folder,
                settings={"PATH": path, "VIRTUAL_ENV": str(venv)}, any_answer=True)


def wait_for_any_answer(server: Server, seconds: float = 15) -> float:
    """Wait for any HTTP answer to GET / (a 404 or 405 too); return how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()}")
        try:
            urllib.request.urlopen(server.url, timeout=1).close()
            return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"server did not answer within {seconds} s:\n{server.output()}")


def run_wrk(url: str, case: Case, seconds: int, connections: int) -> dict:
    """Drive a server with wrk from the load core, from the case's next delivery on; return its figures."""
    command = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(HERE / "benchmark.lua"), url, "--", str(case.deliveries), str(case.position)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    case.position += figures["requests"] + connections  # a request in flight at the end may still have landed
    return figures


def worker_cpu_seconds(server: Server) -> float:
    """Return the CPU time (user and system) that the server's processes but its log pipe's reader have used."""
    pid = str(server.process.pid)
    children = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
    ticks = 0
    for process in children or [pid]:
        try:
            name, fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)
        except FileNotFoundError:
            continue  # a child that has ended since (the settings check at boot)
        if not name.endswith("(tail"):
            ticks += int(fields.split()[11]) + int(fields.split()[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def worker_rss_mb(server: Server) -> float:
    """Return the largest resident set of the server's worker processes (or of the server alone), in MB."""
    pid = str(server.process.pid)
    children = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
    sizes = []
    for process in children or [pid]:
        status = Path(f"/proc/{process}/status").read_text()
        sizes.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))))
    return max(sizes) / 1024


def measure(case: Case, args, folder: Path, round_number: int) -> dict:
    """Start the case's server, warm it, load it, stop it, and return the figures of this run."""
    log = folder / f"{case.label}.log"
    # As on Heroku, the server writes to a pipe that another machine drains: here a reader on the load
    # core, which keeps the last 64 KB for a run that fails (gigabytes on disk would slow later runs).
    command = (f"cd {shlex.quote(str(case.folder))} && exec taskset -c {SERVER_CORE} {case.command} "
               f"> >(exec taskset -c {LOAD_CORE} tail -c 65536 >> {shlex.quote(str(log))}) 2>&1")
    server = Server(log, command=command, DT_SIGNATURE_SECRET=SECRET,
                    WEB_CONCURRENCY=str(args.workers), **case.settings)
    # What Heroku's Python buildpack sets for every app (its access log, trust in the router's headers);
    # loopback only here.
    server.env.update(GUNICORN_CMD_ARGS=f"--access-logfile - --bind 127.0.0.1:{server.port}", FORWARDED_ALLOW_IPS="*")
    if "DATABASE_URL" in case.settings:
        empty_table(case.settings["DATABASE_URL"])
    sent_before = case.position
    server.start(wait=False)
    try:
        boot_seconds = wait_for_any_answer(server) if case.any_answer else server.wait_until_up()
        run_wrk(server.url, case, args.warmup, args.connections)
        cpu_before = worker_cpu_seconds(server)
        figures = run_wrk(server.url, case, args.seconds, args.connections)
        figures["cpu_us"] = (worker_cpu_seconds(server) - cpu_before) / max(figures["requests"], 1) * 1e6
        figures.update(rss_mb=worker_rss_mb(server), boot_s=boot_seconds, label=case.label, round=round_number)
    finally:
        server.stop()
    figures["events_per_s"] = figures["requests"] / figures["seconds"]
    figures["replayed"] = case.position - sent_before > case.count
    return figures


def summary(case: Case) -> dict:
    """Return the case's medians over its rounds, its range of events/s, its errors and its largest worker."""
    runs = case.runs
    rates = [run["events_per_s"] for run in runs]
    return {"label": case.label, "size": case.size, "own": case.folder == ROOT,
            "events_per_s": statistics.median(rates), "low": min(rates), "high": max(rates),
            "p50_ms": statistics.median(run["p50_ms"] for run in runs),
            "p99_ms": statistics.median(run["p99_ms"] for run in runs),
            "errors": sum(run["errors"] + run["non_2xx"] for run in runs),
            "cpu_us": statistics.median(run["cpu_us"] for run in runs),
            "rss_mb": max(run["rss_mb"] for run in runs), "boot_s": max(run["boot_s"] for run in runs)}


def pin_postgres(postgres: PostgresServer) -> None:
    """Pin the database server, and the backends it will fork, away from the servers' core."""
    pid = (postgres.data / "postmaster.pid").read_text().split()[0]
    subprocess.run(["taskset", "-a", "-p", "-c", DATABASE_CORE, pid], check=True, capture_output=True)


def empty_table(database_url: str) -> None:
    """Empty the events table, if it exists yet: each run stores events new to it, however many rounds came before."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        if connection.execute("SELECT to_regclass('dt_events')").fetchone()[0]:
            connection.execute("TRUNCATE dt_events")


def new_database(postgres: PostgresServer, name: str) -> str:
    """Create an empty database on the benchmark's server; return its URL."""
    with psycopg.connect(postgres.url(), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.url(name)


def stored_events(databases: dict[str, str]) -> str:
    """Say how many distinct events the Postgres cases' last runs committed, and how durably."""
    if not databases:
        return ""
    total = 0
    for url in databases.values():
        with psycopg.connect(url) as connection:
            total += connection.execute("SELECT count(*) FROM dt_events").fetchone()[0]
            settings = {name: connection.execute(f"SHOW {name}").fetchone()[0]
                        for name in ("synchronous_commit", "fsync")}
    return (f"{total} distinct events committed in the last round's runs (synchronous_commit "
            f"{settings['synchronous_commit']}, fsync {settings['fsync']})")


def table(results: list[dict], compared: str | None) -> str:
    """Return the medians as a Markdown table, with ratios to the ceiling, to log only (and to the compared app)."""
    references = ["ceiling", LOG_ONLY] + ([compared] if compared else [])
    header = ("| case | events/s (median) | events/s (range) | p50 ms | p99 ms | errors | RSS/worker MB "
              "| worker CPU µs/event |")
    for name in references:
        header += f" events/s vs {name} | p99 vs {name} |"
    rows = [header, "|---" + "|---:" * (header.count("|") - 2) + "|"]
    by_label = {result["label"]: result for result in results}
    for result in results:
        row = (f"| {result['label']} | {result['events_per_s']:.0f} | {result['low']:.0f}-{result['high']:.0f} "
               f"| {result['p50_ms']:.2f} | {result['p99_ms']:.2f} | {result['errors']} | {result['rss_mb']:.1f} "
               f"| {result['cpu_us']:.0f} |")
        for name in references:
            reference = by_label[f"{result['size']}: {name}"]
            row += (f" {result['events_per_s'] / reference['events_per_s']:.2f} "
                    f"| {result['p99_ms'] / reference['p99_ms']:.2f} |")
        rows.append(row)
    return "\n".join(rows)


def write_table(text: str) -> None:
    """Replace the performance table in docs/performance.md with this run's."""
    content = TABLE_FILE.read_text()
    start, end = content.index(TABLE_START) + len(TABLE_START), content.index(TABLE_END)
    TABLE_FILE.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def missing_programs(with_postgres: bool) -> list[str]:
    """Return what the benchmark needs that this machine lacks, each as what to install."""
    missing = [f"{program} (e.g. apt-get install {package})" for program, package in
               (("wrk", "wrk"), ("taskset", "util-linux")) if shutil.which(program) is None]
    if with_postgres and server_programs() is None:
        missing.append("PostgreSQL's server programs (run the tests' install first, or pass --no-postgres)")
    return missing


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every case once")
    parser.add_argument("--seconds", type=int, default=5, help="length of each measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="WEB_CONCURRENCY of every server (see above)")
    parser.add_argument("--size", action="append", choices=SIZES, help="only these body sizes (repeatable)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the Postgres case")
    parser.add_argument("--compare", metavar="DIR", help="also run this app folder's Procfile web command")
    parser.add_argument("--baseline", metavar="DIR", help="also run another checkout of this receiver, stored")
    parser.add_argument("--print-only", action="store_true", help="print the table, leave docs/performance.md alone")
    return parser.parse_args()


def make_cases(args, folder: Path, postgres: PostgresServer | None, compare: Path | None) -> tuple[list, dict]:
    """Write each size's deliveries and return its cases, and the database URL of each size's Postgres case."""
    cases, databases = [], {}
    for size_label, size in SIZES.items():
        if args.size and size_label not in args.size:
            continue
        count = max(30, min(80_000, 640_000_000 // size))  # distinct events: more than one run sends
        deliveries = folder / f"{size}.txt"
        write_deliveries(deliveries, size, count)
        cases.append(Case(size_label, "ceiling", CEILING_COMMAND, deliveries, count))
        cases.append(Case(size_label, LOG_ONLY, web_command(ROOT), deliveries, count))
        if postgres is not None:
            databases[size_label] = new_database(postgres, f"bench_{size}_{int(time.time())}")
            cases.append(Case(size_label, STORED, web_command(ROOT), deliveries, count,
                              settings={"DATABASE_URL": databases[size_label]}))
        if postgres is not None and args.baseline:
            baseline = Path(args.baseline).resolve()
            cases.append(Case(size_label, f"{baseline.name}, Postgres", web_command(baseline), deliveries, count,
                              folder=baseline,
                              settings={"DATABASE_URL": new_database(postgres, f"base_{size}_{int(time.time())}")}))
        if compare:
            cases.append(comparison_case(compare, size_label, deliveries, count))
    return cases, databases


def run_rounds(cases: list[Case], args, folder: Path) -> None:
    """Run every case once a round, the order turning by one each round."""
    for round_number in range(args.rounds):
        turn = round_number % len(cases)
        for case in cases[turn:] + cases[:turn]:
            case.runs.append(measure(case, args, folder, round_number + 1))
            print(json.dumps(case.runs[-1]), file=sys.stderr)
    if any(run["replayed"] for case in cases if "DATABASE_URL" in case.settings for run in case.runs):
        print("note: a Postgres run replayed events, which it skips as duplicates", file=sys.stderr)


def report(cases: list[Case], args, compare: Path | None, durability: str) -> str:
    """Return the table of medians and the notes that say how it was made."""
    command = (f"python tests/benchmark/benchmark.py --rounds {args.rounds} --seconds {args.seconds} "
               f"--connections {args.connections} --workers {args.workers}"
               + (f" --compare {args.compare}" if args.compare else "")
               + (f" --baseline {args.baseline}" if args.baseline else ""))
    results = [summary(case) for case in cases]
    by_label = {result["label"]: result for result in results}

    def rate(size: str, name: str) -> float:
        return by_label[f"{size}: {name}"]["events_per_s"]

    notes = [f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores: each server pinned to "
             f"core {SERVER_CORE}, wrk and PostgreSQL to core {LOAD_CORE}, {args.connections} keep-alive connections, "
             f"WEB_CONCURRENCY={args.workers} for every server; {args.rounds} interleaved rounds, each starting every "
             f"server afresh for {args.warmup} s of warm-up and {args.seconds} s measured; medians of the rounds, "
             "and ratios of the medians.",
             f"Boot to first 200: {max(result['boot_s'] for result in results if result['own']):.2f} s at most."]
    if compare:
        pins = ", ".join((compare / "requirements.txt").read_text().split())
        notes.append(f"{compare.name}: its Procfile's `{web_command(compare)}` from its own environment ({pins}).")
    if durability:
        sizes = sorted({case.size for case in cases if "DATABASE_URL" in case.settings}, key=list(SIZES).index)
        ratios = ", ".join(f"{rate(size, STORED) / rate(size, LOG_ONLY):.2f} at {size}" for size in sizes)
        if args.baseline:
            baseline = f"{Path(args.baseline).resolve().name}, Postgres"
            ratios += " (" + ", ".join(f"{rate(size, baseline) / rate(size, LOG_ONLY):.2f} at {size}"
                                       for size in sizes) + f" for {baseline})"
        notes.append(f"Postgres / log only: {ratios} of the events/s; {durability}.")
    return table(results, compare.name if compare else None) + "\n\n" + " ".join(notes)


def main() -> None:
    """Run every case in interleaved rounds and report the medians."""
    args = arguments()
    compare = Path(args.compare).resolve() if args.compare else None
    if missing := missing_programs(not args.no_postgres):
        sys.exit("benchmark needs " + "; ".join(missing))
    folder = Path(tempfile.mkdtemp(prefix="dt-receiver-bench-"))
    postgres = None
    if not args.no_postgres:
        postgres = PostgresServer(server_programs())
        postgres.start()
        pin_postgres(postgres)
    try:
        cases, databases = make_cases(args, folder, postgres, compare)
        run_rounds(cases, args, folder)
        durability = stored_events(databases)
    finally:
        if postgres is not None:
            postgres.remove()
    shutil.rmtree(folder)  # the deliveries and the servers' last lines; kept when a run fails
    text = report(cases, args, compare, durability)
    print(text)
    if not args.print_only:
        write_table(text)


if __name__ == "__main__":
    main()
