"""No database fault tells anyone where the database is: no host, port, user or database name in a 503 or a log line."""

import logging
import time

import psycopg
import pytest
from support.signing import SECRET, signed_delivery

from receiver.logs import database_fault, library_message

HOST = "zqx-host-name"
USER = "zqx_user_name"
DATABASE = "zqx_database_name"


def distinctive_url(postgres, user: str = USER) -> str:
    """Return a URL of the tests' server under a distinctive host name (reached at 127.0.0.1), user and database."""
    return (f"postgresql://{user}@{HOST}:{postgres.port}/{DATABASE}"
            "?hostaddr=127.0.0.1&sslmode=disable")


def names_in(text: str, port: int) -> list[str]:
    """Return which of the distinctive names (and the port) a text holds."""
    return [name for name in (HOST, USER, DATABASE, str(port)) if name in text]


def wait_for_pool_lines(server, seconds: float = 10) -> list[dict]:
    """Return the pool's own log lines, once it has written one."""
    deadline = time.monotonic() + seconds
    while not (lines := [line for line in server.log_lines() if line["msg"].startswith("psycopg.pool")]):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.2)
    return lines


@pytest.mark.parametrize("user, reason", [
    (USER, "database unavailable: OperationalError"),  # a role that does not exist: a fault with no fixed form
    ("postgres", "database unavailable: the database DATABASE_URL names does not exist"),
], ids=["unknown fault", "known fault"])
def test_database_faults_name_no_host_port_user_or_database(start_server, postgres, user, reason):
    """The 503, the receiver's lines and the pool's own warnings say what failed, never where the database is."""
    server = start_server(DT_SIGNATURE_SECRET=SECRET, DATABASE_URL=distinctive_url(postgres, user))
    answers = [server.post(*signed_delivery()) for _ in range(2)]
    pool_lines = wait_for_pool_lines(server)
    assert answers == [(503, reason + "\n")] * 2
    assert any(line["msg"].startswith("psycopg.pool: error connecting") for line in pool_lines)
    json_lines = [line for line in server.output().splitlines() if line.startswith("{")]
    assert [line for line in json_lines if names_in(line, postgres.port)] == []
    assert HOST not in server.output() and USER not in server.output()


def test_library_text_of_a_real_libpq_error_names_no_server(postgres):
    """A library line that quotes libpq's message itself (not the exception) loses its host, port, user and database."""
    with pytest.raises(psycopg.OperationalError) as failed:
        psycopg.connect(distinctive_url(postgres), connect_timeout=3)
    assert names_in(str(failed.value), postgres.port)  # libpq's own message names them all
    assert database_fault(failed.value) == "OperationalError"
    record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "error connecting: %s: %s",
                               (failed.value, str(failed.value)), None)
    shown = library_message(record)
    assert shown == ("psycopg.pool: error connecting: OperationalError: connection failed: "
                             "connection to the database server failed: FATAL:  role ... does not exist")
    assert names_in(shown, postgres.port) == []
