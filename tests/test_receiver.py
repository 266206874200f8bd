"""The receiver through Flask's test client: what it accepts, logs and turns away."""

import time

import pytest
from support.issuer import ORGANIZATION_ID
from support.signing import SECRET, claims_for, signed_delivery, token_with

from receiver import create_app
from receiver.sample import encode_body, sample_event
from receiver.webhook import MAX_BODY_BYTES


def test_signed_event_is_accepted_and_logged(client, log_lines):
    """A correctly signed event gets 200 and one log line with its fields."""
    event = sample_event("temperature", event_id="evt-accepted-1")
    body, headers = signed_delivery(event)
    answer = client.post("/", data=body, headers={**headers, "X-Request-Id": "req-42"})
    assert (answer.status_code, answer.text) == (200, "logged\n")
    [line] = log_lines()
    assert line["msg"] == "event logged"
    assert line["event_id"] == "evt-accepted-1"
    assert line["event_type"] == "temperature"
    assert line["device_id"] == "emuc2f3h2lbr9a5ks2vncg0"
    assert line["project_id"] == "c0md3mm0c7bet3vico8g"
    assert line["timestamp"] == event["event"]["timestamp"]
    assert line["body"] == event  # the whole body, labels and metadata included
    assert line["body"]["event"]["data"]["temperature"]["isBackfilled"] is False
    assert line["request_id"] == "req-42"


@pytest.mark.parametrize("name", ["x-dt-signature", "X-DT-SIGNATURE", "X-Dt-Signature"])
def test_header_name_in_any_casing(client, name):
    """The signature header is found whatever its casing."""
    body, headers = signed_delivery()
    assert client.post("/", data=body, headers={name: headers["X-Dt-Signature"]}).status_code == 200


def test_unknown_event_type_and_extra_fields_pass_through(client, log_lines):
    """A type DT adds later, and fields we do not know, are accepted and logged."""
    event = sample_event("touch")
    event["event"].update(eventType="quantumFlux", data={"quantumFlux": {"level": None}}, extra=[1, 2.5])
    event["somethingNew"] = {"nested": True}
    body, headers = signed_delivery(event)
    assert client.post("/", data=body, headers=headers).status_code == 200
    assert log_lines()[0]["event_type"] == "quantumFlux"


def test_either_checksum_alone_is_enough(client):
    """A token with only `checksum` or only `checksum_sha256` is accepted when it matches."""
    body = encode_body(sample_event())
    for only in ("checksum", "checksum_sha256"):
        dropped = "checksum_sha256" if only == "checksum" else "checksum"
        token = token_with(claims_for(body, **{dropped: None}))
        assert client.post("/", data=body, headers={"X-Dt-Signature": token}).status_code == 200


def test_known_answer_token(client):
    """A token made once, outside this run, still verifies against the same bytes."""
    body = b'{"event":{"eventId":"known-answer","eventType":"touch","targetName":"projects/p/devices/d"},"labels":{}}'
    token = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        "eyJjaGVja3N1bSI6IjkxYmUyNGZjYTU1MjdkMTE3YWZkNmU4NjQ2NGVhNWQ1ZTE4ZmFjY2YiLCJjaGVja3N1bV9zaGEyNTYiOiJlNmQ2"
        "ZmVlMzI1ZjU1ODA2ZDUzMGUyYjFhNjAxNzBjM2RlMzJhMDgwNjkyMGQzYTY2OGYwMmRkNTQ4MjdjYTYyIiwiaWF0IjoxNzkzMDAwMDAw"
        "LCJleHAiOjQxMDI0NDQ4MDAsImp0aSI6Imtub3duLWFuc3dlciJ9."
        "4e-G6r18KMO990e7Df26CJl7LP7TJuu4wCh9JwjvVy0"
    )
    assert client.post("/", data=body, headers={"X-Dt-Signature": token}).status_code == 200


BODY = encode_body(sample_event(event_id="evt-rejected"))


def body_with(**event_fields) -> bytes:
    """Return a sample body whose `event` has these fields changed."""
    body = sample_event(event_id="evt-rejected")
    body["event"].update(event_fields)
    return encode_body(body)


def body_whose_event_is(value) -> bytes:
    """Return a sample body whose `event` is this value instead of an object."""
    return encode_body({**sample_event(event_id="evt-rejected"), "event": value})


def signed_only(body: bytes) -> tuple[dict, bytes]:
    """Return the X-Dt-Signature header of a correct token for these bytes, and the bytes."""
    return {"X-Dt-Signature": token_with(claims_for(body))}, body


REJECTIONS = [
    # (case, headers, body, status, reason)
    ("missing header", {}, BODY, 401, "missing X-Dt-Signature header"),
    ("empty header", {"X-Dt-Signature": ""}, BODY, 401, "missing X-Dt-Signature header"),
    ("not a JWT", {"X-Dt-Signature": "not-a-token"}, BODY, 401, "token is not a valid JWT"),
    ("wrong secret", {"X-Dt-Signature": token_with(claims_for(BODY), secret="another-secret-0123456789abcdef0123")},
     BODY, 401, "signature does not verify"),
    ("alg none", {"X-Dt-Signature": token_with(claims_for(BODY), secret=None, algorithm="none")},
     BODY, 401, "token algorithm is not allowed"),
    ("alg HS512", {"X-Dt-Signature": token_with(claims_for(BODY), algorithm="HS512")},
     BODY, 401, "token algorithm is not allowed"),
    ("expired", {"X-Dt-Signature": token_with(claims_for(BODY, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))},
     BODY, 401, "token has expired"),
    ("issued in the future", {"X-Dt-Signature": token_with(claims_for(BODY, iat=int(time.time()) + 600))},
     BODY, 401, "token is not valid yet"),
    ("no exp", {"X-Dt-Signature": token_with(claims_for(BODY, exp=None))}, BODY, 401, "token lacks a required claim"),
    ("no checksum claims", {"X-Dt-Signature": token_with(claims_for(BODY, checksum=None, checksum_sha256=None))},
     BODY, 401, "token has no checksum claim"),
    ("numeric checksum", {"X-Dt-Signature": token_with(claims_for(BODY, checksum=12345))},
     BODY, 401, "token's checksum is not a string"),
    ("list checksum_sha256", {"X-Dt-Signature": token_with(claims_for(BODY, checksum_sha256=["a"]))},
     BODY, 401, "token's checksum_sha256 is not a string"),
    ("one byte changed", {"X-Dt-Signature": token_with(claims_for(BODY))}, BODY.replace(b"evt-rejected", b"evt-rejectee"),
     401, "body does not match the token's checksum_sha256"),
    ("trailing whitespace", {"X-Dt-Signature": token_with(claims_for(BODY))}, BODY + b"\n",
     401, "body does not match the token's checksum_sha256"),
    ("sha256 right, sha1 wrong", {"X-Dt-Signature": token_with(claims_for(BODY, checksum="0" * 40))},
     BODY, 401, "body does not match the token's checksum"),
    ("sha1 right, sha256 wrong", {"X-Dt-Signature": token_with(claims_for(BODY, checksum_sha256="0" * 64))},
     BODY, 401, "body does not match the token's checksum_sha256"),
    ("signed body not JSON", {"X-Dt-Signature": token_with(claims_for(b"hello"))}, b"hello", 400, "body is not UTF-8 JSON"),
    ("signed JSON array", {"X-Dt-Signature": token_with(claims_for(b"[1]"))}, b"[1]", 400, "body is not a DT event: no event.eventId"),
    ("eventId not a string", {"X-Dt-Signature": token_with(claims_for(b'{"event":{"eventId":7}}'))},
     b'{"event":{"eventId":7}}', 400, "body is not a DT event: no event.eventId"),
    ("empty eventId", *signed_only(body_with(eventId="")), 400, "body is not a DT event: no event.eventId"),
    ("event a list", *signed_only(body_whose_event_is([{"eventId": "e1"}])), 400, "body is not a DT event: no event.eventId"),
    ("event a string", *signed_only(body_whose_event_is("e1")), 400, "body is not a DT event: no event.eventId"),
    ("event null", *signed_only(body_whose_event_is(None)), 400, "body is not a DT event: no event.eventId"),
    ("no iat", {"X-Dt-Signature": token_with(claims_for(BODY, iat=None))}, BODY, 401, "token lacks a required claim"),
]


@pytest.mark.parametrize("case, headers, body, status, reason", REJECTIONS, ids=[row[0] for row in REJECTIONS])
def test_rejection(client, log_lines, case, headers, body, status, reason):
    """Each kind of bad delivery gets its 4xx, a short reason and one log line, and no secret is logged."""
    answer = client.post("/", data=body, headers=headers)
    assert (answer.status_code, answer.text) == (status, reason + "\n")
    [line] = log_lines()
    assert (line["msg"], line["status"], line["reason"]) == ("request rejected", status, reason)
    logged = str(log_lines())
    assert SECRET not in logged
    assert all(value not in logged for value in headers.values() if value)


def test_asymmetric_token_without_iat_is_refused(make_app, issuer, log_lines):
    """A DT-Asymmetric-Signature token from DT's key with no `iat` is refused as lacking a claim, with one log line."""
    client = make_app(DT_SIGNATURE_SECRET="", DT_ORGANIZATION_ID=ORGANIZATION_ID, DT_ISSUER=issuer.url).test_client()
    answer = client.post("/", data=BODY, headers={"DT-Asymmetric-Signature": issuer.token(BODY, "k1", iat=None)})
    assert (answer.status_code, answer.text) == (401, "token lacks a required claim\n")
    rejected = [line for line in log_lines() if line["msg"] == "request rejected"]
    assert [(line["status"], line["reason"]) for line in rejected] == [(401, "token lacks a required claim")]


def test_body_over_the_limit_is_413(client, log_lines):
    """A body larger than the limit is refused before it is read."""
    body = b" " * (MAX_BODY_BYTES + 1)
    answer = client.post("/", data=body, headers={"X-Dt-Signature": token_with(claims_for(body))})
    assert answer.status_code == 413
    assert answer.text == f"body is larger than {MAX_BODY_BYTES} bytes\n"
    assert [line["status"] for line in log_lines()] == [413]


def test_get_shows_the_receiver_is_up(client):
    """Opening the app in a browser shows a one-line hint."""
    answer = client.get("/")
    assert answer.status_code == 200
    assert "receiver is up" in answer.text


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(client, method):
    """Methods other than GET and POST are refused, naming the allowed ones."""
    answer = client.open("/", method=method)
    assert answer.status_code == 405
    assert set(answer.headers["Allow"].split(", ")) >= {"GET", "POST"}


def test_app_without_any_verification_setting_handles_nothing(log_lines):
    """Built without either setting (as the commands are), the app answers every delivery 503 and logs both variables' names."""
    for settings in ({}, {"DT_SIGNATURE_SECRET": ""}):
        answer = create_app(settings).test_client().post("/", data=BODY, headers={"X-Dt-Signature": "x"})
        assert (answer.status_code, answer.headers["Retry-After"]) == (503, "10")
        assert answer.text == "receiver is not configured: see its log\n"  # no setting told to whoever asks
    problems = [line["problem"] for line in log_lines() if line["msg"] == "receiver is not configured"]
    assert len(problems) == 2 and all("DT_SIGNATURE_SECRET" in p and "DT_ORGANIZATION_ID" in p for p in problems)


def test_short_secret_is_accepted(make_app):
    """A short secret still verifies (the server warns about it once at start, see test_server)."""
    client = make_app(DT_SIGNATURE_SECRET="short").test_client()
    body, headers = signed_delivery(secret="short")
    assert client.post("/", data=body, headers=headers).status_code == 200


PREVIOUS_SECRET = "previous-signature-secret-0123456789abcdef"


def test_previous_secret_is_accepted_during_rotation(make_app, log_lines):
    """Tokens signed with the current or the previous secret pass and are logged; a third secret does not verify."""
    client = make_app(DT_SIGNATURE_SECRET_PREVIOUS=PREVIOUS_SECRET).test_client()
    answers = []
    for secret in (SECRET, PREVIOUS_SECRET, "a-third-secret-0123456789abcdef0123456789"):
        body, headers = signed_delivery(sample_event(event_id=f"rotation-{len(answers)}"), secret=secret)
        answer = client.post("/", data=body, headers=headers)
        answers.append((answer.status_code, answer.text))
    assert answers == [(200, "logged\n"), (200, "logged\n"), (401, "signature does not verify\n")]
    assert [(line["msg"], line.get("event_id") or line.get("reason")) for line in log_lines()] == [
        ("event logged", "rotation-0"), ("event logged", "rotation-1"), ("request rejected", "signature does not verify")]


ROTATION_FAULTS = [
    # (case, claims changed in seconds from now or None to remove, reason): faults of a token a secret of the rotation signed
    ("expired", {"iat": -7200, "exp": -3600}, "token has expired"),
    ("issued in the future", {"iat": 600}, "token is not valid yet"),
    ("no iat", {"iat": None}, "token lacks a required claim"),
]


@pytest.mark.parametrize("signer", [SECRET, PREVIOUS_SECRET], ids=["current secret", "previous secret"])
@pytest.mark.parametrize("case, changes, reason", ROTATION_FAULTS, ids=[row[0] for row in ROTATION_FAULTS])
def test_rotation_names_the_fault_of_a_token_either_secret_signed(make_app, log_lines, signer, case, changes, reason):
    """During a rotation, a token signed with either secret but expired, early or lacking a claim is refused for that fault, not as a bad signature."""
    client = make_app(DT_SIGNATURE_SECRET_PREVIOUS=PREVIOUS_SECRET).test_client()
    now = int(time.time())
    claims = claims_for(BODY, **{name: None if seconds is None else now + seconds for name, seconds in changes.items()})
    answer = client.post("/", data=BODY, headers={"X-Dt-Signature": token_with(claims, secret=signer)})
    assert (answer.status_code, answer.text) == (401, reason + "\n")
    assert [(line["msg"], line["reason"]) for line in log_lines()] == [("request rejected", reason)]


def test_a_path_other_than_the_root_says_where_to_point_the_connector(client, log_lines):
    """A Data Connector pointed at /webhook gets 404 with a reason naming the root URL, and one log line."""
    answer = client.post("/webhook", data=BODY, headers={"X-Dt-Signature": "x"})
    assert (answer.status_code, answer.text) == (404, "no such path: point the Data Connector at this app's root URL, /\n")
    assert [line["status"] for line in log_lines()] == [404]
