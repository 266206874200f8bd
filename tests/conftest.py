"""Fixtures: the app built from a mapping, its log lines, and real servers."""

import io
import json
import logging
import os

import pytest

from helpers import SECRET, Server

# app.py builds its module-level `app` from the environment when it is imported.
os.environ.setdefault("DT_SIGNATURE_SECRET", SECRET)

from app import JsonLineFormatter, create_app  # noqa: E402


@pytest.fixture
def make_app():
    """Return a builder of apps from settings; the signature secret is set unless overridden."""

    def build(**settings):
        app = create_app({"DT_SIGNATURE_SECRET": SECRET, **settings})
        app.config["TESTING"] = True
        return app

    return build


@pytest.fixture
def client(make_app):
    """Return a test client of a log-only receiver."""
    return make_app().test_client()


@pytest.fixture
def log_lines():
    """Return a function listing the receiver's log lines, parsed, since the test began."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger("receiver")
    logger.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
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
