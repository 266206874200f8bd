"""The DT Data Connector receiver as a Flask app: `create_app` builds it from settings, part by part."""

import os
from collections.abc import Mapping


def create_app(config: Mapping[str, str] | None = None):
    """Build the receiver from a mapping of settings, or from the environment."""
    # Imported here rather than above: gunicorn's master imports receiver.server and receiver.settings, and
    # must load neither psycopg nor pyjwt before it forks the workers (see receiver.settings.library_problem).
    from flask import Flask

    from . import commands, health, webhook
    from .components import build_components
    from .deliveries import DeliveriesFirst
    from .logs import configure_logging
    from .settings import read_settings

    configure_logging()
    app = Flask(__name__)
    app.config.from_mapping(read_settings(os.environ if config is None else config))
    # One byte over: Werkzeug cuts a chunked body silently at the limit, and the extra byte shows it was cut.
    app.config["MAX_CONTENT_LENGTH"] = webhook.MAX_BODY_BYTES + 1
    app.extensions["receiver"] = build_components(app.config)
    app.register_blueprint(webhook.blueprint)
    app.register_blueprint(health.blueprint)
    commands.init_app(app)
    app.wsgi_app = DeliveriesFirst(app)  # POST / without Flask's per-request work; the rest through Flask
    return app
