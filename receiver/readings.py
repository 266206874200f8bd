"""Read the typed readings of a parsed DT event, as dt_samples stores them: one row per sample."""

import json
import math
import re
from decimal import Decimal
from typing import NamedTuple

from .events import Event, parse_timestamp


class Kind(NamedTuple):
    """A type with readings: what its data holds (a number, a state, or the event itself: a touch), the field
    of its first value with that value's name and unit, and a second number's (humidity, networkStatus)."""

    number: int
    event_type: str
    shape: str
    field: str | None
    name: str
    unit: str | None
    field2: str | None = None
    name2: str | None = None
    unit2: str | None = None


KINDS = (
    Kind(1, "temperature", "number", "value", "temperature", "°C"),
    Kind(2, "humidity", "number", "temperature", "temperature", "°C", "relativeHumidity", "relativeHumidity", "%"),
    Kind(3, "co2", "number", "ppm", "co2", "ppm"),
    Kind(4, "pressure", "number", "pascal", "pressure", "Pa"),
    Kind(5, "touch", "event", None, "touch", None),
    Kind(6, "touchCount", "number", "total", "count", None),
    Kind(7, "objectPresentCount", "number", "total", "count", None),
    Kind(8, "objectPresent", "state", "state", "state", None),
    Kind(9, "waterPresent", "state", "state", "state", None),
    Kind(10, "motion", "state", "state", "state", None),
    Kind(11, "deskOccupancy", "state", "state", "state", None),
    Kind(12, "contact", "state", "state", "state", None),
    Kind(13, "probeWireStatus", "state", "state", "state", None),
    Kind(14, "networkStatus", "number", "signalStrength", "signalStrength", "%", "rssi", "rssi", "dBm"),
    Kind(15, "cellularStatus", "number", "signalStrength", "signalStrength", "%"),
    Kind(16, "batteryStatus", "number", "percentage", "battery", "%"),
    Kind(17, "connectionStatus", "state", "connection", "connection", None),
)
KIND_OF = {kind.event_type: kind for kind in KINDS}

# RFC 3339 with its zone: PostgreSQL would also take 'now', 'epoch' or a time in the session's zone.
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
TINY = re.compile(r"[eE]-0*[0-9]{3}")  # an exponent that may read as zero
ESCAPE = re.compile(r"(\\+)u([0-9a-fA-F]{4})")
SMALLEST = Decimal("1e-307")  # a number nearer zero than this is refused
# Between these, a number read as a float passes every check of as_number, and its text, read exactly, would too.
SAFE_LOW, SAFE_HIGH = 1e-306, 1e307


class Sample(NamedTuple):
    """One row of dt_samples but its device: time as RFC 3339 text (None: the time the event is stored at)."""

    time: str | None
    value: float | None
    value2: float | None
    kind: int
    state: str | None


def samples_of(event: Event) -> list[Sample]:
    """Return the readings of an event: each sample of data[eventType] (temperature and humidity carry `samples`),
    or data[eventType] itself, at the sample's time, else data's updateTime, else the event's own time. A sample
    whose time is not RFC 3339, and a value that is not a JSON number double precision holds, give no row;
    a body jsonb would refuse (a \\u0000, a lone surrogate) gives none at all, as the readings always have."""
    kind = KIND_OF.get(event.event_type)
    data = event.data
    data = data.get(kind.event_type) if kind and isinstance(data, dict) else None
    if not isinstance(data, dict) or ("\\u" in event.text and jsonb_refuses(event.text)):
        return []
    rows, unsure = read_samples(kind, data, event)
    # Python reads 1e-400 as 0.0: only a number read near zero (or near the top of the range) may have been
    # written so, and only a body that writes such an exponent is read again, its numbers exactly, to tell.
    if unsure and TINY.search(event.text):
        exact = json.loads(event.text, parse_float=Decimal)["event"]["data"][kind.event_type]
        rows, _ = read_samples(kind, exact, event)
    return rows


def read_samples(kind: Kind, data: dict, event: Event) -> tuple[list[Sample], bool]:
    """Return the readings of data[eventType], and whether a number among them may not be read exactly."""
    samples = data.get("samples")
    samples = samples if isinstance(samples, list) and samples else [data]
    fallback = None
    rows = []
    unsure = False
    for sample in samples:
        if not isinstance(sample, dict):
            continue
        given = sample.get("sampleTime")
        given = data.get("updateTime") if given is None else given
        if given is None:
            fallback = fallback or event_time_text(event)
        elif not is_time(given):
            continue
        value = value2 = state = None
        if kind.shape == "number":
            value = as_number(first := sample.get(kind.field))
            unsure = unsure or near_limits(first)
        elif kind.shape == "event":
            value = 1.0
        elif isinstance(sample.get(kind.field), str):
            state = sample.get(kind.field)
        if kind.field2:
            value2 = as_number(second := sample.get(kind.field2))
            unsure = unsure or near_limits(second)
        if value is not None or value2 is not None or state is not None:
            rows.append(Sample(fallback if given is None else given, value, value2, kind.number, state))
    return rows, unsure


def event_time_text(event: Event) -> str | None:
    """Return the event's own time as RFC 3339 text, if it has one."""
    moment = event.time
    return moment.isoformat() if moment else None


def is_time(given) -> bool:
    """Tell whether a value is an RFC 3339 time with its zone, and a real one (no 31 November)."""
    return isinstance(given, str) and RFC3339.fullmatch(given) is not None and parse_timestamp(given) is not None


def as_number(field) -> float | None:
    """Return a JSON number as double precision, exactly as Python read it; None for anything else, and for a
    number beyond double precision's range or too near zero for it (a Decimal, read again, tells which)."""
    if type(field) is float and SAFE_LOW < abs(field) < SAFE_HIGH:  # the usual case, which every check passes
        return field
    if isinstance(field, bool) or not isinstance(field, int | float | Decimal):
        return None
    try:
        number = float(field)
    except OverflowError:
        return None
    if not math.isfinite(number) or abs(field) >= 1e308 or (field != 0 and abs(field) <= SMALLEST):
        return None
    return number


def near_limits(field) -> bool:
    """Tell whether a number Python read as a float is so near zero, or so large, that its text may read otherwise."""
    return type(field) is float and not SAFE_LOW < abs(field) < SAFE_HIGH


def jsonb_refuses(text: str) -> bool:
    """Tell whether a JSON text holds an escape jsonb refuses: \\u0000, or half of a surrogate pair alone."""
    pending_high = False
    last_end = -1
    for match in ESCAPE.finditer(text):
        if len(match[1]) % 2 == 0:  # an escaped backslash, then a plain 'u'
            continue
        code = int(match[2], 16)
        if pending_high and (match.start() + len(match[1]) - 1 != last_end or not 0xDC00 <= code <= 0xDFFF):
            return True
        if code == 0 or (not pending_high and 0xDC00 <= code <= 0xDFFF):
            return True
        pending_high = 0xD800 <= code <= 0xDBFF and not pending_high
        last_end = match.end()
    return pending_high
