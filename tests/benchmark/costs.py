"""Time each step of the receiver's handling of a 1 KB event in-process, beside bare Flask (docs/performance.md).

Run by hand: `python tests/benchmark/costs.py` (after the test install; about a minute). No server runs: each
round calls the bare-Flask ceiling, then the log-only receiver, as WSGI applications with the same signed
deliveries, and times each step of the receiver where it runs, among the others. The receiver answers a
delivery without Flask's per-request work, so bare Flask is a row to compare with, not a part of it. (Alone in a tight loop a
step looks up to twice as fast: its code and data stay in the CPU's caches.) The table gives the median
of the rounds for each row; "the rest" is what the receiver's median leaves after its steps. The
server's own work per request (gevent, gunicorn's parser, the socket) is the same for both and is not in it.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from werkzeug.test import EnvironBuilder

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the receiver, and the tests' support modules
sys.stdout = open(os.devnull, "w")  # the log lines' stream, set before the receiver configures logging
import ceiling  # noqa: E402
from benchmark import body_of_size  # noqa: E402
from support.signing import SECRET  # noqa: E402

from receiver import create_app, signatures, webhook  # noqa: E402
from receiver.sample import sign_body  # noqa: E402

STEPS = {  # row of the table -> (module, name) of the function that does it
    "pyjwt's HS256 decode, with every check it makes": (signatures.HS256_JWT, "decode"),
    "both checksums of the body, compared in constant time": (signatures, "verify_checksums"),
    "parsing the event": (webhook, "parse_event"),
    "the event's JSON log line: its fields, its text, the write and its flush": (webhook, "write_event_line"),
}
CEILING = "bare Flask, for comparison: routing, request and response objects, reading the body (the ceiling)"
REST = "the rest: the WSGI entry, reading the body, the deadline timer, header lookups, the answer"
TOTAL = "**the receiver, log only**"


def environs(deliveries: list) -> list[dict]:
    """Return the WSGI environ of each delivery, built before any timing starts."""
    return [EnvironBuilder(method="POST", path="/", data=body, content_type="application/json",
                           headers={"X-Dt-Signature": token}).get_environ() for body, token in deliveries]


def start_response(status: str, headers: list, exc_info=None) -> None:
    """Insist on a 200: a refused delivery would time the wrong path."""
    if not status.startswith("200"):
        raise RuntimeError(f"delivery answered {status}")


def seconds_per_call(application, deliveries: list) -> float:
    """Call a WSGI application with every delivery; return the mean seconds per call."""
    requests = environs(deliveries)
    started = time.perf_counter()
    for environ in requests:
        for _ in application(environ, start_response):
            pass
    return (time.perf_counter() - started) / len(requests)


def timed(totals: Counter, row: str, function):
    """Wrap a function so that its time is added to a row's total."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[row] += time.perf_counter() - started

    return wrapper


def main() -> None:
    """Time both applications in alternating rounds and print the table of medians, in µs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--events", type=int, default=10_000)
    args = parser.parse_args()
    bodies = [body_of_size(1024, number) for number in range(args.events)]
    deliveries = [(body, sign_body(body, SECRET)) for body in bodies]
    receiver = create_app({"DT_SIGNATURE_SECRET": SECRET})
    totals = Counter()
    for row, (module, name) in STEPS.items():
        setattr(module, name, timed(totals, row, getattr(module, name)))

    rounds = []
    for _ in range(args.rounds):
        totals.clear()
        figures = {CEILING: seconds_per_call(ceiling.app, deliveries),
                   TOTAL: seconds_per_call(receiver, deliveries)}
        figures.update({row: totals[row] / len(deliveries) for row in STEPS})
        rounds.append(figures)

    median = {row: statistics.median(figures[row] for figures in rounds) for row in rounds[0]}
    median[REST] = median[TOTAL] - sum(median[row] for row in STEPS)
    rows = [*STEPS, REST, TOTAL, CEILING]
    table = ["| step | µs per event |", "|---|---:|"] + [f"| {row} | {median[row] * 1e6:.1f} |" for row in rows]
    print("\n".join(table), file=sys.__stdout__)


if __name__ == "__main__":
    main()
