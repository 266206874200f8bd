"""Write a window of stored events to a stream for `export`: readings as CSV, or bodies as JSON lines."""

import csv
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO

import click

from .logs import one_line

READING_COLUMNS = ("time", "device_id", "event_type", "name", "value", "state", "unit", "event_id")


def write_readings(rows: Iterable[tuple], out, advance: Callable[[int], None]) -> tuple[int, int]:
    """Write readings (in READING_COLUMNS' order, an event's rows together) as CSV; return how many, and events."""
    writer = csv.writer(out, lineterminator="\n")  # a terminal (`heroku run`) makes each \n a \r\n itself
    writer.writerow(READING_COLUMNS)
    written, events, event_id = 0, 0, None
    for row in rows:
        writer.writerow(row)
        written += 1
        if row[-1] != event_id:
            event_id = row[-1]
            events += 1
            advance(1)
    return written, events


def write_bodies(rows: Iterable[tuple[str, str]], out, advance: Callable[[int], None]) -> tuple[int, int]:
    """Write each stored body (rows of event id and body) as one line; return how many, twice (one per event)."""
    written = 0
    for _, body in rows:
        out.write(body_line(body))
        out.write("\n")
        written += 1
        advance(1)
    return written, written


def body_line(body: str) -> str:
    """Return a stored body as one line, by the rule the event log follows."""
    try:
        return one_line(body)
    except (ValueError, RecursionError):  # not JSON at all: not a body the receiver stored
        return json.dumps(body)


def stderr_joins_stdout() -> bool:
    """Tell whether stderr is the very file stdout writes to, as under `heroku run`, whose terminal joins them."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):  # no file behind them (io.UnsupportedOperation is both)
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


@contextmanager
def stdout_text() -> Iterator[TextIO]:
    """Lend stdout as UTF-8 text, whatever the locale; a reader that goes away (`| head`) ends it in one line."""
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    try:
        yield out
        out.flush()
    except BrokenPipeError:
        raise click.ClickException("stdout was closed before the export ended: the output is cut short") from None
    finally:
        out.detach()  # stdout itself stays open, for click
