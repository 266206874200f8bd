"""Read what DT's REST API keeps (projects, devices, event history, connector metrics) through DT's own client."""

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import disruptive
import requests
from disruptive import errors as dterrors
from disruptive.authentication import ServiceAccountAuth
from disruptive.requests import DTRequest

DEFAULT_API_URL = "https://api.disruptive-technologies.com/v2"
DEFAULT_AUTH_URL = "https://identity.disruptive-technologies.com/oauth2/token"
CREDENTIALS = ("DT_SERVICE_ACCOUNT_KEY_ID", "DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL")

# The client sends a request up to 1 + REQUEST_ATTEMPTS times. Between tries it sleeps 0, 1, 4 s after a
# 5xx or a dropped connection (9, 10, 13 s after a 504) and Retry-After seconds after a 429; each try may
# wait REQUEST_TIMEOUT_SECONDS (DT's client defaults to 3). So one request gives up within a minute:
# after 4 x 7 + 5 = 33 s if DT hangs, 4 x 7 + 32 = 60 s if each try ends in a slow 504.
REQUEST_TIMEOUT_SECONDS = 7
REQUEST_ATTEMPTS = 3
EVENTS_PAGE_SIZE = 1000  # the largest page DT serves: fewest round trips per device
ID = re.compile(r"[A-Za-z0-9_-]+")


class ApiError(Exception):
    """DT's API cannot be used as configured or right now; the message is one line saying what to fix."""


@dataclass(frozen=True)
class Account:
    """Where DT's API and token endpoint are, and the service account that signs in to them."""

    api_url: str
    auth_url: str
    auth: ServiceAccountAuth = field(repr=False, compare=False)  # its own repr prints the secret
    request_timeout: float = REQUEST_TIMEOUT_SECONDS
    request_attempts: int = REQUEST_ATTEMPTS


def load_account(settings: Mapping[str, Any], request_timeout: float = REQUEST_TIMEOUT_SECONDS,
                 request_attempts: int = REQUEST_ATTEMPTS) -> Account:
    """Return the service account the settings name, or raise ApiError naming what is missing."""
    values = {name: str(settings.get(name) or "").strip() for name in CREDENTIALS}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ApiError(f"set {' and '.join(missing)}: the key of a DT service account with access to "
                           "the projects (DT Studio, API Integrations > Service Accounts)")
    api_url = str(settings.get("DT_API_URL") or DEFAULT_API_URL).strip().rstrip("/")
    auth_url = str(settings.get("DT_AUTH_URL") or DEFAULT_AUTH_URL).strip()
    for name, url in (("DT_API_URL", api_url), ("DT_AUTH_URL", auth_url)):
        if not re.match(r"https?://[^/\s]+", url):
            raise ApiError(f"{name} must be an http(s) URL, not {url!r}")
    auth = disruptive.Auth.service_account(*values.values())
    auth.token_endpoint = auth_url  # also the `aud` claim DT checks in the assertion
    return Account(api_url, auth_url, auth, request_timeout, request_attempts)


def list_project_ids(account: Account) -> list[str]:
    """Return the ids of every project the service account can see."""
    with _signed_in(account, "the list of projects"):
        projects = disruptive.Project.list_projects(**_options(account))
    return [project.project_id for project in projects]


def list_device_ids(account: Account, project_id: str, device_ids: Iterable[str] | None = None) -> list[str]:
    """Return the ids of a project's devices, or of those among `device_ids` that are in it."""
    _check_id("project", project_id)
    wanted = None if device_ids is None else {_check_id("device", device) for device in device_ids}
    if wanted == set():
        return []
    with _signed_in(account, f"project {project_id}"):
        devices = disruptive.Device.list_devices(
            project_id, device_ids=None if wanted is None else sorted(wanted), **_options(account))
    return [device.device_id for device in devices]


def iter_events(account: Account, project_id: str, device_id: str, start: datetime, end: datetime,
                event_types: Iterable[str] | None = None) -> Iterator[dict]:
    """Yield a device's events from `start` to `end` (aware times) as DT sent them, page by page."""
    _check_id("project", project_id)
    _check_id("device", device_id)
    params: dict[str, Any] = {"startTime": _rfc3339(start), "endTime": _rfc3339(end), "pageSize": EVENTS_PAGE_SIZE}
    if event_types:
        params["eventTypes"] = list(event_types)
    # Raw pages, not EventHistory.list_events: that holds the whole history in memory, cannot set the
    # page size, and rewrites events through its classes (labelsChanged gains data.updateTime).
    return _pages(account, f"/projects/{project_id}/devices/{device_id}/events", params,
                  f"device {device_id} in project {project_id}")


def fetch_metrics(account: Account, project_id: str, connector_id: str) -> dict:
    """Return a Data Connector's delivery counters of the last 3 hours: successCount, errorCount, latency99p."""
    _check_id("project", project_id)
    _check_id("Data Connector", connector_id)
    with _signed_in(account, f"Data Connector {connector_id} in project {project_id}"):
        metric = disruptive.DataConnector.get_metrics(connector_id, project_id, **_options(account))
        return dict(metric.raw["metrics"])


def _pages(account: Account, url: str, params: dict, what: str) -> Iterator[dict]:
    while True:
        with _signed_in(account, what):
            page = DTRequest.get(url, params=dict(params), **_options(account))
            events, token = page["events"], page.get("nextPageToken") or ""
        yield from events
        if not token:
            return
        params["pageToken"] = token


def _options(account: Account) -> dict:
    """Return the client's per-call settings, so no call depends on its package-wide ones."""
    return {"base_url": account.api_url, "auth": account.auth,
            "request_timeout": account.request_timeout, "request_attempts": account.request_attempts}


@contextmanager
def _signed_in(account: Account, what: str):
    """Hold a fresh access token, then run the block; turn every failure of the client into ApiError."""
    # The token exchange reads only the package-wide timeout and attempts; set them to this account's.
    disruptive.request_timeout = account.request_timeout
    disruptive.request_attempts = account.request_attempts
    with _translated(account, "the service account's access token", token_endpoint=True):
        account.auth.get_token()  # exchanges the assertion only when the last token has expired
    with _translated(account, what, token_endpoint=False):
        yield


@contextmanager
def _translated(account: Account, what: str, token_endpoint: bool):
    started = time.monotonic()
    where, variable = ((f"DT's token endpoint {account.auth_url}", "DT_AUTH_URL") if token_endpoint
                       else (f"DT's API {account.api_url}", "DT_API_URL"))
    try:
        yield
    except dterrors.DTApiError as error:
        seconds = time.monotonic() - started
        raise ApiError(_explain(account, error, what, where, variable, token_endpoint, seconds)) from None
    except requests.JSONDecodeError:  # an answer that is not JSON at all: not DT's API
        raise ApiError(f"{where} did not answer like DT's REST API about {what}: check {variable}") from None
    except requests.RequestException:  # what the client does not retry: a URL it cannot even send to
        raise ApiError(f"cannot send a request to {where}: check {variable}") from None
    except (ValueError, KeyError, TypeError):  # a body that is not DT's JSON, or not of DT's shape
        raise ApiError(f"{where} did not answer like DT's REST API about {what}: check {variable}") from None


def _explain(account: Account, error: dterrors.DTApiError, what: str, where: str, variable: str,
             token_endpoint: bool, seconds: float) -> str:
    gave_up = f"gave up after {account.request_attempts + 1} tries in {seconds:.0f} s"
    if isinstance(error, dterrors.Unauthorized):
        if token_endpoint:
            return ("DT refused the service account's credentials: check DT_SERVICE_ACCOUNT_KEY_ID, "
                    "DT_SERVICE_ACCOUNT_SECRET and DT_SERVICE_ACCOUNT_EMAIL")
        return (f"{where} refused the access token from {account.auth_url}: "
                "check that DT_API_URL and DT_AUTH_URL are one DT environment")
    if isinstance(error, dterrors.TooManyRequests):
        return f"{where} kept answering 429 Too Many Requests: gave up after {seconds:.0f} s; run this again later"
    if isinstance(error, dterrors.ServerError):
        return f"{where} kept failing with server errors (5xx): {gave_up}; run this again later"
    if isinstance(error, dterrors.ReadTimeout):
        return f"{where} did not answer within {account.request_timeout:g} s: {gave_up}"
    if isinstance(error, dterrors.ConnectionError):
        return f"cannot reach {where}: {gave_up}; check {variable} and the network"
    if token_endpoint:
        return f"{where} did not exchange the credentials ({_reason(error)}): check {variable}"
    if isinstance(error, (dterrors.Forbidden, dterrors.NotFound)):
        return (f"DT does not know {what}, or the service account has no access to it: "
                "check the ID and the account's membership of the project")
    if isinstance(error, dterrors.BadRequest):
        return f"{where} rejected the request about {what}: {_reason(error)}"
    return f"{where} answered unexpectedly about {what}: {_reason(error)}"


def _reason(error: dterrors.DTApiError) -> str:
    """Return DT's own short error text, on one line."""
    detail = error.args[0] if error.args else ""
    if isinstance(detail, dict):
        detail = detail.get("error_description") or detail.get("error") or detail
    return " ".join(str(detail).split())[:200] or type(error).__name__


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value) or value == "-":
        raise ApiError(f"{value!r} is not a DT {kind} ID")
    return value


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("event history times must be aware datetimes")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
