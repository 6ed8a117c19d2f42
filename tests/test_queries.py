"""data.queries.timeline against the lab_results view it stands for."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data import queries
from data.importers import run_import

_VIEW_SQL = (f"SELECT {', '.join(queries.TIMELINE_COLUMNS)} FROM lab_results WHERE patient_id = ? "
             "ORDER BY collected_at, analyte_code, result_id")


def _view(store, patient_id: str) -> pd.DataFrame:
    with store.read() as cur:
        return cur.execute(_VIEW_SQL, [patient_id]).df()


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal row for row, column for column (NULL as NaN/None alike; floats to 1e-12)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            np.testing.assert_allclose(x.astype(float), y.astype(float), rtol=1e-12, equal_nan=True, err_msg=c)
        else:
            xs = [None if pd.isna(v) else v for v in x]
            ys = [None if pd.isna(v) else v for v in y]
            assert xs == ys, c


def test_timeline_equals_the_view_for_mimic_patients(mimic_store):
    """Every column of every row, in the view's order, for patients with censored, text,
    converted and reference-interval results."""
    with mimic_store.read() as cur:
        pids = [r[0] for r in cur.execute(
            "SELECT patient_id FROM lab_results GROUP BY patient_id "
            "ORDER BY count(*) FILTER (WHERE result_kind <> 'numeric') DESC, patient_id LIMIT 12").fetchall()]
    for pid in pids:
        got, want = queries.timeline(mimic_store, pid), _view(mimic_store, pid)
        assert len(got) > 0
        _same(got, want)
    kinds = set(pd.concat([queries.timeline(mimic_store, p) for p in pids])["result_kind"])
    assert {"numeric", "text"} <= kinds


def test_timeline_filters_match_the_view(mimic_store):
    pid = queries.patients(mimic_store, limit=1).iloc[0]["patient_id"]
    full = _view(mimic_store, pid)
    codes = list(full["analyte_code"].value_counts().index[:3])
    got = queries.timeline(mimic_store, pid, analytes=codes)
    _same(got, full[full["analyte_code"].isin(codes)].reset_index(drop=True))
    assert queries.timeline(mimic_store, pid, analytes=[]).empty
    t0, t1 = full["collected_at"].quantile(0.25), full["collected_at"].quantile(0.75)
    got = queries.timeline(mimic_store, pid, start=t0, end=t1)
    want = full[(full["collected_at"] >= t0) & (full["collected_at"] <= t1)].reset_index(drop=True)
    assert 0 < len(got) < len(full)
    _same(got, want)
    empty = queries.timeline(mimic_store, "no such patient")
    assert empty.empty and list(empty.columns) == queries.TIMELINE_COLUMNS


def test_timeline_sees_analytes_imported_while_the_connection_is_open(store, tmp_path):
    """The analyte keys read once per connection are read again when a later import (same
    process, same open connection) adds keys: no row is shown without its analyte or unit."""
    a = tmp_path / "a.csv"
    a.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "P1,2024-01-01 08:00,2823-3,Potassium,4.1,mmol/L\n", encoding="utf-8")
    b = tmp_path / "b.csv"
    b.write_text("patient_id,collected_at,loinc,test_name,value,unit\n"
                 "P1,2024-01-02 08:00,2160-0,Creatinine,106,umol/L\n"
                 "P1,2024-01-03 08:00,2823-3,Potassium,4.4,mmol/L\n", encoding="utf-8")
    run_import(store, a)
    with store.read():  # keeps the connection (and what it cached) open across the import
        first = queries.timeline(store, "P1")
        assert list(first["analyte_code"]) == ["2823-3"]
        run_import(store, b)
        got = queries.timeline(store, "P1")
        _same(got, _view(store, "P1"))
    assert list(got["analyte_code"]) == ["2823-3", "2160-0", "2823-3"]
    creat = got.iloc[1]
    # 106 umol/L x 113.12 g/mol (catalogue molar mass) = 1.199 mg/dL
    assert creat["unit"] == "umol/L" and creat["unit_canonical"] == "mg/dL"
    assert creat["value_canonical"] == pytest.approx(106 * 113.12 / 10_000, rel=1e-6)
