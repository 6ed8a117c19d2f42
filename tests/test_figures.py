"""Pure figure builders (dashboard/figures.py): assertions on fig.data and fig.layout only."""

from __future__ import annotations

import pandas as pd
import pytest

from dashboard import figures, services
from data import queries
from data.importers import run_import

QUANTILES = ("q05", "q10", "q25", "q50", "q75", "q90", "q95")


@pytest.fixture(scope="module")
def case_store(tmp_path_factory, cases):
    from data.db import open_store

    store = open_store(tmp_path_factory.mktemp("fig") / "cases.duckdb")
    for name in ("LAB-01", "LAB-02", "LAB-04", "LAB-05", "LAB-10", "XAI-15"):
        run_import(store, cases / f"{name}.csv")
    return store


def results(store, pid: str, sex=None, age=None) -> pd.DataFrame:
    return services.with_reference_limits(queries.timeline(store, pid), sex, age)


def traces(fig, name_part: str):
    """Traces whose name contains ``name_part`` (not the invisible lower edges of bands)."""
    return [t for t in fig.data if t.name and name_part.lower() in t.name.lower() and not t.name.endswith("(low)")]


def colors(trace) -> set[str]:
    """The marker colours of a trace (one colour is given once, not per point)."""
    c = trace.marker.color
    return {c} if isinstance(c, str) else set(c)


def yaxis(fig, row: int):
    return fig.layout["yaxis" if row == 1 else f"yaxis{row}"]


def test_axis_titles_units_band_and_time_order(case_store):
    """A clinician opens P0020's potassium: name and unit on the y-axis, shaded band, oldest left."""
    fig = figures.make_timeline_figure(results(case_store, "P0020"), "electrolytes")
    assert fig.layout.meta["analytes"] == ["2823-3"]
    title = yaxis(fig, 1).title.text
    assert "Potassium" in title and "mmol/L" in title
    band = traces(fig, "Reference interval")
    assert band and band[0].fill == "tonexty"
    assert min(v for v in band[0].y if v is not None) == pytest.approx(5.1)  # catalogue interval 3.3-5.1
    pts = traces(fig, "Result")[0]
    assert list(pts.x) == sorted(pts.x)
    assert fig.layout.xaxis.type == "date"
    x0, x1 = (pd.Timestamp(v) for v in fig.layout.xaxis.range)
    assert x0 < pd.Timestamp(pts.x[0]) and pd.Timestamp(pts.x[-1]) < x1


def test_abnormal_values_have_text_labels_not_only_colour(case_store):
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None)
    high = traces(fig, "outside reference")[0]
    assert set(high.text) == {"H"}  # 5.2 .. 5.8 above 5.1
    assert colors(high) == {figures.COLORS["abnormal"]}
    hover = " ".join(high.customdata)
    assert "Flag: H" in hover and "mmol/L" in hover and "As reported" in hover


def test_flag_labels_never_touch_so_two_l_cannot_read_as_ll():
    t = [pd.Timestamp("2024-01-01") + pd.Timedelta(hours=h) for h in (0, 2, 240, 242)]
    keep = figures.declutter_labels(t, [2.4, 2.2, 2.3, 6.9], ["L", "L", "L", "HH"],
                                    (pd.Timestamp("2023-12-31"), pd.Timestamp("2024-01-31")), (0.0, 8.0))
    assert keep == [False, True, True, True]  # of the two "L" hours apart only the more recent is printed
    # the more severe label wins over a more recent one; points apart in value both keep theirs
    keep = figures.declutter_labels(t[:2], [2.4, 2.45], ["LL", "L"], (t[0], t[0] + pd.Timedelta(days=30)), (0.0, 8.0))
    assert keep == [True, False]
    assert figures.declutter_labels(t[:2], [1.0, 7.0], ["L", "H"], (t[0], t[0] + pd.Timedelta(days=30)),
                                    (0.0, 8.0)) == [True, True]


def test_crowded_abnormal_results_print_one_label_each_cluster(case_store):
    """Low potassium results hours apart on a month-long axis: one 'L' printed, the others stay red and say so."""
    r = results(case_store, "P0020")
    k = r[r["analyte_code"] == "2823-3"].sort_values("collected_at").head(3).copy()
    k["collected_at"] = k["collected_at"].iloc[0] + pd.to_timedelta([0, 1, 2], unit="h")
    k["value_canonical"] = [3.0, 2.95, 3.05]
    k["ref_low_canonical"], k["ref_high_canonical"] = 3.3, 5.1
    late = r[r["analyte_code"] == "2823-3"].sort_values("collected_at").tail(1).assign(
        collected_at=k["collected_at"].iloc[0] + pd.Timedelta(days=30))
    fig = figures.make_timeline_figure(pd.concat([k, late]), ["2823-3"])
    low = traces(fig, "outside reference")[0]
    assert list(low.text) == ["", "", "L", "H"]  # the latest of the cluster keeps its label; 30 days later: apart
    assert colors(low) == {figures.COLORS["abnormal"]}  # every abnormal point is still red
    assert all("Flag: L" in h for h in low.customdata[:3])
    assert fig.layout.meta["hidden_flag_labels"] == 2


def test_legend_starts_below_the_chart_toolbar(case_store):
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None)
    assert fig.layout.legend.yref == "container" and fig.layout.legend.yanchor == "top"
    assert (1 - fig.layout.legend.y) * fig.layout.height >= figures.MODEBAR_PX  # the toolbar hid legend entries


def test_censored_results_at_the_limit_with_their_own_markers(case_store):
    """LAB-01: '<10' and '>100' drawn at the limit as triangles, hover shows the comparator."""
    fig = figures.make_timeline_figure(results(case_store, "P0001"), None)
    below = traces(fig, "Below limit")
    assert below and below[0].marker.symbol == "triangle-down"
    assert list(below[0].y) == [10.0] and below[0].text[0].startswith("<10")
    assert "<10" in below[0].customdata[0]
    fig2 = figures.make_timeline_figure(results(case_store, "P0002"), None)
    assert traces(fig2, "Above limit")[0].marker.symbol == "triangle-up"
    assert list(traces(fig2, "Above limit")[0].y) == [100.0]
    assert list(traces(fig2, "Below limit")[0].y) == [0.001]


def test_text_results_are_marked_on_the_time_axis_not_at_a_value(case_store):
    """LAB-02: HEMOLYZED and an empty value are marks on the time axis (y = 0 of the chart's domain, not a
    value of the y-axis), the text in their hover; never a point at 0 or at any other height."""
    r = results(case_store, "P0003")
    fig = figures.make_timeline_figure(r, None)
    marks = [a for a in fig.layout.annotations if a.name == "text_result"]
    assert len(marks) == 2
    assert all(a.yref.endswith(" domain") and a.y == 0 for a in marks)
    assert "HEMOLYZED" in marks[0].hovertext and "see note" in marks[1].hovertext
    assert len([s for s in fig.layout.shapes if s.line.dash == "dot"]) == 2
    legend = traces(fig, "Text result")[0]
    assert list(legend.y) == [None]  # a legend entry only: no point on the value axis
    times = {pd.Timestamp(a.x) for a in marks}
    for t in fig.data:  # no trace draws a point at 0, nor any point at a text result's time
        assert all(v is None or v != 0 for v in (list(t.y) if t.y is not None else []))
        if t.mode and "markers" in t.mode and t.x is not None and t.name != "Trend":
            assert not times & {pd.Timestamp(x) for x in t.x if x is not None}, t.name
    # the urine protein 'NEG' (text only) is not charted at all
    assert figures.make_timeline_figure(results(case_store, "P0004"), None).layout.meta["analytes"] == []


def test_implausible_values_off_scale_and_out_of_the_y_range(case_store):
    """LAB-10: sodium 1390 is an off-scale marker; the sodium axis stays near 130-145."""
    fig = figures.make_timeline_figure(results(case_store, "P0012"), ["2951-2", "2345-7"])
    lo, hi = yaxis(fig, 1).range
    assert 120 < lo < 139 and 141 < hi < 160
    off = traces(fig, "Implausible")[0]
    assert off.marker.symbol == "arrow-bar-up" and off.y[0] == hi and off.cliponaxis is False
    assert "1390" in off.text[0]
    _, ghi = yaxis(fig, 2).range
    assert ghi < 1000  # glucose 1276103 excluded from scaling


def test_unit_missing_greyed_and_conflicting_both_shown(case_store):
    fig = figures.make_timeline_figure(results(case_store, "P0006"), ["718-7"])
    um = traces(fig, "Unit missing")[0]
    assert um.marker.symbol == "circle-open" and "No unit reported" in um.customdata[0]
    assert list(traces(fig, "Result")[0].y) == pytest.approx([13.8, 13.6])
    fig5 = figures.make_timeline_figure(results(case_store, "P0007"), None)
    conf = traces(fig5, "Conflicting")[0]
    assert sorted(conf.y) == [128.0, 138.0]
    trend = [t for t in fig5.data if t.name == "Trend"][0]
    assert 138.0 in list(trend.y) and 128.0 not in list(trend.y)  # the series keeps the one reported last


def _forecast_frame(pid="P0020", code="2823-3", start="2024-04-09", med=5.9):
    at = pd.date_range(start, periods=3, freq="2D")
    rows = []
    for k, t in enumerate(at):
        w = 0.2 * (k + 1)
        rows.append({"patient_id": pid, "analyte_code": code, "at": t, "q05": med - 2 * w, "q10": med - 1.5 * w,
                     "q25": med - 0.7 * w, "q50": med, "q75": med + 0.7 * w, "q90": med + 1.5 * w,
                     "q95": med + 2 * w, "unit": "mmol/L", "n_history": 8, "status": "ok", "model_version": "lt-abc"})
    return pd.DataFrame(rows)


def test_forecast_band_traces_are_distinct_and_labelled(case_store):
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None, forecasts=_forecast_frame())
    med = traces(fig, "Forecast median")[0]
    assert med.line.dash == "dash" and "lt-abc" in med.name
    b80, b90 = traces(fig, "Forecast 80%")[0], traces(fig, "Forecast 90%")[0]
    assert b80.fill == "tonexty" and b90.fill == "tonexty" and b80.fillcolor != b90.fillcolor
    observed = traces(fig, "Result")[0]
    assert med.line.color != observed.marker.color
    assert med.x[0] == observed.x[-1] or pd.Timestamp(med.x[0]) <= pd.Timestamp(traces(fig, "outside")[0].x[-1])
    # the horizon is written under the chart by the page, not over the chart above (it overprinted its dates)
    assert fig.layout.meta["forecast_notes"] == {"2823-3": "up to 5 d after the last result"}
    assert not [a for a in fig.layout.annotations if a.yanchor == "bottom" and (a.y or 0) >= 1]
    assert "Decision support" in med.customdata[-1] and "based on 8 measurements" in med.customdata[-1]
    _, hi = yaxis(fig, 1).range
    assert hi >= 5.9 + 2 * 0.6  # the whole band is on the axis
    one = figures.make_timeline_figure(results(case_store, "P0020"), None, forecasts=_forecast_frame().assign(n_history=1))
    assert "based on 1 measurement<" in traces(one, "Forecast median")[0].customdata[-1]  # FC-12 / issue 13 (b)


def test_forecast_95_band_replaces_90_when_calibrated(case_store):
    """A model calibrated at 95 % gives lo95/hi95: the outer band is the 95 % interval, wider than q05..q95."""
    fc = _forecast_frame()
    fc["lo95"], fc["hi95"] = fc["q05"] - 0.3, fc["q95"] + 0.3
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None, forecasts=fc)
    assert not traces(fig, "Forecast 90%")
    b95 = traces(fig, "Forecast 95% interval (conformal)")[0]
    assert list(b95.y[1:]) == pytest.approx(list(fc["hi95"]))
    assert "95%:" in traces(fig, "Forecast median")[0].customdata[-1]
    _, hi = yaxis(fig, 1).range
    assert hi >= float(fc["hi95"].max())
    # a frame whose 95 % columns are empty (model not calibrated at 95 %) keeps the 90 % band
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None,
                                       forecasts=fc.assign(lo95=float("nan"), hi95=float("nan")))
    assert traces(fig, "Forecast 90%") and not traces(fig, "Forecast 95%")


def test_forecast_without_numbers_says_why(case_store):
    fc = _forecast_frame().head(1).assign(q50=float("nan"), status="Not enough measurements to forecast (0; minimum 1)")
    fig = figures.make_timeline_figure(results(case_store, "P0020"), None, forecasts=fc)
    assert not traces(fig, "Forecast median")
    assert any("Not enough measurements" in v for v in fig.layout.meta["forecast_status"].values())


def test_anomalies_ring_the_result_and_name_the_rule(case_store):
    r = results(case_store, "P0020")
    last = r.iloc[-1]
    an = pd.DataFrame([{"result_id": last["result_id"], "patient_id": "P0020", "analyte_code": "2823-3",
                        "collected_at": last["collected_at"], "rule": "delta_check", "flag": "UP",
                        "text": "Potassium rose beyond the reference change value"},
                       {"result_id": last["result_id"], "patient_id": "P0020", "analyte_code": "2823-3",
                        "collected_at": last["collected_at"], "rule": "reference_interval", "flag": "H", "text": "x"}])
    fig = figures.make_timeline_figure(r, None, anomalies=an)
    ring = traces(fig, "Anomaly")
    assert len(ring) == 1 and "delta check" in ring[0].name and ring[0].marker.symbol == "square-open"
    assert list(ring[0].y) == [5.8] and "reference change value" in ring[0].customdata[0]


def test_date_range_limits_the_axis(case_store):
    r = results(case_store, "P0020")
    fig = figures.make_timeline_figure(r, None, date_range=(pd.Timestamp("2024-04-03").date(), pd.Timestamp("2024-04-05").date()))
    pts = [x for t in fig.data if t.name and t.name.startswith("Result") for x in t.x]
    assert len(pts) == 3
    assert pd.Timestamp(fig.layout.xaxis.range[0]) == pd.Timestamp("2024-04-03")


def test_cumulative_table(case_store):
    t = figures.make_cumulative_table(results(case_store, "P0006"))
    assert list(t.columns[:3]) == ["Analyte", "Unit", "Reference interval"]
    assert list(t.columns[3:]) == sorted(t.columns[3:])  # oldest left
    glu = t[t["Analyte"] == "Glucose"].iloc[0]
    # reported 5.6 mmol/L (1 decimal) is 100.9 mg/dL: written at the precision reported, 1 decimal less
    # in mg/dL (x18), "101" (dashboard.precision)
    assert glu["2024-02-08 08:05"] == "101 H (5.6 mmol/L)"  # above 70-100 mg/dL; as reported in brackets
    hb = t[t["Analyte"] == "Hemoglobin"].iloc[0]
    assert hb["2024-02-15 08:10"] == "13.5 (no unit)" and hb["Unit"] == "g/dL"
    assert hb["Reference interval"] == "11.2–17.5"  # sex unknown: union of the F and M intervals
    t5 = figures.make_cumulative_table(results(case_store, "P0007"))
    assert "128 L | 138" == t5.iloc[0]["2024-03-10 14:00"]
    t2 = figures.make_cumulative_table(results(case_store, "P0003"))
    assert t2.iloc[0]["2024-05-03 06:25"] == "HEMOLYZED" and t2.iloc[0]["2024-05-05 06:35"] == "5.9 H"
    styled = figures.style_cumulative_table(t2).to_html()
    assert figures.COLORS["abnormal"] in styled


def test_cumulative_table_keeps_every_result_of_the_same_minute(case_store):
    """Two results collected within one minute share the minute's column: both shown, oldest first, none dropped."""
    r = results(case_store, "P0020")
    k = r[r["analyte_code"] == "2823-3"].sort_values("collected_at")
    first, second = k.iloc[0], k.iloc[1]
    twin = second.copy()
    twin["collected_at"] = first["collected_at"] + pd.Timedelta(seconds=30)
    twin["result_id"] = int(r["result_id"].max()) + 1
    t = figures.make_cumulative_table(pd.concat([r, twin.to_frame().T.astype(r.dtypes.to_dict())], ignore_index=True))
    minute = first["collected_at"].strftime(figures.TIME_FMT)
    assert list(t.columns).count(minute) == 1
    cell = t[t["Analyte"] == "Potassium"].iloc[0][minute]
    assert cell.split(" | ") == [figures._cell(first, figures.flag_label(first)),
                                 figures._cell(twin, figures.flag_label(twin))]


def test_units_in_free_text_as_clinicians_write_them():
    assert figures.readable_units("pCO2 68 mm[Hg] is above the critical limit 67 mm[Hg] — consider review") == \
        "pCO2 68 mmHg is above the critical limit 67 mmHg — consider review"
    assert figures.readable_units("WBC 4.1 10*3/uL (4-10 10*3/uL); creatinine 80 umol/L.") == \
        "WBC 4.1 10³/µL (4-10 10³/µL); creatinine 80 µmol/L."
    assert figures.readable_units("Sodium 136 mmol/L fell 1 in 10") == "Sodium 136 mmol/L fell 1 in 10"
    assert figures.readable_units(None) == ""


def test_rule_labels_name_the_rule():
    assert figures.rule_label("delta_check") == "Delta check: change beyond the reference change value"
    assert figures.rule_label("preanalytical:edta_contamination") == "Pre-analytical pattern: K-EDTA contamination"
    assert figures.rule_label("some_new_rule") == "Some new rule"


def test_flag_labels():
    base = {"result_kind": "numeric", "comparator": "=", "ref_low_canonical": 3.3, "ref_high_canonical": 5.1,
            "critical_low": 2.8, "critical_high": 6.2, "implausible": False, "unit_missing": False}
    assert figures.flag_label({**base, "value_canonical": 4.0}) == ""
    assert figures.flag_label({**base, "value_canonical": 5.5}) == "H"
    assert figures.flag_label({**base, "value_canonical": 6.5}) == "HH"
    assert figures.flag_label({**base, "value_canonical": 2.5}) == "LL"
    assert figures.flag_label({**base, "result_kind": "censored", "comparator": ">", "value_canonical": 5.0}) == ""
    assert figures.flag_label({**base, "result_kind": "censored", "comparator": ">", "value_canonical": 7.0}) == "HH"
    assert figures.flag_label({**base, "ref_low_canonical": None, "ref_high_canonical": None, "critical_high": None,
                               "value_canonical": 9.0, "flag": "abnormal"}) == "A"
    assert figures.flag_label({**base, "implausible": True, "value_canonical": 45.0}) == ""


def test_shap_bar_refuses_explanations_that_do_not_add_up():
    expl = {"features": [{"feature": "Potassium 2024-04-08 (5.8)", "value": 0.5},
                         {"feature": "Potassium 2024-04-07 (5.4)", "value": 0.2},
                         {"feature": "Creatinine", "value": -0.1}],
            "base_value": 5.0, "output": 5.6, "unit": "mmol/L", "analyte_name": "Potassium", "model_version": "lt-x"}
    fig = figures.make_shap_bar(expl)
    bar = fig.data[0]
    assert bar.orientation == "h" and list(bar.y)[-1].startswith("Potassium 2024-04-08")  # largest on top
    assert "mmol/L" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="do not add up; difference = 0.69"):
        figures.make_shap_bar({**expl, "output": 6.29})


def test_calibration_plot_from_model_card():
    cal = [{"kind": "quantile", "nominal": q, "empirical": min(1.0, q + 0.02)} for q in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)]
    cal.append({"kind": "interval 80% (q10..q90)", "nominal": 0.8, "empirical": 0.79})
    card = {"ranking": ["full fine-tuning", "last value"],
            "methods": {"full fine-tuning": {"calibration": cal}, "last value": {"calibration": cal}}}
    fig = figures.make_calibration_plot(card)
    names = [t.name for t in fig.data]
    assert names == ["Perfect calibration", "full fine-tuning", "last value"]
    assert len(fig.data[1].x) == 7 and fig.layout.xaxis.title.text == "Nominal quantile level"


def test_anomaly_hover_lines_are_the_first_lines_of_the_whole_text():
    """The hover wraps only a long text's head: its 5 lines must be those of the whole text, whatever the spacing
    and word lengths around the cut (words longer than the width, runs of spaces, short texts)."""
    import random
    import textwrap

    rng = random.Random(7)
    words = ["a", "mg/dL", "glucose", "x" * 75, "delta" * 16, "", "RCV", "(Fraser 2011);"]
    for _ in range(2000):
        text = "".join(rng.choice(words) + rng.choice([" ", "  ", "\n", "   "]) for _ in range(rng.randint(0, 160)))
        assert figures._first_lines(text, 70, 5) == textwrap.wrap(text, 70)[:5]
