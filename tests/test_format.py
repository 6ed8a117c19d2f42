"""One rounding rule: the analyte's reporting precision (clinical.format)."""

import pandas as pd
import pytest

from clinical.format import decimals_from_reported, format_change, format_quantity, format_value, reporting_decimals
from data.catalogue import load_catalogue, reference_file


@pytest.mark.parametrize("code,value,text", [
    ("2823-3", 7.912, "7.9"),     # potassium: 1 decimal
    ("2951-2", 128.9, "129"),     # sodium: whole numbers
    ("3094-0", 21.94, "22"),      # urea nitrogen: whole numbers
    ("2160-0", 2.05, "2.1"),      # half away from zero, not binary half-to-even (round(2.05, 1) == 2.0)
    ("2160-0", -0.04, "0.0"),     # never '-0.0'
    ("11558-4", 7.4, "7.40"),     # pH: 2 decimals, trailing zero kept
    ("6690-2", 12, "12.0"),
])
def test_values_use_the_reporting_precision(code, value, text):
    assert format_value(code, value) == text


def test_unknown_precision_falls_back_to_significant_digits_and_missing_values_are_empty():
    assert reporting_decimals("LOCAL:XYZ") is None
    assert format_value("LOCAL:XYZ", 0.0683) == "0.0683"
    assert format_value("LOCAL:XYZ", 1234.56) == "1235"
    assert format_value("LOCAL:XYZ", 12.345, decimals=1) == "12.3"
    assert format_value("2823-3", None) == "" and format_value("2823-3", float("nan")) == ""
    assert format_value("2823-3", "abc") == ""


def test_quantity_and_change():
    assert format_quantity("2823-3", 6.8, "mmol/L") == "6.8 mmol/L"
    assert format_quantity("11558-4", 7.401, "1") == "7.40"
    assert format_change("2160-0", 0.3) == "+0.3" and format_change("2951-2", -12.2) == "-12"
    assert format_change("2160-0", -0.04) == "0.0"


def test_decimals_from_reported_values():
    assert decimals_from_reported(["4.1", "3.95", "4", "HEMOLYZED", "<0.05"]) == 2
    assert decimals_from_reported(["2", "2.1", "1.9", "3"]) == 1  # trailing zeros dropped by the export
    assert decimals_from_reported(["136"] * 95 + ["136.5"] * 5) == 0  # a rare extra decimal is not the rule
    assert decimals_from_reported(["HEMOLYZED", None]) is None


def test_precision_file_is_cited_and_in_canonical_units():
    df = pd.read_csv(reference_file("reporting_precision.csv"), dtype=str, keep_default_na=False)
    cat = load_catalogue()
    assert set(df["code"]) == {a.code for a in cat}
    for r in df.itertuples(index=False):
        assert r.unit == cat.get(r.code).canonical_unit, r.code
        assert len(r.source) > 30, r.code
