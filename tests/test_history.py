"""DT's REST API through receiver.rest_api, against the local stand-in for DT's API and token endpoint."""

import socket
import time
from datetime import datetime, timedelta, timezone

import pytest
from disruptive import errors as dterrors
from support.dt_api import PROJECT, DTApi, history_event, hours_ago

from receiver import rest_api
from receiver.rest_api import ApiError


@pytest.fixture
def settings(dt_api):
    """Return the settings that point receiver.rest_api at the stand-in with its service account."""
    return dt_api.settings()


@pytest.fixture
def account(settings):
    """Return an account with a short timeout and two retries, so that giving up takes about a second."""
    return rest_api.load_account(settings, request_timeout=2, request_attempts=2)


def closed_port_url(path: str) -> str:
    """Return a loopback URL on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def failure(call, dt_api=None) -> str:
    """Run a call that must fail; return its ApiError message after checking it is one line without secrets."""
    with pytest.raises(ApiError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.__cause__ is None  # no chained traceback of the client's
    assert caught.value.__context__ is None or caught.value.__suppress_context__
    if dt_api is not None:
        assert dt_api.secret not in message
        assert all(token not in message for token in dt_api._tokens)
    return message


def event_requests(dt_api) -> list[str]:
    """Return the paths with query of the event-history requests the stand-in answered."""
    return [path for method, path, _ in dt_api.log if "/events" in path]


# -- listing -------------------------------------------------------------------------------------------

def test_lists_every_project_across_pages(settings):
    """All visible projects come back when DT pages them four at a time; projects without membership do not."""
    dt_api = DTApi(default_page_size=4)
    settings.update(DT_API_URL=dt_api.url, DT_AUTH_URL=dt_api.token_url)
    names = [f"c0proj{number:02d}" for number in range(25)]
    for name in names:
        dt_api.add_project(name)
    dt_api.add_project("c0hidden", member=False)
    try:
        assert rest_api.list_project_ids(rest_api.load_account(settings)) == names
        assert sum(1 for _, path, _ in dt_api.log if path.startswith("/v2/projects")) == 7
    finally:
        dt_api.close()


def test_lists_every_device_across_pages(dt_api, account):
    """All 23 devices of a project come back over five pages of five."""
    dt_api.default_page_size = 5
    devices = [f"emu{number:020d}" for number in range(23)]
    for device in devices:
        dt_api.add_device(PROJECT, device, "ccon" if device.endswith("7") else "temperature")
    assert rest_api.list_device_ids(account, PROJECT) == devices
    assert sum(1 for _, path, _ in dt_api.log if "/devices" in path) == 5


def test_narrows_devices_to_the_ids_given(dt_api, account):
    """Asked for two devices of the project and one it does not hold, the two come back."""
    for device in ("d1", "d2", "d3", "d4"):
        dt_api.add_device(PROJECT, device)
    assert rest_api.list_device_ids(account, PROJECT, ["d3", "elsewhere", "d1"]) == ["d1", "d3"]
    assert "device_ids=d1&device_ids=d3&device_ids=elsewhere" in dt_api.log[-1][1]


# -- event history -------------------------------------------------------------------------------------

def test_yields_every_event_across_pages_exactly_as_dt_sent_it(dt_api, account):
    """50 events over 8 pages of 7 come back once each, byte-for-byte the JSON DT holds, nanoseconds included."""
    dt_api.max_page_size = 7
    dt_api.add_device(PROJECT, "d1")
    now = datetime.now(timezone.utc)
    events = [history_event(PROJECT, "d1", "temperature", now - timedelta(minutes=10 * n)) for n in range(47)]
    events.append(history_event(PROJECT, "d1", "labelsChanged", now - timedelta(hours=9),
                                data={"added": {"room": "2"}, "modified": {}, "removed": ["floor"]}))
    events.append(history_event(PROJECT, "d1", "touch", now - timedelta(hours=9, minutes=1)))
    events.append({**history_event(PROJECT, "d1", "futureType", now - timedelta(hours=9, minutes=2),
                                   data={"futureType": {"anything": [1, 2.5, None]}}), "futureField": True})
    dt_api.add_events(PROJECT, "d1", events)

    fetched = list(rest_api.iter_events(account, PROJECT, "d1", now - timedelta(hours=10), now + timedelta(seconds=1)))

    assert sorted(fetched, key=lambda event: event["eventId"]) == sorted(events, key=lambda event: event["eventId"])
    assert all(event["timestamp"].endswith("123Z") for event in fetched)  # the nanoseconds DT wrote
    assert len(event_requests(dt_api)) == 8
    assert all("pageSize=1000" in path for path in event_requests(dt_api))


def test_fetches_pages_only_as_they_are_read(dt_api, account):
    """The first event is in hand after one page request: a device's history is never held whole."""
    dt_api.max_page_size = 10
    dt_api.add_device(PROJECT, "d1")
    dt_api.add_events(PROJECT, "d1", [history_event(PROJECT, "d1", when=hours_ago(n / 60)) for n in range(35)])
    events = rest_api.iter_events(account, PROJECT, "d1", hours_ago(1), hours_ago(0))
    assert event_requests(dt_api) == []
    next(events)
    assert len(event_requests(dt_api)) == 1
    assert len(list(events)) == 34
    assert len(event_requests(dt_api)) == 4


def test_keeps_to_the_event_types_asked_for(dt_api, account):
    """Asked for touch and networkStatus, only those come back, and DT is asked for just them."""
    dt_api.add_device(PROJECT, "d1")
    dt_api.add_events(PROJECT, "d1", [history_event(PROJECT, "d1", kind, hours_ago(n))
                                      for n in range(1, 10) for kind in ("temperature", "touch", "networkStatus")])
    fetched = list(rest_api.iter_events(account, PROJECT, "d1", hours_ago(24), hours_ago(0), ["touch", "networkStatus"]))
    assert sorted(event["eventType"] for event in fetched) == ["networkStatus"] * 9 + ["touch"] * 9
    assert "eventTypes=touch&eventTypes=networkStatus" in event_requests(dt_api)[0]


def test_keeps_to_the_time_window(dt_api, account):
    """Of 60 hourly events, those between 36 and 12 hours ago come back, and no others."""
    now = datetime.now(timezone.utc)
    dt_api.add_device(PROJECT, "d1")
    events = [history_event(PROJECT, "d1", when=now - timedelta(hours=age + 0.5)) for age in range(60)]
    dt_api.add_events(PROJECT, "d1", events)
    fetched = list(rest_api.iter_events(account, PROJECT, "d1", now - timedelta(hours=36), now - timedelta(hours=12)))
    assert {event["eventId"] for event in fetched} == {event["eventId"] for event in events[12:36]}


def test_refuses_naive_times_before_asking_dt(dt_api, account):
    """A time without a zone is a ValueError, raised before any request."""
    with pytest.raises(ValueError, match="aware"):
        rest_api.iter_events(account, PROJECT, "d1", datetime.now() - timedelta(hours=1), datetime.now())
    assert dt_api.requests == 0


def test_names_an_event_type_dt_rejects(dt_api, account):
    """A misspelt event type comes back as DT's own reason, naming it."""
    dt_api.add_device(PROJECT, "d1")
    message = failure(lambda: list(rest_api.iter_events(account, PROJECT, "d1", hours_ago(2), hours_ago(0), ["tuch"])),
                      dt_api)
    assert "rejected" in message and '"tuch"' in message


# -- retries and giving up -------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["api", "token"])
@pytest.mark.parametrize("status", [429, 503])
def test_retries_429_and_503_then_succeeds(dt_api, account, status, endpoint):
    """Two 429s (Retry-After 0) or one 503 from the API or the token endpoint are retried through."""
    count = 2 if status == 429 else 1  # a second 503 would cost the client's one-second back-off
    dt_api.fail_next(count, status, retry_after=0 if status == 429 else None, endpoint=endpoint)
    assert rest_api.list_project_ids(account) == [PROJECT]
    assert dt_api.answered(status) == count
    assert dt_api.answered(200) == 2  # the token, then the projects


def test_retries_a_failing_page_without_losing_or_repeating_events(dt_api, account):
    """A 503 on the third page of events is retried, and every event still comes back once."""
    dt_api.max_page_size = 5
    dt_api.add_device(PROJECT, "d1")
    events = [history_event(PROJECT, "d1", when=hours_ago(n / 10)) for n in range(23)]
    dt_api.add_events(PROJECT, "d1", events)
    fetched = rest_api.iter_events(account, PROJECT, "d1", hours_ago(3), hours_ago(0))
    first = [next(fetched) for _ in range(10)]
    dt_api.fail_next(1, 503)
    rest = list(fetched)
    assert sorted(event["eventId"] for event in first + rest) == sorted(event["eventId"] for event in events)
    assert dt_api.answered(503) == 1


@pytest.mark.parametrize("status, words", [(503, "server errors (5xx): gave up after 3 tries"),
                                           (429, "429 Too Many Requests: gave up")])
def test_gives_up_on_a_failing_api_within_its_retry_budget(dt_api, account, status, words):
    """An API that keeps failing is tried 1 + request_attempts times, then a one-line error says it gave up."""
    dt_api.fail_next(50, status, retry_after=0 if status == 429 else None)
    started = time.monotonic()
    message = failure(lambda: rest_api.list_project_ids(account), dt_api)
    assert time.monotonic() - started < 3
    assert words in message and dt_api.url in message and "run this again later" in message
    assert dt_api.answered(status) == account.request_attempts + 1


def test_gives_up_on_a_hanging_api_after_its_timeouts(dt_api, settings):
    """An API that does not answer costs one timeout per try, then the error names the timeout."""
    quick = rest_api.load_account(settings, request_timeout=0.3, request_attempts=1)
    dt_api.hang_next(5, seconds=10)
    started = time.monotonic()
    message = failure(lambda: rest_api.list_project_ids(quick), dt_api)
    assert time.monotonic() - started < 2
    assert "did not answer within 0.3 s: gave up after 2 tries" in message


def test_default_retry_budget_stays_under_a_minute(settings):
    """With the defaults, the client's own back-off plus a timeout per try stays under 60 s, even for 504s."""
    account = rest_api.load_account(settings)
    tries = account.request_attempts + 1
    for status in (503, 504):
        sleeps = sum(dterrors.parse_api_status_code(status, {}, {}, attempt)[2] for attempt in range(tries - 1))
        assert sleeps + tries * account.request_timeout <= 60
    hung = sum(dterrors.parse_request_error(dterrors.requests.exceptions.ReadTimeout(), {}, attempt)[2]
               for attempt in range(tries - 1))
    assert hung + tries * account.request_timeout <= 60


# -- configuration and credentials ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DT_SERVICE_ACCOUNT_KEY_ID", "DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL"])
def test_bad_credentials_are_refused_clearly(dt_api, settings, name):
    """A wrong key id, secret or email gets no token, and the error names the three variables, not the secret."""
    settings[name] = "wrong-" + settings[name]
    message = failure(lambda: rest_api.list_project_ids(rest_api.load_account(settings)), dt_api)
    assert message.startswith("DT refused the service account's credentials")
    assert all(variable in message for variable in rest_api.CREDENTIALS)
    assert settings["DT_SERVICE_ACCOUNT_SECRET"] not in message
    assert dt_api.tokens_issued == 0 and dt_api.api_requests == 0


@pytest.mark.parametrize("missing", [
    ["DT_SERVICE_ACCOUNT_KEY_ID"],
    ["DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL"],
    ["DT_SERVICE_ACCOUNT_KEY_ID", "DT_SERVICE_ACCOUNT_SECRET", "DT_SERVICE_ACCOUNT_EMAIL"],
])
@pytest.mark.parametrize("absent", [None, "", "  "])
def test_missing_credentials_are_named(settings, missing, absent):
    """Each missing or blank credential is named, and only those."""
    for name in missing:
        settings[name] = absent
    message = failure(lambda: rest_api.load_account(settings))
    assert message.startswith("set " + " and ".join(missing) + ":")
    assert all(name not in message for name in rest_api.CREDENTIALS if name not in missing)


def test_reads_the_settings_not_the_environment(settings, monkeypatch):
    """Credentials in the environment but not in the settings do not count."""
    for name in rest_api.CREDENTIALS:
        monkeypatch.setenv(name, settings.pop(name))
    assert "set DT_SERVICE_ACCOUNT_KEY_ID" in failure(lambda: rest_api.load_account(settings))


def test_defaults_to_dts_endpoints(settings):
    """Without DT_API_URL and DT_AUTH_URL the account points at DT's production API and token endpoint."""
    del settings["DT_API_URL"], settings["DT_AUTH_URL"]
    account = rest_api.load_account(settings)
    assert (account.api_url, account.auth_url) == (rest_api.DEFAULT_API_URL, rest_api.DEFAULT_AUTH_URL)
    assert account.auth.token_endpoint == rest_api.DEFAULT_AUTH_URL


@pytest.mark.parametrize("name", ["DT_API_URL", "DT_AUTH_URL"])
def test_a_url_setting_without_scheme_is_named(settings, name):
    """A URL that is not http(s) is refused at once, naming its variable."""
    settings[name] = "api.disruptive-technologies.com/v2"
    assert failure(lambda: rest_api.load_account(settings)).startswith(f"{name} must be an http(s) URL")


def test_account_repr_keeps_the_secret_out(settings):
    """The account's repr shows where it talks to, never the secret (the client's own auth repr prints it)."""
    text = repr(rest_api.load_account(settings))
    assert settings["DT_SERVICE_ACCOUNT_SECRET"] not in text and settings["DT_API_URL"] in text


def test_signs_in_once_for_many_calls(dt_api, account):
    """One token serves every call while it is valid."""
    dt_api.add_device(PROJECT, "d1")
    rest_api.list_project_ids(account)
    rest_api.list_device_ids(account, PROJECT)
    list(rest_api.iter_events(account, PROJECT, "d1", hours_ago(1), hours_ago(0)))
    assert dt_api.tokens_issued == 1 and dt_api.token_requests == 1


# -- unknown things and unreachable hosts ----------------------------------------------------------------

@pytest.mark.parametrize("member", [None, False])
def test_unknown_or_inaccessible_project_is_named(dt_api, account, member):
    """A project DT does not have (404) or the account is not in (403) is named, for devices and events alike."""
    if member is False:
        dt_api.add_project("c0other", member=False)
    message = failure(lambda: rest_api.list_device_ids(account, "c0other"), dt_api)
    assert message.startswith("DT does not know project c0other, or the service account has no access to it")
    message = failure(lambda: list(rest_api.iter_events(account, "c0other", "d1", hours_ago(1), hours_ago(0))), dt_api)
    assert "device d1 in project c0other" in message


def test_unknown_device_is_named(dt_api, account):
    """A device the project does not hold is named with its project."""
    message = failure(lambda: list(rest_api.iter_events(account, PROJECT, "d404", hours_ago(1), hours_ago(0))), dt_api)
    assert f"DT does not know device d404 in project {PROJECT}" in message


def test_an_id_that_would_change_the_path_is_refused(dt_api, account):
    """An id with a slash is not sent to DT at all."""
    assert "'x/../y' is not a DT project ID" in failure(lambda: rest_api.list_device_ids(account, "x/../y"))
    assert dt_api.requests == 0


@pytest.mark.parametrize("down, words", [("DT_API_URL", "cannot reach DT's API"),
                                         ("DT_AUTH_URL", "cannot reach DT's token endpoint")])
def test_unreachable_host_is_named_within_bounded_time(dt_api, settings, down, words):
    """A closed port for the API or the token endpoint fails fast, naming the host and its variable."""
    settings[down] = closed_port_url("/v2" if down == "DT_API_URL" else "/oauth2/token")
    account = rest_api.load_account(settings, request_timeout=2, request_attempts=1)
    started = time.monotonic()
    message = failure(lambda: rest_api.list_project_ids(account), dt_api)
    assert time.monotonic() - started < 2
    assert message.startswith(words) and settings[down] in message and f"check {down}" in message


def test_api_unavailable_for_good_fails_at_the_token_endpoint(dt_api, settings):
    """When DT answers 503 to everything, the error says so, starting with the token exchange."""
    account = rest_api.load_account(settings, request_timeout=2, request_attempts=1)
    dt_api.available = False
    message = failure(lambda: rest_api.list_project_ids(account), dt_api)
    assert message.startswith(f"DT's token endpoint {dt_api.token_url} kept failing with server errors (5xx)")


def test_a_url_that_is_not_dts_api_is_named(dt_api, settings):
    """An API URL that answers HTML (here: /v2 left off) is named, not a JSON traceback."""
    settings["DT_API_URL"] = dt_api.url.removesuffix("/v2")
    message = failure(lambda: rest_api.list_project_ids(rest_api.load_account(settings)), dt_api)
    assert message.endswith("did not answer like DT's REST API about the list of projects: check DT_API_URL")


# -- Data Connector metrics ------------------------------------------------------------------------------

def test_fetches_a_data_connectors_metrics(dt_api, account):
    """A connector's counters of the last 3 hours come back as DT names them."""
    dt_api.add_data_connector(PROJECT, "c16eegpdidie7lltpefg", success_count=9, error_count=2, latency99p="0.411s")
    assert rest_api.fetch_metrics(account, PROJECT, "c16eegpdidie7lltpefg") == {
        "successCount": 9, "errorCount": 2, "latency99p": "0.411s"}


def test_unknown_data_connector_is_named(dt_api, account):
    """A connector the project does not have is named with its project."""
    message = failure(lambda: rest_api.fetch_metrics(account, PROJECT, "c404"), dt_api)
    assert message.startswith(f"DT does not know Data Connector c404 in project {PROJECT}")
