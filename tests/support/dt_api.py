"""A local stand-in for DT's REST API v2 and its OAuth2 token endpoint, as DT's own client `disruptive` expects them."""

import base64
import binascii
import collections
import copy
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt

from receiver.sample import SAMPLE_DATA

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ORGANIZATION_ID = "c0md3mm0c7bet3vico8g0"
HELP = "https://developer.disruptive-technologies.com/docs/error-codes#{}"
# The event types DT's client 1.7.3 knows; DT parses eventTypes as an enum and answers 400 to others.
EVENT_TYPES = (
    "touch", "temperature", "objectPresent", "humidity", "objectPresentCount", "touchCount", "waterPresent",
    "networkStatus", "batteryStatus", "labelsChanged", "connectionStatus", "ethernetStatus", "cellularStatus",
    "co2", "pressure", "motion", "deskOccupancy", "contact", "probeWireStatus",
)
RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.IGNORECASE)
ROUTES = [
    ("GET", re.compile(r"/v2/projects"), "_list_projects"),
    ("GET", re.compile(r"/v2/projects/([^/:]+)/devices"), "_list_devices"),
    ("GET", re.compile(r"/v2/projects/([^/:]+)/devices/([^/:]+)/events"), "_list_events"),
    ("GET", re.compile(r"/v2/projects/([^/:]+)/dataconnectors/([^/:]+):metrics"), "_metrics"),
]


PROJECT = "c0md3mm0c7bet3vico8g"  # the project of receiver.sample's events


class ApiError(Exception):
    """An answer other than 200, with DT's error body."""

    def __init__(self, status: int, message: str, body: dict | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body if body is not None else {"error": message, "code": status, "help": HELP.format(status)}


class DTApi:
    """Serves DT's token exchange, projects, devices, event history and connector metrics on loopback.

    One service account is known (`key_id`, `secret`, `email`); it sees the projects added with member=True.
    Pages follow DT (Google AIP-158): `pageSize` absent or 0 means `default_page_size`, above
    `max_page_size` is lowered to it, negative is a 400; `nextPageToken` is "" on the last page.
    """

    def __init__(self, key_id: str = "c0sa1key0000000000g0", secret: str = "service-account-secret-0123456789abcdef",
                 email: str = "backfill@c0md3mm0c7bet3vico8g.serviceaccount.d21s.com",
                 default_page_size: int = 100, max_page_size: int = 1000, token_lifetime: int = 3600):
        self.key_id, self.secret, self.email = key_id, secret, email
        self.default_page_size, self.max_page_size = default_page_size, max_page_size
        self.token_lifetime = token_lifetime
        self.available = True  # False: every request is answered 503, as during an outage
        self.requests = 0  # every request received, faults included
        self.api_requests = 0
        self.token_requests = 0
        self.tokens_issued = 0
        self.log: list[tuple[str, str, int]] = []  # (method, path with query, status) of every answer
        self._projects: dict[str, dict] = {}
        self._tokens: dict[str, float] = {}  # access token -> expiry
        self._faults = {"api": collections.deque(), "token": collections.deque()}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = base + "/v2"
        self.token_url = base + "/oauth2/token"
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()

    # -- loading data ---------------------------------------------------------------------------------

    def settings(self) -> dict:
        """Return the settings that point DT's client at this stand-in, with its service account."""
        return {"DT_SERVICE_ACCOUNT_KEY_ID": self.key_id, "DT_SERVICE_ACCOUNT_SECRET": self.secret,
                "DT_SERVICE_ACCOUNT_EMAIL": self.email, "DT_API_URL": self.url, "DT_AUTH_URL": self.token_url}

    def add_project(self, project_id: str, display_name: str | None = None, member: bool = True) -> None:
        """Add a project; one the service account is not a member of answers 403, as DT does."""
        self._projects[project_id] = {"displayName": display_name or project_id, "member": member,
                                      "devices": {}, "events": {}, "connectors": {}}

    def add_device(self, project_id: str, device_id: str, device_type: str = "temperature",
                   labels: dict | None = None, product_number: str = "102081") -> None:
        """Add a device to a project, with no events yet."""
        self._projects[project_id]["devices"][device_id] = {
            "name": f"projects/{project_id}/devices/{device_id}",
            "type": device_type,
            "labels": dict(labels or {"name": device_id}),
            "productNumber": product_number,
            "reported": {},
        }
        self._projects[project_id]["events"].setdefault(device_id, [])

    def add_events(self, project_id: str, device_id: str, events: list[dict]) -> None:
        """Add events shaped like DT's (eventId, targetName, eventType, data, timestamp) to a device's history."""
        stored = self._projects[project_id]["events"][device_id]
        for event in events:
            stored.append((timestamp_ns(event["timestamp"]), copy.deepcopy(event)))
        stored.sort(key=lambda pair: -pair[0])  # newest first

    def add_data_connector(self, project_id: str, connector_id: str, success_count: int = 0,
                           error_count: int = 0, latency99p: str = "0s") -> None:
        """Add a Data Connector whose `:metrics` answer these counts of the last 3 hours."""
        self._projects[project_id]["connectors"][connector_id] = {
            "successCount": success_count, "errorCount": error_count, "latency99p": latency99p}

    # -- faults ---------------------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, retry_after: int | None = None, endpoint: str = "api") -> None:
        """Answer the next `count` requests to `endpoint` ("api" or "token") with this status (and Retry-After)."""
        with self._lock:
            self._faults[endpoint].extend([("status", status, retry_after)] * count)

    def hang_next(self, count: int, seconds: float = 30.0, endpoint: str = "api") -> None:
        """Hold the next `count` requests to `endpoint` for `seconds` before answering."""
        with self._lock:
            self._faults[endpoint].extend([("hang", seconds, None)] * count)

    def answered(self, status: int) -> int:
        """Return how many requests were answered with this status."""
        return sum(1 for _, _, answered in self.log if answered == status)

    def close(self) -> None:
        """Stop serving: the port then refuses connections."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    # -- the protocol ---------------------------------------------------------------------------------

    def _answer(self, method: str, target: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        endpoint = "token" if parts.path == "/oauth2/token" else "api"
        with self._lock:
            self.requests += 1
            if endpoint == "token":
                self.token_requests += 1
            else:
                self.api_requests += 1
            fault = self._faults[endpoint].popleft() if self._faults[endpoint] else None
        if not self.available:
            raise ApiError(503, "service unavailable")
        if fault and fault[0] == "hang":
            self._closing.wait(fault[1])
        elif fault:
            _, status, retry_after = fault
            raise ApiError(status, "too many requests" if status == 429 else "service unavailable",
                           retry_after=retry_after)
        if endpoint == "token":
            if method != "POST":
                raise ApiError(405, "method not allowed")
            return self._exchange(headers, body)
        if not parts.path.startswith("/v2/"):
            return 404, {"Content-Type": "text/html"}, b"<html><body><h1>404 Not Found</h1></body></html>"
        self._authenticate(headers.get("Authorization", ""))
        for route_method, pattern, name in ROUTES:
            match = pattern.fullmatch(parts.path)
            if match:
                if method != route_method:
                    raise ApiError(405, "method not allowed")
                return 200, {}, json.dumps(getattr(self, name)(query, *match.groups())).encode()
        raise ApiError(404, "not found")

    def _exchange(self, headers, body: bytes) -> tuple[int, dict, bytes]:
        if not headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            raise ApiError(400, "invalid_request", {"error": "invalid_request",
                                                     "error_description": "expected a form-encoded body"})
        form = parse_qs(body.decode("utf-8", "replace"))
        if form.get("grant_type") != [GRANT_TYPE]:
            raise ApiError(400, "unsupported_grant_type", {"error": "unsupported_grant_type",
                                                           "error_description": "grant_type must be " + GRANT_TYPE})
        assertion = (form.get("assertion") or [""])[0]
        try:
            header = jwt.get_unverified_header(assertion)
            if header.get("alg") != "HS256" or header.get("kid") != self.key_id:
                raise jwt.InvalidTokenError("unknown key")
            claims = jwt.decode(assertion, self.secret, algorithms=["HS256"], audience=self.token_url,
                                issuer=self.email, options={"require": ["iat", "exp", "aud", "iss"]})
            if claims["exp"] - claims["iat"] > 3600 or claims["iat"] > time.time() + 60:
                raise jwt.InvalidTokenError("timing")
        except jwt.InvalidTokenError:
            raise ApiError(400, "invalid_grant", {"error": "invalid_grant",
                                                  "error_description": "the assertion could not be verified"}) from None
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + self.token_lifetime
            self.tokens_issued += 1
        answer = {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime}
        return 200, {"Cache-Control": "no-store"}, json.dumps(answer).encode()

    def _authenticate(self, authorization: str) -> None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and self._tokens.get(credentials, 0) > time.time():
            return
        if scheme.lower() == "basic":  # DT also takes the key id and secret directly
            try:
                key_id, _, secret = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                key_id = secret = ""
            if hmac.compare_digest(f"{key_id}:{secret}", f"{self.key_id}:{self.secret}"):
                return
        raise ApiError(401, "unauthenticated")

    def _project(self, project_id: str) -> dict:
        project = self._projects.get(project_id)
        if project is None:
            raise ApiError(404, "project not found")
        if not project["member"]:
            raise ApiError(403, "forbidden")
        return project

    def _list_projects(self, query) -> dict:
        projects = [{
            "name": f"projects/{project_id}",
            "displayName": project["displayName"],
            "organization": f"organizations/{ORGANIZATION_ID}",
            "organizationDisplayName": "Stand-in organization",
            "sensorCount": sum(1 for d in project["devices"].values() if d["type"] != "ccon"),
            "cloudConnectorCount": sum(1 for d in project["devices"].values() if d["type"] == "ccon"),
            "inventory": False,
        } for project_id, project in self._projects.items() if project["member"]]
        return self._page(query, "projects", projects)

    def _list_devices(self, query, project_id) -> dict:
        devices = list(self._project(project_id)["devices"].values())
        wanted = param(query, "device_ids", "deviceIds")
        if wanted:
            devices = [device for device in devices if device["name"].rsplit("/", 1)[1] in wanted]
        types = param(query, "device_types", "deviceTypes")
        if types:
            devices = [device for device in devices if device["type"] in types]
        return self._page(query, "devices", copy.deepcopy(devices))

    def _list_events(self, query, project_id, device_id) -> dict:
        history = self._project(project_id)["events"].get(device_id)
        if history is None:
            raise ApiError(404, "device not found")
        types = param(query, "eventTypes", "event_types")
        unknown = [name for name in types if name not in EVENT_TYPES]
        if unknown:
            raise ApiError(400, f'invalid value for enum type: "{unknown[0]}"')
        now = time.time_ns()
        start = self._time(query, "startTime", "start_time", now - 24 * 3600 * 10**9)
        end = self._time(query, "endTime", "end_time", now)
        if start > end:
            raise ApiError(400, "startTime must be before endTime")
        events = [event for moment, event in history
                  if start <= moment < end and (not types or event["eventType"] in types)]
        return self._page(query, "events", events)

    def _metrics(self, query, project_id, connector_id) -> dict:
        metrics = self._project(project_id)["connectors"].get(connector_id)
        if metrics is None:
            raise ApiError(404, "data connector not found")
        return {"metrics": dict(metrics)}

    def _page(self, query, key: str, items: list) -> dict:
        size_text = (param(query, "pageSize", "page_size") or ["0"])[0]
        token = (param(query, "pageToken", "page_token") or [""])[0]
        try:
            size = int(size_text)
            offset = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ApiError(400, "invalid page size or token") from None
        if size < 0 or offset < 0:
            raise ApiError(400, "invalid page size or token")
        size = min(size or self.default_page_size, self.max_page_size)
        page = items[offset:offset + size]
        more = offset + size < len(items)
        next_token = base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else ""
        return {key: page, "nextPageToken": next_token}

    @staticmethod
    def _time(query, name: str, alias: str, default: int) -> int:
        values = param(query, name, alias)
        if not values:
            return default
        try:
            return timestamp_ns(values[0])
        except ValueError:
            raise ApiError(400, f"invalid {name}: {values[0]}") from None

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def _serve(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    status, headers, payload = stand_in._answer(method, self.path, self.headers, body)
                except ApiError as error:
                    status, headers, payload = error.status, {}, json.dumps(error.body).encode()
                    if error.retry_after is not None:
                        headers["Retry-After"] = str(error.retry_after)
                with stand_in._lock:
                    stand_in.log.append((method, self.path, status))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hung request

            def log_message(self, *args):
                pass

        return Handler


def param(query: dict, name: str, alias: str) -> list[str]:
    """Return a query parameter's values under its camelCase or snake_case name (DT's gateway takes both)."""
    return query.get(name, []) + query.get(alias, [])


def timestamp_ns(text: str) -> int:
    """Return an RFC 3339 timestamp (up to nanoseconds) as nanoseconds since the epoch."""
    match = RFC3339.fullmatch(text)
    if not match:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    whole, fraction, zone = match.groups()
    moment = datetime.fromisoformat(whole + ("+00:00" if zone.upper() == "Z" else zone))
    return int(moment.timestamp()) * 10**9 + int((fraction or "").ljust(9, "0"))


def rfc3339_ns(moment: datetime, nanoseconds: int = 0) -> str:
    """Return an aware datetime as DT writes timestamps: UTC, nine fractional digits, Z."""
    moment = moment.astimezone(timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond * 1000 + nanoseconds:09d}Z"


def history_event(project_id: str, device_id: str, event_type: str = "temperature",
                  when: datetime | None = None, event_id: str | None = None, data: dict | None = None) -> dict:
    """Return an event as DT's event history holds it: the `event` object of a pushed body, no labels or metadata."""
    when = when or datetime.now(timezone.utc)
    timestamp = rfc3339_ns(when, nanoseconds=123)
    if data is None:
        make = SAMPLE_DATA.get(event_type, lambda now: {"updateTime": now})
        data = {event_type: make(timestamp)}
    return {
        "eventId": event_id or uuid.uuid4().hex[:20],
        "targetName": f"projects/{project_id}/devices/{device_id}",
        "eventType": event_type,
        "data": data,
        "timestamp": timestamp,
    }


def hours_ago(hours: float) -> datetime:
    """Return the aware time this many hours before now."""
    return datetime.now(timezone.utc) - timedelta(hours=hours)
