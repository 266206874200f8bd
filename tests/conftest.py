"""Fixtures: the app built from a mapping, its log lines, and real servers."""

import io
import itertools
import json
import logging
import re

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql
from support.dt_api import PROJECT, DTApi
from support.issuer import Issuer
from support.postgres import PostgresServer, programs_missing, server_programs
from support.server import Server
from support.signing import SECRET

DATABASE_NUMBERS = itertools.count()

# No example database on disk; `--deep` explores far more inputs.
settings.register_profile("quick", database=None, print_blob=True, max_examples=200, deadline=None)
settings.register_profile("deep", database=None, print_blob=True, max_examples=5000, deadline=None)

from receiver import create_app
from receiver.logs import EVENT_LINES, JsonLineFormatter, configure_logging

configure_logging()  # as a worker does when it loads the app: before any test adds a handler of its own


@pytest.fixture
def make_app():
    """Return a builder of apps from settings; the signature secret is set unless overridden."""

    apps = []

    def build(**settings):
        app = create_app({"DT_SIGNATURE_SECRET": SECRET, **settings})
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:  # stop each pool and its schema check, as a worker does on exit
        if app.extensions["receiver"].store is not None:
            app.extensions["receiver"].store.close()


@pytest.fixture
def app(make_app):
    """Return a log-only receiver that verifies the tests' secret."""
    return make_app()


@pytest.fixture
def client(app):
    """Return a test client of the log-only receiver."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """Return a runner of the log-only receiver's commands."""
    return app.test_cli_runner()


@pytest.fixture
def log_lines():
    """Return a function listing the receiver's log lines, parsed, since the test began: events' lines among them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("receiver")
    logger.addHandler(handler)
    stdout, EVENT_LINES.stream = EVENT_LINES.stream, stream
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    EVENT_LINES.stream = stdout
    logger.removeHandler(handler)


@pytest.fixture
def start_server(tmp_path):
    """Return a starter of Procfile servers; every one started is stopped after the test."""
    servers = []

    def start(wait=True, **settings):
        server = Server(tmp_path / f"server-{len(servers)}.log", **settings)
        servers.append(server)
        return server.start(wait)

    yield start
    for server in servers:
        server.stop(seconds=30)


@pytest.fixture
def server(start_server):
    """Return a real Procfile server with the test secret."""
    return start_server(DT_SIGNATURE_SECRET=SECRET)


@pytest.fixture(scope="session")
def postgres():
    """Return a running PostgreSQL server of the tests' own; without server programs, fail (never skip)."""
    programs = server_programs()
    if programs is None:
        pytest.fail(programs_missing(), pytrace=False)
    # The tests crash PostgreSQL's processes, never the machine: what a commit wrote survives without fsync.
    server = PostgresServer(programs, fsync=False)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def database_url(postgres, request):
    """Return the URL of a new, empty database for this test."""
    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[:50] + f"_{next(DATABASE_NUMBERS)}"
    with psycopg.connect(postgres.url(), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return postgres.url(name)


@pytest.fixture
def dt_api():
    """Return a local stand-in for DT's REST API and token endpoint, holding one project the account is a member of."""
    stand_in = DTApi()
    stand_in.add_project(PROJECT)
    yield stand_in
    stand_in.close()


@pytest.fixture
def issuer():
    """Return a local stand-in for DT's identity service, with one published key, `k1`."""
    stand_in = Issuer()
    stand_in.add_key("k1")
    yield stand_in
    stand_in.close()


def pytest_addoption(parser):
    """Add --deep, for a long run of the generated-input tests."""
    parser.addoption("--deep", action="store_true", help="run 5000 examples per property instead of 200")


def pytest_configure(config):
    """Choose the hypothesis profile; silence pyjwt's key-length warnings (tests use odd keys on purpose)."""
    settings.load_profile("deep" if config.getoption("deep") else "quick")
    config.addinivalue_line("filterwarnings", "ignore::jwt.warnings.InsecureKeyLengthWarning")
