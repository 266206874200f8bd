"""Durations as people write them (90s, 30m, 36h, 3d, 2w, 2y): read for settings and commands, written for people."""

import re
from datetime import timedelta

DURATION = re.compile(r"(\d+)\s*([smhdwy])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "y": "days"}
DAYS_PER_UNIT = {"y": 365}  # a year as 365 days: 2y keeps two years of days, leap days aside
EXAMPLES = "90s, 30m, 2h, 3d or 2w"


def parse_duration(text: str) -> timedelta | None:
    """Return the length a duration such as 90s, 30m or 36h names, or None if the text is not one."""
    match = DURATION.fullmatch(text.strip())
    if match is None:
        return None
    try:
        return timedelta(**{UNITS[match[2]]: int(match[1]) * DAYS_PER_UNIT.get(match[2], 1)})
    except OverflowError:  # more days than a timedelta holds
        return None


def describe_age(age: timedelta) -> str:
    """Return an age for people, in its two largest units: 45 s, 12 min, 2 h 5 min, 3 d 4 h."""
    seconds = max(0, int(age.total_seconds()))
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 90:
        return f"{seconds} s"
    if minutes < 90:
        return f"{minutes} min"
    if hours < 48:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"
