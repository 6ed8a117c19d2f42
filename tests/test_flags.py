"""Flags on every result from the right limits (clinical.flags), the same in Python and in the Patients list's SQL."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from clinical.anomalies import _prepare, default_reference
from clinical.flags import ABNORMAL_FLAGS, CRITICAL_FLAGS, classify, flag_of, normalise_flag, result_flags
from data import queries
from data.importers import run_import
from test_anomalies import ADULT_F, CREA, K, NA, tl


def flags(rows, patient=ADULT_F) -> list:
    return result_flags(tl(rows), patient)["flag"].tolist()


def test_reported_flags_are_read_with_the_cited_codes():
    assert [normalise_flag(f) for f in ("H", "high", "HU", "abnormal", "Critical High", "ll", "N", "*", " ", None, "U")] \
        == ["H", "H", "H", "A", "HH", "LL", "N", "A", None, None, None]  # U: a change, nothing about the interval


def test_catalogue_interval_by_sex_age_and_unknown_sex():
    rows = [("2024-01-01", CREA, 1.15)]  # F 0.4-1.1, M 0.5-1.2 (MIMIC-IV demo intervals)
    assert flags(rows) == ["H"] and flags(rows, ADULT_F | {"sex": "M"}) == ["N"]
    assert flags(rows, None) == ["N"]  # sex unknown: the union 0.4-1.2
    f = result_flags(tl([("2024-01-01", CREA, 1.25)]), None)
    assert f["flag"].tolist() == ["H"] and f["flag_basis"].tolist() == ["catalogue reference interval"]
    # age from the birth date at collection: a 10-year-old has no adult interval in the catalogue
    child = {"patient_id": "P", "sex": "F", "birth_date": pd.Timestamp("2014-01-01"), "age_at_ref": np.nan,
             "ref_date": pd.NaT}
    assert flags(rows, child) == [None]
    adult_since = child | {"birth_date": pd.Timestamp("2005-12-31")}  # 18 the day before collection
    assert flags(rows, adult_since) == ["H"]


def test_file_flag_then_file_limits_then_catalogue():
    k = lambda v, **extra: ("2024-01-01", K, v, extra)  # noqa: E731 - catalogue 3.3-5.1
    t = tl([k(5.6), k(5.6, ref_low=3.5, ref_high=5.8), k(4.0), k(4.0), k(5.6), k(2.0), k(3.0), k(6.8), "text"][:8])
    t.loc[[2, 3, 4], "flag"] = ["H", "abnormal", "N"]
    f = result_flags(t, ADULT_F)
    assert f["flag"].tolist() == ["H", "N", "H", "A", "N", "LL", "L", "HH"]
    assert f["flag_basis"].tolist() == [
        "catalogue reference interval", "laboratory reference interval", "laboratory flag", "laboratory flag",
        "laboratory flag", "critical value list", "catalogue reference interval", "critical value list"]
    # 'abnormal' takes its direction from the limits; a critical limit wins over any reported flag
    t2 = tl([k(5.6), k(6.8)])
    t2["flag"] = ["abnormal", "N"]
    assert result_flags(t2, ADULT_F)["flag"].tolist() == ["H", "HH"]


def test_text_implausible_and_censored_results():
    rows = [("2024-01-01", K, "HEMOLYZED"), ("2024-01-02", K, 45.0, {"implausible": True}), ("2024-01-03", K, "<2"),
            ("2024-01-04", K, "<4"), ("2024-01-05", K, ">5.5"), ("2024-01-06", K, 4.0, {"unit_missing": True})]
    t = tl(rows)
    t.loc[[0, 1, 5], "flag"] = ["A", "H", "H"]
    assert result_flags(t, ADULT_F)["flag"].tolist() == ["A", None, "LL", None, "H", "H"]


def test_scalar_rule_equals_the_vectorised_rule():
    """flag_of (one chart point / table cell) and classify (frames) are one rule: every combination."""
    combos = list(itertools.product(["=", "<", ">", "<=", ">="], [2.0, 3.3, 4.0, 5.1, 6.0, 6.2, 7.0],
                                    [None, "H", "L", "A", "AA", "N", "HH", "U", "*"],
                                    [(None, None), (3.5, 5.8), (None, 5.0)], [False, True]))
    rows = [(pd.Timestamp("2024-01-01") + pd.Timedelta(minutes=i), K, v, {"ref_low": lo, "ref_high": hi,
                                                                          "implausible": imp})
            for i, (_, v, _, (lo, hi), imp) in enumerate(combos)]
    t = tl(rows)
    t["comparator"] = [c[0] for c in combos]
    t["result_kind"] = ["numeric" if c[0] == "=" else "censored" for c in combos]
    t["flag"] = [c[2] for c in combos]
    p = _prepare(t, ADULT_F, default_reference())
    got, _ = classify(p, p["x_clo"].to_numpy(), p["x_chi"].to_numpy())
    scalar = [flag_of(r.value_canonical, r.comparator, r.result_kind, reported=r.flag, low=r.x_lo, high=r.x_hi,
                      critical_low=r.x_clo, critical_high=r.x_chi, implausible=r.implausible,
                      unit_missing=r.unit_missing) for r in p.itertuples(index=False)]
    assert [None if not isinstance(x, str) else x for x in got] == scalar and len(scalar) == len(combos)
    assert {"HH", "LL", "H", "L", "A", "AA", "N", None} <= set(scalar)


def _write(path, text: str):
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


def test_csv_without_a_flag_column_counts_abnormal_and_critical(store, tmp_path):
    """The issue's case: potassium 6.8 mmol/L (critical), sodium 127, creatinine 2.1, no flag column."""
    f = _write(tmp_path / "no_flags.csv", """
patient_id,collected_at,loinc,test_name,value,unit,sex,birth_date
P1,2024-03-01 08:00,2823-3,Potassium,6.8,mmol/L,F,1950-05-01
P1,2024-03-01 08:00,2951-2,Sodium,127,mmol/L,F,1950-05-01
P1,2024-03-01 08:00,2160-0,Creatinine,2.1,mg/dL,F,1950-05-01
P1,2024-03-02 08:00,2823-3,Potassium,4.2,mmol/L,F,1950-05-01
P2,2024-03-01 08:00,2823-3,Potassium,4.1,mmol/L,M,1980-01-01
""")
    run_import(store, f)
    p = queries.patients(store).set_index("patient_id")
    assert p.loc["P1", ["n_results", "n_abnormal", "n_critical"]].tolist() == [4, 3, 1]
    assert p.loc["P2", ["n_abnormal", "n_critical"]].tolist() == [0, 0]
    assert int(p.loc["P1", "age_years"]) == 73 and int(p.loc["P2", "age_years"]) == 44  # at the last result
    t = queries.timeline(store, "P1")  # creatinine, potassium, sodium at 08:00, then potassium the next day
    assert result_flags(t, queries.patient_info(store, "P1"))["flag"].tolist() == ["H", "HH", "L", "N"]
    # the Patients page's filters see them
    assert queries.patients(store, search="p1")["n_critical"].tolist() == [1]


def test_synthea_export_counts_abnormal_results_and_ages(store):
    from pathlib import Path

    run_import(store, Path(__file__).parent / "fixtures" / "synthea")
    p = queries.patients(store)
    assert p["age_years"].notna().all()  # birth dates imported: ages shown
    _sql_equals_python(store)


def _sql_equals_python(store) -> pd.DataFrame:
    p = queries.patients(store, limit=1_000_000).set_index("patient_id")
    for pid in p.index:
        f = result_flags(queries.timeline(store, pid), queries.patient_info(store, pid))
        got = (int(f["flag"].isin(ABNORMAL_FLAGS).sum()), int(f["flag"].isin(CRITICAL_FLAGS).sum()))
        assert got == (p.loc[pid, "n_abnormal"], p.loc[pid, "n_critical"]), pid
    return p


def test_sql_rule_equals_python_rule_on_every_kind_of_row(store, tmp_path):
    """Flags as reported (incl. unknown and change codes), own limits, inverted limits, no limits, censored, text,
    implausible, unit missing, sexes and ages: the Patients list's SQL and clinical.flags agree per patient."""
    f = _write(tmp_path / "mixed.csv", """
patient_id,collected_at,loinc,test_name,value,unit,ref_low,ref_high,flag,sex,birth_date
A,2024-01-01 08:00,2823-3,Potassium,5.6,mmol/L,,,,F,1960-01-01
A,2024-01-02 08:00,2823-3,Potassium,5.6,mmol/L,3.5,5.8,,F,1960-01-01
A,2024-01-03 08:00,2823-3,Potassium,4.0,mmol/L,,,H,F,1960-01-01
A,2024-01-04 08:00,2823-3,Potassium,5.6,mmol/L,,,abnormal,F,1960-01-01
A,2024-01-05 08:00,2823-3,Potassium,5.6,mmol/L,,,N,F,1960-01-01
A,2024-01-06 08:00,2823-3,Potassium,<2.0,mmol/L,,,,F,1960-01-01
A,2024-01-07 08:00,2823-3,Potassium,HEMOLYZED,mmol/L,,,A,F,1960-01-01
A,2024-01-08 08:00,2823-3,Potassium,5.6,mmol/L,5.8,3.5,,F,1960-01-01
A,2024-01-09 08:00,2823-3,Potassium,5.6,mmol/L,,,U,F,1960-01-01
A,2024-01-10 08:00,2823-3,Potassium,5.6,mmol/L,,,*,F,1960-01-01
A,2024-01-11 08:00,2951-2,Sodium,1390,mmol/L,,,H,F,1960-01-01
A,2024-01-12 08:00,2160-0,Creatinine,1.15,mg/dL,,,,F,1960-01-01
A,2024-01-13 08:00,2160-0,Creatinine,110,umol/L,,,,F,1960-01-01
A,2024-01-14 08:00,2823-3,Potassium,4.0,,,,,F,1960-01-01
A,2024-01-15 08:00,2823-3,Potassium,4.0,mmol/L,,,AA,F,1960-01-01
B,2024-01-01 08:00,2160-0,Creatinine,1.15,mg/dL,,,,M,1960-01-01
B,2024-01-02 08:00,2160-0,Creatinine,1.25,mg/dL,,,,,
C,2024-01-01 08:00,2160-0,Creatinine,1.25,mg/dL,,,,F,2015-01-01
C,2024-01-02 08:00,2823-3,Potassium,7.5,mmol/L,,,,F,2015-01-01
""")
    run_import(store, f)
    p = _sql_equals_python(store)
    assert p.loc["A", "n_abnormal"] > 0 and p.loc["C", "n_critical"] == 1  # a critical limit applies at any age
