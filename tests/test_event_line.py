"""An accepted event's line, written by its own path: the log formatter's line, the body as received, strict."""

import io
import json
import logging

import pytest
from support.signing import SECRET, signed_delivery

from receiver.logs import EVENT_LINES, JsonLineFormatter, JsonText
from receiver.sample import sample_event, sign_body


@pytest.fixture
def written(monkeypatch):
    """Return the stream that accepted events' lines are written to, for this test."""
    stream = io.StringIO()
    monkeypatch.setattr(EVENT_LINES, "stream", stream)
    return stream


def formatter_line(body: str, document: dict, request_id: str | None) -> str:
    """Return what the log formatter writes for an accepted event's info record: the line before its own path."""
    event = document["event"]
    project_id, _, device_id = event["targetName"].removeprefix("projects/").partition("/devices/")
    fields = {"event_id": event["eventId"], "event_type": event["eventType"], "device_id": device_id,
              "project_id": project_id, "timestamp": event["timestamp"], "request_id": request_id,
              "body": JsonText(json.dumps(document) if breaks(body) else body)}
    record = logging.LogRecord("receiver", logging.INFO, __file__, 1, "event logged", None, None)
    record.fields = fields
    return JsonLineFormatter().format(record) + "\n"


def breaks(text: str) -> bool:
    """Say whether text holds a character that some readers take for the end of a line."""
    return any(mark in text for mark in "\n\r\x85\u2028\u2029")


EVENT = sample_event("temperature", event_id="évènement-1")
BODIES = {
    "compact, non-ASCII as UTF-8": json.dumps(EVENT, separators=(",", ":"), ensure_ascii=False),
    "spaced, non-ASCII escaped": json.dumps(EVENT, separators=(" , ", " : ")),
    "raw line breaks between and inside values": json.dumps(EVENT, indent=1, ensure_ascii=False).replace(
        "emuc2f3h2lbr9a5ks2vncg0", "emuc2f3h2lbr9a5ks2vncg0\u2028"),
}


@pytest.mark.parametrize("request_id", ["req-7", None])
@pytest.mark.parametrize("name", BODIES)
def test_event_line_is_the_formatters_line_with_the_body_as_received(client, written, name, request_id):
    """The line is byte for byte what the log formatter wrote for it, its body the bytes received unless they break."""
    body = BODIES[name]
    headers = {"X-Dt-Signature": sign_body(body.encode(), SECRET)}
    headers.update({"X-Request-Id": request_id} if request_id else {})
    answer = client.post("/", data=body.encode(), headers=headers)
    assert (answer.status_code, answer.text) == (200, "logged\n")
    assert written.getvalue() == formatter_line(body, json.loads(body), request_id)
    if not breaks(body):
        assert written.getvalue().endswith(f', "body": {body}}}\n')  # not re-serialised


class FailingStream(io.StringIO):
    """A stdout whose reader has gone: what is written stays buffered, and the flush fails."""

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_event_whose_line_cannot_be_written_is_refused_with_503(client, monkeypatch):
    """A line that cannot be flushed turns the answer into a 503 with a reason, never a 200."""
    monkeypatch.setattr(EVENT_LINES, "stream", FailingStream())
    body, headers = signed_delivery()
    answer = client.post("/", data=body, headers=headers)
    assert (answer.status_code, answer.text) == (503, "log line could not be written\n")
    assert answer.headers["Retry-After"] == "10"


def test_plain_answers_carry_their_type_and_length_and_a_head_request_no_body(client):
    """The short answers are text/plain with a Content-Length; HEAD gets the same headers and no body."""
    body, headers = signed_delivery()
    answers = {"POST": client.post("/", data=body, headers=headers), "GET": client.get("/"), "HEAD": client.head("/")}
    for method, answer in answers.items():
        assert answer.headers["Content-Type"] == "text/plain; charset=utf-8", method
    assert answers["POST"].headers["Content-Length"] == "7"
    assert answers["HEAD"].headers["Content-Length"] == answers["GET"].headers["Content-Length"]
    assert (answers["HEAD"].status_code, answers["HEAD"].data) == (200, b"")
