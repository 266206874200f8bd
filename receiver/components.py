"""What every delivery uses, built once per app from its settings: why it cannot work, its verifier, its store."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from flask import current_app

from .keys import SigningKeys
from .settings import SECRETS, connections_per_worker, library_problem, server_problem, stale_after
from .signatures import DT_ISSUER, Verifier
from .store import EventStore


@dataclass(frozen=True)
class Components:
    """The receiver's parts; with a problem, neither a verifier nor a store (the server refuses to start)."""

    problem: str | None
    verifier: Verifier | None
    store: EventStore | None
    stale_after: timedelta | None = None  # with a store: how long /health lets pass without a pushed event


def build_components(settings: Mapping[str, str]) -> Components:
    """Check the settings and build the parts they configure."""
    problem = server_problem(settings) or library_problem(settings)
    if problem:
        return Components(problem, None, None)
    return Components(None, build_verifier(settings), build_store(settings), stale_after(settings))


def build_verifier(settings: Mapping[str, str]) -> Verifier:
    """Return a verifier for the signatures the settings require."""
    names = SECRETS if settings.get("DT_SIGNATURE_SECRET") else ()
    organization_id = settings.get("DT_ORGANIZATION_ID")
    return Verifier(
        secrets=tuple(settings[name] for name in names if settings.get(name)),
        organization_id=organization_id or None,
        keys=SigningKeys(settings.get("DT_ISSUER") or DT_ISSUER) if organization_id else None,
    )


def build_store(settings: Mapping[str, str]) -> EventStore | None:
    """Return the Postgres store when DATABASE_URL is set, with this worker's share of the connections."""
    database_url = settings.get("DATABASE_URL")
    return EventStore(database_url, connections_per_worker(settings)) if database_url else None


def components() -> Components:
    """Return the parts of the app handling the current request or command."""
    return current_app.extensions["receiver"]
