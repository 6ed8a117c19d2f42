"""What a review card shows beside an output: when, the rule with its numbers, the results it is about.

No Streamlit here (tested with plain pytest). An *output* is one row of
``clinical.outputs.pending_outputs`` as a dict (``kind, rule, output_time, analyte_code,
unit, payload``...). Numbers are written at the analyte's reporting precision
(:mod:`dashboard.precision`). Payload fields this module does not know are still listed
("name: value"), so a new rule's evidence is never hidden from the expert.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dashboard.figures import TIME_FMT, display_unit, fmt_value, readable_units, rule_label
from dashboard.precision import fmt_signed

__all__ = ["when", "result_ids", "chart_analytes", "evidence_lines", "forecast_frame", "explanation_dict"]

QUANTILES = ("q05", "q10", "q25", "q50", "q75", "q90", "q95")


def _payload(out: dict) -> dict:
    p = out.get("payload")
    return p if isinstance(p, dict) else {}


def _ts(v) -> pd.Timestamp | None:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    try:
        return pd.Timestamp(v)
    except (TypeError, ValueError):
        return None


def when(out: dict) -> tuple[str, pd.Timestamp | None]:
    """(what the time is, the time): 'Collected' for an anomaly, 'Forecast for', 'Evaluated at'."""
    kind = out.get("kind")
    p = _payload(out)
    t = _ts(p.get("collected_at")) or _ts(out.get("output_time")) or _ts(p.get("at"))
    label = {"anomaly": "Collected", "forecast": "Forecast for", "explanation": "Explains the forecast for",
             "recommendation": "Evaluated at"}.get(kind, "Time")
    return label, t


def _ints(values) -> list[int]:
    out = []
    for v in values or []:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(int(f))
    return out


def result_ids(out: dict) -> list[int]:
    """The stored results an output is about: its own result, the results its evidence names, and the
    results of its run (consecutive flags of one analyte within one episode), in that order."""
    p = _payload(out)
    ev = p.get("evidence") if isinstance(p.get("evidence"), dict) else {}
    ids = _ints([p.get("result_id")]) + _ints(ev.get("result_ids")) + _ints(p.get("result_ids"))
    run = p.get("run")
    if isinstance(run, list):
        ids += _ints([r.get("result_id") if isinstance(r, dict) else r for r in run])
    if isinstance(p.get("based_on"), dict):
        ids += _ints(p["based_on"].get("result_ids") if isinstance(p["based_on"].get("result_ids"), list) else [])
    return list(dict.fromkeys(ids))


def chart_analytes(out: dict, results: pd.DataFrame, limit: int = 3) -> list[str]:
    """Analytes to chart beside the output: its own, then those of the other results it names (a
    pre-analytical pattern's calcium beside its potassium), at most ``limit``."""
    codes = [out.get("analyte_code")] if out.get("analyte_code") else []
    ids = result_ids(out)
    if ids and len(results):
        hit = results[results["result_id"].isin(ids)]
        codes += list(dict.fromkeys(hit["analyte_code"]))
    return [c for c in dict.fromkeys(codes) if c][:limit]


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _value(v, dec, unit) -> str:
    s = fmt_value(v, dec)
    u = display_unit(unit)
    return f"{s} {u}".strip() if s else "?"


def evidence_lines(out: dict, decimals: int | None = None) -> list[str]:
    """The rule with its numbers, one line per fact (markdown), for an output of any kind."""
    kind, p = out.get("kind"), _payload(out)
    unit = p.get("unit") or out.get("unit")
    dec = decimals
    lines: list[str] = []
    if kind == "anomaly":
        rule = p.get("rule") or out.get("rule")
        lines.append(f"Rule: **{rule_label(rule)}**" + (f" (flag {p['flag']})" if p.get("flag") else ""))
        value = p.get("value") if _num(p.get("value")) is not None else out.get("predicted_value")
        if _num(value) is not None:
            lines.append(f"Result: **{_value(value, dec, unit)}**")
        ev = p.get("evidence") if isinstance(p.get("evidence"), dict) else {}
        lines += _anomaly_evidence(ev, dec, unit)
        run = p.get("run")
        if isinstance(run, list) and run:
            vals = [_value(r.get("value"), dec, unit) for r in run if isinstance(r, dict)]
            times = [_ts(r.get("collected_at")) for r in run if isinstance(r, dict)]
            times = [t for t in times if t is not None]
            span = f" from {min(times):{TIME_FMT}} to {max(times):{TIME_FMT}}" if times else ""
            lines.append(f"Run of {len(run)} results{span}: " + ", ".join(vals[:12]) + (" …" if len(vals) > 12 else ""))
    elif kind == "forecast":
        q = p.get("quantiles") if isinstance(p.get("quantiles"), dict) else {}
        lines.append(f"Median **{_value(q.get('q50', p.get('median')), dec, unit)}**")
        if _num(q.get("q10")) is not None:
            lines.append(f"80 % interval {fmt_value(q.get('q10'), dec)}–{_value(q.get('q90'), dec, unit)}")
        i95 = p.get("interval95")
        if isinstance(i95, list) and len(i95) == 2 and all(_num(v) is not None for v in i95):
            lines.append(f"95 % interval (conformal) {fmt_value(i95[0], dec)}–{_value(i95[1], dec, unit)}")
        elif _num(q.get("q05")) is not None:
            lines.append(f"90 % interval (q05–q95) {fmt_value(q.get('q05'), dec)}–{_value(q.get('q95'), dec, unit)}")
        b = p.get("based_on") if isinstance(p.get("based_on"), dict) else {}
        facts = []
        if _num(b.get("prior_results")) is not None:
            facts.append(f"{int(float(b['prior_results']))} prior results")
        if _ts(b.get("last_result_at")) is not None:
            facts.append(f"the last collected {_ts(b['last_result_at']):{TIME_FMT}}")
        if b.get("calibrated") is not None:
            facts.append("interval calibrated" if b.get("calibrated") else "interval not calibrated")
        if facts:
            lines.append("Based on " + ", ".join(facts))
    elif kind == "recommendation":
        if p.get("title"):
            lines.append(f"**{p['title']}**" + (f" · urgency {p['urgency']}" if p.get("urgency") else ""))
        if p.get("text"):
            lines.append(readable_units(p["text"]))
        if p.get("triggered_by"):
            lines.append(f"Triggered by: {readable_units(p['triggered_by'])}")
    elif kind == "explanation":
        if _num(p.get("base_value")) is not None and _num(p.get("median")) is not None:
            lines.append(f"Base {fmt_value(p['base_value'], dec)} → forecast median **{_value(p['median'], dec, unit)}**"
                         + (f" ({p.get('method')})" if p.get("method") else ""))
        if p.get("message"):
            lines.append(str(p["message"]))
    src = p.get("source")
    if src:
        lines.append(f"Source: {src}")
    return lines


_KNOWN = {"low", "high", "interval_source", "censored", "comparator", "age_note", "sex", "limit", "list",
          "previous_value", "previous_at", "previous_result_id", "days_since_previous", "change_pct", "rcv_pct", "z",
          "cvi_pct", "cva_pct", "log_normal", "pattern", "result_ids", "criteria", "supporting", "method",
          "quantiles", "interval_level", "predictive_quantile", "excess_in_interval_widths", "model_version",
          "value_text", "comment", "scored_as_number"}


def _anomaly_evidence(ev: dict, dec, unit) -> list[str]:
    lines = []
    if "low" in ev or "high" in ev:
        src = {"row": "the laboratory's interval", "catalogue": "the catalogue"}.get(ev.get("interval_source"),
                                                                                   ev.get("interval_source") or "")
        lines.append(f"Reference interval {fmt_value(ev.get('low'), dec)}–{_value(ev.get('high'), dec, unit)}"
                     + (f" ({src})" if src else "") + (f"; {ev['age_note']}" if ev.get("age_note") else ""))
    if "limit" in ev:
        lines.append(f"Critical limit {_value(ev.get('limit'), dec, unit)}" + (f" ({ev['list']})" if ev.get("list") else ""))
    if "previous_value" in ev:
        prev_at = _ts(ev.get("previous_at"))
        days = _num(ev.get("days_since_previous"))
        ago = "" if days is None else (f", {days:.1f} days earlier" if days >= 1 else f", {days * 24:.1f} h earlier")
        lines.append(f"Previous result {_value(ev.get('previous_value'), dec, unit)}"
                     + (f" at {prev_at:{TIME_FMT}}" if prev_at is not None else "") + ago)
        if _num(ev.get("change_pct")) is not None:
            rcv = _num(ev.get("rcv_pct"))
            lines.append(f"Change {fmt_signed(ev['change_pct'], 0)} % against a reference change value of "
                         + (f"{fmt_signed(rcv, 0)} %" if rcv is not None else "?")
                         + (f" (CVI {ev['cvi_pct']} %, CVA {ev['cva_pct']} %" if ev.get("cvi_pct") is not None else "")
                         + (", log-normal)" if ev.get("log_normal") else (")" if ev.get("cvi_pct") is not None else "")))
    if ev.get("criteria"):
        lines.append("Criteria met: " + "; ".join(readable_units(c) for c in ev["criteria"]))
    if ev.get("supporting"):
        lines.append("Supporting: " + "; ".join(readable_units(c) for c in ev["supporting"]))
    if ev.get("comment"):
        lines.append(f"Laboratory comment: {ev['comment']}")
    if isinstance(ev.get("quantiles"), dict):
        q = ev["quantiles"]
        level = _num(ev.get("interval_level"))
        lo_k, hi_k = ("q05", "q95") if level is None or level >= 0.9 else ("q10", "q90")
        lines.append(f"Forecast {'' if level is None else f'{100 * level:.0f} % '}interval "
                     f"{fmt_value(q.get(lo_k), dec)}–{_value(q.get(hi_k), dec, unit)}"
                     + (f"; predictive quantile {float(ev['predictive_quantile']):.3f}"
                        if _num(ev.get("predictive_quantile")) is not None else ""))
    extra = [f"{k.replace('_', ' ')}: {v}" for k, v in ev.items() if k not in _KNOWN and v not in (None, "", [], {})]
    if extra:
        lines.append("; ".join(extra))
    return lines


def forecast_frame(out: dict) -> pd.DataFrame | None:
    """A one-row forecast frame (the timeline figure's contract) from a forecast output's payload, or None."""
    if out.get("kind") != "forecast":
        return None
    p = _payload(out)
    q = p.get("quantiles") if isinstance(p.get("quantiles"), dict) else {}
    at = _ts(p.get("at")) or _ts(out.get("output_time"))
    if at is None or any(_num(q.get(c)) is None for c in QUANTILES):
        return None
    row = {"patient_id": out.get("patient_id"), "analyte_code": out.get("analyte_code"), "at": at,
           **{c: float(q[c]) for c in QUANTILES}, "unit": p.get("unit"), "n_history": np.nan,
           "status": p.get("status") or "ok", "model_version": out.get("model_version")}
    i95 = p.get("interval95")
    if isinstance(i95, list) and len(i95) == 2 and all(_num(v) is not None for v in i95):
        row["lo95"], row["hi95"] = float(i95[0]), float(i95[1])
    return pd.DataFrame([row])


def explanation_dict(out: dict) -> dict | None:
    """An explanation output's payload as :func:`dashboard.figures.make_shap_bar` takes it, or None."""
    if out.get("kind") != "explanation":
        return None
    p = _payload(out)
    groups = [g for g in p.get("groups") or [] if isinstance(g, dict) and _num(g.get("value")) is not None]
    if not groups or _num(p.get("base_value")) is None or _num(p.get("median")) is None:
        return None
    return {"features": [{"feature": g.get("label") or g.get("group"), "value": float(g["value"])} for g in groups],
            "base_value": float(p["base_value"]), "output": float(p["median"]), "unit": p.get("unit"),
            "model_version": out.get("model_version")}
