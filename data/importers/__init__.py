"""Importers for lab exports, and the one entry point that runs an import atomically.

Formats: ``csv`` (canonical long CSV), ``mimic`` (MIMIC-IV hosp), ``fhir`` (R4 Bundle
JSON / NDJSON), ``omop`` (CDM v5.4 MEASUREMENT + PERSON), ``synthea`` (observations.csv
+ patients.csv). :func:`detect_format` picks one; ``format=`` overrides.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from datetime import datetime, timezone
from pathlib import Path

from data import codemap, timezones
from data.importers.base import ImportFileError, ImportOptions, Staged
from data.importers.pipeline import ImportSummary, drop_temp, load_staged, summary_json

__all__ = ["run_import", "detect_format", "ImportFileError", "ImportOptions", "ImportSummary", "summary_json", "FORMATS"]

FORMATS = {
    "csv": "data.importers.csv_long",
    "mimic": "data.importers.mimic",
    "fhir": "data.importers.fhir",
    "omop": "data.importers.omop",
    "synthea": "data.importers.synthea",
}


def _module(fmt: str):
    if fmt not in FORMATS:
        raise ImportFileError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    return importlib.import_module(FORMATS[fmt])


def _header(path: Path) -> str:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return fh.readline(1 << 16).decode("utf-8", errors="replace").lower()
    except OSError:
        return ""


def detect_format(path: Path) -> str:
    """The importer for ``path`` (a file or a folder). Raises :class:`ImportFileError`."""
    path = Path(path)
    if not path.exists():
        raise ImportFileError(f"{path}: no such file or folder")
    if path.is_dir():
        from data.importers import mimic

        if mimic.is_mimic_dir(path):
            return "mimic"
        names = {p.name.lower() for p in path.iterdir()}
        if any(n.startswith("measurement.") for n in names):
            return "omop"
        if "observations.csv" in names:
            return "synthea"
        if any(n.endswith((".ndjson", ".json")) for n in names):
            return "fhir"
        raise ImportFileError(f"{path.name}: folder holds no known lab export (MIMIC-IV hosp, OMOP, Synthea, FHIR)")
    name = path.name.lower()
    if name.endswith((".json", ".ndjson", ".json.gz", ".ndjson.gz")):
        return "fhir"
    head = _header(path)
    if "measurement_concept_id" in head:
        return "omop"
    if "itemid" in head and "subject_id" in head:
        return "mimic"
    if head.startswith(("date,patient", "start,stop,patient")) or ("patient" in head and "encounter" in head and "description" in head):
        return "synthea"
    if head.lstrip("\ufeff").startswith(("{", "[")):
        return "fhir"
    return "csv"


def _file_sha256(paths: list[Path]) -> tuple[str, str]:
    """(identity, legacy identity) of the import's content.

    One file: the sha256 of its bytes, so a renamed copy is the same import. Several files
    (a MIMIC-IV folder): the sha256 over each file's name and digest, since the names say
    which table each file is. The legacy identity is what stores made before single files
    were identified by their bytes alone recorded (name and digest), so that re-importing
    those files is still recognised.
    """
    h = hashlib.sha256()
    digests = []
    for p in sorted(paths, key=lambda p: p.name):
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                fh.update(chunk)
        digests.append(fh)
        h.update(p.name.encode() + b"\0" + fh.digest())
    identity = digests[0].hexdigest() if len(digests) == 1 else h.hexdigest()
    return identity, h.hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def run_import(store, path, fmt: str | None = None, options: ImportOptions | None = None) -> ImportSummary:
    """Import one file or folder into the store, in one transaction.

    Returns the summary (``rows_loaded + rows_quarantined + rows_skipped == rows_read``).
    Re-importing identical content adds nothing and returns ``already_imported=True``.

    Raises
    ------
    ImportFileError
        the file cannot be read at all (not CSV/JSON, no patient or value column, empty,
        ambiguous dates or decimal mark), the time zone is unknown, or the site mapping
        file of local codes is invalid; nothing is written.
    """
    path = Path(path)
    options = options or ImportOptions()
    try:  # an unknown zone or a broken mapping file is a bad argument: stop before reading anything
        zone_name = options.timezone if options.timezone is not None else timezones.site_zone()
        zone_name = zone_name.strip() if zone_name and zone_name.strip() else None
        timezones.zone(zone_name)
        code_map = codemap.map_path(options.code_map)
        map_rows = codemap.read_map(code_map)
    except (timezones.ZoneError, codemap.CodeMapError) as exc:
        raise ImportFileError(str(exc)) from exc
    mapping = codemap.current_mapping(map_rows)
    fmt = fmt or detect_format(path)
    module = _module(fmt)
    label = path.name
    files = module.files(path) if hasattr(module, "files") else [path]
    if not path.exists():
        raise ImportFileError(f"{path}: no such file or folder")
    sha, legacy_sha = _file_sha256(files)
    started = _now()
    with store.write() as cur:
        prior = cur.execute(
            "SELECT batch_id, file_name, started_at FROM import_batches WHERE sha256 IN (?, ?) AND status = 'complete' "
            "ORDER BY batch_id LIMIT 1", [sha, legacy_sha]
        ).fetchone()
        if prior:
            return ImportSummary(
                batch_id=prior[0], file=label, format=fmt, already_imported=True,
                message=f"already imported as batch {prior[0]} ({prior[1]}, {prior[2]:%Y-%m-%d %H:%M}); nothing added",
            )
        batch_id = cur.execute("SELECT COALESCE(max(batch_id), 0) + 1 FROM import_batches").fetchone()[0]
        staged: Staged = module.stage(cur, path, options, label)
        staged.shifted_dates = staged.shifted_dates or options.shifted_dates
        summary = load_staged(cur, staged, batch_id, label, zone_name=zone_name, mapping=mapping, started=started)
        if map_rows:
            staged.options["code_map"] = {"file": code_map.name, "sha256": codemap.file_sha256(code_map)}
            # results imported earlier follow the mapping file too (each move audited in code_map_events)
            codemap.rekey(cur, map_rows, by=codemap.os_user(), map_file=code_map)
        summary.message = _message(summary)
        cur.execute(
            """
            INSERT INTO import_batches (batch_id, file_name, sha256, format, options, rows_read, rows_loaded,
                rows_quarantined, rows_skipped, rows_duplicate, rows_conflicting, rows_censored, rows_text,
                rows_implausible, rows_unit_missing, patients, skipped_reasons, started_at, finished_at, status,
                time_zone, rows_time_unknown, rows_dst, rows_after_import, unmapped_codes)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'complete', ?, ?, ?, ?, ?)
            """,
            [batch_id, label, sha, fmt, json.dumps(staged.options, default=str), summary.rows_read,
             summary.rows_loaded, summary.rows_quarantined, summary.rows_skipped, summary.rows_duplicate,
             summary.rows_conflicting, summary.rows_censored, summary.rows_text, summary.rows_implausible,
             summary.rows_unit_missing, summary.patients, json.dumps(summary.skipped_reasons), started, _now(),
             summary.time_zone, summary.rows_time_unknown, summary.rows_dst, summary.rows_after_import,
             json.dumps(summary.unmapped_codes)],
        )
        for t in ("stg", "stg_file", "stg_patients", "csv_rejects", "fhir_rejects", "mimic_map", "reject_errors",
                  "reject_scans"):
            drop_temp(cur, t)
    return summary


def _message(s: ImportSummary) -> str:
    parts = [f"{s.rows_read} rows", f"{s.rows_loaded} loaded"]
    if s.rows_censored:
        parts.append(f"{s.rows_censored} censored")
    if s.rows_text:
        parts.append(f"{s.rows_text} text results")
    if s.rows_quarantined:
        parts.append(f"{s.rows_quarantined} quarantined")
    if s.rows_duplicate:
        parts.append(f"{s.rows_duplicate} duplicate row{'s' if s.rows_duplicate != 1 else ''} removed")
    if s.rows_conflicting:
        parts.append(f"{s.rows_conflicting} conflicting results at the same collection time")
    if s.rows_implausible:
        parts.append(f"{s.rows_implausible} physiologically implausible (possible entry error)")
    if s.rows_unit_missing:
        parts.append(f"{s.rows_unit_missing} with unit missing")
    if s.rows_time_unknown:
        parts.append(f"{s.rows_time_unknown} with a date but no time (time unknown)")
    if s.rows_dst:
        parts.append(f"{s.rows_dst} in an hour skipped or repeated by a daylight-saving change (check the time)")
    if s.rows_after_import:
        parts.append(f"{s.rows_after_import} collected after the import time (check the date)")
    if s.unmapped_codes:
        n = len(s.unmapped_codes)
        parts.append(f"{n} local test code{'s' if n != 1 else ''} without a LOINC mapping "
                     f"({', '.join(list(s.unmapped_codes)[:5])}{' …' if n > 5 else ''})")
    return ", ".join(parts)
