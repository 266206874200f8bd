# Gunicorn settings for Heroku: https://docs.gunicorn.org/en/stable/settings.html
# Heroku's Python buildpack also sets GUNICORN_CMD_ARGS, which takes priority over this file.
import os

from receiver.server import (  # noqa: F401
    OneLinePerRequest,
    on_starting,
    post_request,
    post_worker_init,
    pre_request,
    worker_exit,
)
from receiver.settings import server_problem, worker_count

# Heroku gives the port in $PORT; "[::]" accepts IPv6 and, unless IPV6_V6ONLY is set, IPv4 too.
bind = [f"[::]:{os.environ.get('PORT', 5006)}"]

# The buildpack sets WEB_CONCURRENCY from the dyno's memory (2 on a 512 MB dyno). With a database,
# never more workers than DATABASE_MAX_CONNECTIONS, since each worker holds at least one connection.
workers = worker_count(os.environ) if not server_problem(os.environ) else 1

# gevent: each connection is a greenlet, so clients that trickle their bodies (scanners, bad
# networks) cost a few KB each instead of a thread, and DT's deliveries never queue behind them.
# Every wait of a delivery (Postgres, DT's key endpoint, the body) yields, and the delivery's deadline
# (receiver/webhook.py) can interrupt it. psycopg 3 cooperates with gevent by itself.
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


# The receiver writes its own line for each delivery and rejection; this logger skips their access lines.
logger_class = OneLinePerRequest

# Gunicorn's control socket (gunicornc) is for admins on a shell; a dyno has none, and two
# servers on one machine (tests, benchmarks) would fight over its path.
control_socket_disable = True
