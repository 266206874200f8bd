"""GET /health: whether the receiver can do its job right now, for an uptime monitor."""

import re

import gevent
from flask import Blueprint, Response, jsonify

from .components import components
from .webhook import POOL_MARGIN_SECONDS

# An uptime monitor's check answers within this.
HEALTH_SECONDS = 3.0

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
def health() -> Response:
    """Answer 200 if a delivery would be accepted now, else 503 naming each problem (and no setting)."""
    with gevent.Timeout(HEALTH_SECONDS, False):  # an unanswered check is a failed one
        problems = current_problems()
        return jsonify(ok=not problems, problems=problems), 503 if problems else 200
    return jsonify(ok=False, problems={"health": f"checks took over {HEALTH_SECONDS:g} s"}), 503


def current_problems() -> dict[str, str]:
    """Return what stops deliveries now: the configuration, the database, DT's signing keys."""
    parts = components()
    if parts.problem:
        return {"configuration": "the receiver is not configured"}
    problems = {}
    if parts.store is not None and (fault := parts.store.check(HEALTH_SECONDS - POOL_MARGIN_SECONDS)):
        # The fixed forms may name the configured database; an open endpoint shows no setting.
        problems["database"] = re.sub(r'database "[^"]*"', "the database", fault)
    if parts.verifier.keys is not None and not parts.verifier.keys.held():
        problems["signing_keys"] = "DT's signing keys could not be fetched"
    return problems
