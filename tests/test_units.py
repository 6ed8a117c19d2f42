"""Unit conversion with pint/UCUM and the catalogue's cited molar masses and valences."""

from __future__ import annotations

import pandas as pd
import pytest

from data.catalogue import load_catalogue, reference_file
from data.importers.pipeline import loinc_check_digit_ok
from data.units import UnitError, conversion_factor, normalise_unit, parse_ucum

cat = load_catalogue()


@pytest.mark.parametrize("code,unit,factor", [
    ("2345-7", "mmol/L", 18.016),   # glucose, molar mass 180.16 g/mol
    ("2345-7", "MG/DL", 1.0),       # case ignored through the alias table
    ("718-7", "g/L", 0.1),
    ("2823-3", "mEq/L", 1.0),       # monovalent: 1 mEq = 1 mmol
    ("777-3", "K/uL", 1.0),
    ("777-3", "10*9/L", 1.0),       # 10^9/L == 10^3/uL
])
def test_factors(code, unit, factor):
    assert conversion_factor(unit, cat.get(code)) == pytest.approx(factor, rel=2e-3)


def test_divalent_calcium_meq():
    ca = cat.get("17861-6")
    assert ca.valence == 2
    # 1 mEq/L of Ca2+ = 0.5 mmol/L = 0.5 * 40.078 / 10 mg/dL
    assert conversion_factor("mEq/L", ca) == pytest.approx(0.5 * ca.molar_mass_g_per_mol / 10, rel=1e-6)


def test_errors_name_analyte_and_units():
    with pytest.raises(UnitError, match="Glucose.*|g/s"):
        conversion_factor("g/s", cat.get("2345-7"))
    with pytest.raises(UnitError, match="unit missing"):
        conversion_factor(None, cat.get("718-7"))
    with pytest.raises(UnitError, match="not a known UCUM unit"):
        parse_ucum("furlongs per fortnight")


def test_normalise():
    assert normalise_unit(" µmol/L ") == "umol/L"
    assert normalise_unit("") is None and normalise_unit(None) is None and normalise_unit(float("nan")) is None


def test_reference_files_are_consistent():
    """Every catalogued unit parses, every LOINC passes its check digit, every row is cited."""
    a = pd.read_csv(reference_file("analytes.csv"), dtype={"code": str})
    for u in a["canonical_unit"]:
        parse_ucum(u)
    assert a["source"].str.len().min() > 10
    for name in ("analytes.csv", "critical_values.csv", "biological_variation.csv", "reference_intervals.csv",
                 "reporting_precision.csv", "delta_check_limits.csv"):
        df = pd.read_csv(reference_file(name), dtype=str)
        assert all(loinc_check_digit_ok(c) for c in df["code"]), name
        assert set(df["code"]) <= set(a["code"]), name
        assert df["source"].notna().all(), name
    m = pd.read_csv(reference_file("mimic_loinc.csv"), dtype=str)
    assert all(loinc_check_digit_ok(c) for c in m["loinc"])


@pytest.mark.parametrize("code,ok", [("2823-3", True), ("718-7", True), ("6301-6", True), ("5895-7", False), ("2823-4", False), ("abc", False)])
def test_loinc_check_digit(code, ok):
    assert loinc_check_digit_ok(code) is ok
