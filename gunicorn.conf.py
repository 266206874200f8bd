# Gunicorn settings for Heroku: https://docs.gunicorn.org/en/stable/settings.html
# Heroku's Python buildpack also sets GUNICORN_CMD_ARGS, which takes priority over this file.
import os

# Heroku gives the port in $PORT; "[::]" accepts IPv6 and, unless IPV6_V6ONLY is set, IPv4 too.
bind = [f"[::]:{os.environ.get('PORT', 5006)}"]

# The buildpack sets WEB_CONCURRENCY from the dyno's memory (2 on a 512 MB dyno).
workers = int(os.environ.get("WEB_CONCURRENCY", 2))

# Handlers wait on Postgres and DT's key endpoint, so threads overlap those waits.
# The app sizes its database pool from the same variable: one connection per thread.
# Measured with tests/benchmark.py on one core: 1x1, 2x1, 1x4, 2x4 and 4x1 workers x threads
# give the same log-only throughput within the run-to-run noise (about 10%); with Postgres,
# four threads overlap the database round trips, and 2 x 4 stays near 45 MB per worker.
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", 4))

# Load the app once, before forking: a bad configuration stops the server at once with one
# clear message, boot is faster and workers share memory. Database connections open after the fork.
preload_app = True

# A worker silent this long is restarted (with gthread this is a heartbeat, not a request limit).
timeout = 20

# On SIGTERM, in-flight requests get this long to finish: inside Heroku's 30 s before SIGKILL.
graceful_timeout = 20

# Heroku's router keeps idle connections to the dyno for 90 s; closing ours first would drop requests.
keepalive = 100

# Access log on stdout in Heroku's logfmt style, with the router's request id.
accesslog = "-"
access_log_format = (
    'gunicorn method=%(m)s path="%(U)s" status=%(s)s duration=%(M)sms '
    'request_id=%({x-request-id}i)s fwd="%({x-forwarded-for}i)s" user_agent="%(a)s"'
)

# Gunicorn's control socket (gunicornc) is for admins on a shell; a dyno has none, and two
# servers on one machine (tests, benchmarks) would fight over its path.
control_socket_disable = True
