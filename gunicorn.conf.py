# Gunicorn settings for Heroku: https://docs.gunicorn.org/en/stable/settings.html
# Heroku's Python buildpack also sets GUNICORN_CMD_ARGS, which takes priority over this file.
import logging
import os
import subprocess
import sys

import gevent
from gunicorn.glogging import Logger

from receiver.logs import LOGGED, configure_logging
from receiver.settings import secret_warnings, server_problem, worker_count

# Heroku gives the port in $PORT; "[::]" accepts IPv6 and, unless IPV6_V6ONLY is set, IPv4 too.
bind = [f"[::]:{os.environ.get('PORT', 5006)}"]

# The buildpack sets WEB_CONCURRENCY from the dyno's memory (2 on a 512 MB dyno). With a database,
# never more workers than DATABASE_MAX_CONNECTIONS, since each worker holds at least one connection.
workers = worker_count(os.environ) if not server_problem(os.environ) else 1

# gevent: each connection is a greenlet, so clients that trickle their bodies (scanners, bad
# networks) cost a few KB each instead of a thread, and DT's deliveries never queue behind them.
# Every wait of a delivery (Postgres, DT's key endpoint, the body) yields, and app.py's deadline
# can interrupt it. psycopg 3 cooperates with gevent by itself.
worker_class = "gevent"
# Connections one worker serves at once; beyond it the kernel queues them.
worker_connections = 1000

# gevent patches the standard library in each worker after the fork; anything made before that (the
# database pool's locks and threads) would block the whole worker. So each worker loads the app itself.
preload_app = False

# A worker silent this long is restarted (with gevent, a heartbeat, not a request limit).
timeout = 20

# On SIGTERM, in-flight requests get this long to finish: inside Heroku's 30 s before SIGKILL.
graceful_timeout = 20

# Heroku's router keeps idle connections to the dyno for 90 s; closing ours first would drop requests.
keepalive = 100

# Access log on stdout in Heroku's logfmt style, with the router's request id, for the requests the
# receiver does not log itself (see OneLinePerRequest below).
accesslog = "-"
access_log_format = (
    'gunicorn method=%(m)s path="%(U)s" status=%(s)s duration=%(M)sms '
    'request_id=%({x-request-id}i)s fwd="%({x-forwarded-for}i)s" user_agent="%(a)s"'
)


class OneLinePerRequest(Logger):
    """Gunicorn's logger, minus the access line of a request whose own line the receiver has written.

    Each delivery's JSON line already says what became of it, with the router's request id; a second
    line per delivery would double the log volume (and cost a fifth of what a bare Flask request does).
    Heroku's buildpack turns the access log on whatever this file says, so it is filtered here.
    """

    def access(self, resp, req, environ, request_time):
        if not environ.get(LOGGED):
            super().access(resp, req, environ, request_time)


logger_class = OneLinePerRequest

# Gunicorn's control socket (gunicornc) is for admins on a shell; a dyno has none, and two
# servers on one machine (tests, benchmarks) would fight over its path.
control_socket_disable = True


def on_starting(server):
    """Refuse to start, with one line, a server whose settings could accept no event; warn once of weak ones."""
    problem = server_problem(os.environ) or library_problem_of_a_child()
    if problem:
        print(f"receiver not started: {problem}", file=sys.stderr)
        sys.exit(1)
    configure_logging()
    for warning in secret_warnings(os.environ):
        logging.getLogger("receiver").warning(warning)


def library_problem_of_a_child():
    """Return what pyjwt and libpq find wrong with the settings, asked of a child process, or None.

    This process forks the workers and must not import them: see receiver.settings.library_problem.
    """
    check = "import os; from receiver.settings import library_problem; print(library_problem(os.environ) or '')"
    try:
        child = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the settings could not be checked within 30 s"
    if child.returncode != 0:
        return "the settings could not be checked: " + (child.stderr.strip().splitlines() or ["no output"])[-1]
    lines = child.stdout.strip().splitlines()
    return lines[-1] if lines and lines[-1] else None


def post_worker_init(worker):
    """Open the worker's database pool and check the schema, in the background, as the worker starts."""
    store = worker.wsgi.extensions.get("dt_events_store")
    if store is not None:
        store.start()


def worker_exit(server, worker):
    """Close the worker's database pool while gevent still runs, so its threads end without a traceback."""
    store = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("dt_events_store")
    if store is not None:
        store.close()


def post_request(worker, req, environ, resp):
    """Let the worker's other connections run before this one's next request.

    A keep-alive connection whose next request has already arrived is otherwise served again at once:
    measured with 16 connections on one worker, p99 fell from 390-700 ms to 6-16 ms with this yield.
    """
    gevent.sleep(0)
