"""Collection times and time zones: UTC in the store, the source's offset beside it.

A lab export writes local wall-clock times. Across a daylight-saving change two things go wrong
when they are stored as written: an hour that never happened (the clock jumped from 02:00 to
03:00) and an hour that happened twice (03:00 back to 02:00), whose results then sort in the
wrong order. The importer therefore reads every collection time in a zone and stores

* ``collected_at`` in UTC and ``utc_offset_min`` (minutes east of UTC at that instant), so that
  the local time at collection is ``collected_at + utc_offset_min`` exactly;
* ``time_flag`` ``skipped_hour`` for a local time inside a spring-forward gap (read with the
  offset in force before the change, as PEP 495 does for ``fold=0``), ``repeated_hour`` for
  one inside a fall-back fold (read as its first occurrence, ``fold=0``).

Which zone: an ISO 8601 offset written in the file (``+02:00``, ``Z``) wins; otherwise the
import's ``--timezone``, else the site setting ``LABTREND_TIMEZONE`` (:func:`site_zone`). With
none of these the time is stored as written and ``utc_offset_min`` is NULL (zone unknown).

The zone rules are the IANA database's, through :mod:`zoneinfo` and pandas' ``tz_localize``
(the ``tzdata`` package provides the database where the system has none); nothing here
encodes a daylight-saving rule.
"""

from __future__ import annotations

import functools
import os
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import numpy as np
import pandas as pd

__all__ = ["SKIPPED_HOUR", "REPEATED_HOUR", "ZoneError", "zone", "site_zone", "zone_names", "localize",
           "local_time", "format_offset", "time_text"]

SKIPPED_HOUR = "skipped_hour"
REPEATED_HOUR = "repeated_hour"
TIME_FMT = "%Y-%m-%d %H:%M"
DATE_FMT = "%Y-%m-%d"


class ZoneError(ValueError):
    """A time zone name that the IANA database does not know; the message names it."""


def zone(name: str | None) -> ZoneInfo | None:
    """The IANA zone ``name`` (``Europe/Berlin``), None for None / blank.

    Raises :class:`ZoneError` for an unknown name or an abbreviation such as ``CET``/``EST``
    that names no daylight-saving rule of a place.
    """
    if name is None or not str(name).strip():
        return None
    name = str(name).strip()
    try:
        z = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ZoneError(f"unknown time zone {name!r}: give an IANA name such as 'Europe/Berlin' "
                        "or 'America/New_York'") from exc
    return z


def site_zone() -> str | None:
    """The site's time zone for files without one: ``$LABTREND_TIMEZONE`` (an IANA name), else None."""
    value = os.environ.get("LABTREND_TIMEZONE", "").strip()
    if value:
        zone(value)  # an unknown name is an error here, not at the first import
    return value or None


@functools.lru_cache(maxsize=1)
def zone_names() -> list[str]:
    """Every IANA zone name of the installed database, sorted (for a picker; read once)."""
    return sorted(n for n in available_timezones() if "/" in n and not n.startswith(("Etc/", "SystemV/")))


def localize(local: np.ndarray, zone_name: str) -> pd.DataFrame:
    """Read naive local times in ``zone_name``.

    ``local``: naive ``datetime64`` values (any unit; NaT allowed). Returns one row per input,
    columns ``local`` (as given), ``offset_min`` (int16, minutes east of UTC: UTC = local -
    offset) and ``flag`` (:data:`SKIPPED_HOUR`, :data:`REPEATED_HOUR` or None). Raises
    :class:`ZoneError` for an unknown zone.
    """
    z = zone(zone_name)
    idx = pd.DatetimeIndex(pd.to_datetime(np.asarray(local)))
    if idx.tz is not None:
        raise ValueError("localize expects naive local times")
    # every unambiguous time in one vectorised call; gap and fold times come back NaT
    aware = idx.tz_localize(z, ambiguous="NaT", nonexistent="NaT")
    utc = aware.tz_convert("UTC").tz_localize(None)
    offset = np.array(((idx - utc) / pd.Timedelta(minutes=1)).to_numpy(dtype=float, na_value=np.nan))
    flag = np.full(len(idx), None, dtype=object)
    for i in np.flatnonzero(aware.isna() & idx.notna()):
        off, kind = _gap_or_fold(idx[i].to_pydatetime(), z)
        offset[i], flag[i] = off, kind
    out = pd.DataFrame({"local": idx, "offset_min": offset, "flag": flag})
    out["offset_min"] = out["offset_min"].astype("Int16")
    return out


def _gap_or_fold(dt: datetime, z: ZoneInfo) -> tuple[int, str]:
    """(offset in minutes, flag) of a wall time pandas could not place: PEP 495's ``fold=0`` offset
    (the one in force before the change) and whether the time was skipped or repeated."""
    first = dt.replace(tzinfo=z, fold=0)
    offset = int(first.utcoffset() / timedelta(minutes=1))
    round_trip = first.astimezone(timezone.utc).astimezone(z).replace(tzinfo=None)
    return offset, (REPEATED_HOUR if round_trip == dt else SKIPPED_HOUR)


def local_time(collected_at: pd.Series, utc_offset_min: pd.Series | None) -> pd.Series:
    """Local wall time at collection: ``collected_at`` plus its offset (as stored when unknown)."""
    t = pd.to_datetime(collected_at)
    if utc_offset_min is None:
        return t
    off = pd.to_numeric(utc_offset_min, errors="coerce").fillna(0).to_numpy(dtype=float)
    return t + pd.to_timedelta(off, unit="min")


def format_offset(minutes) -> str:
    """``UTC+02:00`` for 120; '' when the offset is unknown."""
    if minutes is None or (isinstance(minutes, float) and np.isnan(minutes)) or minutes is pd.NA:
        return ""
    m = int(minutes)
    sign = "+" if m >= 0 else "-"
    return f"UTC{sign}{abs(m) // 60:02d}:{abs(m) % 60:02d}"


def time_text(collected_at, utc_offset_min=None, time_unknown=False, time_flag=None, with_flag: bool = True) -> str:
    """How a collection time reads in the UI: local time with its offset, a date alone when the
    source gave no time, and what a daylight-saving flag means.

    ``collected_at``: the stored time (UTC when ``utc_offset_min`` is known).
    """
    if collected_at is None or pd.isna(collected_at):
        return ""
    known = utc_offset_min is not None and not pd.isna(utc_offset_min)
    t = pd.Timestamp(collected_at) + (pd.Timedelta(minutes=int(utc_offset_min)) if known else pd.Timedelta(0))
    if bool(time_unknown) if time_unknown is not None and not pd.isna(time_unknown) else False:
        return f"{t.strftime(DATE_FMT)} (time not given)"
    text = t.strftime(TIME_FMT) + (f" ({format_offset(utc_offset_min)})" if known else "")
    if with_flag and time_flag == SKIPPED_HOUR:
        text += " – in the hour skipped by the clock change: the written time did not exist"
    elif with_flag and time_flag == REPEATED_HOUR:
        text += " – in the hour repeated by the clock change: it may be the second occurrence (later)"
    return text
