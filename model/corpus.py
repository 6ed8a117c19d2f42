"""Pretraining corpus: the open lab datasets, mapped to the history contract, plus synthetic patients.

Every loader returns a **history frame** as defined in :mod:`model` (``patient_id, collected_at,
analyte_code, value, censor, unit_canonical, sex, age_years``):

* ``analyte_code`` is the LOINC code from ``data/reference/source_codes.csv`` (one versioned
  mapping table: ``source, source_name, source_unit, loinc, note``; each row cites the dataset's
  documentation). A source variable with an empty ``loinc`` (vital signs, descriptors, analytes
  that are not in the catalogue, duplicate measurements) is dropped and counted.
* ``value`` is converted from ``source_unit`` to the catalogue's canonical unit with
  :func:`data.units.conversion_factor` (pint/UCUM plus the catalogue's molar masses/valences).
* values outside the catalogue's cited plausible limits (``analytes.csv``; inclusive bounds) are
  dropped and counted per analyte: they are entry or specimen errors (PhysioNet has pH 735, PaO2 0).
* ``patient_id`` is prefixed by the source (``physionet2012:``, ``eicu:``, ``nhanes:``,
  ``synthetic:``) so corpus patients never collide with site patients.
* repeated (patient, analyte, time) rows keep the last one, as ``data.queries.cohort`` does.

What was dropped is returned in ``frame.attrs["report"]`` (a plain dict) and logged at INFO.

Time anchors (the datasets carry no calendar dates; the anchors are synthetic and have no
clinical meaning, only the relative times do):

* PhysioNet 2012: each ICU stay starts at :data:`PHYSIONET_ANCHOR`; ``collected_at`` = anchor +
  minutes since ICU admission (0-2880).
* eICU (YAIB/ricu hourly): each ICU stay starts at :data:`EICU_ANCHOR`; ``collected_at`` = anchor +
  hour since unit admission (the start of the hourly bin whose median ricu reports). Stays are
  **not** linked into patients: the gap between two stays of one patient is unknown, so each stay is
  its own series (``eicu:<stay_id>``).
* NHANES 2017-Mar 2020: cross-sectional, one visit per person; every person is dated
  :data:`NHANES_DATE` (mid-point of the Jan 2017 - Mar 2020 fieldwork; the files hold only a
  six-month exam period). Results below the detection limit (``comment_code`` 1) were imputed by
  NCHS as LOD/sqrt(2) (dataset PROVENANCE.md); they are returned as ``censor = -1`` with
  ``value`` = the LOD (imputed value x sqrt(2)).

Unit caveat: PhysioNet 2012 documents Mg in mmol/L but the values are mg/dL (median 2.0, like
eICU's mg/dL column); ``source_codes.csv`` therefore maps it as mg/dL and says why.

Paths are never hard-coded: the folders come from :func:`data.settings.dataset_dir`.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from data.catalogue import load_catalogue, reference_file
from data.units import conversion_factor
from data import settings
from model import HISTORY_COLUMNS

__all__ = [
    "load_physionet2012",
    "load_eicu_hourly",
    "load_nhanes",
    "load_pretraining_corpus",
    "source_codes",
    "DATASETS",
    "PHYSIONET_ANCHOR",
    "EICU_ANCHOR",
    "NHANES_DATE",
]

log = logging.getLogger(__name__)

PHYSIONET_ANCHOR = pd.Timestamp("2000-01-01 00:00:00")
EICU_ANCHOR = pd.Timestamp("2000-01-01 00:00:00")
NHANES_DATE = pd.Timestamp("2018-07-01 09:00:00")

# source key in source_codes.csv -> (dataset folder under the shared data dir, patient-id prefix)
DATASETS = {
    "physionet2012": ("physionet-challenge-2012", "physionet2012:"),
    "eicu": ("eicu-demo-yaib-hourly", "eicu:"),
    "nhanes": ("nhanes-2017-2020-prepandemic", "nhanes:"),
}


@functools.lru_cache(maxsize=1)
def source_codes() -> pd.DataFrame:
    """The versioned source-name -> LOINC table (``data/reference/source_codes.csv``)."""
    frame = pd.read_csv(reference_file("source_codes.csv"), dtype=str, keep_default_na=False)
    expected = ["source", "source_name", "source_unit", "loinc", "note"]
    if list(frame.columns) != expected:
        raise ValueError(f"source_codes.csv: columns {list(frame.columns)} != {expected}")
    if frame.duplicated(["source", "source_name"]).any():
        raise ValueError("source_codes.csv: duplicated (source, source_name)")
    return frame


def _mapping(source: str) -> pd.DataFrame:
    """Mapped rows of one source: source_name, loinc, factor, unit_canonical, plausible limits."""
    cat = load_catalogue()
    codes = source_codes()
    codes = codes[(codes["source"] == source) & (codes["loinc"] != "")]
    rows = []
    for r in codes.itertuples(index=False):
        a = cat.get(r.loinc)
        if a is None:
            raise ValueError(f"source_codes.csv: {source}/{r.source_name} maps to {r.loinc}, not in the catalogue")
        rows.append({
            "source_name": r.source_name,
            "analyte_code": a.code,
            "factor": conversion_factor(r.source_unit or None, a),
            "unit_canonical": a.canonical_unit,
            "lo": a.plausible_low if a.plausible_low is not None else -np.inf,
            "hi": a.plausible_high if a.plausible_high is not None else np.inf,
        })
    return pd.DataFrame(rows)


def _resolve_dir(dir, key: str) -> Path:
    folder = DATASETS[key][0]
    path = Path(dir) if dir is not None else settings.dataset_dir(folder)
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"dataset folder '{folder}' not found (set LABTREND_DATA_DIR or pass dir=)")
    return Path(path)


def _empty_history() -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": pd.Series([], dtype=object),
        "collected_at": pd.Series([], dtype="datetime64[ns]"),
        "analyte_code": pd.Series([], dtype=object),
        "value": pd.Series([], dtype="float64"),
        "censor": pd.Series([], dtype="int8"),
        "unit_canonical": pd.Series([], dtype=object),
        "sex": pd.Series([], dtype=object),
        "age_years": pd.Series([], dtype="float64"),
    })


def _finish(long: pd.DataFrame, source: str, report: dict) -> pd.DataFrame:
    """Map, convert, filter and shape a long frame (patient_id, collected_at, source_name, value,
    censor, sex, age_years) into the history contract; fill ``report``."""
    report["rows_read"] = int(len(long))
    mapping = _mapping(source)
    mapped = long["source_name"].isin(mapping["source_name"])
    report["dropped_not_mapped"] = {str(k): int(v) for k, v in long.loc[~mapped, "source_name"].value_counts().items()}
    frame = long.loc[mapped].merge(mapping, on="source_name", how="left")
    frame["value"] = frame["value"].astype("float64") * frame["factor"]
    finite = np.isfinite(frame["value"].to_numpy())
    report["dropped_non_numeric"] = int((~finite).sum())
    frame = frame.loc[finite]
    ok = (frame["value"] >= frame["lo"]) & (frame["value"] <= frame["hi"])
    report["dropped_implausible"] = {str(k): int(v) for k, v in frame.loc[~ok, "analyte_code"].value_counts().items()}
    frame = frame.loc[ok]
    n = len(frame)
    frame = frame.drop_duplicates(["patient_id", "analyte_code", "collected_at"], keep="last")
    report["dropped_duplicate"] = int(n - len(frame))
    frame = frame.sort_values(["patient_id", "collected_at", "analyte_code"], kind="stable")
    out = pd.DataFrame({
        "patient_id": frame["patient_id"].astype(str).to_numpy(dtype=object),
        "collected_at": frame["collected_at"].to_numpy(dtype="datetime64[ns]"),
        "analyte_code": frame["analyte_code"].to_numpy(dtype=object),
        "value": frame["value"].to_numpy(dtype="float64"),
        "censor": frame["censor"].to_numpy(dtype="int8"),
        "unit_canonical": frame["unit_canonical"].to_numpy(dtype=object),
        "sex": frame["sex"].to_numpy(dtype=object),
        "age_years": frame["age_years"].to_numpy(dtype="float64"),
    })
    report["rows_loaded"] = int(len(out))
    report["patients"] = int(out["patient_id"].nunique())
    report["analytes"] = int(out["analyte_code"].nunique())
    report["censored"] = int((out["censor"] != 0).sum())
    out.attrs["report"] = {source: report}
    log.info("corpus %s: %s", source, report)
    return out


def _sex(values: pd.Series, female, male) -> pd.Series:
    return pd.Series(np.where(values == female, "F", np.where(values == male, "M", None)), index=values.index, dtype=object)


def load_physionet2012(dir=None) -> pd.DataFrame:
    """PhysioNet/CinC Challenge 2012 set A (4,000 ICU stays, first 48 h) as a history frame.

    Reads ``set-a_long.csv.gz`` (record_id, time, minutes, parameter, value). The lab parameters
    are mapped by ``source_codes.csv``; ``Age`` (years, capped at 90; -1 unknown) and ``Gender``
    (0 female, 1 male, -1 unknown) at 00:00 give ``age_years``/``sex``; vitals and other
    descriptors are dropped (counted as not mapped). Each stay is anchored at
    :data:`PHYSIONET_ANCHOR`.
    """
    path = _resolve_dir(dir, "physionet2012") / "set-a_long.csv.gz"
    raw = pd.read_csv(path, usecols=["record_id", "minutes", "parameter", "value"],
                      dtype={"record_id": "int64", "minutes": "int64", "parameter": str, "value": "float64"})
    prefix = DATASETS["physionet2012"][1]
    static = raw[raw["parameter"].isin(["Age", "Gender"]) & (raw["minutes"] == 0)]
    static = static.drop_duplicates(["record_id", "parameter"], keep="first").pivot(index="record_id", columns="parameter", values="value")
    age = static.get("Age", pd.Series(dtype="float64")).where(lambda s: s >= 0)
    sex = _sex(static.get("Gender", pd.Series(dtype="float64")), 0.0, 1.0)
    long = pd.DataFrame({
        "patient_id": prefix + raw["record_id"].astype(str),
        "collected_at": PHYSIONET_ANCHOR + pd.to_timedelta(raw["minutes"], unit="min"),
        "source_name": raw["parameter"],
        "value": raw["value"],
        "censor": np.zeros(len(raw), dtype="int8"),
        "sex": raw["record_id"].map(sex).to_numpy(dtype=object),
        "age_years": raw["record_id"].map(age).to_numpy(dtype="float64"),
    })
    return _finish(long, "physionet2012", {"source": "physionet2012", "file": path.name, "stays": int(raw["record_id"].nunique())})


def load_eicu_hourly(dir=None) -> pd.DataFrame:
    """eICU-CRD demo, YAIB/ricu hourly cohort (``dyn.parquet`` + ``sta.parquet``) as a history frame.

    ``dyn`` is wide (stay_id, time, one column per ricu concept); values are hourly medians already
    converted by ricu to the units listed in the dataset's PROVENANCE.md and filtered by ricu's
    plausibility bounds. Lab columns are mapped by ``source_codes.csv``; vitals are dropped
    (counted). ``sta`` gives ``age`` (years) and ``sex`` ('Female'/'Male'). One series per stay.
    """
    folder = _resolve_dir(dir, "eicu")
    dyn = pd.read_parquet(folder / "dyn.parquet")
    sta = pd.read_parquet(folder / "sta.parquet").set_index("stay_id")
    prefix = DATASETS["eicu"][1]
    value_cols = [c for c in dyn.columns if c not in ("stay_id", "time")]
    long = dyn.melt(id_vars=["stay_id", "time"], value_vars=value_cols, var_name="source_name", value_name="value")
    long = long[long["value"].notna()]
    stay = long["stay_id"]
    frame = pd.DataFrame({
        "patient_id": prefix + stay.astype(str),
        "collected_at": EICU_ANCHOR + pd.to_timedelta(long["time"]),
        "source_name": long["source_name"].astype(str),
        "value": long["value"].astype("float64"),
        "censor": np.zeros(len(long), dtype="int8"),
        "sex": stay.map(_sex(sta["sex"], "Female", "Male")).to_numpy(dtype=object),
        "age_years": stay.map(sta["age"]).to_numpy(dtype="float64"),
    })
    return _finish(frame, "eicu", {"source": "eicu", "file": "dyn.parquet", "stays": int(dyn["stay_id"].nunique())})


def load_nhanes(dir=None) -> pd.DataFrame:
    """NHANES 2017-Mar 2020 ("P_" files) laboratory results as a history frame.

    Reads ``nhanes_p_labs_long.csv.gz`` and ``p_demo.csv.gz``. SI-unit duplicates
    (``is_si_duplicate``) are dropped first (counted), so each person has one value per analyte;
    variables are mapped by ``source_codes.csv``. ``RIAGENDR`` (1 male, 2 female) and ``RIDAGEYR``
    (years, top-coded at 80) give ``sex``/``age_years``. Cross-sectional: every person is dated
    :data:`NHANES_DATE`. Below-detection-limit results become ``censor = -1`` at the LOD.
    """
    folder = _resolve_dir(dir, "nhanes")
    raw = pd.read_csv(folder / "nhanes_p_labs_long.csv.gz",
                      usecols=["SEQN", "variable", "unit", "value", "comment_code", "is_si_duplicate"])
    demo = pd.read_csv(folder / "p_demo.csv.gz", usecols=["SEQN", "RIAGENDR", "RIDAGEYR"]).set_index("SEQN")
    prefix = DATASETS["nhanes"][1]
    si = raw["is_si_duplicate"].astype(bool)
    n_si = int(si.sum())
    raw = raw.loc[~si]
    # guard: the unit in the file must be the one the mapping table converts from
    codes = source_codes()
    codes = codes[(codes["source"] == "nhanes") & (codes["loinc"] != "")].set_index("source_name")["source_unit"]
    file_units = raw.drop_duplicates("variable").set_index("variable")["unit"].fillna("")
    for var, unit in file_units.items():
        if var in codes.index and codes[var] != unit:
            raise ValueError(f"NHANES {var}: file unit '{unit}' != source_codes.csv unit '{codes[var]}'")
    below = raw["comment_code"].to_numpy() == 1
    value = raw["value"].to_numpy(dtype="float64").copy()
    value[below] = value[below] * math.sqrt(2.0)  # NCHS imputes LOD/sqrt(2): back to the LOD
    seqn = raw["SEQN"]
    long = pd.DataFrame({
        "patient_id": prefix + seqn.astype(str),
        "collected_at": pd.Series(NHANES_DATE, index=raw.index),
        "source_name": raw["variable"].astype(str),
        "value": value,
        "censor": np.where(below, -1, 0).astype("int8"),
        "sex": seqn.map(_sex(demo["RIAGENDR"], 2.0, 1.0)).to_numpy(dtype=object),
        "age_years": seqn.map(demo["RIDAGEYR"]).to_numpy(dtype="float64"),
    })
    return _finish(long, "nhanes", {"source": "nhanes", "file": "nhanes_p_labs_long.csv.gz", "dropped_si_duplicate": n_si})


_LOADERS = {"physionet2012": load_physionet2012, "eicu": load_eicu_hourly, "nhanes": load_nhanes}


def load_pretraining_corpus(max_rows: int | None = None, include_synthetic_patients: int = 1000, seed: int = 0,
                            sources=("physionet2012", "eicu", "nhanes")) -> pd.DataFrame:
    """All available open datasets plus ``include_synthetic_patients`` synthetic patients.

    A dataset whose folder is missing is skipped with a warning. ``max_rows`` keeps whole
    patients, chosen in a ``seed``-ed random order, until the row budget is used (series are never
    cut). The per-source reports are in ``frame.attrs["report"]``.
    """
    parts, report = [], {}
    for key in sources:
        try:
            part = _LOADERS[key]()
        except FileNotFoundError as exc:
            warnings.warn(f"pretraining corpus: skipping {key}: {exc}", stacklevel=2)
            report[key] = {"skipped": str(exc)}
            continue
        report.update(part.attrs.get("report", {}))
        parts.append(part)
    if include_synthetic_patients:
        from model.synthetic import generate_cohort

        syn, labels = generate_cohort(int(include_synthetic_patients), seed=seed)
        report["synthetic"] = dict(syn.attrs.get("report", {}), labels=int(len(labels)))
        parts.append(syn)
    if not parts:
        out = _empty_history()
    else:
        for p in parts:
            p.attrs = {}
        out = pd.concat(parts, ignore_index=True)
    if max_rows is not None and len(out) > max_rows:
        counts = out.groupby("patient_id", sort=True).size()
        order = np.random.default_rng(seed).permutation(len(counts))
        sizes = counts.to_numpy()[order]
        keep_n = int(np.searchsorted(np.cumsum(sizes), max_rows, side="right"))
        keep = set(counts.index.to_numpy()[order[: max(keep_n, 0)]])
        out = out[out["patient_id"].isin(keep)].reset_index(drop=True)
        report["max_rows"] = {"max_rows": int(max_rows), "patients_kept": len(keep), "rows_kept": int(len(out))}
    out = out[list(HISTORY_COLUMNS)]
    out.attrs["report"] = report
    log.info("pretraining corpus: %d rows, %d patients", len(out), out["patient_id"].nunique())
    return out
