"""Generated hostile and valid input: nothing unsigned gets in, nothing signed is lost, nothing crashes."""

import hashlib
import json
import socket

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import Server
from support.signing import SECRET, claims_for, token_with

from receiver import create_app
from receiver.sample import encode_body, sign_body

OTHER_SECRET = "an-attackers-guess-at-the-secret-0123456789"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=20)


@st.composite
def bodies(draw) -> bytes:
    """Bytes a scanner or forger might send: noise, broken and odd JSON, DT-like events."""
    return draw(st.one_of(
        st.binary(max_size=2000),
        json_values.map(lambda value: encode_body(value)),
        st.integers(min_value=1, max_value=3000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(min_value=10**300, max_value=10**301).map(lambda n: b'{"event":{"eventId":%d}}' % n),
        st.text().map(lambda key: f'{{"event":{{"eventId":"a"}},"event":{{"eventId":{json.dumps(key)}}}}}'.encode()),
        st.binary(max_size=200).map(lambda tail: b'{"event":{"eventId":"' + tail + b'"}}'),
        json_values.map(lambda value: b"\xef\xbb\xbf" + encode_body({"event": {"eventId": "bom"}, "x": value})),
    ))


@st.composite
def tokens(draw, body: bytes) -> str:
    """Tokens a forger might send for a body: garbage, wrong keys and algorithms, mangled real ones."""
    real = sign_body(body, SECRET)
    claims = draw(st.dictionaries(st.sampled_from(["checksum", "checksum_sha256", "iat", "exp", "jti", "sub"]),
                                  json_values, max_size=6))
    token = draw(st.one_of(
        st.text(max_size=500),
        st.just(token_with(claims_for(body), secret=OTHER_SECRET)),
        st.sampled_from(["HS384", "HS512"]).map(lambda algorithm: token_with(claims_for(body), algorithm=algorithm)),
        st.just(token_with(claims_for(body), secret=None, algorithm="none")),
        st.just(token_with(claims)),  # our secret, random claims: never checksums of this body by chance
        st.integers(min_value=0, max_value=len(real) - 1).map(lambda cut: real[:cut]),
        st.tuples(st.integers(0, len(real) - 1), st.characters()).map(lambda at: real[:at[0]] + at[1] + real[at[0] + 1:]),
        st.text(alphabet="=.", min_size=1, max_size=4).map(lambda padding: real + padding),
    ))
    return token.replace("\r", "").replace("\n", "")  # no HTTP client can send these in a header


def genuinely_signed(token: str, body: bytes) -> bool:
    """Tell, independently of the receiver, whether a token is a valid HS256 signature of these bytes."""
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp", "iat"]}, leeway=60)
    except Exception:
        return False
    digests = {"checksum": hashlib.sha1(body).hexdigest(), "checksum_sha256": hashlib.sha256(body).hexdigest()}
    present = [name for name in digests if name in claims]
    return bool(present) and all(claims[name] == digests[name] for name in present)


@pytest.fixture(scope="module")
def property_client():
    """Return one test client for all examples (hypothesis reruns the test body many times)."""
    return create_app({"DT_SIGNATURE_SECRET": SECRET}).test_client()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), body=bodies())
def test_forged_or_garbled_deliveries_are_turned_away_calmly(property_client, log_lines, data, body):
    """Any body with any token is answered 4xx without a traceback, unless it is genuinely signed."""
    token = data.draw(tokens(body))
    answer = property_client.post("/", data=body, headers={"X-Dt-Signature": token})
    assert answer.status_code < 500 and "Traceback" not in answer.text
    if answer.status_code == 200:
        assert genuinely_signed(token, body)
    else:
        assert 400 <= answer.status_code < 500 and len(answer.text) < 200
    logged = str(log_lines())
    assert SECRET not in logged and (len(token) < 8 or token not in logged)


labels = st.dictionaries(st.text(), st.text(), max_size=5)
samples = st.lists(st.fixed_dictionaries({"value": st.floats(allow_nan=False, allow_infinity=False) | st.none(),
                                          "sampleTime": st.text()}), max_size=5)
events = st.fixed_dictionaries({
    "event": st.fixed_dictionaries({
        "eventId": st.text(min_size=1),
        "targetName": st.text(),
        "eventType": st.text(),
        "data": st.dictionaries(st.text(), json_values | samples, max_size=3),
        "timestamp": st.text() | st.just("2026-11-21T10:34:03.970415123Z"),
    }),
    "labels": labels,
    "metadata": st.dictionaries(st.text(), json_values, max_size=4),
})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=events, ascii_only=st.booleans())
def test_every_validly_signed_event_is_accepted(property_client, log_lines, event, ascii_only):
    """Any DT-shaped event, with any unicode, types, floats and nulls, signed correctly, gets 200 and its log line."""
    body = json.dumps(event, ensure_ascii=ascii_only).encode()
    token = sign_body(body, SECRET)
    answer = property_client.post("/", data=body, headers={"x-dt-signature": token})
    assert (answer.status_code, answer.text) == (200, "logged\n")
    lines = log_lines()
    assert lines[-1]["event_id"] == event["event"]["eventId"]
    assert SECRET not in str(lines) and token not in str(lines)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """Return one Procfile server for all examples of the HTTP-level properties."""
    server = Server(tmp_path_factory.mktemp("server") / "server.log", DT_SIGNATURE_SECRET=SECRET).start()
    yield server
    server.stop()


header_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=40)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=300)


@given(headers=st.dictionaries(header_names, header_values, max_size=20), body=bodies(), signature=st.text(max_size=200))
def test_real_server_never_answers_5xx(shared_server, headers, body, signature):
    """Raw HTTP with random headers and bodies gets a 4xx from the real server, never a 5xx or a dropped line."""
    lines = [f"{name}: {value}" for name, value in headers.items() if name.lower() not in ("content-length", "transfer-encoding")]
    head = "\r\n".join(["POST / HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", "Connection: close",
                        f"X-Dt-Signature: {signature}", *lines]) + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as connection:
        connection.sendall(head.encode() + body)
        status_line = connection.makefile("rb").readline().decode("latin-1")
    assert status_line.startswith("HTTP/1.1 4"), status_line
