"""Validate data/reference/*.csv (LabTrend reference data 2026.11-1)."""
import sys
from pathlib import Path
import pandas as pd
from ucumvert import PintUcumRegistry

D = Path(__file__).resolve().parent
HDR = {
    "analytes.csv": "code,name,panel,canonical_unit,molar_mass_g_per_mol,valence,plausible_low,plausible_high,skewed,source",
    "reference_intervals.csv": "code,sex,age_low_years,age_high_years,low,high,unit,source",
    "critical_values.csv": "code,low,high,unit,source",
    "biological_variation.csv": "code,cvi_pct,cva_pct,source",
    "mimic_loinc.csv": "itemid,label,fluid,loinc,source",
    "unit_aliases.csv": "spelling,ucum,note",
}
PANELS = set("cbc electrolytes renal liver lipids glycaemia blood_gas coagulation cardiac thyroid iron inflammation urine other".split())
err = []
for f, h in HDR.items():
    first = (D / f).read_text(encoding="utf-8").splitlines()[0]
    if first != h:
        err.append(f"{f}: header {first!r}")
an = pd.read_csv(D / "analytes.csv", dtype={"code": str})
if an.code.duplicated().any():
    err.append(f"duplicated codes {list(an.code[an.code.duplicated()])}")
if not set(an.panel) <= PANELS:
    err.append(f"bad panels {set(an.panel) - PANELS}")
if an.source.isna().any():
    err.append("analyte without source")
codes = set(an.code)
for f, col in [("reference_intervals.csv", "code"), ("critical_values.csv", "code"), ("biological_variation.csv", "code"), ("mimic_loinc.csv", "loinc")]:
    t = pd.read_csv(D / f, dtype={col: str})
    miss = set(t[col]) - codes
    if miss:
        err.append(f"{f}: codes not in analytes {miss}")
    if t.source.isna().any():
        err.append(f"{f}: row without source")
reg = PintUcumRegistry()
units = set(an.canonical_unit) | set(pd.read_csv(D / "unit_aliases.csv", keep_default_na=False).ucum)
for u in units:
    if u == "1":
        continue
    try:
        reg.from_ucum(u)
    except Exception as e:  # noqa: BLE001
        err.append(f"unit {u!r} does not parse: {type(e).__name__}")
al = pd.read_csv(D / "unit_aliases.csv", keep_default_na=False)
if (al.spelling != al.spelling.str.lower()).any() or al.spelling.duplicated().any():
    err.append("unit_aliases spelling not lower-case/unique")
a = an.set_index("code")
cv = pd.read_csv(D / "critical_values.csv", dtype={"code": str})
for r in cv.itertuples():
    lo, hi = a.loc[r.code, "plausible_low"], a.loc[r.code, "plausible_high"]
    if r.unit != a.loc[r.code, "canonical_unit"]:
        err.append(f"critical {r.code} unit {r.unit} != canonical")
    for v in (r.low, r.high):
        if pd.notna(v) and ((pd.notna(lo) and v < lo) or (pd.notna(hi) and v > hi)):
            err.append(f"critical limit {v} of {r.code} outside plausible [{lo},{hi}]")
def implausible(code, v):
    lo, hi = a.loc[code, "plausible_low"], a.loc[code, "plausible_high"]
    return (pd.notna(lo) and v < lo) or (pd.notna(hi) and v > hi)
for code, v, exp in [("2951-2", 1390, True), ("2951-2", 139, False), ("2951-2", 141, False), ("2823-3", 45, True),
                     ("2345-7", 1276103, True), ("2345-7", 104, False)]:
    if implausible(code, v) != exp:
        err.append(f"LAB-10 check failed for {code}={v}")
if round(5.6 * a.loc["2345-7", "molar_mass_g_per_mol"] / 10, 1) != 100.9:
    err.append("glucose conversion")
print("\n".join(err) if err else "OK: all reference files valid")
sys.exit(1 if err else 0)
