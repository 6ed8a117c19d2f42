"""Recommendations from a versioned rule file, with a small structured condition language.

The rules live in ``clinical/rules/recommendations.yaml`` (``version`` plus a list of rules
with ``id``, ``title``, ``condition``, ``text``, ``urgency``, ``source``). Nothing is
``eval``-ed: a condition is a YAML mapping with exactly one of these keys.

``forecast: {analyte, quantile, above|below: LIMIT}``
    A forecast of ``analyte`` with status 'ok' whose ``quantile`` (q05 .. q95) is above /
    below the named limit. Triggered by that forecast's output id.
``observed: {analyte, above|below: LIMIT}``
    The patient's latest valid result of ``analyte`` (before the evaluation time) is above /
    below the limit. Triggered by that result.
``anomaly: {rule, analyte?, flag?, latest?}``
    An anomaly output with that rule (``'preanalytical:*'`` matches every pattern), optionally
    on ``analyte`` and with ``flag`` (one or a list). With ``latest: true`` only anomalies
    on the latest valid result of their analyte count (the current state, not history).
    Triggered by those anomaly output ids.
``trend: {analyte, direction: up|down, min_results, beyond_rcv}``
    The last ``min_results`` valid results each moved in ``direction``, and with
    ``beyond_rcv: true`` the total change exceeds the reference change value (Z and CVI/CVA
    as the delta check). Triggered by those results.
``all: [conditions]``, ``any: [conditions]``, ``not: condition``
    Combinators; a recommendation lists what triggered its positive parts.

Texts use the placeholders of :data:`PLACEHOLDERS`; ``{change}`` is always computed from the
``{baseline}`` the text names (value, how long before, which result), numbers with the analyte's
reporting precision (:mod:`clinical.format`).

``LIMIT`` is one of ``critical_high``, ``critical_low`` (the critical list in use),
``reference_high``, ``reference_low`` (the catalogue interval for the patient's sex and age):
no clinical number is written in a rule. Texts are formatted with a fixed set of
placeholders (:data:`PLACEHOLDERS`), checked when the file is loaded.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clinical.anomalies import (
    PATTERN_PREFIX,
    ClinicalReference,
    _change_text,
    _fmt,
    _prepared,
    _u,
    _when,
    default_reference,
    rcv_limits,
)
from clinical.format import decimals_by_code, reported_precision
from model import QUANTILE_COLUMNS

__all__ = ["Rule", "RuleSet", "load_rules", "evaluate_rules", "recommend", "PLACEHOLDERS", "URGENCIES", "RECOMMENDATION_COLUMNS"]

PLACEHOLDERS = frozenset({"analyte", "value", "unit", "limit", "quantile", "first", "last", "n", "change_pct", "pattern", "at",
                          "change", "baseline"})
URGENCIES = ("high", "medium", "low")
LIMITS = ("critical_high", "critical_low", "reference_high", "reference_low")
_KINDS = ("forecast", "observed", "anomaly", "trend", "all", "any", "not")
RECOMMENDATION_COLUMNS = [
    "rule_id", "rule_version", "patient_id", "analyte_code", "at", "title", "text", "urgency", "source",
    "triggered_by", "result_ids", "priority", "basis",
]
# What a recommendation rests on, most urgent first (its clinical priority; clinical.outputs ranks
# the review queue with the same numbers): an actual critical value, a pre-analytical error, an
# observed change (delta check, trend, model surprise, an observed value beyond a reference limit),
# then a forecast.
BASES = {1: "observed critical value", 2: "pre-analytical error", 3: "observed change", 4: "forecast"}


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    condition: dict
    text: str
    urgency: str
    source: str

    @property
    def priority(self) -> int:
        """The clinical priority of what the rule rests on (:data:`BASES`): the most urgent positive
        condition (conditions under ``not`` are not evidence)."""
        return _priority(self.condition)

    @property
    def basis(self) -> str:
        return BASES[self.priority]


def _priority(cond: dict) -> int:
    (kind, body), = cond.items()
    if kind in ("all", "any"):
        return min(_priority(c) for c in body)
    if kind == "not":
        return 4
    if kind == "forecast":
        return 4
    if kind == "observed":
        side = body.get("above") or body.get("below")
        return 1 if str(side).startswith("critical") else 3
    if kind == "anomaly":
        rule = str(body["rule"])
        return 1 if rule == "critical_value" else 2 if rule.startswith(PATTERN_PREFIX) else 3
    return 3  # trend


@dataclass(frozen=True)
class RuleSet:
    version: str
    rules: tuple[Rule, ...]


def _check_condition(cond, where: str) -> None:
    if not isinstance(cond, dict) or len(cond) != 1:
        raise ValueError(f"{where}: a condition is a mapping with exactly one of {list(_KINDS)}, got {cond!r}")
    (kind, body), = cond.items()
    if kind not in _KINDS:
        raise ValueError(f"{where}: unknown condition {kind!r}; expected one of {list(_KINDS)}")
    if kind in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise ValueError(f"{where}: '{kind}' needs a non-empty list")
        for i, c in enumerate(body):
            _check_condition(c, f"{where}.{kind}[{i}]")
        return
    if kind == "not":
        _check_condition(body, f"{where}.not")
        return
    if not isinstance(body, dict):
        raise ValueError(f"{where}: '{kind}' needs a mapping")
    if kind in ("forecast", "observed"):
        side = [k for k in ("above", "below") if k in body]
        if len(side) != 1 or body[side[0]] not in LIMITS:
            raise ValueError(f"{where}: '{kind}' needs one of above/below with a limit in {list(LIMITS)}")
        if kind == "forecast" and body.get("quantile") not in QUANTILE_COLUMNS:
            raise ValueError(f"{where}: forecast quantile must be one of {list(QUANTILE_COLUMNS)}")
    if kind == "trend" and body.get("direction") not in ("up", "down"):
        raise ValueError(f"{where}: trend direction must be 'up' or 'down'")
    if kind in ("forecast", "observed", "trend") and "analyte" not in body:
        raise ValueError(f"{where}: '{kind}' needs an analyte")
    if kind == "anomaly" and "rule" not in body:
        raise ValueError(f"{where}: 'anomaly' needs a rule")


def _check_text(text: str, where: str) -> None:
    for _, name, spec, conv in string.Formatter().parse(text):
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conv:
            raise ValueError(f"{where}: placeholder {{{name}}} is not allowed; use only {sorted(PLACEHOLDERS)}")


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Parse and check the rule file (default: the shipped ``recommendations.yaml``)."""
    if path is None:
        text = resources.files("clinical.rules").joinpath("recommendations.yaml").read_text(encoding="utf-8")
        name = "recommendations.yaml"
    else:
        text, name = Path(path).read_text(encoding="utf-8"), Path(path).name
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or "version" not in doc or "rules" not in doc:
        raise ValueError(f"{name}: needs 'version' and 'rules'")
    rules, seen = [], set()
    for i, r in enumerate(doc["rules"]):
        where = f"{name}: rule {r.get('id', i)!r}"
        for key in ("id", "title", "condition", "text", "urgency", "source"):
            if not str(r.get(key, "")).strip():
                raise ValueError(f"{where}: missing {key!r}")
        if r["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(r["id"])
        if r["urgency"] not in URGENCIES:
            raise ValueError(f"{where}: urgency must be one of {list(URGENCIES)}")
        text_ = " ".join(str(r["text"]).split())
        if not text_.startswith("Consider"):
            raise ValueError(f"{where}: text must be decision support, starting with 'Consider'")
        _check_text(text_, where)
        _check_condition(r["condition"], where)
        rules.append(Rule(str(r["id"]), str(r["title"]), r["condition"], text_, r["urgency"],
                          " ".join(str(r["source"]).split())))
    return RuleSet(str(doc["version"]), tuple(rules))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Match:
    ok: bool
    outputs: list = field(default_factory=list)
    results: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    analyte: str | None = None


@dataclass
class _Context:
    patient_id: str
    at: pd.Timestamp
    valid: pd.DataFrame  # prepared timeline rows: valid numeric results before ``at``
    forecasts: pd.DataFrame
    anomalies: pd.DataFrame
    ref: ClinicalReference
    latest_any: np.ndarray | None = None  # text/empty results that are the latest of their analyte


def _limit(ctx: _Context, code: str, name: str) -> float | None:
    if name.startswith("critical"):
        lim = ctx.ref.critical.get(code)
        v = None if lim is None else lim[0 if name == "critical_low" else 1]
    else:
        rows = ctx.valid[ctx.valid["analyte_code"] == code]
        col = "x_lo" if name == "reference_low" else "x_hi"
        v = rows[col].iloc[-1] if len(rows) else None
        if v is None or not np.isfinite(v):
            iv = ctx.ref.intervals
            sex = rows["sex"].iloc[-1] if len(rows) and rows["sex"].iloc[-1] in ("F", "M") else "unknown"
            hit = iv[(iv["code"] == code) & (iv["sex"].isin([sex, "any"]))]
            v = hit["low" if name == "reference_low" else "high"].iloc[0] if len(hit) else None
    return float(v) if v is not None and np.isfinite(v) else None


def _name(ctx: _Context, code: str) -> str:
    from data.catalogue import load_catalogue

    a = load_catalogue().get(code)
    return a.name if a is not None else code


def _eval(cond: dict, ctx: _Context) -> _Match:
    (kind, body), = cond.items()
    if kind == "all":
        parts = [_eval(c, ctx) for c in body]
        if not all(p.ok for p in parts):
            return _Match(False)
        return _merge(parts)
    if kind == "any":
        parts = [p for p in (_eval(c, ctx) for c in body) if p.ok]
        return _merge(parts) if parts else _Match(False)
    if kind == "not":
        return _Match(not _eval(body, ctx).ok)
    return {"forecast": _forecast, "observed": _observed, "anomaly": _anomaly, "trend": _trend}[kind](body, ctx)


def _merge(parts: list[_Match]) -> _Match:
    m = _Match(True)
    for p in parts:
        m.outputs += [o for o in p.outputs if o not in m.outputs]
        m.results += [r for r in p.results if r not in m.results]
        m.facts = {**p.facts, **m.facts}
        m.analyte = m.analyte or p.analyte
    return m


def _forecast(body: dict, ctx: _Context) -> _Match:
    code, qcol = str(body["analyte"]), body["quantile"]
    side = "above" if "above" in body else "below"
    limit = _limit(ctx, code, body[side])
    f = ctx.forecasts
    if limit is None or f is None or f.empty:
        return _Match(False)
    f = f[(f["analyte_code"].astype(str) == code) & (f["status"] == "ok")]
    x = pd.to_numeric(f[qcol], errors="coerce")
    hit = f[(x > limit) if side == "above" else (x < limit)]
    if hit.empty:
        return _Match(False)
    r = hit.iloc[0]
    return _Match(True, outputs=[r["output_id"]] if "output_id" in hit else [], analyte=code, facts=dict(
        analyte=_name(ctx, code), value=_fmt(r[qcol], code), unit=r.get("unit") or "", limit=_fmt(limit, code),
        quantile=qcol, at=pd.Timestamp(r["at"]).strftime("%Y-%m-%d %H:%M")))


def _observed(body: dict, ctx: _Context) -> _Match:
    code = str(body["analyte"])
    side = "above" if "above" in body else "below"
    limit = _limit(ctx, code, body[side])
    rows = ctx.valid[ctx.valid["analyte_code"] == code]
    if limit is None or rows.empty:
        return _Match(False)
    r = rows.iloc[-1]
    v = float(r["value_canonical"])
    if not ((v > limit) if side == "above" else (v < limit)):
        return _Match(False)
    return _Match(True, results=[int(r["result_id"])], analyte=code, facts=dict(
        analyte=_name(ctx, code), value=_fmt(v, code), unit=r["x_unit"] or "", limit=_fmt(limit, code)))


def _anomaly(body: dict, ctx: _Context) -> _Match:
    a = ctx.anomalies
    if a is None or a.empty:
        return _Match(False)
    rule = str(body["rule"])
    if rule.endswith("*"):
        a = a[a["rule"].astype(str).str.startswith(rule[:-1])]
    else:
        a = a[a["rule"] == rule]
    if "analyte" in body:
        a = a[a["analyte_code"].astype(str) == str(body["analyte"])]
    if "flag" in body:
        flags = body["flag"] if isinstance(body["flag"], list) else [body["flag"]]
        a = a[a["flag"].isin(flags)]
    a = a[pd.to_datetime(a["collected_at"]) < ctx.at]
    members = [_run_members(r) for r in a.to_dict("records")]
    if body.get("latest") and len(a):
        latest = set(ctx.valid.groupby("analyte_code")["result_id"].last().to_numpy().tolist())
        if ctx.latest_any is not None:
            latest |= set(np.asarray(ctx.latest_any).tolist())
        keep = np.array([bool(set(m) & latest) for m in members], dtype=bool)
        a, members = a[keep], [m for m, k in zip(members, keep) if k]
    if a.empty:
        return _Match(False)
    order = np.argsort(pd.to_datetime(a["collected_at"]).to_numpy(), kind="stable")
    a, members = a.iloc[order], [members[i] for i in order]
    r = a.iloc[-1]
    code = str(r["analyte_code"])
    ev = r["evidence"] if isinstance(r["evidence"], dict) else {}
    run = ev.get("run") or {}
    last_value = run.get("last", {}).get("value", r["value"]) if run else r["value"]
    last_at = pd.Timestamp(run["last"]["collected_at"]) if run else pd.Timestamp(r["collected_at"])
    pattern = str(r["rule"])[len(PATTERN_PREFIX):].replace("_", " ") if str(r["rule"]).startswith(PATTERN_PREFIX) else ""
    facts = dict(analyte=r.get("analyte_name") or _name(ctx, code),
                 value=_fmt(last_value, code) if last_value is not None and pd.notna(last_value) else "(text result)",
                 unit=r["unit"] or "", pattern=pattern)
    base, base_at = ev.get("previous_value"), ev.get("previous_at")
    if base is not None and base_at is not None and last_value is not None and pd.notna(last_value) and float(base) > 0:
        # the change is computed from the baseline the text names: the result before the flag (or its run)
        days = (last_at - pd.Timestamp(base_at)).total_seconds() / 86400.0
        facts["change"] = _change_text(code, float(last_value), float(base), r["unit"])
        facts["change_pct"] = f"{100 * (float(last_value) / float(base) - 1):+.0f}"
        facts["baseline"] = (f"{_fmt(base, code)}{_u(r['unit'])} {_when(days)} earlier "
                             f"({'the result before this run' if run else 'the previous result'})")
    if "limit" in ev and ev["limit"] is not None:
        facts["limit"] = _fmt(ev["limit"], code)
    outs = a["output_id"].tolist() if "output_id" in a else []
    results = [int(x) for m in members for x in m]
    return _Match(True, outputs=outs, results=list(dict.fromkeys(results)), facts=facts, analyte=code)


def _run_members(row: dict) -> list[int]:
    """Result ids an anomaly row stands for: its run's (:func:`clinical.anomalies.group_runs`), else its own."""
    ev = row.get("evidence") if isinstance(row.get("evidence"), dict) else {}
    run = ev.get("run") or {}
    ids = run.get("result_ids") or [row["result_id"]]
    return [int(x) for x in ids]


def _trend(body: dict, ctx: _Context) -> _Match:
    code = str(body["analyte"])
    n = int(body.get("min_results", 3))
    rows = ctx.valid[ctx.valid["analyte_code"] == code]
    rows = rows.drop_duplicates("collected_at", keep="last").tail(n)
    if len(rows) < n:
        return _Match(False)
    v = rows["value_canonical"].to_numpy(float)
    steps = np.diff(v)
    monotone = np.all(steps < 0) if body["direction"] == "down" else np.all(steps > 0)
    if not monotone or v[0] <= 0:
        return _Match(False)
    change = v[-1] / v[0] - 1.0
    if body.get("beyond_rcv"):
        lim = rcv_limits(code, float(ctx.ref.rules["delta_check"]["z"]), ctx.ref)
        if lim is None or not (change < lim[0] if body["direction"] == "down" else change > lim[1]):
            return _Match(False)
    unit = rows["x_unit"].iloc[-1] or ""
    return _Match(True, results=[int(x) for x in rows["result_id"]], analyte=code, facts=dict(
        analyte=_name(ctx, code), n=str(n), first=_fmt(v[0], code), last=_fmt(v[-1], code), unit=unit,
        value=_fmt(v[-1], code), change_pct=f"{100 * change:+.0f}", change=_change_text(code, v[-1], v[0], unit)))


class _Facts(dict):
    def __missing__(self, key):
        return "?"


def evaluate_rules(
    timeline: pd.DataFrame,
    patient=None,
    *,
    at=None,
    forecasts: pd.DataFrame | None = None,
    anomalies: pd.DataFrame | None = None,
    rules: RuleSet | None = None,
    reference: ClinicalReference | None = None,
) -> pd.DataFrame:
    """The recommendations that fire for one patient at ``at`` (:data:`RECOMMENDATION_COLUMNS`), most
    clinically urgent first: ``priority`` (1 an actual critical value, 2 a pre-analytical error, 3 an
    observed change, 4 a forecast; :data:`BASES` names it in ``basis``), then urgency.

    ``forecasts`` (the forecasts contract) and ``anomalies`` (:func:`clinical.anomalies.detect_anomalies`)
    should carry an ``output_id`` column so each recommendation can list what triggered it;
    ``at`` defaults to just after the last result. Only results collected before ``at`` count.
    ``timeline`` may be :func:`clinical.anomalies.prepare_timeline` rows (prepared once for the anomalies
    and the recommendations; ``patient`` and ``reference`` were applied there).
    """
    with reported_precision(decimals_by_code(timeline)):
        return _evaluate(timeline, patient, at, forecasts, anomalies, rules, reference)


def _evaluate(timeline, patient, at, forecasts, anomalies, rules, reference) -> pd.DataFrame:
    rs = rules or load_rules()
    ref = reference or default_reference()
    t = _prepared(timeline, patient, ref)
    at = pd.Timestamp(at) if at is not None else (t["collected_at"].max() + pd.Timedelta(seconds=1) if len(t) else pd.Timestamp.now())
    if len(t) and not (t["collected_at"] < at).all():  # no copy of every row when all count
        t = t[t["collected_at"] < at]
    valid = t[t["x_num"]].sort_values(["analyte_code", "collected_at", "reported_at", "result_id"])
    pid = str(t["patient_id"].iloc[0]) if len(t) else str((patient or {}).get("patient_id", ""))
    ctx = _Context(pid, at, valid, forecasts if forecasts is not None else pd.DataFrame(),
                   anomalies if anomalies is not None else pd.DataFrame(), ref)
    # text-only results (e.g. 'HEMOLYZED') are the latest result of their analyte when nothing valid follows
    last_any = t.sort_values(["collected_at", "result_id"]).groupby("analyte_code").tail(1)
    newer_valid = last_any["result_id"].isin(valid.groupby("analyte_code")["result_id"].last().to_numpy())
    ctx.latest_any = last_any.loc[~newer_valid, "result_id"].to_numpy()
    out = []
    for rule in rs.rules:
        m = _eval(rule.condition, ctx)
        if not m.ok:
            continue
        facts = _Facts(at=at.strftime("%Y-%m-%d %H:%M"))
        facts.update(m.facts)
        out.append(dict(rule_id=rule.id, rule_version=rs.version, patient_id=pid, analyte_code=m.analyte, at=at,
                        title=rule.title, text=rule.text.format_map(facts).replace("  ", " "), urgency=rule.urgency,
                        source=rule.source, triggered_by=list(m.outputs), result_ids=list(m.results),
                        priority=rule.priority, basis=rule.basis))
    # clinical priority first (an actual critical value before a forecast warning), then urgency
    out.sort(key=lambda r: (r["priority"], URGENCIES.index(r["urgency"])))
    return pd.DataFrame(out, columns=RECOMMENDATION_COLUMNS)


def recommend(timeline: pd.DataFrame, forecasts: pd.DataFrame | None, anomalies: pd.DataFrame | None, patient=None,
              at=None) -> pd.DataFrame:
    """:func:`evaluate_rules` with two display columns added: ``recommendation`` (the text) and
    ``rationale`` (the rule title and what triggered it)."""
    recs = evaluate_rules(timeline, patient, at=at, forecasts=forecasts, anomalies=anomalies)
    recs["recommendation"] = recs["text"]
    recs["rationale"] = [
        f"{title} (rule {rid}; triggered by {', '.join(map(str, trig + res)) or 'observed values'})"
        for title, rid, trig, res in zip(recs["title"], recs["rule_id"], recs["triggered_by"], recs["result_ids"])
    ]
    return recs
