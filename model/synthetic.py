"""LabTrend's own seeded synthetic lab cohort: stable patients, chronic drifts, acute episodes and
labelled pre-analytical errors, vectorised with numpy so millions of results take seconds.

Design (every clinical number is read from a cited, versioned file; the code holds none):

* **Population set points** - ``data/reference/reference_intervals.csv`` (adult, sex-specific where
  given). A reference interval is the central 95 % of the reference population (CLSI EP28); each
  patient's set point is drawn so that set point + within-subject variation fill it: between-subject
  SD = sqrt(SD_RI^2 - SD_I^2 - SD_A^2) (floored). Analytes flagged ``skewed`` in the catalogue, and
  intervals with lower limit 0 (AST, ALT, CRP), are handled on the log scale.
* **Within-subject and analytical variation** - ``CVI`` and ``CVA`` from
  ``data/reference/biological_variation.csv`` (cited studies); where that file has no point value
  (K, Cl, HCO3, urea, albumin, Mg) the ``stable``/``cvi`` rows of ``preanalytical_patterns.csv`` give
  a labelled assumption. Each result = set point x trajectory x (1 + CVI z1) x (1 + CVA z2)
  (log-normal equivalents for skewed analytes, with the same CVs), i.e. Gaussian scatter around a
  homeostatic set point (reference notes section 3.5).
* **Sampling** - outpatients about monthly (gamma intervals, per-patient mean around 30 days);
  inpatient stays with daily morning draws, plus 6-hourly bursts for two days after an acute
  episode starts. Panels (BMP, CBC, LFT, ...) are ordered with fixed probabilities
  (:data:`PANELS`). Sampling frequencies and panel probabilities are design choices of the generator,
  not clinical facts.
* **Chronic drifts** - CKD (eGFR falls from KDIGO G3 at 1-5 mL/min/1.73 m2/year; creatinine and urea
  rise as 1/eGFR), diabetes (HbA1c from >= 6.5 % drifting; glucose follows via the ADAG equation),
  anaemia (haemoglobin falling). eGFR itself is not emitted: the catalogue has no eGFR code.
* **Acute episodes** (during inpatient stays) - AKI (creatinine up to 1.5-3.0x baseline, KDIGO
  stages, over days, then recovery; urea follows) and infection (WBC pulse; CRP rising to a peak at
  ~48 h then falling with a ~19 h half-life, Pepys & Hirschfield 2003).
* **Pre-analytical errors**, each on single specimens and labelled:
  - haemolysis: potassium up by 0.33 mmol/L per g/L free haemoglobin (Hemokalc, CCLM 2025); LDH and
    AST up by release of red-cell content (erythrocyte:plasma ratios ~160 and ~20, Caraway via Frank
    et al., Clin Chem 1978). Direction: Lippi et al., CCLM 2006;44:311 and Sonntag 1986. Every
    chemistry specimen also carries the analyser's **haemolysis index** (free haemoglobin, LOINC
    4635-9, mg/dL): the specimen's own free haemoglobin (within ARUP's 0-11.3 mg/dL interval,
    ``serum_indices.csv``) plus the injected free haemoglobin that drives the increments above, so
    the index rises with the degree of haemolysis (:func:`_haemolysis_index`).
  - K-EDTA contamination: potassium very high, calcium very low, magnesium and ALP low (Cornes et
    al., Ann Clin Biochem 2008; Lima-Oliveira et al., Biochem Med 2014; kEDTA reappraisal, JALM
    2019). The calcium magnitude is a labelled assumption.
  - drip-arm contamination with 5 % dextrose in 0.9 % NaCl: specimen = (1 - f) blood + f infusate,
    so glucose rises steeply, sodium/chloride move toward 154 mmol/L, and everything else (proteins,
    calcium, potassium, creatinine, cell counts) is diluted (Watson 1983; Read 1988; Spies &
    Farnsworth 2024; ClinLabNavigator).
  Magnitudes, rates and ranges are in ``data/reference/preanalytical_patterns.csv`` with their source;
  a number without a source says there that it is an assumption of the synthetic generator.

Results outside the catalogue's plausible limits are dropped (as the lab store does), and counted.

API: :func:`generate_cohort` -> ``(history, labels)``; :func:`to_canonical_csv` writes the project's
canonical long CSV so a synthetic cohort can go through the normal importer (the demo fallback).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

from data.catalogue import load_catalogue, load_serum_indices, reference_file
from data.units import conversion_factor, parse_ucum
from model import HISTORY_COLUMNS

__all__ = [
    "generate_cohort",
    "to_canonical_csv",
    "patterns",
    "analyte_parameters",
    "DEFAULT_ANALYTES",
    "HAEMOLYSIS_INDEX",
    "CHEMISTRY_PANELS",
    "PROFILES",
    "DEFAULT_PROFILE_MIX",
    "LABEL_KINDS",
    "LABEL_COLUMNS",
    "CANONICAL_CSV_COLUMNS",
]

log = logging.getLogger(__name__)

NA, K, CL, HCO3, UREA, CREA, GLU, CA, MG = "2951-2", "2823-3", "2075-0", "1963-8", "3094-0", "2160-0", "2345-7", "17861-6", "2601-3"
ALB, ALP, ALT, AST, LDH, HB, WBC, PLT, CRP, A1C = "1751-7", "6768-6", "1742-6", "1920-8", "2532-0", "718-7", "6690-2", "777-3", "1988-5", "4548-4"
MCHC = "786-4"
HAEMOLYSIS_INDEX = "4635-9"  # free haemoglobin in serum: the analyser's haemolysis index (mg/dL), see data/reference

DEFAULT_ANALYTES = (NA, K, CL, HCO3, UREA, CREA, GLU, CA, MG, ALB, ALP, ALT, AST, LDH, HB, WBC, PLT, CRP, A1C)

# Ordering groups: codes, P(ordered at an outpatient visit), P(ordered at an inpatient draw).
# Design choices of the generator (how often panels are ordered), not clinical facts.
PANELS = {
    "bmp": ((NA, K, CL, HCO3, UREA, CREA, GLU, CA), 0.9, 1.0),
    "cbc": ((HB, WBC, PLT), 0.6, 0.9),
    "lft": ((ALB, ALP, ALT, AST), 0.35, 0.4),
    "mg": ((MG,), 0.2, 0.6),
    "ldh": ((LDH,), 0.1, 0.2),
    "crp": ((CRP,), 0.25, 0.6),
    "a1c": ((A1C,), 0.15, 0.05),
}
OTHER_PANEL_P = (0.2, 0.3)  # any other simulated analyte
# Ordering groups measured on the serum/plasma chemistry analyser, which reports a haemolysis index
# with every such specimen (CBC and HbA1c are whole-blood tests). A design choice of the generator.
CHEMISTRY_PANELS = ("bmp", "lft", "mg", "ldh", "crp")
HAEMOLYSIS_INDEX_RESOLUTION = 1.0  # mg/dL: the index is reported in whole units (generator design choice)
PROFILE_PANEL_BOOST = {"diabetes": {"a1c": 0.35}, "ckd": {"bmp": 1.0}, "anaemia": {"cbc": 0.95}}

PROFILES = ("stable", "ckd", "diabetes", "anaemia", "inpatient")
DEFAULT_PROFILE_MIX = {"stable": 0.45, "ckd": 0.15, "diabetes": 0.15, "anaemia": 0.10, "inpatient": 0.15}

# Sampling design (generator choices): mean outpatient interval in days and its per-patient spread
# (log-normal sigma); expected inpatient stays per patient over the period; stay length in days.
OUTPATIENT_MEAN_DAYS = {"stable": 30.0, "ckd": 30.0, "diabetes": 30.0, "anaemia": 30.0, "inpatient": 45.0}
OUTPATIENT_SPREAD = 0.35
STAYS_PER_PATIENT = {"stable": 0.05, "ckd": 0.3, "diabetes": 0.2, "anaemia": 0.2, "inpatient": 1.5}
MAX_STAYS = 3
STAY_DAYS = (3.0, 14.0)
BURST_EVERY_DAYS = 0.25  # 6-hourly draws ...
BURST_N = 8  # ... for two days after an acute episode starts
AGE_RANGE = (18.0, 90.0)

LABEL_KINDS = ("haemolysis", "edta_contamination", "drip_arm", "aki", "infection", "ckd", "diabetes", "anaemia")
LABEL_COLUMNS = ("patient_id", "collected_at", "analyte_code", "kind", "end_at", "severity", "severity_unit")
CANONICAL_CSV_COLUMNS = ("patient_id", "collected_at", "loinc", "test_name", "value", "unit", "specimen_id", "sex", "birth_date")

_Z = NormalDist()


@functools.lru_cache(maxsize=1)
def patterns() -> pd.DataFrame:
    """``data/reference/preanalytical_patterns.csv``: (pattern, parameter, loinc, effect, effect_unit, source)."""
    frame = pd.read_csv(reference_file("preanalytical_patterns.csv"), dtype={"loinc": str, "effect": float}, keep_default_na=False)
    expected = ["pattern", "parameter", "loinc", "effect", "effect_unit", "source"]
    if list(frame.columns) != expected:
        raise ValueError(f"preanalytical_patterns.csv: columns {list(frame.columns)} != {expected}")
    if (frame["source"].str.strip() == "").any():
        raise ValueError("preanalytical_patterns.csv: a row has no source")
    if frame.duplicated(["pattern", "parameter", "loinc"]).any():
        raise ValueError("preanalytical_patterns.csv: duplicated (pattern, parameter, loinc)")
    return frame


@functools.lru_cache(maxsize=1)
def _pattern_index() -> dict[tuple[str, str, str], float]:
    f = patterns()
    return {(a, b, c): float(e) for a, b, c, e in zip(f["pattern"], f["parameter"], f["loinc"], f["effect"])}


def _p(pattern: str, parameter: str, loinc: str = "*") -> float:
    try:
        return _pattern_index()[(pattern, parameter, loinc)]
    except KeyError:
        raise KeyError(f"preanalytical_patterns.csv has no ({pattern}, {parameter}, {loinc})") from None


def _p_by_loinc(pattern: str, parameter: str) -> dict[str, float]:
    f = patterns()
    hit = f[(f["pattern"] == pattern) & (f["parameter"] == parameter)]
    return dict(zip(hit["loinc"], hit["effect"].astype(float)))


@dataclass(frozen=True)
class AnalyteParams:
    code: str
    unit: str
    log_scale: bool  # set point and variation on the log scale
    cvi: float  # fraction
    cva: float  # fraction
    centre: tuple[float, float]  # (F, M): mean, or mean of log
    between_sd: tuple[float, float]  # (F, M): SD, or SD of log
    decimals: int
    is_concentration: bool  # diluted by drip-arm contamination


def _is_concentration(unit: str) -> bool:
    try:
        return parse_ucum(unit).dimensionality.get("[length]", 0) < 0
    except Exception:  # noqa: BLE001 - a unit that does not parse is not treated as a concentration
        return False


@functools.lru_cache(maxsize=1)
def analyte_parameters() -> dict[str, AnalyteParams]:
    """Generator parameters of every analyte that has a reference interval and a CVI."""
    cat = load_catalogue()
    ri = pd.read_csv(reference_file("reference_intervals.csv"), dtype={"code": str})
    bv = pd.read_csv(reference_file("biological_variation.csv"), dtype={"code": str}).set_index("code")
    cvi_fallback = _p_by_loinc("stable", "cvi")
    cva_frac = _p("stable", "cva_fraction_of_cvi")
    z = _Z.inv_cdf(0.5 + _p("stable", "reference_interval_coverage") / 2.0)
    median_frac = _p("stable", "median_fraction_of_upper_limit")
    floor_frac = _p("stable", "between_sd_floor_fraction")
    out = {}
    for code in sorted(set(ri["code"])):
        a = cat.get(code)
        if a is None:
            continue
        cvi = bv["cvi_pct"].get(code) if code in bv.index else None
        cva = bv["cva_pct"].get(code) if code in bv.index else None
        if cvi is None or pd.isna(cvi):
            cvi = cvi_fallback.get(code)
            cva = None
        if cvi is None or pd.isna(cvi):
            continue
        cvi = float(cvi) / 100.0
        cva = float(cva) / 100.0 if cva is not None and not pd.isna(cva) else cva_frac * cvi
        rows = ri[ri["code"] == code]
        centre, between = [], []
        zero_low = False
        for sex in ("F", "M"):
            r = rows[rows["sex"] == sex]
            r = r if not r.empty else rows[rows["sex"] == "any"]
            if r.empty:
                break
            lo, hi = float(r["low"].iloc[0]), float(r["high"].iloc[0])
            zero_low = zero_low or lo <= 0
            log_scale = a.skewed or lo <= 0
            if log_scale:
                s_i, s_a = math.sqrt(math.log1p(cvi**2)), math.sqrt(math.log1p(cva**2))
                if lo <= 0:
                    m = math.log(median_frac * hi)
                    s_tot = (math.log(hi) - m) / z
                else:
                    m = (math.log(lo) + math.log(hi)) / 2.0
                    s_tot = (math.log(hi) - math.log(lo)) / (2.0 * z)
                within2 = s_i**2 + s_a**2
            else:
                m = (lo + hi) / 2.0
                s_tot = (hi - lo) / (2.0 * z)
                within2 = (m * cvi) ** 2 + (m * cva) ** 2
            centre.append(m)
            between.append(math.sqrt(max(s_tot**2 - within2, (floor_frac * s_tot) ** 2)))
        if len(centre) != 2:
            continue
        typical = math.exp(centre[0]) if (a.skewed or zero_low) else centre[0]
        decimals = int(min(3, max(0, 2 - math.floor(math.log10(abs(typical)))))) if typical > 0 else 2
        out[code] = AnalyteParams(code, a.canonical_unit, bool(a.skewed or zero_low), cvi, cva,
                                  (centre[0], centre[1]), (between[0], between[1]), decimals,
                                  _is_concentration(a.canonical_unit))
    return out


def _group_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each index in ``starts`` (sorted, first is 0)."""
    c = np.cumsum(values)
    offsets = np.zeros_like(c)
    offsets[starts[1:]] = c[starts[1:] - 1]
    offsets = np.maximum.accumulate(offsets)
    return c - offsets


def generate_cohort(
    n_patients: int,
    seed: int = 0,
    profile_mix: dict[str, float] | None = None,
    start: str | pd.Timestamp = "2021-01-01",
    analytes: list[str] | tuple[str, ...] | None = None,
    years: float = 3.0,
    event_rates: dict[str, float] | None = None,
    haemolysis_index: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded synthetic cohort.

    Parameters
    ----------
    n_patients : number of patients (ids ``synthetic:s<seed>-<n>``).
    seed : everything is drawn from ``numpy.random.default_rng(seed)``: same seed, same cohort.
    profile_mix : fractions of :data:`PROFILES` (normalised); default :data:`DEFAULT_PROFILE_MIX`.
    start, years : follow-up window.
    analytes : LOINC codes to simulate (default :data:`DEFAULT_ANALYTES`); each needs a reference
        interval and a CVI (see :func:`analyte_parameters`).
    event_rates : overrides of the ``rate`` rows of ``preanalytical_patterns.csv`` by pattern name
        (e.g. ``{"edta_contamination": 0.02}`` to oversample an error for training/tests).
    haemolysis_index : emit the analyser's haemolysis index (:data:`HAEMOLYSIS_INDEX`, free
        haemoglobin in mg/dL) with every chemistry specimen (:data:`CHEMISTRY_PANELS`). Its values
        are drawn after all others, so with ``False`` the other results of a seed are identical,
        only the index rows are missing (a laboratory or export without serum indices).

    Returns
    -------
    history : the history contract (``model.HISTORY_COLUMNS``); ``attrs["report"]`` holds counts.
    labels : one row per injected event: ``patient_id, collected_at`` (specimen time, or onset),
        ``analyte_code`` ('*' for a whole specimen or a multi-analyte episode), ``kind`` (one of
        :data:`LABEL_KINDS`), ``end_at`` (episode end, NaT otherwise), ``severity`` and
        ``severity_unit`` (free Hb g/L, contamination fraction, peak ratio, ...).
    """
    params_all = analyte_parameters()
    codes = tuple(analytes) if analytes is not None else DEFAULT_ANALYTES
    missing = [c for c in codes if c not in params_all]
    if missing:
        raise ValueError(f"cannot simulate {missing}: no reference interval or CVI (simulatable: {sorted(params_all)})")
    if len(set(codes)) != len(codes):
        raise ValueError("analytes: duplicated codes")
    mix = dict(profile_mix or DEFAULT_PROFILE_MIX)
    bad = set(mix) - set(PROFILES)
    if bad:
        raise ValueError(f"unknown profiles {sorted(bad)} (choose from {PROFILES})")
    rates = {k: _p(k, "rate") for k in ("haemolysis", "edta_contamination", "drip_arm", "aki", "infection")}
    rates.update(event_rates or {})
    start = pd.Timestamp(start)
    T = float(years) * 365.25
    rng = np.random.default_rng(seed)
    N = int(n_patients)
    A = len(codes)
    col = {c: i for i, c in enumerate(codes)}
    P = [params_all[c] for c in codes]

    # ---- patients -------------------------------------------------------------------------
    prof_names = [p for p in PROFILES if mix.get(p, 0) > 0]
    prof_p = np.array([mix[p] for p in prof_names], dtype=float)
    prof = np.array([PROFILES.index(p) for p in prof_names])[rng.choice(len(prof_names), size=N, p=prof_p / prof_p.sum())]
    male = rng.random(N) < 0.5
    age0 = rng.uniform(*AGE_RANGE, size=N)
    zsp = rng.standard_normal((N, A))
    SP = np.empty((N, A))
    for j, p in enumerate(P):
        c = np.where(male, p.centre[1], p.centre[0])
        s = np.where(male, p.between_sd[1], p.between_sd[0])
        SP[:, j] = np.exp(c + s * zsp[:, j]) if p.log_scale else np.maximum(c + s * zsp[:, j], 0.2 * c)
    is_prof = {name: prof == PROFILES.index(name) for name in PROFILES}

    # chronic-condition parameters (drawn for everyone, used where the profile applies)
    egfr0 = rng.uniform(_p("ckd", "egfr_start_min"), _p("ckd", "egfr_start_max"), N)
    egfr_rate = rng.uniform(_p("ckd", "egfr_decline_min"), _p("ckd", "egfr_decline_max"), N)
    a1c0 = rng.uniform(_p("diabetes", "hba1c_start_min", A1C), _p("diabetes", "hba1c_start_max", A1C), N)
    a1c_rate = rng.uniform(_p("diabetes", "hba1c_drift_min", A1C), _p("diabetes", "hba1c_drift_max", A1C), N)
    hb_rate = rng.uniform(_p("anaemia", "hb_decline_min", HB), _p("anaemia", "hb_decline_max", HB), N)

    # ---- inpatient stays (N x MAX_STAYS slots, one per third of the period) -------------------
    lam = np.array([STAYS_PER_PATIENT[PROFILES[k]] for k in prof])
    n_stay = np.minimum(rng.poisson(lam), MAX_STAYS)
    n_stay = np.where(is_prof["inpatient"], np.maximum(n_stay, 1), n_stay)
    seg = T / MAX_STAYS
    stay_len = rng.uniform(*STAY_DAYS, size=(N, MAX_STAYS))
    stay_t0 = np.arange(MAX_STAYS)[None, :] * seg + rng.random((N, MAX_STAYS)) * np.maximum(seg - stay_len - 1.0, 0.0)
    stay_on = np.arange(MAX_STAYS)[None, :] < n_stay[:, None]
    aki_on = stay_on & (rng.random((N, MAX_STAYS)) < rates["aki"])
    aki_t0 = stay_t0 + rng.random((N, MAX_STAYS)) * np.minimum(2.0, stay_len / 2.0)
    aki_peak = rng.uniform(_p("aki", "peak_ratio_min", CREA), _p("aki", "peak_ratio_max", CREA), (N, MAX_STAYS))
    aki_rise = rng.uniform(_p("aki", "rise_days_min", CREA), _p("aki", "rise_days_max", CREA), (N, MAX_STAYS))
    aki_rec = rng.uniform(_p("aki", "recovery_days_min", CREA), _p("aki", "recovery_days_max", CREA), (N, MAX_STAYS))
    inf_on = stay_on & (rng.random((N, MAX_STAYS)) < rates["infection"])
    inf_t0 = stay_t0 - rng.random((N, MAX_STAYS))  # symptoms start up to a day before admission
    inf_wbc = rng.uniform(_p("infection", "peak_ratio_min", WBC), _p("infection", "peak_ratio_max", WBC), (N, MAX_STAYS))
    inf_crp = rng.uniform(_p("infection", "peak_min", CRP), _p("infection", "peak_max", CRP), (N, MAX_STAYS))

    # ---- specimens --------------------------------------------------------------------------
    mean_iv = np.array([OUTPATIENT_MEAN_DAYS[PROFILES[k]] for k in prof]) * np.exp(OUTPATIENT_SPREAD * rng.standard_normal(N))
    n_max = np.ceil(T / mean_iv * 2.0 + 5.0).astype(np.int64)
    pid_o = np.repeat(np.arange(N), n_max)
    starts = np.concatenate([[0], np.cumsum(n_max)[:-1]])
    iv = rng.gamma(2.0, mean_iv[pid_o] / 2.0)
    t_o = rng.random(N)[pid_o] * mean_iv[pid_o] + _group_cumsum(iv, starts) - iv[starts][np.repeat(np.arange(N), n_max)]
    t_o = np.floor(t_o) + rng.uniform(8 / 24, 12 / 24, t_o.size)  # morning clinic
    keep = t_o < T
    for s in range(MAX_STAYS):  # no outpatient visit during a stay
        inside = stay_on[pid_o, s] & (t_o >= stay_t0[pid_o, s] - 0.5) & (t_o <= stay_t0[pid_o, s] + stay_len[pid_o, s] + 0.5)
        keep &= ~inside
    pid_o, t_o = pid_o[keep], t_o[keep]

    sp_pid, sp_t = [pid_o], [t_o]
    for s in range(MAX_STAYS):
        on = np.nonzero(stay_on[:, s])[0]
        ndays = np.floor(stay_len[on, s]).astype(np.int64) + 1
        pid_d = np.repeat(on, ndays)
        day = np.arange(ndays.sum()) - np.repeat(np.cumsum(ndays) - ndays, ndays)
        t_d = stay_t0[pid_d, s] + day + rng.normal(0.0, 1 / 24, pid_d.size)
        sp_pid.append(pid_d)
        sp_t.append(t_d)
        for on_mask, t0 in ((aki_on, aki_t0), (inf_on, inf_t0)):
            ep = np.nonzero(on_mask[:, s])[0]
            pid_b = np.repeat(ep, BURST_N)
            t_b = np.maximum(t0[pid_b, s], stay_t0[pid_b, s]) + np.tile(np.arange(1, BURST_N + 1), ep.size) * BURST_EVERY_DAYS
            ok = t_b <= stay_t0[pid_b, s] + stay_len[pid_b, s]
            sp_pid.append(pid_b[ok])
            sp_t.append(t_b[ok])
    inpatient_flag = np.concatenate([np.zeros(pid_o.size, bool)] + [np.ones(x.size, bool) for x in sp_pid[1:]])
    s_pid = np.concatenate(sp_pid)
    s_t = np.clip(np.concatenate(sp_t), 0.0, T)
    s_t = np.round(s_t * 1440.0) / 1440.0  # whole minutes
    order = np.lexsort((s_t, s_pid))
    s_pid, s_t, inpatient_flag = s_pid[order], s_t[order], inpatient_flag[order]
    dup = np.zeros(s_pid.size, bool)
    dup[1:] = (s_pid[1:] == s_pid[:-1]) & (s_t[1:] == s_t[:-1])
    s_pid, s_t, inpatient_flag = s_pid[~dup], s_t[~dup], inpatient_flag[~dup]
    S = s_pid.size

    # ---- panels: which analytes each specimen holds -----------------------------------------
    group_of = np.full(A, -1)
    gnames = list(PANELS)
    for gi, g in enumerate(gnames):
        for c in PANELS[g][0]:
            if c in col:
                group_of[col[c]] = gi
    n_groups = len(gnames) + 1  # last = "other"
    group_of[group_of < 0] = len(gnames)
    p_out = np.array([PANELS[g][1] for g in gnames] + [OTHER_PANEL_P[0]])
    p_in = np.array([PANELS[g][2] for g in gnames] + [OTHER_PANEL_P[1]])
    pg = np.where(inpatient_flag[:, None], p_in[None, :], p_out[None, :])
    for pname, boosts in PROFILE_PANEL_BOOST.items():
        for g, pb in boosts.items():
            gi = gnames.index(g)
            sel = (prof[s_pid] == PROFILES.index(pname)) & ~inpatient_flag
            pg[sel, gi] = np.maximum(pg[sel, gi], pb)
    ordered = rng.random((S, n_groups)) < pg
    present_groups = np.unique(group_of)
    none = ~ordered[:, present_groups].any(axis=1)
    ordered[none, group_of[0]] = True
    mask = ordered[:, group_of]  # S x A
    r_spec, r_a = np.nonzero(mask)
    r_pid = s_pid[r_spec]
    r_t = s_t[r_spec]
    R = r_spec.size

    # ---- true biological level per row ------------------------------------------------------
    level = SP[r_pid, r_a].copy()
    ty = r_t / 365.25
    cvi = np.array([p.cvi for p in P])[r_a]
    cva = np.array([p.cva for p in P])[r_a]
    log_scale = np.array([p.log_scale for p in P])[r_a]

    def rows_of(code: str, who: np.ndarray | None = None) -> np.ndarray:
        if code not in col:
            return np.zeros(R, bool)
        m = r_a == col[code]
        return m if who is None else m & who[r_pid]

    # CKD: creatinine (and urea) rise as 1/eGFR
    egfr_ref = _p("ckd", "egfr_reference", CREA)
    egfr_t = np.maximum(egfr0[r_pid] - egfr_rate[r_pid] * ty, _p("ckd", "egfr_floor"))
    ckd_ratio = egfr_ref / egfr_t
    m = rows_of(CREA, is_prof["ckd"])
    level[m] *= ckd_ratio[m]
    m = rows_of(UREA, is_prof["ckd"])
    level[m] *= ckd_ratio[m] ** _p("ckd", "ratio_exponent", UREA)
    # diabetes: HbA1c drifts; glucose follows via ADAG
    a1c_t = np.maximum(a1c0[r_pid] + a1c_rate[r_pid] * ty, _p("diabetes", "hba1c_start_min", A1C) - 1.0)
    m = rows_of(A1C, is_prof["diabetes"])
    level[m] = a1c_t[m]
    m = rows_of(GLU, is_prof["diabetes"])
    level[m] = _p("diabetes", "adag_slope", GLU) * a1c_t[m] + _p("diabetes", "adag_intercept", GLU)
    cvi[m] = _p("diabetes", "cvi", GLU) / 100.0
    # anaemia: haemoglobin falls
    m = rows_of(HB, is_prof["anaemia"])
    level[m] = np.maximum(level[m] - hb_rate[r_pid[m]] * ty[m], _p("anaemia", "hb_floor", HB))
    # AKI and infection episodes (per stay slot)
    crp_tp = _p("infection", "time_to_peak_hours", CRP) / 24.0
    crp_hl = _p("infection", "half_life_hours", CRP) / 24.0
    crp_dbl = _p("infection", "doubling_hours", CRP) / 24.0
    wbc_tp = _p("infection", "time_to_peak_days", WBC)
    m_crea, m_urea, m_wbc, m_crp = rows_of(CREA), rows_of(UREA), rows_of(WBC), rows_of(CRP)
    urea_exp = _p("aki", "ratio_exponent", UREA)
    for s in range(MAX_STAYS):
        on = aki_on[r_pid, s]
        dt = r_t - aki_t0[r_pid, s]
        rise, peak, tau = aki_rise[r_pid, s], aki_peak[r_pid, s], aki_rec[r_pid, s] / 3.0
        ratio = np.where(dt < 0, 1.0, np.where(dt <= rise, 1.0 + (peak - 1.0) * dt / rise,
                                               1.0 + (peak - 1.0) * np.exp(-(dt - rise) / tau)))
        ratio = np.where(on, ratio, 1.0)
        level[m_crea] *= ratio[m_crea]
        level[m_urea] *= ratio[m_urea] ** urea_exp
        on = inf_on[r_pid, s]
        dt = r_t - inf_t0[r_pid, s]
        x = np.clip(dt / wbc_tp, 0.0, None)
        pulse = np.where(on & (dt > 0), x * np.exp(1.0 - x), 0.0)
        level[m_wbc] *= 1.0 + (inf_wbc[r_pid, s][m_wbc] - 1.0) * pulse[m_wbc]
        expo = np.where(dt < crp_tp, (dt - crp_tp) / crp_dbl, -(dt - crp_tp) / crp_hl)
        crp_add = np.exp2(np.minimum(expo, 0.0))  # <= 1 on both sides of the peak
        crp_add = np.where(on & (dt > 0), inf_crp[r_pid, s] * crp_add, 0.0)
        level[m_crp] += crp_add[m_crp]

    # within-subject variation
    z1 = rng.standard_normal(R)
    bio = np.where(log_scale, level * np.exp(np.sqrt(np.log1p(cvi**2)) * z1), level * (1.0 + cvi * z1))

    # ---- pre-analytical errors on single specimens ------------------------------------------
    spec_has = mask  # S x A
    def has(code):
        return spec_has[:, col[code]] if code in col else np.zeros(S, bool)

    err_kind = np.zeros(S, np.int8)  # 0 none, 1 haemolysis, 2 edta, 3 drip
    severity = np.zeros(S)
    u = rng.random((S, 3))
    sev = rng.random((S, 3))
    drip_ok = inpatient_flag & has(GLU)
    edta_ok = has(K)
    haem_ok = has(K) | has(LDH) | has(AST)
    pick = drip_ok & (u[:, 2] < rates["drip_arm"])
    err_kind[pick] = 3
    pick = (err_kind == 0) & edta_ok & (u[:, 1] < rates["edta_contamination"])
    err_kind[pick] = 2
    pick = (err_kind == 0) & haem_ok & (u[:, 0] < rates["haemolysis"])
    err_kind[pick] = 1
    lo, hi = _p("haemolysis", "free_hb_min"), _p("haemolysis", "free_hb_max")
    severity = np.where(err_kind == 1, lo + (hi - lo) * sev[:, 0], severity)
    lo, hi = _p("edta_contamination", "fraction_min"), _p("edta_contamination", "fraction_max")
    severity = np.where(err_kind == 2, lo + (hi - lo) * sev[:, 1], severity)
    lo, hi = _p("drip_arm", "mix_fraction_min"), _p("drip_arm", "mix_fraction_max")
    severity = np.where(err_kind == 3, lo + (hi - lo) * sev[:, 2], severity)

    rk = err_kind[r_spec]
    rsev = severity[r_spec]
    # haemolysis
    h = rk == 1
    if h.any():
        mchc_gl = _p("haemolysis", "erythrocyte_hb_concentration", MCHC) * 10.0  # g/dL -> g/L
        lysed = rsev / mchc_gl  # volume of lysed cells per volume of plasma
        m = h & rows_of(K)
        bio[m] += _p("haemolysis", "delta_per_free_hb", K) * rsev[m]
        for code, ratio in _p_by_loinc("haemolysis", "rbc_to_plasma_ratio").items():
            m = h & rows_of(code)
            bio[m] *= 1.0 + lysed[m] * ratio
    # EDTA contamination
    e = rk == 2
    if e.any():
        pct = rsev * 100.0
        m = e & rows_of(K)
        bio[m] += _p("edta_contamination", "delta_per_percent", K) * pct[m]
        for code, rel in _p_by_loinc("edta_contamination", "relative_change_per_percent").items():
            m = e & rows_of(code)
            bio[m] *= np.maximum(1.0 + rel * pct[m], 0.0)
    # drip arm: specimen = (1 - f) blood + f infusate
    d = rk == 3
    if d.any():
        infusate = _p_by_loinc("drip_arm", "infusate_concentration")
        default_c = infusate.pop("*")
        conc = np.array([p.is_concentration for p in P])[r_a]
        m = d & (conc | np.isin(r_a, [col[c] for c in infusate if c in col]))
        c_inf = np.full(R, default_c)
        for code, c in infusate.items():
            if code in col:
                c_inf[r_a == col[code]] = c
        bio[m] = (1.0 - rsev[m]) * bio[m] + rsev[m] * c_inf[m]

    # analytical variation
    z2 = rng.standard_normal(R)
    value = np.where(log_scale, bio * np.exp(np.sqrt(np.log1p(cva**2)) * z2), bio * (1.0 + cva * z2))
    decimals = np.array([p.decimals for p in P])[r_a]
    value = np.round(value * 10.0**decimals) / 10.0**decimals

    # ---- plausibility filter (as the lab store does) ----------------------------------------
    cat = load_catalogue()
    plo = np.array([cat.get(c).plausible_low if cat.get(c).plausible_low is not None else -np.inf for c in codes])[r_a]
    phi = np.array([cat.get(c).plausible_high if cat.get(c).plausible_high is not None else np.inf for c in codes])[r_a]
    ok = np.isfinite(value) & (value >= plo) & (value <= phi)
    dropped = pd.Series(np.asarray(codes, dtype=object)[r_a[~ok]]).value_counts()

    # ---- haemolysis index: one result per chemistry specimen (drawn last: see the docstring) ----
    hi_spec, hi_value = np.zeros(0, np.int64), np.zeros(0)
    if haemolysis_index:
        hi_spec, hi_value = _haemolysis_index(rng, mask, col, err_kind, severity)
    hi_unit = cat.get(HAEMOLYSIS_INDEX).canonical_unit

    # ---- frames -----------------------------------------------------------------------------
    names = np.array([f"synthetic:s{seed}-{i:06d}" for i in range(N)], dtype=object)
    units = np.array([p.unit for p in P], dtype=object)
    sex = np.where(male, "M", "F").astype(object)
    row_spec = np.concatenate([r_spec[ok], hi_spec])
    order = np.lexsort((np.concatenate([r_a[ok], np.full(hi_spec.size, A)]), row_spec))  # index last in a specimen
    row_spec = row_spec[order]
    row_pid, row_t = s_pid[row_spec], s_t[row_spec]
    t_ns = (row_t * 86400.0).round().astype("int64") * 1_000_000_000
    history = pd.DataFrame({
        "patient_id": names[row_pid],
        "collected_at": start + pd.to_timedelta(t_ns, unit="ns"),
        "analyte_code": np.concatenate([np.asarray(codes, dtype=object)[r_a[ok]],
                                        np.full(hi_spec.size, HAEMOLYSIS_INDEX, dtype=object)])[order],
        "value": np.concatenate([value[ok], hi_value])[order],
        "censor": np.zeros(row_spec.size, dtype="int8"),
        "unit_canonical": np.concatenate([units[r_a[ok]], np.full(hi_spec.size, hi_unit, dtype=object)])[order],
        "sex": sex[row_pid],
        "age_years": age0[row_pid] + row_t / 365.25,
    })[list(HISTORY_COLUMNS)]

    def when(t):
        return start + pd.to_timedelta((np.asarray(t, dtype=float) * 86400.0).round().astype("int64"), unit="s")

    lab = []
    kinds = {1: ("haemolysis", "g/L free haemoglobin"), 2: ("edta_contamination", "volume fraction"), 3: ("drip_arm", "volume fraction")}
    for k, (kind, unit) in kinds.items():
        sel = np.nonzero(err_kind == k)[0]
        lab.append(pd.DataFrame({"patient_id": names[s_pid[sel]], "collected_at": when(s_t[sel]), "analyte_code": "*",
                                 "kind": kind, "end_at": pd.NaT, "severity": severity[sel], "severity_unit": unit}))
    for kind, on, t0, sevv, unit, end in (
        ("aki", aki_on, aki_t0, aki_peak, "peak x baseline creatinine", aki_t0 + aki_rise + aki_rec),
        ("infection", inf_on, inf_t0, inf_crp, "CRP peak increment mg/L", inf_t0 + crp_tp + 7.0 * crp_hl),
    ):
        pi, si = np.nonzero(on)
        lab.append(pd.DataFrame({"patient_id": names[pi], "collected_at": when(t0[pi, si]), "analyte_code": "*",
                                 "kind": kind, "end_at": when(np.minimum(end[pi, si], T)), "severity": sevv[pi, si],
                                 "severity_unit": unit}))
    for kind, code, sevv, unit in (("ckd", "*", egfr_rate, "eGFR decline mL/min/1.73 m2/year"),
                                   ("diabetes", "*", a1c0, "HbA1c at start %"),
                                   ("anaemia", HB, hb_rate, "Hb decline g/dL/year")):
        pi = np.nonzero(is_prof[kind])[0]
        lab.append(pd.DataFrame({"patient_id": names[pi], "collected_at": start, "analyte_code": code, "kind": kind,
                                 "end_at": pd.NaT, "severity": sevv[pi], "severity_unit": unit}))
    labels = pd.concat(lab, ignore_index=True)[list(LABEL_COLUMNS)]
    labels["collected_at"] = pd.to_datetime(labels["collected_at"]).astype("datetime64[ns]")
    labels["end_at"] = pd.to_datetime(labels["end_at"]).astype("datetime64[ns]")
    labels = labels.sort_values(["patient_id", "collected_at", "kind"], kind="stable").reset_index(drop=True)

    history.attrs["report"] = {
        "source": "synthetic", "seed": int(seed), "patients": N, "specimens": int(S), "rows_generated": int(R),
        "rows_loaded": int(len(history)), "dropped_implausible": {str(k): int(v) for k, v in dropped.items()},
        "haemolysis_index_results": int(hi_spec.size),
        "profiles": {p: int(is_prof[p].sum()) for p in PROFILES},
        "events": {str(k): int(v) for k, v in labels["kind"].value_counts().items()},
    }
    log.info("synthetic cohort: %s", history.attrs["report"])
    return history, labels


def _haemolysis_index(rng: np.random.Generator, mask: np.ndarray, col: dict, err_kind: np.ndarray,
                      severity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The haemolysis index of every chemistry specimen: ``(specimen indices, values in mg/dL)``.

    ``mask`` is specimens x simulated analytes (which analytes each specimen holds), ``col`` the
    analyte -> column map, ``err_kind``/``severity`` the per-specimen error kind (1 = haemolysis)
    and its free haemoglobin in g/L. Without haemolysis the index is the specimen's own free
    haemoglobin: log-normal with median ``median_fraction_of_upper_limit`` x the upper reference
    limit and that limit at the ``reference_interval_coverage`` upper quantile (the generator's
    labelled assumptions for intervals starting at 0, ``preanalytical_patterns.csv``; the limit,
    11.3 mg/dL, is ARUP's, ``serum_indices.csv``). A haemolysed specimen adds its injected free
    haemoglobin - the same quantity that sets its potassium, LDH and AST increments (Hemokalc
    2025; Frank 1978) - so the index rises with the degree of haemolysis. Rounded to
    :data:`HAEMOLYSIS_INDEX_RESOLUTION`. Draws one normal per specimen from ``rng``.
    """
    analyte = load_catalogue().get(HAEMOLYSIS_INDEX)
    g_per_l = conversion_factor("g/L", analyte)  # injected free Hb is in g/L; the index in the canonical unit
    upper = load_serum_indices()[(HAEMOLYSIS_INDEX, "reference_high")][0]
    median = _p("stable", "median_fraction_of_upper_limit") * upper
    sigma = math.log(upper / median) / _Z.inv_cdf(0.5 + _p("stable", "reference_interval_coverage") / 2.0)
    z = rng.standard_normal(mask.shape[0])
    chem_cols = [col[c] for g in CHEMISTRY_PANELS for c in PANELS[g][0] if c in col]
    if not chem_cols:
        return np.zeros(0, np.int64), np.zeros(0)
    spec = np.nonzero(mask[:, chem_cols].any(axis=1))[0]
    added = np.where(err_kind[spec] == 1, severity[spec], 0.0) * g_per_l
    value = median * np.exp(sigma * z[spec]) + added
    return spec, np.round(value / HAEMOLYSIS_INDEX_RESOLUTION) * HAEMOLYSIS_INDEX_RESOLUTION


def _value_text(value: pd.Series, censor: pd.Series) -> pd.Series:
    """Values as text with the censoring comparator ('<' for -1, '>' for +1) the importer parses."""
    text = value.map("{:.10g}".format)
    prefix = np.where(censor.to_numpy() < 0, "<", np.where(censor.to_numpy() > 0, ">", ""))
    return pd.Series(prefix, index=value.index) + text


def to_canonical_csv(history: pd.DataFrame, path) -> Path:
    """Write a history frame as the project's canonical long CSV, ready for the normal importer.

    Columns: ``patient_id, collected_at, loinc, test_name, value, unit, specimen_id, sex,
    birth_date``. ``specimen_id`` numbers each patient's distinct collection times; ``birth_date`` is
    derived from ``age_years`` at the patient's first result (empty when unknown). A ``.gz`` suffix
    writes gzip.
    """
    path = Path(path)
    cat = load_catalogue()
    h = history.sort_values(["patient_id", "collected_at", "analyte_code"], kind="stable").reset_index(drop=True)
    names = {a.code: a.name for a in cat}
    first = h.groupby("patient_id", sort=False).first()
    birth = (first["collected_at"] - pd.to_timedelta(first["age_years"] * 365.25, unit="D")).dt.strftime("%Y-%m-%d")
    spec = h.groupby(["patient_id", "collected_at"], sort=False).ngroup()
    out = pd.DataFrame({
        "patient_id": h["patient_id"].astype(str),
        "collected_at": h["collected_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
        "loinc": h["analyte_code"].astype(str),
        "test_name": h["analyte_code"].map(names).fillna(""),
        "value": _value_text(h["value"], h["censor"]) if (h["censor"] != 0).any() else h["value"].astype("float64"),
        "unit": h["unit_canonical"].astype(str),
        "specimen_id": "S" + spec.astype(str).str.zfill(8),
        "sex": h["sex"].fillna(""),
        "birth_date": h["patient_id"].map(birth).fillna(""),
    })[list(CANONICAL_CSV_COLUMNS)]
    from data.export import write_csv  # the product's one CSV writer (formula cells neutralised)

    write_csv(out, path, float_format="%.10g", compression="gzip" if path.suffix == ".gz" else None)
    return path
