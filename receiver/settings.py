"""Say, in one line each, what is wrong with the settings the web server needs."""

from collections.abc import Mapping
from datetime import timedelta
from urllib.parse import urlsplit

from .durations import EXAMPLES, parse_duration

# Every variable the receiver and its commands read; the app's config holds these and no others of the environment.
NAMES = (
    "DT_SIGNATURE_SECRET", "DT_SIGNATURE_SECRET_PREVIOUS", "DT_ORGANIZATION_ID", "DT_ISSUER",
    "DATABASE_URL", "DATABASE_MAX_CONNECTIONS", "DATABASE_PLAN_MB", "WEB_CONCURRENCY", "HEALTH_STALE_AFTER",
    "EVENTS_RETENTION", "READINGS_RETENTION",
    "DT_SERVICE_ACCOUNT_KEY_ID", "DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL", "DT_API_URL", "DT_AUTH_URL",
)
DATABASE_SCHEMES = ("postgres", "postgresql")
SECRETS = ("DT_SIGNATURE_SECRET", "DT_SIGNATURE_SECRET_PREVIOUS")
MIN_SECRET_BYTES = 32
WHOLE_NUMBERS = ("WEB_CONCURRENCY", "DATABASE_MAX_CONNECTIONS")
# How long the raw events and the readings are kept (unset: for ever); the receiver removes what is older.
RETENTIONS = ("EVENTS_RETENTION", "READINGS_RETENTION")
RETENTION_EXAMPLES = "31d, 26w or 2y"
# Heroku Postgres essential-0 allows 20 connections: two dynos of 8 leave 4 for `heroku run` and psql.
DEFAULT_CONNECTION_BUDGET = 8


def read_settings(source: Mapping[str, str]) -> dict[str, str]:
    """Return the receiver's settings from a mapping such as the environment."""
    return {name: source[name] for name in NAMES if name in source}


def verification_problem(settings: Mapping[str, str]) -> str | None:
    """Return why no delivery could be verified with these settings, or None."""
    if settings.get("DT_SIGNATURE_SECRET") or settings.get("DT_ORGANIZATION_ID"):
        return None
    return ("set DT_SIGNATURE_SECRET (the Data Connector's Signature Secret), "
            "DT_ORGANIZATION_ID (to verify DT-Asymmetric-Signature), or both")


def setting_warnings(settings: Mapping[str, str]) -> list[str]:
    """Return a warning for each secret too short to resist guessing, and for a setting that has no effect."""
    warnings = [f"{name} is shorter than {MIN_SECRET_BYTES} bytes: use a longer random secret"
                for name in SECRETS if settings.get(name) and len(settings[name].encode()) < MIN_SECRET_BYTES]
    if settings.get("HEALTH_STALE_AFTER") and not settings.get("DATABASE_URL"):
        warnings.append("HEALTH_STALE_AFTER has no effect without DATABASE_URL: /health cannot see when events arrive")
    warnings += [f"{name} has no effect without DATABASE_URL: no event is kept" for name in RETENTIONS
                 if settings.get(name) and not settings.get("DATABASE_URL")]
    return warnings


def database_problem(settings: Mapping[str, str]) -> str | None:
    """Return why DATABASE_URL cannot name a PostgreSQL database, or None (also when it is unset)."""
    url = settings.get("DATABASE_URL")
    if not url or "://" not in url and "=" in url:  # unset, or libpq's key=value form
        return None
    try:
        scheme = urlsplit(url).scheme
    except ValueError:  # e.g. an unclosed [ around an IPv6 host
        return "DATABASE_URL is not a URL: check its host part"
    if scheme not in DATABASE_SCHEMES:
        found = scheme + "://" if scheme else "without a scheme"
        return f"DATABASE_URL must start with postgres:// or postgresql://, not {found}"
    return None


def number_problem(settings: Mapping[str, str]) -> str | None:
    """Return which whole-number setting is not a positive whole number, or None."""
    for name in WHOLE_NUMBERS:
        value = settings.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) > 0):
            return f"{name} must be a positive whole number, not {value!r}"
    return None


def stale_after(settings: Mapping[str, str]) -> timedelta | None:
    """Return how long /health lets pass without a stored event (HEALTH_STALE_AFTER), or None if unset or invalid."""
    duration = parse_duration(settings.get("HEALTH_STALE_AFTER") or "")
    return duration if duration is not None and duration > timedelta(0) else None


def stale_problem(settings: Mapping[str, str]) -> str | None:
    """Return why HEALTH_STALE_AFTER is not a duration, or None (also when it is unset or empty)."""
    value = settings.get("HEALTH_STALE_AFTER")
    if value and stale_after(settings) is None:
        return f"HEALTH_STALE_AFTER must be a duration such as {EXAMPLES}, not {value!r}"
    return None


def retention(settings: Mapping[str, str], name: str) -> timedelta | None:
    """Return how long EVENTS_RETENTION or READINGS_RETENTION keeps rows, or None if unset (for ever) or invalid."""
    duration = parse_duration(settings.get(name) or "")
    return duration if duration is not None and duration > timedelta(0) else None


def retention_problem(settings: Mapping[str, str]) -> str | None:
    """Return why EVENTS_RETENTION or READINGS_RETENTION is not a duration, or None (also when unset or empty)."""
    for name in RETENTIONS:
        value = settings.get(name)
        if value and retention(settings, name) is None:
            return f"{name} must be a duration such as {RETENTION_EXAMPLES}, not {value!r}"
    return None


def server_problem(settings: Mapping[str, str]) -> str | None:
    """Return the first reason the web server must not start that the standard library can see, or None."""
    return (verification_problem(settings) or database_problem(settings) or number_problem(settings)
            or stale_problem(settings) or retention_problem(settings))


def library_problem(settings: Mapping[str, str]) -> str | None:
    """Return what pyjwt finds wrong with a secret or libpq with DATABASE_URL, or None.

    It imports both, so gunicorn's master asks a child process: a module imported before the fork is
    one that gevent cannot patch in the workers (ssl, through pyjwt), or that waits in a way no deadline
    can interrupt (psycopg).
    """
    from .errors import ConfigError
    from .signatures import secret_problem
    from .store import connection_options

    for name in SECRETS:
        if settings.get(name) and (problem := secret_problem(name, settings[name])):
            return problem
    try:
        if settings.get("DATABASE_URL"):
            connection_options(settings["DATABASE_URL"])
    except ConfigError as error:
        return str(error)
    return None


def worker_count(settings: Mapping[str, str]) -> int:
    """Return how many gunicorn workers to run: WEB_CONCURRENCY, but never more than the connection budget."""
    workers = int(settings.get("WEB_CONCURRENCY") or 2)
    if settings.get("DATABASE_URL"):
        workers = min(workers, connection_budget(settings))  # each worker holds at least one connection
    return workers


def connection_budget(settings: Mapping[str, str]) -> int:
    """Return the most database connections one dyno may hold."""
    return int(settings.get("DATABASE_MAX_CONNECTIONS") or DEFAULT_CONNECTION_BUDGET)


def connections_per_worker(settings: Mapping[str, str]) -> int:
    """Return one worker's share of the dyno's connection budget."""
    return max(1, connection_budget(settings) // worker_count(settings))
