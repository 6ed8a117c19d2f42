"""MIMIC-IV ``hosp`` module: labevents + d_labitems + patients (+ admissions, for the timeline's episodes).

Accepts the dataset root (with ``hosp/``) or the ``hosp`` folder itself; files may be
``.csv`` or ``.csv.gz``. Items are mapped to LOINC by ``data/reference/mimic_loinc.csv``
(cited per row); unmapped items keep the local code ``mimic:<itemid>``.

Rules specific to MIMIC:
* ``value`` is the result as reported; where de-identification masked it as ``___`` (or it
  is blank) but ``valuenum`` is present, the number ``valuenum`` is used.
* A test's display name is its ``label``, with the fluid added when it is not blood
  (``Glucose (Urine)``) so that urine and blood tests are never mixed on one chart.
* Patient age: ``anchor_age`` is the age in ``anchor_year``; it is stored with a reference
  date of 1 July of ``anchor_year`` (the year's midpoint, error at most six months).
* Every result keeps its item as the local code ``mimic:<itemid>``, mapped or not.
* **Times carry no zone.** MIMIC-IV shifts every patient's dates by a random offset into the
  future (years 2100-2200) for de-identification, keeping time of day and day of week; the
  shifted time is not a time in any real zone (the daylight-saving calendar of the shifted
  year is not the one the sample was drawn under), so no zone is applied (``--timezone`` and
  ``LABTREND_TIMEZONE`` are ignored and the batch records none), no time is flagged as a
  skipped or repeated hour, and times after the import are expected (the source declares
  shifted dates), not flagged. ``utc_offset_min`` stays NULL.
"""

from __future__ import annotations

from pathlib import Path

from data.catalogue import reference_file
from data.importers.base import ImportFileError, ImportOptions, Staged
from data.importers.csvio import has_control_bytes

FORMAT = "mimic"


def _find(root: Path, name: str) -> Path | None:
    for base in (root / "hosp", root):
        for suffix in (".csv.gz", ".csv"):
            p = base / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def files(root: Path) -> list[Path]:
    lab = _find(root, "labevents")
    items = _find(root, "d_labitems")
    if lab is None or items is None:
        raise ImportFileError(
            f"{root.name}: not a MIMIC-IV hosp folder (need labevents.csv[.gz] and d_labitems.csv[.gz])"
        )
    pats = _find(root, "patients")
    return [p for p in (lab, items, pats) if p is not None]


def is_mimic_dir(path: Path) -> bool:
    return path.is_dir() and _find(path, "labevents") is not None and _find(path, "d_labitems") is not None


def stage(cur, path: Path, options: ImportOptions, label: str) -> Staged:
    lab, items, *rest = files(path)
    pats = rest[0] if rest else None
    mapping = reference_file("mimic_loinc.csv")
    cur.execute(
        "CREATE OR REPLACE TEMP TABLE mimic_map AS SELECT itemid::BIGINT AS itemid, loinc FROM read_csv(?, all_varchar = true, header = true)",
        [str(mapping)],
    )
    try:
        cur.execute(
            """
            CREATE OR REPLACE TEMP TABLE stg AS
            WITH le AS (
                SELECT row_number() OVER () AS source_row, *
                FROM read_csv(?, header = true, all_varchar = true, auto_detect = true)
            ),
            items AS (SELECT * FROM read_csv(?, header = true, all_varchar = true))
            SELECT le.source_row,
                   le.subject_id AS patient_id,
                   le.charttime AS collected_at,
                   le.storetime AS reported_at,
                   le.specimen_id,
                   m.loinc,
                   'mimic:' || trim(le.itemid) AS local_code,
                   CASE WHEN i.fluid IS NULL OR i.fluid = 'Blood' THEN i.label
                        ELSE i.label || ' (' || i.fluid || ')' END AS test_name,
                   CASE WHEN (le.value IS NULL OR trim(le.value) IN ('', '___')) AND le.valuenum IS NOT NULL
                        THEN le.valuenum ELSE le.value END AS value,
                   le.valueuom AS unit,
                   le.ref_range_lower AS ref_low,
                   le.ref_range_upper AS ref_high,
                   le.flag,
                   le.comments AS comment
            FROM le
            LEFT JOIN items i ON i.itemid = le.itemid
            LEFT JOIN mimic_map m ON m.itemid = TRY_CAST(le.itemid AS BIGINT)
            """,
            [str(lab), str(items)],
        )
    except Exception as exc:
        raise ImportFileError(f"{label}: cannot read MIMIC-IV files ({str(exc).splitlines()[0]})") from exc
    staged = Staged(format=FORMAT, files=[lab, items] + ([pats] if pats else []), shifted_dates=True)
    staged.control_possible = has_control_bytes(lab) or has_control_bytes(items)
    if pats is not None:
        cur.execute(
            """
            CREATE OR REPLACE TEMP TABLE stg_patients AS
            SELECT subject_id AS patient_id, gender AS sex, NULL AS birth_date,
                   anchor_age AS age_at_ref, anchor_year || '-07-01' AS ref_date
            FROM read_csv(?, header = true, all_varchar = true)
            """,
            [str(pats)],
        )
        staged.has_patients = True
    adm = _find(path, "admissions")
    if adm is not None:  # not part of the import's identity: a store imported before keeps "already imported"
        try:
            cur.execute(
                """
                CREATE OR REPLACE TEMP TABLE stg_admissions AS
                SELECT subject_id AS patient_id, hadm_id AS admission_id, admittime AS admitted_at,
                       dischtime AS discharged_at, admission_type
                FROM read_csv(?, header = true, all_varchar = true)
                """,
                [str(adm)],
            )
            staged.has_admissions = True
        except Exception as exc:
            raise ImportFileError(f"{label}: cannot read {adm.name} ({str(exc).splitlines()[0]})") from exc
    staged.options = {"mapping": "mimic_loinc.csv"}
    return staged
