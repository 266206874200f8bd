"""Gunicorn's hooks and logger for the receiver, named in gunicorn.conf.py: checks at boot, each worker's pool."""

import contextvars
import fcntl
import logging
import os
import subprocess
import sys

import gevent
from gunicorn.glogging import Logger

from .logs import LOGGED, configure_logging
from .settings import server_problem, setting_warnings

# A pipe holds 64 KB by default, so one large event's line fills it and its worker waits until the log router's
# reader has drained it. 1 MB, Linux's limit for a process without privileges, lets a burst of lines through.
LOG_PIPE_BYTES = 1024 * 1024

# The request gunicorn is serving on this connection: each connection is a greenlet, with contextvars of its own.
GUNICORN_REQUEST = contextvars.ContextVar("gunicorn_request", default=None)


class OneLinePerRequest(Logger):
    """Gunicorn's logger, minus the access line of a request whose own line the receiver has written.

    Each delivery's JSON line already says what became of it, with the router's request id; a second
    line per delivery would double the log volume (and cost a fifth of what a bare Flask request does).
    Heroku's buildpack turns the access log on whatever gunicorn.conf.py says, so it is filtered here.
    """

    def access(self, resp, req, environ, request_time):
        if not environ.get(LOGGED):
            super().access(resp, req, environ, request_time)


def on_starting(server):
    """Refuse to start, with one line, a server whose settings could accept no event; warn once of weak or idle ones."""
    problem = server_problem(os.environ) or library_problem_of_a_child()
    if problem:
        print(f"receiver not started: {problem}", file=sys.stderr)
        sys.exit(1)
    configure_logging()
    grow_log_pipe()
    for warning in setting_warnings(os.environ):
        logging.getLogger("receiver").warning(warning)


def grow_log_pipe() -> None:
    """Let stdout, if it is a pipe, hold 1 MB of lines, so that a worker writing a large event's line seldom waits."""
    try:
        fcntl.fcntl(sys.stdout.fileno(), fcntl.F_SETPIPE_SZ, LOG_PIPE_BYTES)
    except (AttributeError, OSError, ValueError):
        pass  # not a pipe, not Linux, or over this machine's limit: lines are written as before


def library_problem_of_a_child():
    """Return what pyjwt and libpq find wrong with the settings, asked of a child process, or None.

    The master forks the workers and must not import either: see receiver.settings.library_problem. A
    worker cannot refuse in its place: gunicorn prints a traceback when two workers fail to boot at once.
    """
    check = "import os; from receiver.settings import library_problem; print(library_problem(os.environ) or '')"
    try:
        command = [sys.executable, "-c", check]
        child = subprocess.run(command, capture_output=True, text=True, timeout=30)  # noqa: S603 (a fixed command)
    except subprocess.TimeoutExpired:
        return "the settings could not be checked within 30 s"
    if child.returncode != 0:
        return "the settings could not be checked: " + (child.stderr.strip().splitlines() or ["no output"])[-1]
    lines = child.stdout.strip().splitlines()
    return lines[-1] if lines and lines[-1] else None


def post_worker_init(worker):
    """Open the worker's database pool and check the schema, in the background, as the worker starts; start its
    upkeep (partitions ahead, retention)."""
    if (store := worker_store(worker)) is not None:
        store.start()
        from . import retention  # in the worker only: it imports psycopg (see library_problem_of_a_child)

        retention.start(store, worker.wsgi.config)


def worker_exit(server, worker):
    """Close the worker's database pool while gevent still runs, so its threads end without a traceback."""
    if (store := worker_store(worker)) is not None:
        from . import retention

        retention.stop()
        store.close()


def worker_store(worker):
    """Return the store of the worker's app, if it is the receiver and keeps events (the benchmark's ceiling is not)."""
    parts = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("receiver")
    return parts.store if parts is not None else None


def pre_request(worker, req):
    """Remember the request being served, so the app can ask for its connection to be closed after the answer."""
    GUNICORN_REQUEST.set(req)


def close_connection_after_answer() -> None:
    """Have gunicorn answer `Connection: close` and close the connection, rather than read what is left of the body.

    Left unread, a body is read to its end before the connection's next request (in reads as large as
    what is left, held at once): an unsigned request's body would cost the worker what it spares it here.
    Outside gunicorn (the tests' test client) there is no connection to close.
    """
    if (req := GUNICORN_REQUEST.get()) is not None:
        req.force_close()


def post_request(worker, req, environ, resp):
    """Let the worker's other connections run before this one's next request.

    A keep-alive connection whose next request has already arrived is otherwise served again at once:
    measured with 16 connections on one worker, p99 fell from 390-700 ms to 6-16 ms with this yield.
    """
    gevent.sleep(0)
