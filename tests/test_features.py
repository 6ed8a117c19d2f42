"""Feature encoding: vocabulary, robust scaler, strictly-before rule, censoring, padding."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from model import HISTORY_COLUMNS, MIN_HISTORY
from model.features import (
    MASK_ID,
    N_SPECIAL,
    PAD_ID,
    STATUS_OK,
    STATUS_UNKNOWN_ANALYTE,
    UNK_ID,
    AnalyteScaler,
    AnalyteStats,
    AnalyteVocab,
    collate,
    encode_queries,
    status_too_few,
    validate_history,
)

T0 = pd.Timestamp("2024-01-01 08:00")


def make_history(rows, sex="F", age=60.0) -> pd.DataFrame:
    """``rows`` of (patient, days after T0, analyte, value[, censor]) -> a history frame (contract columns)."""
    recs = []
    for r in rows:
        pid, days, code, value = r[:4]
        recs.append(
            dict(patient_id=pid, collected_at=T0 + pd.Timedelta(days=days), analyte_code=code, value=float(value),
                 censor=np.int8(r[4] if len(r) > 4 else 0), unit_canonical="mmol/L", sex=sex,
                 age_years=age + days / 365.25)
        )
    return pd.DataFrame(recs, columns=list(HISTORY_COLUMNS))


def queries_at(pid, code, days) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [pid], "analyte_code": [code], "at": [T0 + pd.Timedelta(days=days)]})


def queries_for(pid, code, at) -> pd.DataFrame:
    return pd.DataFrame({"patient_id": [pid], "analyte_code": [code], "at": [pd.Timestamp(at)]})


def fc12_history(cases) -> pd.DataFrame:
    """FC-12.csv (HbA1c for P0014-P0016) mapped to the history contract."""
    raw = pd.read_csv(cases / "FC-12.csv", dtype={"loinc": str})
    return pd.DataFrame({
        "patient_id": raw["patient_id"], "collected_at": pd.to_datetime(raw["collected_at"]),
        "analyte_code": raw["loinc"], "value": raw["value"].astype(float), "censor": np.int8(0),
        "unit_canonical": raw["unit"], "sex": None, "age_years": np.nan,
    })


def fitted(history):
    return AnalyteVocab.fit(history), AnalyteScaler.fit(history)


def encode(history, queries, vocab=None, scaler=None, max_events=64, max_queries=8):
    if vocab is None:
        vocab, scaler = fitted(history)
    return encode_queries(history, queries, vocab, scaler, max_events=max_events, max_queries=max_queries)


# --- vocabulary -------------------------------------------------------------------------------


def test_vocab_specials_unknown_and_json_round_trip():
    vocab = AnalyteVocab(["2951-2", "2823-3"])
    assert (PAD_ID, UNK_ID, MASK_ID, N_SPECIAL) == (0, 1, 2, 3)
    assert len(vocab) == 5 and "2951-2" in vocab and "nope" not in vocab
    assert vocab.encode(["2951-2", "2823-3", "nope"]).tolist() == [3, 4, UNK_ID]
    again = AnalyteVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.codes == vocab.codes
    with pytest.raises(ValueError, match="duplicate analyte code '2951-2'"):
        AnalyteVocab(["2951-2", "2951-2"])


def test_vocab_fit_min_count_sorted():
    h = make_history([("P1", 0, "B", 1), ("P1", 1, "A", 1), ("P1", 2, "B", 1)])
    assert AnalyteVocab.fit(h).codes == ["A", "B"]
    assert AnalyteVocab.fit(h, min_count=2).codes == ["B"]


# --- scaler -----------------------------------------------------------------------------------


def test_scaler_constant_series_is_finite_without_warnings(cases):
    """FC-12: P0015's three identical 7.0 values alone must not divide by zero."""
    h = fc12_history(cases)
    h = h[h.patient_id == "P0015"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler = AnalyteScaler.fit(h)
        z = scaler.normalise(["4548-4"] * 3, np.array([7.0, 7.0, 7.7]))
        back = scaler.denormalise(["4548-4"] * 3, z)
    stats = scaler.stats["4548-4"]
    assert stats.scale > 0 and stats.center == 7.0 and stats.unit == "%"
    assert np.isfinite(z).all() and z[0] == 0 and z[2] > 0
    np.testing.assert_allclose(back, [7.0, 7.0, 7.7], rtol=1e-6)


def test_scaler_log_for_wide_range_raw_for_narrow_and_round_trip():
    rng = np.random.default_rng(0)
    crp = np.exp(rng.normal(1.5, 1.2, 300))  # skewed, wide: log scale
    sodium = rng.normal(140, 3, 300)  # narrow: raw scale
    h = make_history(
        [("P1", i, "CRP", v) for i, v in enumerate(crp)] + [("P1", i, "NA", v) for i, v in enumerate(sodium)]
    )
    scaler = AnalyteScaler.fit(h)
    assert scaler.stats["CRP"].transform == "log" and scaler.stats["NA"].transform == "identity"
    codes = ["CRP"] * 5 + ["NA"] * 5
    x = np.r_[crp[:5], sodium[:5]]
    np.testing.assert_allclose(scaler.denormalise(codes, scaler.normalise(codes, x)), x, rtol=1e-5)
    # 2-D denormalise (quantile columns) and a JSON round trip
    again = AnalyteScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    z = np.stack([scaler.normalise(codes, x)] * 3, axis=1)
    np.testing.assert_array_equal(again.denormalise(codes, z), scaler.denormalise(codes, z))


def test_scaler_clips_and_never_warns_on_zero_or_negative_input():
    h = make_history([("P1", i, "CRP", v) for i, v in enumerate([0.5, 1, 2, 5, 20, 80])])
    scaler = AnalyteScaler.fit(h)
    assert scaler.stats["CRP"].transform == "log"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = scaler.normalise(["CRP"] * 3, np.array([0.0, -1.0, 1e300]))
        back = scaler.denormalise(["CRP"] * 3, np.array([-1e9, 0.0, 1e9]))
    assert np.isfinite(z).all() and np.abs(z).max() <= scaler.clip
    assert np.isfinite(back).all() and (back > 0).all()


def test_scaler_unknown_analyte_named():
    scaler = AnalyteScaler.fit(make_history([("P1", 0, "A", 1.0)]))
    with pytest.raises(ValueError, match=r"\['ZZZ'\] have no scaler statistics"):
        scaler.normalise(["ZZZ"], np.array([1.0]))


# --- encoding rules ---------------------------------------------------------------------------


def _lab01_history(cases) -> pd.DataFrame:
    """LAB-01.csv with '<10' / '>100' split into (limit, censor) as the importer does."""
    raw = pd.read_csv(cases / "LAB-01.csv", dtype=str)
    parts = raw["value"].str.extract(r"^\s*([<>]?)\s*([0-9.]+)\s*$")
    return pd.DataFrame({
        "patient_id": raw["patient_id"], "collected_at": pd.to_datetime(raw["collected_at"]),
        "analyte_code": raw["loinc"], "value": parts[1].astype(float),
        "censor": parts[0].map({"<": -1, ">": 1, "": 0}).astype(np.int8), "unit_canonical": raw["unit"],
        "sex": None, "age_years": np.nan,
    })


def test_censored_result_enters_as_limit_with_flag_never_zero(cases):
    """LAB-01: '<10' becomes value = normalise(10) with censor -1, not 0."""
    h = _lab01_history(cases)
    # one more exact RF result so P0001 has MIN_HISTORY prior results at the query time
    extra = h.iloc[[1]].assign(collected_at=pd.Timestamp("2024-05-01"), value=12.0)
    h = pd.concat([h, extra], ignore_index=True)
    vocab, scaler = fitted(h)
    enc = encode(h, queries_for("P0001", "11572-5", "2024-06-01"), vocab, scaler)
    assert enc.status.tolist() == [STATUS_OK]
    b = collate(enc.rows)
    n = int(b["event_mask"].sum())
    assert n == 3
    values = scaler.denormalise(["11572-5"] * n, b["event_value"][0, :n])
    np.testing.assert_allclose(values, [10.0, 14.0, 12.0], rtol=1e-5)
    assert b["event_censor"][0, :n].tolist() == [-1, 0, 0]
    assert b["event_value"][0, 0] == scaler.normalise(["11572-5"], np.array([10.0]))[0]
    assert not np.isclose(values, 0).any()
    # '>100' TSH keeps +1
    enc = encode(h, queries_for("P0002", "3016-3", "2024-07-01"), vocab, scaler)
    b = collate(enc.rows)
    assert b["event_censor"][0, :3].tolist() == [-1, 1, 0]
    assert b["query_anchor_censor"][0, 0] == 0


def test_strictly_before_the_query_time():
    """A result collected exactly at ``at`` (or later) is not history."""
    h = make_history([("P1", 0, "A", 1.0), ("P1", 10, "A", 2.0), ("P1", 20, "A", 3.0), ("P1", 30, "A", 4.0)])
    enc = encode(h, queries_at("P1", "A", 20))
    assert enc.n_history.tolist() == [2]
    b = collate(enc.rows)
    assert b["event_mask"].sum() == 2
    assert b["event_time"][0, :2].tolist() == [20.0, 10.0]  # days before ``at``, all > 0
    assert b["query_horizon"][0, 0] == 10.0
    vocab, scaler = fitted(h)
    assert scaler.denormalise(["A"], b["query_anchor_value"][0, :1])[0] == pytest.approx(2.0)
    # one second later the day-20 result is history
    q = queries_at("P1", "A", 20)
    q["at"] += pd.Timedelta(seconds=1)
    assert encode(h, q).n_history.tolist() == [3]


def test_one_result_is_enough_none_gives_status_not_a_row(cases):
    """FC-12 as reconciled with issue 13: P0014's single HbA1c gets a row (a forecast leaning on the
    population); a patient with no result of the analyte gets the status and no row."""
    h = fc12_history(cases)
    q = pd.DataFrame({"patient_id": ["P0014", "P0015", "P9999"], "analyte_code": "4548-4", "at": pd.Timestamp("2025")})
    enc = encode(h, q)
    assert MIN_HISTORY == 1
    assert enc.status.tolist() == [STATUS_OK, STATUS_OK, "Not enough measurements to forecast (0; minimum 1)"]
    assert status_too_few(0) == f"Not enough measurements to forecast (0; minimum {MIN_HISTORY})"
    assert enc.n_history.tolist() == [1, 3, 0]
    assert [r.patient_id for r in enc.rows] == ["P0014", "P0015"]
    # a stricter minimum still gives the status (the baselines' min_history, for instance)
    strict = encode_queries(h, q, *fitted(h), max_events=64, max_queries=8, min_history=2)
    assert strict.status.tolist()[0] == "Not enough measurements to forecast (1; minimum 2)"


def test_unknown_analytes_counted_but_not_encoded():
    h = make_history([("P1", 0, "A", 1.0), ("P1", 1, "A", 2.0), ("P1", 2, "NEW", 5.0), ("P1", 3, "NEW", 6.0)])
    vocab, scaler = fitted(h[h.analyte_code == "A"])
    q = pd.concat([queries_at("P1", "A", 5), queries_at("P1", "NEW", 5)], ignore_index=True)
    enc = encode(h, q, vocab, scaler)
    assert enc.status.tolist() == [STATUS_OK, STATUS_UNKNOWN_ANALYTE]
    assert enc.n_history.tolist() == [2, 2]
    b = collate(enc.rows)
    assert b["event_mask"].sum() == 2 and set(b["event_analyte"][0].tolist()) == {vocab.encode(["A"])[0]}


def test_keeps_most_recent_max_events():
    h = make_history([("P1", d, "A", float(d)) for d in range(10)])
    enc = encode(h, queries_at("P1", "A", 100), max_events=4)
    b = collate(enc.rows)
    assert b["event_mask"].shape == (1, 4) and b["event_mask"].sum() == 4
    assert b["event_time"][0].tolist() == [94.0, 93.0, 92.0, 91.0]  # days 6..9, oldest first
    assert enc.n_history.tolist() == [10]  # n_history counts every prior result


def test_queries_share_context_and_split_by_max_queries():
    h = make_history([("P1", d, code, 1.0 + d) for d in range(3) for code in "ABC"])
    q = pd.concat([queries_at("P1", c, 10) for c in "ABCAB"], ignore_index=True)
    enc = encode(h, q, max_queries=2)
    assert [len(r.query_index) for r in enc.rows] == [2, 2, 1]
    assert sorted(np.concatenate([r.query_index for r in enc.rows]).tolist()) == [0, 1, 2, 3, 4]
    for r in enc.rows[1:]:
        np.testing.assert_array_equal(r.event_value, enc.rows[0].event_value)


def test_padding_convention_in_collate():
    """1 = real, 0 = padding; padded slots hold PAD / zeros (the same in training and inference)."""
    h = make_history([("P1", d, "A", 1.0 + d) for d in range(5)] + [("P2", d, "A", 2.0 + d) for d in range(2)])
    q = pd.concat([queries_at("P1", "A", 9), queries_at("P2", "A", 9), queries_at("P1", "A", 9)], ignore_index=True)
    rows = encode(h, q).rows
    b = collate(rows)
    assert b["event_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["query_mask"].tolist() == [[1, 1], [1, 0]]
    assert (b["event_analyte"][1, 2:] == PAD_ID).all() and (b["event_value"][1, 2:] == 0).all()
    assert (b["event_time"][1, 2:] == 0).all() and (b["query_analyte"][1, 1:] == PAD_ID).all()
    assert b["event_mask"].dtype == np.int64 and b["event_value"].dtype == np.float32
    assert "target_value" not in b


def test_patient_age_at_query_time_and_sex():
    h = make_history([("P1", 0, "A", 1.0), ("P1", 365.25, "A", 2.0)], sex="m", age=40.0)
    b = collate(encode(h, queries_at("P1", "A", 730.5)).rows)
    assert b["patient_age"][0] == pytest.approx(42.0, abs=1e-4)
    assert b["patient_sex"].tolist() == [2]
    h2 = h.assign(sex=None, age_years=np.nan)
    b = collate(encode(h2, queries_at("P1", "A", 730.5)).rows)
    assert np.isnan(b["patient_age"][0]) and b["patient_sex"].tolist() == [0]


def test_targets_from_queries_value_column():
    h = make_history([("P1", d, "A", 1.0 + d) for d in range(4)])
    q = queries_at("P1", "A", 3).assign(value=[4.0], censor=[0])
    vocab, scaler = fitted(h)
    b = collate(encode(h, q, vocab, scaler).rows)
    assert b["target_value"][0, 0] == scaler.normalise(["A"], np.array([4.0]))[0]
    assert b["target_censor"].tolist() == [[0]]


# --- validation -------------------------------------------------------------------------------

_BASE = make_history([("P1", 0, "A", 1.0), ("P1", 1, "A", 2.0)])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h.drop(columns=["censor"]), r"history is missing column\(s\) \['censor'\]"),
        (lambda h: h.assign(value=[1.0, np.inf]), r"non-numeric value inf \(row 1: patient P1, analyte A\)"),
        (lambda h: h.assign(value=[1.0, np.nan]), r"column 'value' has a non-finite"),
        (lambda h: h.assign(value=["1.0", "<10"]), r"value '<10' \(row 1: patient P1"),
        (lambda h: h.assign(collected_at=["2024-01-01", "yesterday"]), r"unparseable time 'yesterday' \(row 1\)"),
        (lambda h: h.assign(collected_at=[T0, pd.NaT]), r"'collected_at' has a missing time \(row 1\)"),
        (lambda h: h.assign(collected_at=h.collected_at.dt.tz_localize("UTC")), r"timezone-aware"),
        (lambda h: h.assign(censor=[0, 2]), r"'censor' has value 2 \(row 1\); expected -1, 0 or \+1"),
        (lambda h: h.assign(sex=["F", "X"]), r"'sex' has value 'X' \(row 1\)"),
        (lambda h: h.assign(analyte_code=["A", None]), r"'analyte_code' has a missing value \(row 1\)"),
    ],
)
def test_invalid_history_raises_naming_the_problem(mutate, message):
    with pytest.raises(ValueError, match=message):
        validate_history(mutate(_BASE.copy()))


def test_invalid_queries_raise():
    vocab, scaler = fitted(_BASE)
    with pytest.raises(ValueError, match=re.escape("queries is missing column(s) ['at']")):
        encode(_BASE, pd.DataFrame({"patient_id": ["P1"], "analyte_code": ["A"]}), vocab, scaler)
    with pytest.raises(ValueError, match="queries column 'at' has an unparseable time 'soon'"):
        encode(_BASE, pd.DataFrame({"patient_id": ["P1"], "analyte_code": ["A"], "at": ["soon"]}), vocab, scaler)


def test_string_times_are_parsed():
    h = _BASE.assign(collected_at=["2024-01-01 08:00", "2024-01-02 08:00"])
    q = pd.DataFrame({"patient_id": ["P1"], "analyte_code": ["A"], "at": ["2024-01-05"]})
    assert encode(h, q).status.tolist() == [STATUS_OK]


def test_query_summary_covers_every_prior_result_of_the_analyte_not_only_the_window():
    """Ten potassium results, a window of four events: the query's summary still describes all
    ten (mean, previous, min, max relative to the last, spread, count), strictly before ``at``."""
    from model.features import QUERY_SUMMARY

    values = [3.6, 4.8, 4.0, 3.9, 4.1, 4.4, 5.2, 4.3, 4.0, 4.6]
    h = make_history([("P1", d, "2823-3", v) for d, v in enumerate(values)] + [("P1", 50, "2823-3", 9.9)])
    vocab, scaler = fitted(h)
    enc = encode(h, queries_at("P1", "2823-3", 20), vocab, scaler, max_events=4)
    s = collate(enc.rows)["query_summary"][0, 0]
    z = scaler.normalise(["2823-3"] * 10, np.array(values)).astype(np.float64)  # the later 9.9 is not history
    a = z[-1]
    expected = [z.mean() - a, z[-2] - a, z.min() - a, z.max() - a, z.std(), np.log1p(10) / 5]
    assert len(s) == len(QUERY_SUMMARY)
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-6)


def test_scaler_compresses_extremes_instead_of_clipping_them():
    """Issue 13 (a): a site whose WBC spread is narrow (raw scale) read WBC 342 x10^3/uL as z = 223 and
    clipped it to 20 (37.5 back in the unit). New scalers compress beyond the soft limit and give every
    real value back; a scaler saved before (no soft_limit) keeps its hard clip."""
    stats = {"6690-2": AnalyteStats("identity", 7.5, 1.5, 0.0, "10*3/uL", 100)}
    new = AnalyteScaler(stats, clip=60.0, soft_limit=8.0)
    x = np.array([2.0, 7.5, 12.0, 240.0, 342.0, 375.0])
    z = new.normalise(["6690-2"] * 6, x)
    np.testing.assert_allclose(new.denormalise(["6690-2"] * 6, z), x, rtol=1e-5)
    assert np.all(np.diff(z) > 0) and abs(z[2] - 3.0) < 0.1  # monotone; nearly the identity within a few units
    again = AnalyteScaler.from_dict(json.loads(json.dumps(new.to_dict())))
    assert again.soft_limit == 8.0 and np.array_equal(again.normalise(["6690-2"], x[-2:]), z[-2:])
    old = AnalyteScaler.from_dict({"clip": 20.0, "analytes": {k: vars(v) for k, v in stats.items()}})
    assert old.soft_limit is None and old.denormalise(["6690-2"], old.normalise(["6690-2"], x[4:5]))[0] == 37.5
    fitted = AnalyteScaler.fit(make_history([("P1", i, "A", v) for i, v in enumerate([1.0, 2, 3, 4])]))
    assert fitted.soft_limit == 8.0  # the default for new fits
    # one normalised unit is worth more canonical units beyond the soft limit (the loss weights use this)
    slope = new.unit_per_normalised(["6690-2"] * 2, z[[1, 4]])
    assert slope[0] == pytest.approx(1.5) and slope[1] > 5 * slope[0]
