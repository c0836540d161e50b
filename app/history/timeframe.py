"""Time ranges and buckets in a time zone (Port's `timeRange` and `timeInterval`).

Buckets follow the zone's wall clock: a day bucket runs from one local midnight to the
next (23 or 25 hours across a DST change), an hour bucket from one local hour to the next
(the repeated hour of a fall-back night is two buckets), weeks start on Monday (ISO).
Every bound is an instant (UTC); a bucket is half-open, [start, next start).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from app.kit.errors import Invalid

Interval = Literal["hour", "day", "isoWeek", "month", "quarter"]
Preset = Literal[
    "today",
    "yesterday",
    "lastDay",
    "lastWeek",
    "last2Weeks",
    "lastMonth",
    "last3Months",
    "last6Months",
    "last12Months",
    "last2Years",
    "last3Years",
]
# Past this many buckets a request is refused: an hour per bucket over years is no chart.
MAX_BUCKETS = 5000
_LONG_PRESETS = ("last2Years", "last3Years")
_ZONES: frozenset[str] = frozenset(available_timezones()) | {"UTC"}
_MONTHS_BACK = {
    "lastMonth": 1,
    "last3Months": 3,
    "last6Months": 6,
    "last12Months": 12,
    "last2Years": 24,
    "last3Years": 36,
}
_DAYS_BACK = {"lastDay": 1, "lastWeek": 7, "last2Weeks": 14}


def zone(name: str | None, pointer: str = "/timeRange/timeZone") -> ZoneInfo:
    """The IANA zone `name` (UTC when absent); a 422 for an unknown one."""
    if name is None:
        return ZoneInfo("UTC")
    if name not in _ZONES:
        raise Invalid(
            f"Unknown time zone {name!r}: use an IANA name such as 'Europe/London'",
            details=[{"pointer": pointer, "message": "unknown time zone"}],
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # listed but not loadable
        raise Invalid(f"Unknown time zone {name!r}") from exc


def _local(value: date, tz: ZoneInfo) -> datetime:
    """The first instant of local day `value` (a midnight a DST change skips starts at the
    change)."""
    wall = datetime(value.year, value.month, value.day, tzinfo=tz)
    return wall.astimezone(UTC).astimezone(tz)


def _months_back(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    month += 1
    for last in (31, 30, 29, 28):
        try:
            return date(year, month, min(day.day, last))
        except ValueError:
            continue
    raise AssertionError("unreachable")


def preset_range(preset: Preset, tz: ZoneInfo, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of a preset, in the zone, as of `now`."""
    local_now = now.astimezone(tz)
    today = _local(local_now.date(), tz)
    if preset == "today":
        return today, _local(local_now.date() + timedelta(days=1), tz)
    if preset == "yesterday":
        return _local(local_now.date() - timedelta(days=1), tz), today
    if preset in _DAYS_BACK:
        back = local_now.date() - timedelta(days=_DAYS_BACK[preset])
    else:
        back = _months_back(local_now.date(), _MONTHS_BACK[preset])
    wall = datetime.combine(back, local_now.timetz().replace(tzinfo=None), tzinfo=tz)
    return wall.astimezone(UTC).astimezone(tz), local_now


def truncate(instant: datetime, interval: Interval, tz: ZoneInfo) -> datetime:
    """The start of the bucket that holds `instant`."""
    local = instant.astimezone(tz)
    if interval == "hour":
        return local.replace(minute=0, second=0, microsecond=0).astimezone(UTC).astimezone(tz)
    day = local.date()
    if interval == "isoWeek":
        day -= timedelta(days=day.weekday())
    elif interval == "month":
        day = day.replace(day=1)
    elif interval == "quarter":
        day = day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    return _local(day, tz)


def following(start: datetime, interval: Interval, tz: ZoneInfo) -> datetime:
    """The start of the bucket after the one that starts at `start`."""
    if interval == "hour":
        step = start.astimezone(UTC) + timedelta(hours=1)
        aligned = truncate(step, "hour", tz)
        return aligned if aligned > start else step.astimezone(tz)
    day = start.astimezone(tz).date()
    if interval == "day":
        return _local(day + timedelta(days=1), tz)
    if interval == "isoWeek":
        return _local(day + timedelta(days=7), tz)
    months = 1 if interval == "month" else 3
    return _local(_months_back(day.replace(day=1), -months), tz)


@dataclass(frozen=True, slots=True)
class Frame:
    """A range cut into buckets: `starts[i]` opens bucket i, which closes at `starts[i+1]`
    (the last at `end`). `start` / `end` are the range asked for; `end` is no later than
    the moment of the request (no bucket lies in the future)."""

    start: datetime
    end: datetime
    starts: list[datetime]

    def closes(self) -> list[datetime]:
        return [*self.starts[1:], self.end]


def frame(
    *,
    preset: Preset | None,
    start: datetime | None,
    end: datetime | None,
    tz: ZoneInfo,
    interval: Interval,
    now: datetime,
) -> Frame:
    """The buckets of a request's range: a preset, or explicit bounds (a bound without an
    offset is read in the zone)."""
    if preset is not None:
        if start is not None or end is not None:
            raise Invalid("Give timeRange.preset or timeRange.from/to, not both")
        if preset in _LONG_PRESETS and interval != "quarter":
            raise Invalid(
                f"timeRange.preset {preset!r} needs timeInterval 'quarter'",
                details=[{"pointer": "/timeInterval", "message": "must be 'quarter'"}],
            )
        start, end = preset_range(preset, tz, now)
    else:
        if start is None or end is None:
            raise Invalid("timeRange needs a preset, or both from and to")
        start = start if start.tzinfo else start.replace(tzinfo=tz)
        end = end if end.tzinfo else end.replace(tzinfo=tz)
        if end <= start:
            raise Invalid(
                "timeRange.to must be after timeRange.from",
                details=[{"pointer": "/timeRange/to", "message": "not after from"}],
            )
    start, end = start.astimezone(UTC), min(end, now).astimezone(UTC)
    starts: list[datetime] = []
    cursor = truncate(start, interval, tz)
    while cursor < end:
        starts.append(cursor.astimezone(UTC))
        if len(starts) > MAX_BUCKETS:
            raise Invalid(
                f"The range holds more than {MAX_BUCKETS} {interval} buckets: choose a "
                "longer timeInterval or a shorter timeRange",
                details=[{"pointer": "/timeInterval", "message": "too many buckets"}],
            )
        cursor = following(cursor, interval, tz)
    return Frame(start=start, end=max(end, start), starts=starts)


def epoch_ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)
