"""One logging configuration: every line of the receiver and of psycopg's pool is one JSON object on stdout."""

import functools
import json
import logging
import logging.config
import re
import sys
from typing import Any, TextIO

# libpq's messages name hosts, ports, users and databases; these fixed forms say what went wrong and nothing more.
DATABASE_FAULTS = (
    (re.compile(r'database "[^"]*" does not exist'), lambda _: "the database DATABASE_URL names does not exist"),
    (re.compile(r"password authentication failed|no password supplied"), lambda _: "password authentication failed"),
    (re.compile(r"Connection refused|could not connect"), lambda _: "connection refused"),
    (re.compile(r"timeout|timed out|canceling statement", re.I), lambda _: "timeout"),
    (re.compile(r"could not translate host name|Name or service not known"), lambda _: "unknown host"),
    (re.compile(r'invalid (?:integer )?(?:value "[^"]*" for connection option "(\w+)"|(\w+) value)'),
     lambda match: f"DATABASE_URL has an invalid {match[1] or match[2]}"),
    (re.compile(r"SSL (?:error|SYSCALL|connection)|server does not support SSL|SSL negotiation"),
     lambda _: "SSL negotiation failed"),
    (re.compile(r"too many connections|remaining connection slots"), lambda _: "too many connections"),
    (re.compile(r"server closed the connection|the connection is lost|terminating connection"),
     lambda _: "connection lost"),
    (re.compile(r"the database system is (shutting down|starting up|in recovery mode|not yet accepting)"),
     lambda match: f"database {match[1]}"),
    (re.compile(r"permission denied"), lambda _: "permission denied"),
    (re.compile(r"could not extend file|No space left on device|disk full", re.I), lambda _: "disk full"),
    (re.compile(r'relation "dt_\w+" does not exist|column .* does not exist'), lambda _: "table not migrated yet"),
)

# How libpq and psycopg name a server or a setting in a message a library logs as text of its own.
CONNECTION_NAMES = (
    (re.compile(r'connection to server (?:at "[^"]*"(?: \([^)]*\))?, port \d+|on socket "[^"]*")'),
     "connection to the database server"),
    (re.compile(r'\b(role|database|user) "[^"]*"'), r"\1 ..."),
    (re.compile(r"\b(host|hostaddr|port|user|dbname|password)=(?:'(?:[^'\\]|\\.)*'|\S+)"), r"\1=..."),
)

# What a valid JSON text may hold raw that some readers take for the end of a line.
LINE_BREAKS = "\n\r\x85\u2028\u2029"

# Set in a request's WSGI environ once the receiver has written that request's line, so the server
# writes no access line for it: one line per request.
LOGGED = "receiver.logged"

JSON = json.JSONEncoder(default=str)  # made once: json.dumps with `default` makes one per call
JSON_STRING = json.encoder.encode_basestring_ascii  # what JSON writes for a str, in C

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,  # gunicorn's own loggers keep their formats
    "formatters": {"json": {"()": "receiver.logs.JsonLineFormatter"}},
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "json"},
    },
    "loggers": {
        "receiver": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        "psycopg": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
    },
}


@functools.cache  # once per process: a second dictConfig would drop handlers added since
def configure_logging() -> None:
    """Send the receiver's and psycopg's log lines, one JSON object each, and the events' lines, to stdout."""
    logging.config.dictConfig(LOGGING)
    EVENT_LINES.stream = sys.stdout  # the stream the handler above holds, so the lines keep their order


class EventLines:
    """Where accepted events' lines go: one write and one flush each, with no log record.

    An event's line is its only record in log-only mode, so unlike a log record's (whose failed write
    logging reports and drops) its write raises: the delivery must not be answered 200. Every line it
    takes is whole, so the process's other lines, written through logging to the same stream, never
    fall inside one. It has no lock: in the server's gevent worker a write to stdout never yields.
    """

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # stdout once logging is configured; a test may set its own

    def write(self, line: str) -> None:
        """Write one line and flush it; raise OSError if it cannot be written."""
        stream = self.stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()


EVENT_LINES = EventLines()


def event_line(message: str, fields: dict[str, Any]) -> str:
    """Return an accepted event's line: what JsonLineFormatter makes of an info record with these fields."""
    line = f'{{"level": "info", "msg": {JSON_STRING(message)}'
    for name, value in fields.items():
        if not isinstance(value, JsonText):
            line += f", {JSON_STRING(name)}: {json_value(value)}"
    for name, value in fields.items():
        if isinstance(value, JsonText):
            line += f', "{name}": {value}'
    return line + "}"


def json_value(value: Any) -> str:
    """Return one field's value as JSON: the common cases without the encoder's machinery."""
    if value.__class__ is str:
        return JSON_STRING(value)
    return "null" if value is None else JSON.encode(value)


class JsonText(str):
    """JSON text that a log line holds as it is, instead of serialising its parse again."""

    @classmethod
    def of(cls, event) -> "JsonText":
        """Return an event's body as received, or re-serialised if it holds a line break (a log line must not)."""
        return cls(one_line(event.text, event.body))


def one_line(text: str, document: Any = None) -> str:
    """Return JSON text as one line: as it is, or re-serialised from its parse (given, or made here) if it breaks."""
    if not any(mark in text for mark in LINE_BREAKS):
        return text
    return json.dumps(json.loads(text) if document is None else document)


class JsonLineFormatter(logging.Formatter):
    """Format a record and its `fields` as one line of JSON; a library's exception becomes a short cause."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage() if record.name.startswith("receiver") else library_message(record)
        fields = getattr(record, "fields", {})
        line = {"level": record.levelname.lower(), "msg": message}
        line.update((name, value) for name, value in fields.items() if not isinstance(value, JsonText))
        text = JSON.encode(line)
        for name, value in fields.items():
            if isinstance(value, JsonText):
                text = f'{text[:-1]}, "{name}": {value}}}'
        return text


def library_message(record: logging.LogRecord) -> str:
    """Return a library's message with its exceptions named by cause and its connections unnamed."""
    args = record.args if isinstance(record.args, tuple) else ()
    shown = tuple(database_fault(arg) if isinstance(arg, BaseException)
                  else arg if isinstance(arg, (str, int, float)) else type(arg).__name__ for arg in args)
    return f"{record.name}: " + unnamed_connections(record.msg % shown if shown else str(record.msg))


def unnamed_connections(text: str) -> str:
    """Return a library's text with the servers, ports, users and databases it names left out."""
    for pattern, replacement in CONNECTION_NAMES:
        text = pattern.sub(replacement, text)
    return text


def database_fault(error: BaseException) -> str:
    """Name a database fault in a short fixed form, without hosts, users, passwords or URLs."""
    text = str(error)
    for pattern, describe in DATABASE_FAULTS:
        match = pattern.search(text)
        if match:
            return describe(match)
    return type(error).__name__
