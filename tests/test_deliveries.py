"""POST / answered by the app's WSGI entry without Flask's request machinery: the same answers Flask gives."""


import pytest
from support.server import raw_exchange
from support.signing import claims_for, signed_delivery, token_with
from werkzeug.test import Client

from receiver import create_app, on_event, webhook
from receiver.deliveries import DeliveriesFirst
from receiver.sample import encode_body, sample_event

BODY, HEADERS = signed_delivery(sample_event(event_id="evt-direct-1"))
UNSIGNED = {"Content-Type": "application/json"}


def failing_handler(event):
    raise KeyError(event.event_id)


DELIVERIES = {  # name -> (body, headers, handler or None)
    "accepted": (BODY, {**HEADERS, "X-Request-Id": "req-7"}, None),
    "unsigned": (BODY, UNSIGNED, None),
    "wrong checksum": (BODY + b" ", HEADERS, None),
    "not an event": (b"[1]", {"X-Dt-Signature": token_with(claims_for(b"[1]"))}, None),
    "over the limit": (b"x" * (webhook.MAX_BODY_BYTES + 1), HEADERS, None),
    "handler fails": (BODY, HEADERS, failing_handler),
}


def exchange(application, body: bytes, headers: dict, log_lines) -> tuple:
    """Return everything a client and the log see of one delivery: status, headers, text, the new log lines."""
    before = len(log_lines())
    answer = Client(application).post("/", data=body, headers=headers)
    lines = [{k: v for k, v in line.items() if k != "error"} for line in log_lines()[before:]]
    return answer.status, sorted(answer.headers.items()), answer.text, lines


@pytest.mark.parametrize("name", DELIVERIES)
def test_each_answer_is_the_one_flask_gives(app, log_lines, monkeypatch, name):
    """Each delivery, accepted or not, is answered and logged by the direct entry exactly as Flask's view answers it."""
    body, headers, handler = DELIVERIES[name]
    if handler is not None:
        monkeypatch.setattr(on_event, "on_event", handler)
    assert isinstance(app.wsgi_app, DeliveriesFirst)
    direct = exchange(app, body, headers, log_lines)
    through_flask = exchange(app.wsgi_app.flask_wsgi_app, body, headers, log_lines)
    assert direct == through_flask
    assert direct[2] != ""


def test_unconfigured_receiver_answers_as_flask_does(log_lines):
    """Without any verification setting, the direct entry's 503, Retry-After and log line are Flask's."""
    app = create_app({})
    direct = exchange(app, BODY, HEADERS, log_lines)
    assert direct == exchange(app.wsgi_app.flask_wsgi_app, BODY, HEADERS, log_lines)
    assert direct[0] == "503 SERVICE UNAVAILABLE" and ("Retry-After", "10") in direct[1]


def test_unexpected_fault_is_handled_by_flask(make_app, log_lines, monkeypatch):
    """A fault the webhook does not expect takes Flask's path: 500 and a rejection line in production, a raise in tests."""
    monkeypatch.setattr(webhook, "parse_event", lambda body: {}["no such key"])
    app = make_app()
    with pytest.raises(KeyError):  # TESTING propagates it, as it did from Flask's view
        app.test_client().post("/", data=BODY, headers=HEADERS)
    app.config["TESTING"] = False
    answer = app.test_client().post("/", data=BODY, headers=HEADERS)
    assert (answer.status_code, answer.text) == (500, "internal server error\n")
    assert [(line["status"], line["reason"]) for line in log_lines() if line["msg"] == "request rejected"] == [
        (500, "internal server error")]


def test_other_requests_still_go_through_flask(client):
    """GET /, /health and a POST elsewhere are Flask's: the hint, the health answer, a 404 with its reason."""
    assert client.get("/").text.startswith("DT Data Connector receiver is up")
    assert client.get("/health").status_code == 200
    answer = client.post("/elsewhere", data=BODY, headers=HEADERS)
    assert (answer.status_code, answer.text) == (404, "no such path: point the Data Connector at this app's root URL, /\n")
    assert client.head("/").status_code == 200



def test_malformed_chunk_is_400_not_500(server):
    """A signed delivery whose chunked body breaks off into a malformed chunk size is a bad request, not a fault."""
    body = encode_body(sample_event())
    head = (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"X-Dt-Signature: %s\r\n\r\n" % token_with(claims_for(body)).encode())
    assert raw_exchange(server, head + b"%x\r\n%s\r\nzz\r\n" % (len(body), body)) == (400, "bad request")
    assert [line["reason"] for line in server.log_lines() if line["msg"] == "request rejected"] == ["bad request"]


def test_signed_event_through_the_server_writes_one_line(server):
    """Through gunicorn, each delivery the direct entry answers writes its own line and no access line."""
    for _ in range(2):
        assert server.post(BODY, HEADERS) == (200, "logged\n")
    lines = [line["msg"] for line in server.log_lines() if line.get("event_id") == "evt-direct-1"]
    assert lines == ["event logged", "event logged"] and "gunicorn method=POST" not in server.output()
