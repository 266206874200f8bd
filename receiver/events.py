"""Read a verified body as a DT event and pick out the fields people query."""

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import InvalidEventError

TARGET = re.compile(r"projects/([^/]+)/devices/([^/]+)")


@dataclass(frozen=True)
class Event:
    """One DT event: its body as parsed and the fields worth a column."""

    body: dict[str, Any]
    text: str  # the body as received, decoded once
    event_id: str
    event_type: str | None
    device_id: str | None
    project_id: str | None
    timestamp: str | None
    labels: Any

    @property
    def time(self) -> datetime | None:
        """Return the event's timestamp as an aware datetime, if it is one."""
        return parse_timestamp(self.timestamp)

    @property
    def data(self) -> Any:
        """Return the event's `data` object, whatever its type."""
        return self.body["event"].get("data")


def parse_event(body: bytes) -> Event:
    """Return the event a verified body holds, or raise InvalidEventError."""
    try:
        text = body.decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise InvalidEventError("body is not UTF-8 JSON") from None
    except RecursionError:
        raise InvalidEventError("body is nested too deeply") from None
    event = document.get("event") if isinstance(document, dict) else None
    if not isinstance(event, dict) or not isinstance(event.get("eventId"), str) or not event["eventId"]:
        raise InvalidEventError("body is not a DT event: no event.eventId")
    project_id, device_id = split_target(event.get("targetName"))
    return Event(
        body=document,
        text=text,
        event_id=event["eventId"],
        event_type=text_or_none(event.get("eventType")),
        device_id=device_id,
        project_id=project_id,
        timestamp=text_or_none(event.get("timestamp")),
        labels=document.get("labels"),
    )


def split_target(target_name: Any) -> tuple[str | None, str | None]:
    """Return the project and device ids in `projects/<P>/devices/<D>`."""
    match = TARGET.fullmatch(target_name) if isinstance(target_name, str) else None
    return match.groups() if match else (None, None)


def parse_timestamp(text: str | None) -> datetime | None:
    """Return an RFC 3339 timestamp as an aware datetime, or None if it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else None


def text_or_none(value: Any) -> str | None:
    """Return the value if it is a string."""
    return value if isinstance(value, str) else None
