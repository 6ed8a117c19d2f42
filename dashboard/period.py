"""The timeline's period and its deep links: which stretch of a patient's history a page opens on.

No Streamlit here (tested with plain pytest).

**Latest episode** (the default, :func:`latest_episode`): a clinician opens a timeline to see
what is new. When the store knows the patient's admissions (MIMIC-IV ``admissions``), the
episode is the admission that holds the patient's newest result, from its admission to its
discharge (widened to the newest result when results were filed after the discharge time).
Otherwise - no admissions known, or the newest result was taken outside any admission
(outpatient) - it is the last :data:`EPISODE_DAYS` days up to the newest result. "All" is one
click away.

**Deep links** (:func:`timeline_link`, :func:`parse_period`): ``timeline?patient=ID`` opens a
patient's timeline; ``&analyte=CODE[,CODE...]`` picks the charts; ``&period=`` is one of
:data:`PERIOD_TOKENS` (``episode``, ``7d``, ``30d``, ``6mo``, ``1y``, ``all``) or a date range
``YYYY-MM-DD..YYYY-MM-DD``. The page writes its current choice back into the address, so the
address bar can be bookmarked or shared at any time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlencode

import pandas as pd

__all__ = ["EPISODE_DAYS", "PERIODS", "PERIOD_TOKENS", "Episode", "latest_episode", "parse_period", "period_token",
           "timeline_link", "around_period", "parse_analytes"]

EPISODE_DAYS = 90
# label shown on the page -> days back from the newest result (None: all; "episode"/"custom": special)
PERIODS = {"Latest episode": "episode", "7 d": 7, "30 d": 30, "6 mo": 182, "1 y": 365, "All": None, "Custom": "custom"}
PERIOD_TOKENS = {"episode": "Latest episode", "7d": "7 d", "30d": "30 d", "6mo": "6 mo", "1y": "1 y", "all": "All"}
_RANGE = re.compile(r"^\s*(\d{4}-\d{2}-\d{2})\s*\.\.\s*(\d{4}-\d{2}-\d{2})\s*$")
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,63}$")  # LOINC '2823-3' or a local code 'mimic:50971'


@dataclass(frozen=True)
class Episode:
    """A stretch of a patient's history: ``start`` .. ``end`` (inclusive) and how it was chosen."""

    start: pd.Timestamp
    end: pd.Timestamp
    kind: str  # 'admission' or 'recent'
    label: str  # e.g. 'admission 2180-07-23 → 2180-07-25 (EW EMER.)' or 'last 90 days'


def latest_episode(newest_result, admissions: pd.DataFrame | None = None, days: int = EPISODE_DAYS) -> Episode | None:
    """The period a timeline opens on (module docstring); None when the patient has no result.

    Args:
        newest_result: the time of the patient's newest result (any analyte).
        admissions: ``admitted_at, discharged_at`` (``admission_type`` optional), one row per
            admission; None or empty when the source had none.
        days: length of the fallback window, days back from the newest result.
    """
    if newest_result is None or pd.isna(newest_result):
        return None
    newest = pd.Timestamp(newest_result)
    if admissions is not None and len(admissions):
        adm = admissions.dropna(subset=["admitted_at"])
        start = pd.to_datetime(adm["admitted_at"])
        end = pd.to_datetime(adm["discharged_at"]).fillna(pd.Timestamp.max)
        holds = adm[(start <= newest) & (newest <= end)]
        if len(holds):
            last = holds.sort_values("admitted_at").iloc[-1]
            a0 = pd.Timestamp(last["admitted_at"])
            a1 = last["discharged_at"]
            a1 = newest if a1 is None or pd.isna(a1) else max(pd.Timestamp(a1), newest)
            kind = last.get("admission_type")
            label = (f"admission {a0:%Y-%m-%d} → "
                     + (f"{pd.Timestamp(last['discharged_at']):%Y-%m-%d}" if not pd.isna(last["discharged_at"])
                        else "not discharged")
                     + (f" ({kind})" if isinstance(kind, str) and kind else ""))
            return Episode(a0, a1, "admission", label)
    return Episode(newest - pd.Timedelta(days=days), newest, "recent", f"last {days} days")


def parse_period(token: str | None) -> tuple[str, tuple[date, date] | None] | None:
    """A ``period=`` value as (page label, date range for 'Custom' else None); None when unreadable.

    ``'all'`` -> ``('All', None)``; ``'2024-01-01..2024-01-15'`` -> ``('Custom', (date, date))``
    (the two dates in order).
    """
    if not token:
        return None
    t = str(token).strip().lower()
    if t in PERIOD_TOKENS:
        return PERIOD_TOKENS[t], None
    m = _RANGE.match(t)
    if not m:
        return None
    try:
        a, b = date.fromisoformat(m.group(1)), date.fromisoformat(m.group(2))
    except ValueError:
        return None
    return "Custom", (min(a, b), max(a, b))


def period_token(label: str | None, dates: tuple | None = None) -> str | None:
    """The ``period=`` value of a page choice (inverse of :func:`parse_period`)."""
    if label == "Custom":
        if dates and len(dates) == 2 and all(dates):
            return f"{pd.Timestamp(dates[0]):%Y-%m-%d}..{pd.Timestamp(dates[1]):%Y-%m-%d}"
        return None
    return next((k for k, v in PERIOD_TOKENS.items() if v == label), None)


def parse_analytes(value: str | None) -> list[str]:
    """``analyte=2823-3,2951-2`` as codes (order kept, duplicates and malformed entries dropped)."""
    if not value:
        return []
    out = []
    for part in str(value).split(","):
        code = part.strip()
        if code and _CODE.match(code) and code not in out:
            out.append(code)
    return out


def around_period(t, days: int = 7) -> str:
    """The ``period=`` value of the dates ``t - days .. t + days``."""
    t = pd.Timestamp(t)
    return f"{t - pd.Timedelta(days=days):%Y-%m-%d}..{t + pd.Timedelta(days=days):%Y-%m-%d}"


def timeline_link(patient_id: str, analytes=None, period: str | None = None, around=None, days: int = 7) -> str:
    """The relative address of a timeline: ``timeline?patient=...&analyte=...&period=...``.

    ``around`` (a time) with ``days``: the period is the dates ``around - days .. around + days``
    (a review card links to the chart around its output).
    """
    params = {"patient": str(patient_id)}
    codes = [analytes] if isinstance(analytes, str) else list(analytes or [])
    if codes:
        params["analyte"] = ",".join(str(c) for c in codes)
    if around is not None and not pd.isna(around):
        period = around_period(around, days)
    if period:
        params["period"] = period
    return "timeline?" + urlencode(params)
