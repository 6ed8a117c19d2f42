"""Pure figure and table builders: DataFrames in, Plotly figures or DataFrames out.

Nothing here imports Streamlit or touches the database, so every builder is tested with
plain pytest on ``fig.data`` / ``fig.layout``. Inputs follow the project's contracts:

* **results** - :data:`data.queries.TIMELINE_COLUMNS` (one row per stored result), plus,
  optionally, ``ref_low_catalogue, ref_high_catalogue`` (the catalogue's reference interval
  for this patient, canonical unit) and ``critical_low, critical_high`` (site critical
  limits, canonical unit), as added by :func:`dashboard.services.with_reference_limits`.
* **forecasts** - the forecast frame of ``model/__init__.py``: ``patient_id, analyte_code,
  at, q05 .. q95, unit, n_history, status, model_version`` (optional ``lo95, hi95``: the
  conformal 95 % prediction interval; drawn instead of q05..q95 when present).
* **anomalies** - :data:`dashboard.services.ANOMALY_COLUMNS` (``clinical.anomalies``); each
  flag other than ``reference_interval`` (already the H/L label) rings its result and names
  its rule.

How the timeline draws each kind of result (Sittig et al. 2015 lab-graph criteria; cases
LAB-01/02/04/05/10):

==========================  ==========================================================
numeric result              circle at its value in the canonical unit; outside the
                            reference interval: red with an ``H``/``L`` text label
                            (``HH``/``LL`` beyond the critical limits)
censored ``<x`` / ``>x``    triangle-down / triangle-up at the limit, hover ``<10``
text or empty result        a marked gap: dotted vertical line and an ``x`` at the bottom
                            edge of the axis, the text in the hover; never a point at 0
implausible value (LAB-10)  arrow pinned at the axis edge, value as label; left out of
                            the axis range and of the trend line
unit missing (LAB-04)       grey open circle at the bottom edge (not to scale); left out
conflicting (LAB-05)        every value drawn (diamonds); the trend line follows the
                            model's rule (the one reported last)
==========================  ==========================================================
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from datetime import date, datetime, timedelta

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from model import history_basis  # "based on 1 measurement" (no torch: model/__init__ is plain Python)

__all__ = [
    "COLORS",
    "display_unit",
    "readable_units",
    "fmt_value",
    "date_bounds",
    "flag_label",
    "declutter_labels",
    "rule_label",
    "panel_analytes",
    "PANEL_LABELS",
    "panels_of",
    "analyte_label",
    "make_timeline_figure",
    "make_cumulative_table",
    "time_label",
    "local_times",
    "style_cumulative_table",
    "explanation_difference",
    "make_shap_bar",
    "make_calibration_plot",
    "flag_labels",
    "with_display_columns",
    "thin",
    "make_results_list",
    "agreement_table",
]

# Okabe-Ito based palette: distinguishable with colour-vision deficiency, and every colour
# cue also has a shape or text cue.
COLORS = {
    "normal": "#1f4e79",
    "abnormal": "#c62828",
    "critical": "#7f0000",
    "trend": "#6b8bb0",
    "gap": "#555555",
    "implausible": "#8e24aa",
    "unit_missing": "#9e9e9e",
    "band": "rgba(46, 125, 50, 0.12)",
    "band_line": "rgba(46, 125, 50, 0.45)",
    "forecast": "#d55e00",
    "forecast80": "rgba(213, 94, 0, 0.28)",
    "forecast_outer": "rgba(213, 94, 0, 0.12)",
    "anomaly": "#e69f00",
}
FONT = dict(family="Inter, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif", size=14, color="#1a1a1a")
ROW_HEIGHT = 220  # px per analyte
MODEBAR_PX = 30  # Plotly's toolbar over the top right corner of a chart (shown on hover)
TIME_FMT = "%Y-%m-%d %H:%M"

_UNIT_DISPLAY = {
    "10*3/uL": "10³/µL", "10*6/uL": "10⁶/µL", "10*9/L": "10⁹/L", "10*12/L": "10¹²/L",
    "u[IU]/mL": "µIU/mL", "m[IU]/L": "mIU/L", "[IU]/mL": "IU/mL", "[IU]/L": "IU/L", "mm[Hg]": "mmHg",
    "ug/dL": "µg/dL", "ug/L": "µg/L", "umol/L": "µmol/L", "meq/L": "mEq/L", "1": "", "N/A": "",
}


# =============================================================================================
# Small helpers
# =============================================================================================
def display_unit(ucum: str | None) -> str:
    """A UCUM code as clinicians write it (``10*3/uL`` -> ``10³/µL``; ``1`` -> '')."""
    if ucum is None or (isinstance(ucum, float) and math.isnan(ucum)):
        return ""
    return _UNIT_DISPLAY.get(str(ucum), str(ucum))


_UNIT_IN_TEXT = re.compile(
    r"(?<![\w\[*/])(" + "|".join(re.escape(u) for u in sorted(
        (u for u in _UNIT_DISPLAY if u not in ("1", "N/A")), key=len, reverse=True)) + r")(?![\w\[\]*/])")


def readable_units(text) -> str:
    """Free text (an anomaly's or output's wording) with UCUM unit codes as clinicians write them
    ('68 mm[Hg]' -> '68 mmHg', '4.1 10*3/uL' -> '4.1 10³/µL'); other text unchanged."""
    return _UNIT_IN_TEXT.sub(lambda m: _UNIT_DISPLAY[m.group(1)], _s(text))


def fmt_value(v, decimals: int | None = None) -> str:
    """A result number at the analyte's reporting precision (``decimals``; :mod:`dashboard.precision`),
    or without false precision when it is unknown (139, 4.1, 0.001, 1276103)."""
    from dashboard.precision import fmt

    return fmt(v, decimals)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _s(v) -> str:
    """A cell as text ('' for missing)."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def _interval(row) -> tuple[float | None, float | None]:
    """The reference interval of a result in the canonical unit: the row's own, else the catalogue's."""
    lo, hi = _num(row.get("ref_low_canonical")), _num(row.get("ref_high_canonical"))
    if lo is None and hi is None:
        lo, hi = _num(row.get("ref_low_catalogue")), _num(row.get("ref_high_catalogue"))
    return lo, hi


def flag_label(row) -> str:
    """The abnormal flag to print next to a result: 'HH', 'H', 'L', 'LL', 'A', 'AA' or ''.

    One rule with the anomaly rules and the Patients list (:func:`clinical.flags.flag_of`): the
    critical limits always; then the flag as reported; then the result's own reference interval,
    else the catalogue's for this sex and age. A censored value is flagged only when the limit
    itself settles it ('<3' below a low of 3.3 is 'L'; '<10' with a low of 3.3 is not flagged).
    Implausible results get no flag (they have their own marker).
    """
    from clinical.flags import flag_of

    lo, hi = _interval(row)
    f = flag_of(row.get("value_canonical"), _s(row.get("comparator")) or None, row.get("result_kind"),
                reported=row.get("flag"), low=lo, high=hi, critical_low=row.get("critical_low"),
                critical_high=row.get("critical_high"), implausible=bool(row.get("implausible")),
                unit_missing=bool(row.get("unit_missing")))
    return "" if f in (None, "N") else f


def _catalogue():
    from data.catalogue import load_catalogue  # versioned reference file, read once

    return load_catalogue()


def panel_analytes(results: pd.DataFrame, panel: str | Sequence[str] | None) -> list[str]:
    """Analyte codes of ``results`` to draw, in catalogue order (others by frequency).

    ``panel`` is a catalogue panel name (``'electrolytes'``; ``'other'`` for analytes the
    catalogue does not know), an explicit list of analyte codes, or None for all.
    """
    if results.empty:
        return []
    cat = _catalogue()
    order = {a.code: i for i, a in enumerate(cat)}
    counts = results["analyte_code"].value_counts()
    codes = list(counts.index)
    if isinstance(panel, str):
        codes = [c for c in codes if (cat.get(c).panel if c in cat else "other") == panel]
    elif panel is not None:
        wanted = list(panel)
        return [c for c in wanted if c in counts.index]
    return sorted(codes, key=lambda c: (order.get(c, len(order)), -int(counts[c]), c))


PANEL_LABELS = {
    "electrolytes": "Electrolytes", "renal": "Renal", "cbc": "Blood count (CBC)", "liver": "Liver",
    "glycaemia": "Glucose / HbA1c", "lipids": "Lipids", "blood_gas": "Blood gas", "coagulation": "Coagulation",
    "cardiac": "Cardiac", "inflammation": "Inflammation", "iron": "Iron studies", "thyroid": "Thyroid",
    "urine": "Urine", "other": "Other (not in the catalogue)",
}


def panels_of(results: pd.DataFrame) -> dict[str, list[str]]:
    """Panel -> analyte codes with at least one plottable (non-text) result, panels in catalogue order."""
    if results.empty:
        return {}
    cats = _classify(results)
    plottable = results.loc[cats != "gap", "analyte_code"].unique()
    cat = _catalogue()
    out: dict[str, list[str]] = {}
    for code in panel_analytes(results[results["analyte_code"].isin(plottable)], None):
        out.setdefault(cat.get(code).panel if code in cat else "other", []).append(code)
    order = list(PANEL_LABELS)
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def analyte_label(results: pd.DataFrame, code: str) -> str:
    """'Sodium (mmol/L)' for pickers and tables."""
    name, unit = _analyte_title(results, code)
    u = display_unit(unit)
    return f"{name} ({u})" if u else name


def _analyte_title(results: pd.DataFrame, code: str) -> tuple[str, str]:
    """(name, canonical unit) of an analyte: catalogue first, else as stored."""
    cat = _catalogue()
    a = cat.get(code) if code in cat else None
    if a:
        return a.name, a.canonical_unit
    rows = results[results["analyte_code"] == code]
    units = rows["unit_canonical"].dropna()
    names = rows["analyte_name"].dropna()
    return (names.mode().iloc[0] if len(names) else code), (units.mode().iloc[0] if len(units) else "")


def _axis_title(name: str, unit: str) -> str:
    lines = textwrap.wrap(name, 18) or [name]
    u = display_unit(unit)
    return "<br>".join(lines[:3]) + (f"<br>({u})" if u else "<br>(no unit)")


def _to_ts(v) -> pd.Timestamp | None:
    if v is None:
        return None
    return pd.Timestamp(v)


def date_bounds(date_range) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    if not date_range:
        return None, None
    start, end = (list(date_range) + [None, None])[:2]
    start, end = _to_ts(start), _to_ts(end)
    # a plain date as the end means "through that day"
    if end is not None and isinstance(date_range[1], date) and not isinstance(date_range[1], datetime):
        end = end + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    return start, end


# =============================================================================================
# Timeline
# =============================================================================================
def _classify(df: pd.DataFrame) -> pd.Series:
    """One drawing category per result (see the module docstring); read from ``draw_category`` when
    :func:`with_display_columns` computed it for the whole patient."""
    if "draw_category" in df:
        return df["draw_category"]
    kind = df["result_kind"].astype(str)
    cat = pd.Series("numeric", index=df.index, dtype=object)
    cat[df["conflicting"].astype(bool)] = "conflicting"
    cat[kind == "censored"] = "censored"
    cat[df["implausible"].astype(bool)] = "implausible"
    cat[df["unit_missing"].astype(bool)] = "unit_missing"
    cat[kind.isin(["text", "empty"]) | df["value_canonical"].isna() & ~df["unit_missing"].astype(bool)] = "gap"
    return cat


def _trend_rows(df: pd.DataFrame, cats: pd.Series) -> pd.DataFrame:
    """The series the model sees: exact and censored values, no implausible or unit-missing;
    one value per time (the one reported last, as in :func:`data.queries.cohort`)."""
    use = df[cats.isin(["numeric", "conflicting", "censored"])].copy()
    if use.empty:
        return use
    use["_rep"] = use["reported_at"].fillna(pd.Timestamp.min) if "reported_at" in use else pd.Timestamp.min
    use = use.sort_values(["collected_at", "_rep", "result_id"])
    return use.drop_duplicates("collected_at", keep="last")


def time_label(row, with_flag: bool = True) -> str:
    """A result's collection time as the clinician reads it: local time at collection (stored UTC
    plus its offset, :mod:`data.timezones`), the date alone when the source gave no time, and
    what a daylight-saving flag means. ``row``: a mapping with ``collected_at`` and, when known,
    ``utc_offset_min``, ``time_unknown``, ``time_flag``."""
    from data.timezones import time_text

    return time_text(row["collected_at"], row.get("utc_offset_min"), row.get("time_unknown"),
                     row.get("time_flag"), with_flag=with_flag)


def local_times(frame: pd.DataFrame, results: pd.DataFrame | None = None) -> pd.Series:
    """``collected_at`` of ``frame`` as local time at collection: plus its own ``utc_offset_min``,
    else the offset of the result with the same ``result_id`` in ``results`` (anomaly rows)."""
    from data.timezones import local_time

    if "utc_offset_min" in frame:
        return local_time(frame["collected_at"], frame["utc_offset_min"])
    if results is not None and "result_id" in frame and "utc_offset_min" in results:
        off = frame["result_id"].map(results.drop_duplicates("result_id").set_index("result_id")["utc_offset_min"])
        return local_time(frame["collected_at"], off)
    return pd.to_datetime(frame["collected_at"])


def _hover(row, name: str, unit: str, label: str, note: str = "", dec: int | None = None) -> str:
    u = display_unit(unit)
    t = time_label(row)
    comp = _s(row.get("comparator"))
    v = _num(row.get("value_canonical"))
    value = (comp if comp in ("<", "<=", ">", ">=") else "") + fmt_value(v, dec) if v is not None else _s(row.get("value_text"))
    lines = [f"<b>{name}</b>: {value} {u}".rstrip(), t]
    lo, hi = _interval(row)
    if lo is not None or hi is not None:
        lines.append(f"Reference: {fmt_value(lo, dec) if lo is not None else '–'}–{fmt_value(hi, dec) if hi is not None else '–'} {u}".rstrip())
    flag_txt = label or "none"
    reported = _s(row.get("flag"))
    if reported and reported.strip().upper() != label:
        flag_txt += f" (reported: {reported})"
    lines.append(f"Flag: {flag_txt}")
    original = (_s(row.get("value_text")) + " " + _s(row.get("unit"))).strip()
    lines.append(f"As reported: {original or '(empty)'}")
    comment = _s(row.get("comment"))
    if comment:
        lines.append(f"Comment: {textwrap.shorten(comment, 80)}")
    if note:
        lines.append(f"<i>{note}</i>")
    return "<br>".join(lines)


MIN_SPAN_FRACTION = 0.10  # the y-axis spans at least 10% of the values' size: 13.8 -> 13.6 is not a cliff


def _y_range(values) -> tuple[float, float]:
    vals = np.asarray(values, dtype=float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    centre = (lo + hi) / 2
    min_span = MIN_SPAN_FRACTION * max(abs(lo), abs(hi)) or 1.0
    if hi - lo < min_span:
        lo, hi = centre - min_span / 2, centre + min_span / 2
    pad = 0.12 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if float(vals.min()) >= 0 > lo:  # no negative axis for values that cannot be negative
        lo = 0.0 if float(vals.min()) > 0 else -pad
    return lo, hi


_SEVERITY = {"HH": 0, "LL": 0, "H": 1, "L": 1, "A": 2}


def declutter_labels(xs: Sequence, ys: Sequence[float], labels: Sequence[str], x_range: tuple, y_range: tuple,
                     min_dx: float = 0.025, min_dy: float = 0.12) -> list[bool]:
    """Which flag labels to print so that no two touch: a list of booleans in the input order.

    Labels are placed most severe first (HH/LL, then H/L, then A), the most recent first within
    a severity; a label is left off when one already placed is closer than ``min_dx`` of the
    x-range **and** ``min_dy`` of the y-range (about the size of a label on a 220 px chart in a
    wide layout). Two adjacent "L" labels would otherwise read as "LL" (critical).
    """
    x0, x1 = (pd.Timestamp(v).value for v in x_range)
    y0, y1 = y_range
    span_x, span_y = max(x1 - x0, 1), max(y1 - y0, 1e-12)
    pos = [((pd.Timestamp(x).value - x0) / span_x, (float(y) - y0) / span_y) for x, y in zip(xs, ys)]
    order = sorted(range(len(labels)), key=lambda k: (_SEVERITY.get(labels[k], 3), -pos[k][0]))
    placed: list[tuple[float, float]] = []
    keep = [False] * len(labels)
    for k in order:
        px, py = pos[k]
        if all(abs(px - qx) >= min_dx or abs(py - qy) >= min_dy for qx, qy in placed):
            keep[k] = True
            placed.append((px, py))
    return keep


def _scatter(**kwargs) -> dict:
    """A scatter trace as a plain dict (validated once, when :meth:`_Draft.figure` builds the figure)."""
    return {"type": "scatter", **kwargs}


def _merge(into: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


class _Draft:
    """A subplot figure collected as plain dicts, with the few ``go.Figure`` methods the timeline uses.

    Plotly's object model makes every ``add_trace``/``update_layout`` on a Figure cost about a
    millisecond or more; a timeline has ~100 traces. Collecting dicts and building the Figure
    once (:meth:`figure`) gives the same figure several times faster.
    """

    def __init__(self, subplots: go.Figure):
        self.layout = subplots.layout.to_plotly_json()
        self.data: list[dict] = []

    def add_trace(self, trace: dict, row: int, col: int = 1) -> None:
        suffix = str(row) if row > 1 else ""
        self.data.append({**trace, "xaxis": f"x{suffix}", "yaxis": f"y{suffix}"})

    def add_shape(self, **shape) -> None:
        self.layout.setdefault("shapes", []).append(shape)

    def add_annotation(self, **annotation) -> None:
        self.layout.setdefault("annotations", []).append(annotation)

    def update_xaxes(self, **update) -> None:
        for key in [k for k in self.layout if k.startswith("xaxis")]:
            _merge(self.layout[key], update)

    def update_layout(self, update: dict | None = None, **more) -> None:
        _merge(self.layout, {**(update or {}), **more})

    def figure(self) -> go.Figure:
        return go.Figure(data=self.data, layout=self.layout)


class _Legend:
    """Shows each legend entry once across all small multiples."""

    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, name: str) -> bool:
        if name in self.seen:
            return False
        self.seen.add(name)
        return True


def flag_labels(df: pd.DataFrame) -> pd.Series:
    """:func:`flag_label` of every row at once (:func:`clinical.flags.flags_of`, the same rule vectorised):
    a Series of 'HH', 'H', 'L', 'LL', 'A', 'AA', ''."""
    from clinical.flags import flags_of

    if df.empty:
        return pd.Series([], index=df.index, dtype=object)
    if "flag_label" in df:  # computed once for the patient (with_display_columns)
        return df["flag_label"]
    lo, hi = _intervals(df)
    f = flags_of(df["value_canonical"], df["comparator"].astype(object), df["result_kind"].astype(object),
                 reported=df["flag"].astype(object) if "flag" in df else [None] * len(df), low=lo, high=hi,
                 critical_low=_col(df, "critical_low"), critical_high=_col(df, "critical_high"),
                 implausible=df["implausible"].fillna(False).astype(bool),
                 unit_missing=df["unit_missing"].fillna(False).astype(bool))
    out = np.array(["" if x in (None, "N") else x for x in f], dtype=object)
    return pd.Series(out, index=df.index, dtype=object)


def with_display_columns(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` (with its limits: :func:`dashboard.services.with_reference_limits`) plus ``flag_label``
    (:func:`flag_labels`) and ``draw_category`` (numeric, censored, gap, ...), computed once for the patient:
    the chart, the results list and the cumulative table of every period then read them instead of
    working them out again over every row (a year of 5-minute results: about 0.4 s a view). The result
    shares ``results``' other columns (copy-on-write)."""
    out = results.copy(deep=False)
    out["flag_label"] = pd.Series(flag_labels(results).to_numpy(dtype=object), index=results.index, dtype=object)
    out["draw_category"] = pd.Series(_classify(results).to_numpy(dtype=object), index=results.index, dtype=object)
    return out


def _col(df: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(df[name], errors="coerce").to_numpy(float) if name in df else np.full(len(df), np.nan)


def _intervals(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) reference limits per row, canonical unit, NaN when unknown: the row's own, else the catalogue's
    (as :func:`_interval`)."""
    own_lo, own_hi = _col(df, "ref_low_canonical"), _col(df, "ref_high_canonical")
    cat_lo, cat_hi = _col(df, "ref_low_catalogue"), _col(df, "ref_high_catalogue")
    own = np.isfinite(own_lo) | np.isfinite(own_hi)
    return np.where(own, own_lo, cat_lo), np.where(own, own_hi, cat_hi)


MAX_POINTS = 1500  # drawn markers per kind of result and chart; more are thinned (min-max + LTTB), all in the table
MAX_TREND_POINTS = 3000  # vertices of one chart's trend line
MAX_TEXT_MARKS = 60  # text results marked one by one on a time axis; more are grouped per stretch of the axis


def thin_positions(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Positions (sorted) of at most ``n_out`` points of the series ``x`` (int64, ascending) / ``y`` (finite
    floats) chosen by MinMaxLTTB (:func:`thin`); every position when there are few enough."""
    if len(x) <= n_out:
        return np.arange(len(x))
    from tsdownsample import MinMaxLTTBDownsampler

    idx = MinMaxLTTBDownsampler().downsample(np.ascontiguousarray(x, dtype=np.int64),
                                             np.ascontiguousarray(y, dtype=np.float64), n_out=max(n_out, 4))
    return np.sort(np.asarray(idx, dtype=np.int64))


def thin(sel: pd.DataFrame, n_out: int, y: str = "value_canonical") -> pd.DataFrame:
    """At most ``n_out`` rows of ``sel`` (sorted by ``collected_at``) that keep the series' shape: every
    local minimum and maximum of a pixel-sized bucket and the visually important points between
    (MinMaxLTTB, ``tsdownsample``; Van Der Donckt et al., IEEE VIS 2023). The rows kept are real
    results with their own values and hover, never averages; ``sel`` itself when it is small enough.
    """
    if len(sel) <= n_out:
        return sel
    x = sel["collected_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    yy = pd.to_numeric(sel[y], errors="coerce").to_numpy(float)
    ok = np.isfinite(yy)
    if not ok.all():  # the downsampler needs numbers: rows without one are kept only if few
        sel, x, yy = sel[ok], x[ok], yy[ok]
        if len(sel) <= n_out:
            return sel
    return sel.iloc[thin_positions(x, yy, n_out)]


def make_timeline_figure(
    results_df: pd.DataFrame,
    panel: str | Sequence[str] | None,
    forecasts: pd.DataFrame | None = None,
    anomalies: pd.DataFrame | None = None,
    date_range: tuple | None = None,
    *,
    decimals: dict | None = None,
    max_points: int = MAX_POINTS,
    highlight: Sequence | None = None,
    marker_at=None,
    row_height: int = ROW_HEIGHT,
) -> go.Figure:
    """Small multiples, one per analyte of ``panel``, on one shared, proportional time axis.

    Args:
        results_df: one patient's results (module docstring: *results*).
        panel: a catalogue panel name, a list of analyte codes, or None for every analyte
            (:func:`panel_analytes`). Analytes with only text results are left out (they
            are in the cumulative table).
        forecasts: forecast frame (``status == 'ok'`` rows are drawn); None or empty for none.
        anomalies: anomaly frame; each flag rings the result it refers to and names its rule.
        date_range: ``(start, end)`` dates or datetimes, inclusive; None for all results.
        decimals: ``{analyte_code: decimals}`` for every number shown
            (:func:`dashboard.precision.reporting_decimals` of ``results_df`` when None).
        max_points: markers drawn per kind of result and chart; a longer series is thinned by
            :func:`thin` (a year of 5-minute glucose draws in about a second), every result
            stays in the table and its drawn neighbours' hovers.
        highlight: result ids to ring as "Result under review" (the review card).
        marker_at: a time to mark with a dashed vertical line (the output under review).
        row_height: pixels per analyte.

    Returns:
        A figure whose y-axes are titled with analyte name and unit, oldest result left.
        ``fig.layout.meta`` holds ``analytes`` (codes in row order), ``hidden_flag_labels``
        (flag labels left off where they would overlap: :func:`declutter_labels`),
        ``thinned`` (``{code: [drawn, results]}`` for series drawn thinned), ``forecast_notes``
        (``{code: 'up to 7 d after the last result'}``) and ``forecast_status`` (``{code:
        reason}`` for analytes without a forecast); the page writes these under the chart
        instead of over the charts, where they overprinted the dates of the chart above.
        Text results are marked on each chart's time axis (annotations named ``text_result``,
        the text in their hover), never at a height on the value axis.
    """
    start, end = date_bounds(date_range)
    df = results_df
    if start is not None:
        df = df[df["collected_at"] >= start]
    if end is not None:
        df = df[df["collected_at"] <= end]
    if not df["collected_at"].is_monotonic_increasing:  # the store's timeline is in time order already
        df = df.sort_values(["collected_at", "result_id"])
    df = df.reset_index(drop=True)
    if decimals is None:
        from dashboard.precision import reporting_decimals

        decimals = reporting_decimals(results_df)
    cats = _classify(df) if len(df) else pd.Series(dtype=object)
    drawable = df.loc[cats != "gap", "analyte_code"].unique() if len(df) else []
    codes = [c for c in panel_analytes(df, panel) if c in set(drawable)]
    fc = forecasts if forecasts is not None and len(forecasts) else None
    an = anomalies if anomalies is not None and len(anomalies) else None

    if not codes:
        fig = go.Figure()
        fig.update_layout(
            template="plotly_white", font=FONT, height=220,
            meta={"analytes": [], "hidden_flag_labels": 0, "thinned": {}, "forecast_notes": {}, "forecast_status": {}},
            annotations=[dict(text="No numeric results in this selection", showarrow=False,
                              xref="paper", yref="paper", x=0.5, y=0.5, font=dict(size=16, color="#555"))],
        )
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return fig

    n = len(codes)
    height = 90 + row_height * n
    fig = _Draft(make_subplots(rows=n, cols=1, shared_xaxes=True, vertical_spacing=min(0.1, 70 / height)))
    legend = _Legend()
    yaxes: dict[str, dict] = {}
    meta = {"analytes": codes, "hidden_flag_labels": 0, "thinned": {}, "forecast_notes": {}, "forecast_status": {}}
    all_labels = flag_labels(df)
    lo_all, hi_all = _intervals(df)
    highlight = {int(h) for h in highlight or () if _num(h) is not None}

    # x extent: the data (and forecasts), padded, or the date range asked for
    t0, t1 = df["collected_at"].min(), df["collected_at"].max()
    if fc is not None:
        ats = pd.to_datetime(fc.loc[fc["status"] == "ok", "at"])
        if len(ats):
            t0, t1 = min(t0, ats.min()), max(t1, ats.max())
    pad = max((t1 - t0) * 0.03, pd.Timedelta(hours=12))
    x0 = start if start is not None else t0 - pad
    x1 = max(end, t1 + pad) if end is not None and fc is not None else (end if end is not None else t1 + pad)

    for i, code in enumerate(codes, start=1):
        sub = df["analyte_code"].to_numpy() == code
        rows = df[sub]
        rc = cats[rows.index]
        labels = all_labels[rows.index]
        lo_r, hi_r = lo_all[sub], hi_all[sub]
        name, unit = _analyte_title(df, code)
        dec = decimals.get(str(code)) if decimals else None

        # ---- y range: plotted values + reference band + forecast quantiles, never implausible ones
        in_scale = rows["value_canonical"][rc.isin(["numeric", "conflicting", "censored"])].astype(float).to_numpy()
        extra = [v for v in np.concatenate([lo_r, hi_r]) if math.isfinite(v)]
        extra = [min(extra), max(extra)] if extra else []
        fc_rows = None
        if fc is not None:
            fc_rows = fc[(fc["analyte_code"] == code)].copy()
            fc_rows["at"] = pd.to_datetime(fc_rows["at"])
            ok = fc_rows[fc_rows["status"] == "ok"]
            for col in ("q05", "q95", "lo95", "hi95"):
                if col in ok:
                    extra += [float(v) for v in ok[col] if _num(v) is not None]
        y0, y1 = _y_range(np.concatenate([in_scale, np.asarray(extra, dtype=float)]))

        # ---- reference band (step band following the row intervals, over the whole x range)
        band = _band_series(rows["collected_at"], lo_r, hi_r, x0, x1, dec)
        if band is not None:
            bx, blo, bhi, btxt = band
            fig.add_trace(_scatter(x=bx, y=blo, mode="lines", line=dict(width=0.8, color=COLORS["band_line"], shape="hv"),
                                   hoverinfo="skip", showlegend=False, legendgroup="ref", name="Reference interval (low)"),
                          row=i, col=1)
            fig.add_trace(_scatter(x=bx, y=bhi, mode="lines", line=dict(width=0.8, color=COLORS["band_line"], shape="hv"),
                                   fill="tonexty", fillcolor=COLORS["band"], name="Reference interval",
                                   legendgroup="ref", showlegend=legend("Reference interval"),
                                   text=btxt, hovertemplate="%{text}<extra></extra>"),
                          row=i, col=1)

        # ---- trend line through the model's series, broken at text results
        rc_arr = rc.to_numpy(object)
        x_ns = rows["collected_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
        y_val = pd.to_numeric(rows["value_canonical"], errors="coerce").to_numpy(float)
        if (rc_arr == "conflicting").any():  # one value per time, the one reported last (as the model)
            trend = _trend_rows(rows, rc)
        else:
            trend = rows.iloc[np.flatnonzero(np.isin(rc_arr, ["numeric", "censored"]))]
        gaps = rows[rc == "gap"]
        gap_marks = _text_marks(gaps, x0, x1)
        if len(trend) >= 2:
            tx = trend["collected_at"].to_numpy(dtype="datetime64[ns]")
            ty = pd.to_numeric(trend["value_canonical"], errors="coerce").to_numpy(float)
            keep = thin_positions(tx.astype(np.int64), ty, MAX_TREND_POINTS)
            tl = pd.DataFrame({"collected_at": np.concatenate([tx[keep], np.array([m[0] for m in gap_marks],
                                                                                  dtype="datetime64[ns]")]),
                               "value_canonical": np.concatenate([ty[keep], np.full(len(gap_marks), np.nan)])}
                              ).sort_values("collected_at", kind="stable")
            fig.add_trace(_scatter(x=tl["collected_at"], y=tl["value_canonical"], mode="lines",
                                   line=dict(color=COLORS["trend"], width=1.3), connectgaps=False,
                                   hoverinfo="skip", showlegend=False, name="Trend"),
                          row=i, col=1)

        # ---- the result under review (review card) and the output time: drawn first, under the points, so that
        #      the point's own H/L label stays readable over the ring
        if highlight:
            mark = rows[rows["result_id"].isin(highlight) & rc.isin(["numeric", "conflicting", "censored"])]
            if len(mark):
                recs = mark.to_dict("records")
                fig.add_trace(_scatter(
                    x=mark["collected_at"], y=list(mark["value_canonical"].astype(float)), mode="markers",
                    name="Result under review", legendgroup="review", showlegend=legend("Result under review"),
                    marker=dict(symbol="circle-open", size=24, color="#111111", line=dict(width=3, color="#111111")),
                    customdata=[_hover(r, name, unit, lab, "The result this output is about", dec)
                                for r, lab in zip(recs, labels[mark.index])],
                    hovertemplate="%{customdata}<extra></extra>", cliponaxis=False), row=i, col=1)
        if marker_at is not None:
            fig.add_shape(type="line", x0=pd.Timestamp(marker_at), x1=pd.Timestamp(marker_at), y0=0, y1=1,
                          yref=f"y{i if i > 1 else ''} domain", xref=f"x{i if i > 1 else ''}",
                          line=dict(color="#111111", width=1.2, dash="dash"), layer="below")

        # ---- results by category (each thinned to max_points when longer): positions first, rows only for
        #      the points drawn (a year of 5-minute results is 105,120 rows)
        drawn_total = [0, 0]
        lab_arr = labels.to_numpy(object)

        def add_points(mask, trace_name, symbol, color_of, note="", size=9, text_of=None, y_of=None,
                       textposition="top center", line_color=None):
            pos = np.flatnonzero(mask)
            if not len(pos):
                return None
            total = len(pos)
            if y_of is None:
                pos = pos[thin_positions(x_ns[pos], y_val[pos], max_points)]
            else:
                pos = pos[:: max(1, math.ceil(total / max_points))]
            drawn_total[0] += len(pos)
            drawn_total[1] += total
            sel = rows.iloc[pos]
            recs = sel.to_dict("records")  # plain dicts of the drawn rows only
            labs = list(lab_arr[pos])
            colors = [color_of(lab) for lab in labs]
            color = colors[0] if len(set(colors)) == 1 else colors  # one colour: no per-point validation
            ys = [y_of(r) for r in recs] if y_of else list(y_val[pos])
            texts = [text_of(r, lab) for r, lab in zip(recs, labs)] if text_of else list(labs)
            hover = [_hover(r, name, unit, lab, note, dec) for r, lab in zip(recs, labs)]
            fig.add_trace(_scatter(
                x=sel["collected_at"].to_numpy(), y=ys, mode="markers+text" if any(texts) else "markers",
                name=trace_name, legendgroup=trace_name, showlegend=legend(trace_name),
                marker=dict(symbol=symbol, size=size, color=color, line=dict(width=1.2, color=line_color or color)),
                text=texts if any(texts) else None, textposition=textposition, textfont=dict(size=12, color=color),
                customdata=hover, hovertemplate="%{customdata}<extra></extra>", cliponaxis=False,
            ), row=i, col=1)
            return fig.data[-1]

        def color_of(lab):
            return COLORS["critical"] if lab in ("HH", "LL") else COLORS["abnormal"] if lab else COLORS["normal"]

        numeric = rc_arr == "numeric"
        add_points(numeric & (lab_arr == ""), "Result", "circle", color_of)
        flagged = add_points(numeric & (lab_arr != ""), "Result outside reference (H/L label)", "circle", color_of)
        if flagged is not None:
            # flag labels that would touch a more severe or more recent one are left off (the point stays red
            # and its hover names the flag): two "L" side by side must never read as "LL"
            keep = declutter_labels(list(flagged["x"]), flagged["y"], flagged["text"], (x0, x1), (y0, y1))
            meta["hidden_flag_labels"] += sum(1 for k in keep if not k)
            flagged["text"] = [t if k else "" for t, k in zip(flagged["text"], keep)]
        add_points(rc_arr == "conflicting", "Conflicting results, same time", "diamond", color_of,
                   note="Conflicting results at the same collection time: all shown; the trend uses the one reported last")
        below_cmp = rows["comparator"].astype(str).str.startswith("<").to_numpy()
        cens_text = lambda r, lab: f"{_s(r['comparator'])}{fmt_value(r['value_canonical'], dec)}" + (f" {lab}" if lab else "")  # noqa: E731
        add_points((rc_arr == "censored") & below_cmp, "Below limit (<), drawn at the limit", "triangle-down", color_of,
                   size=12, text_of=cens_text, textposition="bottom center",
                   note="Censored result: the true value is below this limit")
        add_points((rc_arr == "censored") & ~below_cmp, "Above limit (>), drawn at the limit", "triangle-up", color_of,
                   size=12, text_of=cens_text, note="Censored result: the true value is above this limit")

        implausible = rc_arr == "implausible"
        if implausible.any():
            mid = (y0 + y1) / 2
            note = "Physiologically implausible, possible entry error: off scale, left out of the trend and the model"
            imp_text = lambda r, lab: f"{fmt_value(r['value_canonical'], dec)}?"  # noqa: E731
            with np.errstate(invalid="ignore"):
                high_side = y_val >= mid
            add_points(implausible & high_side, "Implausible value (off scale)", "arrow-bar-up",
                       lambda _: COLORS["implausible"], note=note, size=13, text_of=imp_text, y_of=lambda r: y1,
                       textposition="middle right")
            add_points(implausible & ~high_side, "Implausible value (off scale)", "arrow-bar-down",
                       lambda _: COLORS["implausible"], note=note, size=13, text_of=imp_text, y_of=lambda r: y0,
                       textposition="middle right")

        add_points(rc_arr == "unit_missing", "Unit missing (not to scale)", "circle-open",
                   lambda _: "#757575", size=10,
                   text_of=lambda r, lab: "no unit", y_of=lambda r: y0, textposition="middle right",
                   note="No unit reported: not converted, not to scale; left out of the trend and the model")
        if drawn_total[0] < drawn_total[1]:
            meta["thinned"][code] = [int(drawn_total[0]), int(drawn_total[1])]

        # ---- text results: marked on the time axis (never at a value height), text in the hover
        if gap_marks:
            xref, yref = f"x{i if i > 1 else ''}", f"y{i if i > 1 else ''} domain"
            if legend("Text result (✕ on the time axis)"):
                fig.add_trace(_scatter(x=[None], y=[None], mode="markers", name="Text result (✕ on the time axis)",
                                       marker=dict(symbol="x-thin-open", size=11, color=COLORS["gap"],
                                                   line=dict(width=2, color=COLORS["gap"])),
                                       hoverinfo="skip", showlegend=True), row=i, col=1)
            for t, hover in gap_marks:
                fig.add_shape(type="line", x0=t, x1=t, y0=0, y1=1, yref=yref, xref=xref,
                              line=dict(color=COLORS["gap"], width=1, dash="dot"), layer="below")
                fig.add_annotation(x=t, y=0, xref=xref, yref=yref, text="✕", showarrow=False, yanchor="middle",
                                   font=dict(size=14, color=COLORS["gap"]), name="text_result",
                                   hovertext=f"<b>{name}</b>: " + hover.replace("\n", "<br>"),
                                   hoverlabel=dict(bgcolor="white", font=dict(size=13)))

        # ---- anomalies
        if an is not None:
            _add_anomalies(fig, an[an["analyte_code"] == code], rows, rc, i, legend, name, y0, dec, max_points)

        # ---- forecasts
        if fc_rows is not None and len(fc_rows):
            note = _add_forecast(fig, fc_rows, trend, i, legend, name, unit, dec)
            if note.startswith("up to"):
                meta["forecast_notes"][code] = note
            elif note:
                meta["forecast_status"][code] = note

        yaxes[f"yaxis{i if i > 1 else ''}"] = dict(  # set once after the loop: one layout update, not one per row
            title=dict(text=_axis_title(name, unit), font=dict(size=13, color="#1a1a1a")), range=[y0, y1],
            tickfont=dict(size=12, color="#333"), zeroline=False, gridcolor="#e6e6e6", automargin=True)

    fig.update_xaxes(type="date", range=[x0, x1], showticklabels=True, tickfont=dict(size=12),
                     gridcolor="#eeeeee", showline=True, linecolor="#999", ticks="outside",
                     tickformatstops=[
                         dict(dtickrange=[None, 86400000], value="%d %b %Y<br>%H:%M"),
                         dict(dtickrange=[86400000, None], value="%d %b %Y"),
                     ])
    fig.update_layout(yaxes)
    fig.update_layout(
        template="plotly_white", font=FONT, height=height, hovermode="closest",
        hoverlabel=dict(font_size=14, bgcolor="white", align="left"),
        margin=dict(l=10, r=30, t=70, b=40),
        # the legend starts below the top 30 px, where Plotly's toolbar appears on hover (it hid legend entries)
        legend=dict(orientation="h", yref="container", y=1 - MODEBAR_PX / height, yanchor="top", x=0,
                    xanchor="left", font=dict(size=12), itemsizing="constant"),
        meta=meta,
    )
    return fig.figure()


def _text_marks(gaps: pd.DataFrame, x0, x1) -> list[tuple[pd.Timestamp, str]]:
    """(time, hover text) of each text result to mark on the time axis; beyond :data:`MAX_TEXT_MARKS`, one
    mark per stretch of 1/MAX_TEXT_MARKS of the axis, its hover counting the texts it stands for."""
    if gaps.empty:
        return []

    def one(r) -> str:
        text = _s(r.get("value_text")) or (f"({_s(r.get('comment'))})" if _s(r.get("comment")) else "(no value)")
        comment = _s(r.get("comment"))
        return (f"{text}\n{pd.Timestamp(r['collected_at']).strftime(TIME_FMT)}"
                + (f"\nComment: {textwrap.shorten(comment, 80)}" if comment and comment not in text else "")
                + "\n<i>Text result: no number, so no point on the value axis</i>")

    if len(gaps) <= MAX_TEXT_MARKS:
        return [(pd.Timestamp(r["collected_at"]), one(r)) for r in gaps.to_dict("records")]
    lo, hi = pd.Timestamp(x0).value, pd.Timestamp(x1).value
    width = max((hi - lo) / MAX_TEXT_MARKS, 1)
    t = gaps["collected_at"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    bucket = np.floor((t - lo) / width).astype(np.int64)
    marks = []
    for _, g in gaps.groupby(bucket, sort=True):
        texts = g["value_text"].fillna("(no value)").astype(str).value_counts()
        first, last = g["collected_at"].min(), g["collected_at"].max()
        marks.append((pd.Timestamp(first), f"{len(g)} text results {first.strftime(TIME_FMT)} – {last.strftime(TIME_FMT)}\n"
                      + ", ".join(f"{k} ×{v}" for k, v in texts.head(5).items())
                      + "\n<i>Every one is in the results table below</i>"))
    return marks


def _band_series(times: pd.Series, lo: np.ndarray, hi: np.ndarray, x0, x1, dec: int | None = None):
    """Step band of the reference interval across [x0, x1]; None when no interval is known."""
    known = np.isfinite(lo) | np.isfinite(hi)
    if not known.any():
        return None
    t = times.to_numpy()[known]
    lo, hi = lo[known], hi[known]
    key_lo, key_hi = np.where(np.isfinite(lo), lo, np.inf), np.where(np.isfinite(hi), hi, np.inf)
    change = np.ones(len(t), dtype=bool)
    change[1:] = (key_lo[1:] != key_lo[:-1]) | (key_hi[1:] != key_hi[:-1])
    xs = [pd.Timestamp(v) for v in t[change]]
    los, his = list(lo[change]), list(hi[change])
    xs[0] = min(xs[0], pd.Timestamp(x0))
    xs.append(max(pd.Timestamp(x1), pd.Timestamp(t[-1])))
    los.append(los[-1])
    his.append(his[-1])
    # an open-ended interval (e.g. ALT 0-40 has a low; troponin has only a high) is drawn to the data
    txt = [f"Reference interval {fmt_value(a, dec) if math.isfinite(a) else '–'}–{fmt_value(b, dec) if math.isfinite(b) else '–'}"
           for a, b in zip(los, his)]
    if all(math.isnan(v) for v in los):
        return xs, [None] * len(xs), his, txt
    return xs, los, his, txt


def _add_anomalies(fig, an: pd.DataFrame, rows: pd.DataFrame, rc: pd.Series, i: int, legend, name: str,
                   y_bottom: float, dec: int | None, max_points: int):
    # 'reference_interval' flags are already the H/L labels on every point; ring the other rules
    if "rule" in an:
        an = an[an["rule"].astype(str) != "reference_interval"]
    if an.empty:
        return
    an = _run_members(an)
    plotted = rows[rc.isin(["numeric", "conflicting", "censored"])]
    edge = rows[rc.isin(["gap", "unit_missing"])]  # drawn at the bottom edge
    rid = pd.to_numeric(an["result_id"], errors="coerce")
    y_by_id = pd.Series(plotted["value_canonical"].astype(float).to_numpy(), index=plotted["result_id"].to_numpy())
    y_by_id = y_by_id[~y_by_id.index.duplicated(keep="last")]
    y_by_t = plotted.drop_duplicates("collected_at", keep="last").set_index("collected_at")["value_canonical"].astype(float)
    y = rid.map(y_by_id)
    no_id = rid.isna()
    y[no_id] = pd.to_datetime(an.loc[no_id, "collected_at"]).map(y_by_t)
    y[y.isna() & rid.isin(edge["result_id"])] = y_bottom
    an = an.assign(_y=y.to_numpy(float), collected_at=pd.to_datetime(an["collected_at"]))
    an = an[np.isfinite(an["_y"])]
    for group, g in an.groupby(an["rule"].astype(str).map(_rule_group), sort=False):
        g = thin(g.sort_values("collected_at", kind="stable"), max_points, "_y")
        hover, wrapped = [], {}  # the members of a run share its text: wrapped once
        for a in g.to_dict("records"):
            rule, flag = _s(a.get("rule")) or "anomaly", _s(a.get("flag"))
            detail = _s(a.get("text")) or _s(a.get("detail"))
            if detail and detail not in wrapped:
                wrapped[detail] = "<br>" + "<br>".join(_first_lines(readable_units(detail), 70, 5))
            hover.append(f"<b>Anomaly flag</b>: {rule_label(rule)}{' (' + flag + ')' if flag else ''}<br>{name} at "
                         f"{pd.Timestamp(a['collected_at']).strftime(TIME_FMT)}" + (wrapped[detail] if detail else ""))
        label, symbol = _ANOMALY_STYLE.get(group, _ANOMALY_STYLE["other"])
        fig.add_trace(_scatter(
            x=g["collected_at"], y=list(g["_y"]), mode="markers", name=f"Anomaly: {label}",
            legendgroup=f"anomaly-{group}", showlegend=legend(f"Anomaly: {label}"),
            marker=dict(symbol=symbol, size=20, color=COLORS["anomaly"], line=dict(width=2.5, color=COLORS["anomaly"])),
            customdata=hover, hovertemplate="%{customdata}<extra></extra>", cliponaxis=False,
        ), row=i, col=1)


def _first_lines(text: str, width: int, n: int) -> list[str]:
    """``textwrap.wrap(text, width)[:n]``, wrapping only as much of a long text as those lines can hold: the
    text up to a space past ``(n + 1) * width`` characters, kept when it already wraps to more than ``n`` lines
    (the first ``n`` lines then end where they would in the whole text: every word before the cut is whole).
    An anomaly text can be a few thousand characters; a long series' chart shows some 1,400 of them."""
    cut = text.find(" ", (n + 1) * width)
    if cut > 0:
        lines = textwrap.wrap(text[:cut], width)
        if len(lines) > n:
            return lines[:n]
    return textwrap.wrap(text, width)[:n]


def _run_members(an: pd.DataFrame) -> pd.DataFrame:
    """One row per result an anomaly stands for: a run of consecutive flags (``evidence['run']``,
    :func:`clinical.anomalies.group_runs`) rings every result of the run, each with the run's text.

    Built by position (the run's row repeated, its members' ids and times put in): a long series has
    thousands of runs, and a dict per member cost seconds."""
    if "evidence" not in an:  # per-result rows only
        return an
    pos, rids, ats = [], [], []
    own_ids, own_ats = an["result_id"].to_numpy(object), an["collected_at"].to_numpy(object)
    for k, ev in enumerate(an["evidence"].to_numpy(object)):
        run = ev.get("run") if isinstance(ev, dict) else None
        if not run or not run.get("result_ids"):
            pos.append(k)
            rids.append(own_ids[k])
            ats.append(own_ats[k])
            continue
        members = list(zip(run["result_ids"], run.get("collected_at") or []))
        pos += [k] * len(members)
        rids += [m[0] for m in members]
        ats += [m[1] for m in members]
    out = an.iloc[pos].reset_index(drop=True)
    return out.assign(result_id=pd.Series(rids, dtype=object),
                      collected_at=pd.to_datetime(pd.Series(ats, dtype=object), format="ISO8601"))


# rule -> (legend label, open marker symbol): the legend names the rule behind each ring
_ANOMALY_STYLE = {
    "critical_value": ("critical value", "circle-open"),
    "delta_check": ("delta check (change beyond RCV)", "square-open"),
    "preanalytical": ("pre-analytical pattern", "hexagon-open"),
    "model_surprise": ("outside the forecast interval", "diamond-open"),
    "multivariate_inconsistency": ("inconsistent with the specimen", "star-open"),
    "reference_interval": ("outside reference interval", "circle-open"),
    "other": ("other rule", "octagon-open"),
}


_RULE_NAMES = {
    "reference_interval": "Outside the reference interval",
    "critical_value": "Critical value",
    "delta_check": "Delta check: change beyond the reference change value",
    "model_surprise": "Outside the forecast interval",
    "multivariate_inconsistency": "Inconsistent with the rest of the specimen",
}
_PATTERN_NAMES = {"edta_contamination": "K-EDTA contamination", "haemolysis": "haemolysis",
                  "haemolysis_reported": "haemolysis reported by the laboratory", "drip_arm": "drip-arm contamination"}


def rule_label(rule) -> str:
    """An anomaly rule as a clinician reads it ('delta_check' -> 'Delta check: change beyond the reference
    change value'; 'preanalytical:haemolysis' -> 'Pre-analytical pattern: haemolysis'); unknown rules as given."""
    rule = _s(rule)
    head, _, tail = rule.partition(":")
    if head == "preanalytical" and tail:
        return f"Pre-analytical pattern: {_PATTERN_NAMES.get(tail, tail.replace('_', ' '))}"
    return _RULE_NAMES.get(rule, rule.replace("_", " ").capitalize() if rule else "")


def _rule_group(rule: str) -> str:
    head = rule.split(":")[0]
    return head if head in _ANOMALY_STYLE else "other"


def _add_forecast(fig, fc_rows: pd.DataFrame, trend: pd.DataFrame, i: int, legend, name: str, unit: str,
                  dec: int | None = None) -> str:
    """Median (dashed) and interval bands from the last observed value to each forecast time.

    Returns the chart's forecast note for the page to write under the figure: ``'up to 7 d after the last
    result'``, or the reason there is no forecast (the status), or ''.
    """
    u = display_unit(unit)
    ok = fc_rows[fc_rows["status"] == "ok"].sort_values("at")
    if ok.empty:
        return _s(fc_rows["status"].iloc[0]) if len(fc_rows) else ""
    version = _s(ok["model_version"].iloc[0]) if "model_version" in ok else ""
    if len(trend):
        t_last = pd.Timestamp(trend["collected_at"].iloc[-1])
        v_last = float(trend["value_canonical"].iloc[-1])
        anchor_x, anchor_y = [t_last], [v_last]
    else:
        t_last, anchor_x, anchor_y = None, [], []
    xs = anchor_x + list(ok["at"])

    def series(col):
        return anchor_y + [float(v) for v in ok[col]]

    has95 = {"lo95", "hi95"} <= set(ok.columns) and ok[["lo95", "hi95"]].notna().all().all()
    outer = ("lo95", "hi95", "95%", "conformal") if has95 else ("q05", "q95", "90%", "q05–q95")
    bands = [(outer[0], outer[1], f"Forecast {outer[2]} interval ({outer[3]})", COLORS["forecast_outer"]),
             ("q10", "q90", "Forecast 80% interval (q10–q90)", COLORS["forecast80"])]
    for lo, hi, label, color in bands:
        fig.add_trace(_scatter(x=xs, y=series(lo), mode="lines", line=dict(width=0), hoverinfo="skip",
                               showlegend=False, legendgroup=label, name=f"{label} (low)"), row=i, col=1)
        fig.add_trace(_scatter(x=xs, y=series(hi), mode="lines", line=dict(width=0), fill="tonexty",
                               fillcolor=color, name=label, legendgroup=label, showlegend=legend(label),
                               hoverinfo="skip"), row=i, col=1)
    hover = []
    for r in ok.to_dict("records"):
        at = pd.Timestamp(r["at"])
        horizon = f" (+{_horizon(at - t_last)} after the last result)" if t_last is not None else ""
        hover.append(
            f"<b>Forecast</b> {name} for {at.strftime(TIME_FMT)}{horizon}<br>"
            f"Median {fmt_value(r['q50'], dec)} {u}<br>80%: {fmt_value(r['q10'], dec)}–{fmt_value(r['q90'], dec)} {u}<br>"
            f"{outer[2]}: {fmt_value(r[outer[0]], dec)}–{fmt_value(r[outer[1]], dec)} {u}<br>"
            f"Model {version}" + (f"; {history_basis(r['n_history'])}" if _num(r.get("n_history")) is not None else "")
            + "<br><i>Decision support, not a result</i>"
        )
    med_label = f"Forecast median (model {version})" if version else "Forecast median"
    fig.add_trace(_scatter(
        x=xs, y=series("q50"), mode="lines+markers", name=med_label, legendgroup="forecast",
        showlegend=legend(med_label),
        line=dict(color=COLORS["forecast"], width=2, dash="dash"),
        marker=dict(symbol=["circle"] * len(anchor_x) + ["circle-open"] * len(ok), size=[0] * len(anchor_x) + [10] * len(ok),
                    color=COLORS["forecast"], line=dict(width=2)),
        customdata=[""] * len(anchor_x) + hover,
        hovertemplate="%{customdata}<extra></extra>",
    ), row=i, col=1)
    return f"up to {_horizon(pd.Timestamp(ok['at'].iloc[-1]) - t_last)} after the last result" if t_last is not None else ""


def _horizon(delta: pd.Timedelta | timedelta) -> str:
    hours = pd.Timedelta(delta).total_seconds() / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} d"


# =============================================================================================
# Cumulative table
# =============================================================================================
def _cell(row, label: str, dec: int | None = None) -> str:
    kind = row.get("result_kind")
    if kind in ("text", "empty") or (_num(row.get("value_canonical")) is None and not bool(row.get("unit_missing"))):
        text = _s(row.get("value_text")) or (f"({_s(row.get('comment'))})" if _s(row.get("comment")) else "(no value)")
        return text
    if bool(row.get("unit_missing")):
        return f"{_s(row.get('value_text'))} (no unit)"
    comp = _s(row.get("comparator"))
    v = (comp if comp in ("<", "<=", ">", ">=") else "") + fmt_value(row.get("value_canonical"), dec)
    if bool(row.get("implausible")):
        return f"{v} (implausible?)"
    if label:
        v += f" {label}"
    given_unit = _s(row.get("unit"))
    if given_unit and given_unit != _s(row.get("unit_canonical")) and _num(row.get("value_num")) is not None \
            and not math.isclose(float(row["value_num"]), float(row["value_canonical"]), rel_tol=1e-9):
        v += f" ({_s(row.get('value_text'))} {given_unit})"
    return v


MAX_TABLE_TIMES = 60  # collection times shown as columns; beyond, one row per result (a year of minutes)


def _ref_text(lo, hi, dec) -> str:
    return f"{fmt_value(lo, dec) if lo is not None and math.isfinite(lo) else ''}–" \
           f"{fmt_value(hi, dec) if hi is not None and math.isfinite(hi) else ''}"


def make_cumulative_table(results_df: pd.DataFrame, decimals: dict | None = None) -> pd.DataFrame:
    """Cumulative report: one row per analyte, one column per collection time (oldest left).

    The first columns are ``Analyte``, ``Unit`` and ``Reference interval`` (canonical
    unit); each cell holds the value with its flag (``5.9 H``, ``<10``, ``HEMOLYZED``,
    ``1390 (implausible?)``, ``13.5 (no unit)``, and the value as reported when the unit was
    converted), at the analyte's reporting precision (``decimals``; from the results when
    None). Conflicting results at the same time are both shown, separated by `` | ``. For
    more than :data:`MAX_TABLE_TIMES` times use :func:`make_results_list`.
    """
    fixed = ["Analyte", "Unit", "Reference interval"]
    if results_df.empty:
        return pd.DataFrame(columns=fixed)
    if decimals is None:
        from dashboard.precision import reporting_decimals

        decimals = reporting_decimals(results_df)
    df = results_df.sort_values(["collected_at", "result_id"])
    codes = panel_analytes(df, None)
    records = df.to_dict("records")  # oldest first (UTC order); plain dicts: much cheaper than iterrows
    for r in records:  # column heads in local time at collection; a date alone says so
        r["_col"] = _table_time(r)
    columns = list(dict.fromkeys(r["_col"] for r in records))
    labels = flag_labels(df)
    by_code: dict = {}
    for r, lab in zip(records, labels):
        by_code.setdefault(r["analyte_code"], []).append((r, lab))
    out = []
    for code in codes:
        rows = by_code[code]
        dec = decimals.get(str(code))
        name, unit = _analyte_title(df, code)
        intervals = {(lo, hi) for lo, hi in (_interval(r) for r, _ in rows) if lo is not None or hi is not None}
        if len(intervals) == 1:
            ref = _ref_text(*next(iter(intervals)), dec)
        else:
            ref = "varies" if intervals else ""
        rec = {"Analyte": name, "Unit": display_unit(unit), "Reference interval": ref}
        cells: dict[str, list[str]] = {}
        for r, lab in rows:  # results in the same minute share a column: all shown, oldest first
            cells.setdefault(r["_col"], []).append(_cell(r, lab, dec))
        rec.update({t: " | ".join(v) for t, v in cells.items()})
        out.append(rec)
    return pd.DataFrame(out, columns=fixed + columns).fillna("")


RESULTS_LIST_COLUMNS = ["Collected", "Analyte", "Result", "Flag", "Unit", "Reference interval", "As reported", "Comment"]


def make_results_list(results_df: pd.DataFrame, decimals: dict | None = None) -> pd.DataFrame:
    """Every result as one row, newest first (:data:`RESULTS_LIST_COLUMNS`): the table behind a thinned chart.

    ``Result`` is written as in :func:`make_cumulative_table` (value at the reporting precision,
    comparator, text results as reported); ``Flag`` is the H/L/HH/LL/A label; ``As reported``
    the value and unit as the laboratory sent them. Vectorised: a year of 5-minute results
    (105,120 rows) takes about a second.
    """
    if results_df.empty:
        return pd.DataFrame(columns=RESULTS_LIST_COLUMNS)
    if decimals is None:
        from dashboard.precision import reporting_decimals

        decimals = reporting_decimals(results_df)
    df = results_df.sort_values(["collected_at", "result_id"], ascending=[False, False])
    labels = flag_labels(df)
    cats = _classify(df)
    names = {c: _analyte_title(df, c) for c in df["analyte_code"].unique()}
    codes = df["analyte_code"].to_numpy(object)
    value = pd.to_numeric(df["value_canonical"], errors="coerce").to_numpy(float)
    comp = df["comparator"].astype(object).where(df["comparator"].isin(["<", "<=", ">", ">="]), "").to_numpy(object)
    text = df["value_text"].astype(object).where(df["value_text"].notna(), "").to_numpy(object)
    lo, hi = _intervals(df)
    # each distinct (analyte, value) and (analyte, interval) is written once and shared by its rows: a long
    # series repeats a few hundred values, and formatting 105,120 of them one by one took seconds
    shown_of: dict = {}
    result = []
    for code, v, c, t, cat in zip(codes, value, comp, text, cats.to_numpy(object)):
        if cat == "gap":
            result.append(t or "(no value)")
        elif cat == "unit_missing":
            result.append(f"{t} (no unit)")
        else:
            key = (code, c, v, cat == "implausible")
            shown = shown_of.get(key)
            if shown is None:
                shown = c + fmt_value(v, decimals.get(str(code)))
                shown = shown_of[key] = shown + " (implausible?)" if cat == "implausible" else shown
            result.append(shown)
    ref_of: dict = {}
    refs = []
    for code, a, b in zip(codes, lo, hi):
        key = (code, a, b)
        ref = ref_of.get(key)
        if ref is None:
            ref = ref_of[key] = (_ref_text(a, b, decimals.get(str(code))) if (math.isfinite(a) or math.isfinite(b))
                                 else "")
        refs.append(ref)
    reported = (df["value_text"].fillna("").astype(str) + " " + df["unit"].fillna("").astype(str)).str.strip()
    return pd.DataFrame({
        "Collected": local_times(df).to_numpy(), "Analyte": [names[c][0] for c in codes], "Result": result,
        "Flag": labels.to_numpy(object), "Unit": [display_unit(names[c][1]) for c in codes],
        "Reference interval": refs, "As reported": reported.to_numpy(object),
        "Comment": df["comment"].fillna("").astype(str).to_numpy(object),
    }, columns=RESULTS_LIST_COLUMNS)


def _table_time(r: dict) -> str:
    """Column head of a result in the cumulative table: local time, '(time not given)' for a date
    alone, '(clock change)' in a skipped or repeated daylight-saving hour."""
    text = time_label(r, with_flag=False)
    text = text.split(" (UTC")[0]
    if r.get("time_flag") in ("skipped_hour", "repeated_hour"):
        text += " (clock change)"
    return text


def style_cumulative_table(table: pd.DataFrame):
    """A pandas Styler: abnormal cells red and bold, critical dark red, implausible purple."""

    def css(v):
        s = str(v)
        if " HH" in s or " LL" in s or " AA" in s:
            return f"color: {COLORS['critical']}; font-weight: 700"
        if " H" in s or " L" in s or s.endswith(" A"):
            return f"color: {COLORS['abnormal']}; font-weight: 600"
        if "implausible" in s:
            return f"color: {COLORS['implausible']}"
        if "(no unit)" in s:
            return f"color: {COLORS['unit_missing']}"
        return ""

    cols = [c for c in table.columns if c not in ("Analyte", "Unit", "Reference interval")]
    return table.style.map(css, subset=cols)


# =============================================================================================
# Explanations and model card
# =============================================================================================
def explanation_difference(explanation: dict) -> float:
    """|sum of attributions + base value - model output| of an explanation (XAI-15)."""
    values = [float(v) for v in pd.DataFrame(explanation["features"])["value"]]
    return abs(sum(values) + float(explanation["base_value"]) - float(explanation["output"]))


def make_shap_bar(explanation: dict, top: int = 12, decimals: int | None = None) -> go.Figure:
    """Horizontal bars of the attributions of one forecast, largest first.

    ``explanation``: ``features`` (records or frame with ``feature`` label and ``value``,
    the attribution in the forecast's unit), ``base_value``, ``output`` (the explained
    model output, e.g. the median), and optionally ``unit``, ``analyte_name``, ``at``,
    ``model_version``. Attributions beyond ``top`` are summed into one bar. Numbers are
    written at the analyte's reporting precision ``decimals`` (:mod:`dashboard.precision`):
    an attribution that rounds to zero reads ``≈0``, not ``+0.0683`` on sodium.

    Raises ValueError when the attributions do not add up to the output (tolerance
    0.01 x max(1, |output|)): such an explanation must not be drawn (XAI-15).
    """
    from dashboard.precision import fmt_signed

    dec = decimals
    output = float(explanation["output"])
    diff = explanation_difference(explanation)
    if diff > 0.01 * max(1.0, abs(output)):
        raise ValueError(f"Explanation not available for this model version (attributions do not add up; "
                         f"difference = {diff:.4g})")
    feats = pd.DataFrame(explanation["features"])[["feature", "value"]].copy()
    feats["abs"] = feats["value"].abs()
    feats = feats.sort_values("abs", ascending=False)
    if len(feats) > top:
        rest = feats.iloc[top:]
        feats = pd.concat([feats.iloc[:top], pd.DataFrame(
            [{"feature": f"{len(rest)} other inputs", "value": rest["value"].sum(), "abs": abs(rest["value"].sum())}])])
    feats = feats.iloc[::-1]  # largest at the top
    u = display_unit(explanation.get("unit"))
    colors = [COLORS["abnormal"] if v > 0 else COLORS["normal"] for v in feats["value"]]
    fig = go.Figure(go.Bar(
        x=feats["value"], y=feats["feature"], orientation="h", marker_color=colors,
        text=[fmt_signed(v, dec) for v in feats["value"]], textposition="outside", cliponaxis=False,
        customdata=[f"{fmt_signed(v, dec)} {u}".rstrip() for v in feats["value"]],
        hovertemplate="%{y}: %{customdata}<extra></extra>",
    ))
    name = explanation.get("analyte_name", "forecast")
    title = (f"What moved the forecast of {name}: base {fmt_value(explanation['base_value'], dec)} → "
             f"{fmt_value(output, dec)} {u}")
    if explanation.get("model_version"):
        title += f"<br><sup>model {explanation['model_version']}; red raises, blue lowers the forecast</sup>"
    fig.update_layout(
        template="plotly_white", font=FONT, title=dict(text=title, font=dict(size=16)),
        height=140 + 34 * len(feats), margin=dict(l=10, r=60, t=80, b=50),
        xaxis=dict(title=f"Contribution to the forecast ({u})" if u else "Contribution to the forecast",
                   zeroline=True, zerolinecolor="#888"),
        yaxis=dict(automargin=True), showlegend=False,
    )
    return fig


def make_calibration_plot(card: dict) -> go.Figure:
    """Nominal vs observed quantile levels for each method of a ``model_card.json``.

    A well-calibrated method lies on the diagonal: the fraction of true results at or
    below each forecast quantile equals the quantile's level.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="Perfect calibration",
                             line=dict(color="#888", dash="dot", width=1.5), hoverinfo="skip"))
    dashes = ["solid", "dash", "dashdot", "longdash", "dot"]
    palette = [COLORS["forecast"], COLORS["normal"], "#009e73", "#cc79a7", "#56b4e9", "#e69f00"]
    for k, name in enumerate(card.get("ranking") or list((card.get("methods") or {}).keys())):
        m = (card.get("methods") or {}).get(name) or {}
        cal = pd.DataFrame(m.get("calibration") or [])
        if cal.empty or "kind" not in cal:
            continue
        q = cal[cal["kind"] == "quantile"].sort_values("nominal")
        fig.add_trace(go.Scatter(
            x=q["nominal"], y=q["empirical"], mode="lines+markers", name=name,
            line=dict(color=palette[k % len(palette)], dash=dashes[k % len(dashes)], width=2),
            marker=dict(size=8),
            hovertemplate=name + ": level %{x:.2f} → observed %{y:.3f}<extra></extra>",
        ))
    fig.update_layout(
        template="plotly_white", font=FONT, height=460, margin=dict(l=10, r=10, t=60, b=10),
        title=dict(text="Calibration of forecast quantiles", font=dict(size=16)),
        xaxis=dict(title="Nominal quantile level", range=[0, 1], dtick=0.1, constrain="domain"),
        yaxis=dict(title="Observed fraction of results ≤ quantile", range=[0, 1], dtick=0.1,
                   scaleanchor="x", scaleratio=1, automargin=True),
        legend=dict(orientation="v", x=1.02, y=0.0, yanchor="bottom"),
    )
    return fig


def make_monitoring_skill_chart(errors: pd.DataFrame, names: dict[str, str] | None = None) -> go.Figure:
    """Realised skill over time: ``1 - MAE_model / MAE_last_value`` per period (``model.monitoring``).

    ``errors`` is :func:`model.monitoring.realised_error_summary`'s frame. One line for all
    analytes (count-weighted) and one per analyte with at least 5 forecasts in a period
    (hidden until picked in the legend, so the overall line stays readable);
    above zero the model beat carrying the last value forward. Hover gives n and coverage.
    """
    names = names or {}
    fig = go.Figure()
    fig.add_hline(y=0, line=dict(color="#888", dash="dot", width=1.5),
                  annotation_text="last value carried forward", annotation_position="bottom right")
    if not errors.empty:
        palette = ["#56b4e9", "#009e73", "#cc79a7", "#e69f00", "#0072b2", "#999999"]
        per = errors[(errors["analyte_code"] != "all") & (errors["n"] >= 5)]
        for k, (code, g) in enumerate(per.groupby("analyte_code", sort=True)):
            label = f"{names.get(code, code)}".strip()
            fig.add_trace(go.Scatter(
                x=g["period"], y=g["skill"], mode="lines+markers", name=label, visible="legendonly",
                line=dict(color=palette[k % len(palette)], width=1.5), marker=dict(size=6), opacity=0.8,
                customdata=np.stack([g["n"], g["coverage80"]], axis=1),
                hovertemplate=label + " %{x}: skill %{y:.2f} (n %{customdata[0]}, 80% coverage "
                                      "%{customdata[1]:.2f})<extra></extra>"))
        allr = errors[errors["analyte_code"] == "all"]
        fig.add_trace(go.Scatter(
            x=allr["period"], y=allr["skill"], mode="lines+markers", name="All analytes (count-weighted)",
            line=dict(color=COLORS["forecast"], width=3), marker=dict(size=9),
            customdata=np.stack([allr["n"], allr["coverage80"]], axis=1),
            hovertemplate="All analytes %{x}: skill %{y:.2f} (n %{customdata[0]}, 80% coverage "
                          "%{customdata[1]:.2f})<extra></extra>"))
    fig.update_layout(
        template="plotly_white", font=FONT, height=380, margin=dict(l=10, r=10, t=50, b=10),
        title=dict(text="Realised forecast skill against the last value", font=dict(size=16)),
        xaxis=dict(title="Period of the forecast time", type="category", categoryorder="category ascending"),
        yaxis=dict(title="Skill = 1 − MAE model / MAE last value", zeroline=False, automargin=True),
        legend=dict(orientation="v", x=1.02, y=1.0),
    )
    return fig


def make_drift_heatmap(drift: pd.DataFrame, names: dict[str, str] | None = None, threshold: float = 0.5
                       ) -> go.Figure:
    """Shift of each analyte's median per period, in training robust SDs (``model.monitoring.analyte_drift``).

    Diverging colours centred on 0 (no shift); cells at or beyond ``±threshold`` carry
    their value as text, so the drift is readable without colour.
    """
    names = names or {}
    fig = go.Figure()
    if not drift.empty:
        table = drift.pivot_table(index="analyte_code", columns="period", values="median_shift_sd", aggfunc="first")
        n = drift.pivot_table(index="analyte_code", columns="period", values="n", aggfunc="first")
        labels = [f"{names.get(c, c)}" for c in table.index]
        z = table.to_numpy(dtype=float)
        text = np.where(np.abs(z) >= threshold, np.char.mod("%+.1f", np.nan_to_num(z)), "")
        lim = max(1.0, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0)
        fig.add_trace(go.Heatmap(
            z=z, x=list(table.columns), y=labels, zmin=-lim, zmax=lim, colorscale="RdBu_r", zmid=0,
            text=text, texttemplate="%{text}", customdata=n.reindex(index=table.index, columns=table.columns).to_numpy(),
            colorbar=dict(title="Median shift<br>(training SDs)"),
            hovertemplate="%{y} %{x}: median shift %{z:+.2f} SD (n %{customdata})<extra></extra>", xgap=1, ygap=1))
        height = max(260, 40 + 24 * len(labels))
    else:
        height = 260
    fig.update_layout(
        template="plotly_white", font=FONT, height=height, margin=dict(l=10, r=10, t=50, b=10),
        title=dict(text="Input drift against the training data", font=dict(size=16)),
        xaxis=dict(title="Period of collection", type="category", categoryorder="category ascending"),
        yaxis=dict(automargin=True, autorange="reversed"),
    )
    return fig


# =============================================================================================
# Agreement between experts
# =============================================================================================
_AGREEMENT = (("raw_agreement", "Raw agreement"), ("cohen_kappa", "Cohen's κ"), ("fleiss_kappa", "Fleiss' κ"),
              ("gwet_ac1", "Gwet's AC1"))


def agreement_table(stats: pd.DataFrame) -> pd.DataFrame:
    """``clinical.outputs.agreement`` as a readable table: one row per output kind, each coefficient
    written ``0.82 (0.71–0.93)`` with its 95 % interval, ``–`` where undefined (Cohen's κ needs
    exactly two experts; every coefficient needs outputs judged by at least two)."""
    cols = ["Output kind", "Judged by ≥ 2 experts", "Experts", "Share valid"] + [label for _, label in _AGREEMENT]
    if stats is None or stats.empty:
        return pd.DataFrame(columns=cols)

    def cell(r, key):
        v, lo, hi = r.get(key), r.get(f"{key}_low"), r.get(f"{key}_high")
        if _num(v) is None:
            return "–"
        return f"{v:.2f}" + (f" ({lo:.2f}–{hi:.2f})" if _num(lo) is not None and _num(hi) is not None else "")

    rows = []
    for r in stats.to_dict("records"):
        rows.append({"Output kind": str(r["kind"]).capitalize(), "Judged by ≥ 2 experts": int(r["n_items_multi"]),
                     "Experts": int(r["n_raters"]),
                     "Share valid": "–" if _num(r.get("share_valid")) is None else f"{r['share_valid']:.0%}",
                     **{label: cell(r, key) for key, label in _AGREEMENT}})
    return pd.DataFrame(rows, columns=cols)
