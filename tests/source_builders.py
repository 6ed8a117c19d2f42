"""Tiny exports in every import format, built from the same rows, so that one rule can be tested
across formats (times, time zones, control characters, local codes).

A row is a dict with ``pid``, ``t`` (the time as the source writes it), and optionally
``loinc``, ``local`` (the source's own code), ``name``, ``value``, ``unit``, ``comment``.
Layouts follow the importers' documented columns (data/importers/*.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

FORMATS = ("csv", "fhir", "omop", "synthea", "mimic")


def _row(r: dict) -> dict:
    return {"loinc": "", "local": "", "name": "Potassium", "value": "4.1", "unit": "mmol/L", "comment": "", **r}


def write_source(fmt: str, folder: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as an export of ``fmt`` under ``folder``; returns the path to import."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [_row(r) for r in rows]
    if fmt == "csv":
        p = folder / "results.csv"
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "collected_at", "loinc", "local_code", "test_name", "value", "unit", "comment"])
            for r in rows:
                w.writerow([r["pid"], r["t"], r["loinc"], r["local"], r["name"], r["value"], r["unit"], r["comment"]])
        return p
    if fmt == "fhir":
        p = folder / "observations.ndjson"
        lines = []
        for i, r in enumerate(rows):
            coding = []
            if r["loinc"]:
                coding.append({"system": "http://loinc.org", "code": r["loinc"]})
            if r["local"]:
                coding.append({"system": "http://lab.example.org/codes", "code": r["local"]})
            obs = {"resourceType": "Observation", "id": f"o{i}", "status": "final",
                   "category": [{"coding": [{"code": "laboratory"}]}],
                   "code": {"coding": coding, "text": r["name"]}, "subject": {"reference": f"Patient/{r['pid']}"},
                   "effectiveDateTime": r["t"]}
            try:
                obs["valueQuantity"] = {"value": float(r["value"]), "unit": r["unit"],
                                        "system": "http://unitsofmeasure.org", "code": r["unit"]}
            except ValueError:
                obs["valueString"] = r["value"]
            if r["comment"]:
                obs["note"] = [{"text": r["comment"]}]
            lines.append(json.dumps(obs))
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return p
    if fmt == "omop":
        p = folder / "measurement.csv"
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                        "measurement_datetime", "measurement_time", "value_as_number", "unit_source_value",
                        "measurement_source_value", "value_source_value"])
            for i, r in enumerate(rows):
                date_only = ":" not in r["t"]
                try:
                    num, text = str(float(r["value"])), ""
                except ValueError:
                    num, text = "", r["value"]
                w.writerow([i + 1, r["pid"], 0, r["t"][:10], "" if date_only else r["t"], "", num, r["unit"],
                            r["name"], text])
        return p
    if fmt == "synthea":
        p = folder / "observations.csv"
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["DATE", "PATIENT", "ENCOUNTER", "CATEGORY", "CODE", "DESCRIPTION", "VALUE", "UNITS", "TYPE"])
            for r in rows:
                w.writerow([r["t"], r["pid"], "enc-1", "laboratory", r["loinc"] or r["local"] or "2823-3", r["name"],
                            r["value"], r["unit"], "numeric"])
        return p
    if fmt == "mimic":
        hosp = folder / "hosp"
        hosp.mkdir(exist_ok=True)
        items = {}
        with open(hosp / "labevents.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
                        "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
                        "ref_range_upper", "flag", "priority", "comments"])
            for i, r in enumerate(rows):
                itemid = r["local"] or "50971"  # 50971: Potassium, Blood, Chemistry (mapped in mimic_loinc.csv)
                items[itemid] = r["name"]
                try:
                    num = str(float(r["value"]))
                except ValueError:
                    num = ""
                w.writerow([i + 1, r["pid"], "", i + 100, itemid, "", r["t"], "", r["value"], num, r["unit"],
                            "", "", "", "ROUTINE", r["comment"]])
        with open(hosp / "d_labitems.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["itemid", "label", "fluid", "category"])
            for itemid, name in items.items():
                w.writerow([itemid, name, "Blood", "Chemistry"])
        return folder
    raise ValueError(fmt)
