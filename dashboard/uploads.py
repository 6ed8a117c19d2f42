"""Turning an uploaded file into something :func:`data.importers.run_import` reads.

No Streamlit here. A zip is unpacked safely (no paths outside the target folder, a bound
on the unpacked size) and, when it holds one folder, that folder is the import (a MIMIC-IV,
OMOP, Synthea or FHIR export folder).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import shutil
import zipfile
from pathlib import Path

import pandas as pd

from data.importers import ImportFileError

__all__ = ["UPLOAD_TYPES", "safe_name", "stage_upload", "preview", "row_outcomes", "batch_outcomes"]

UPLOAD_TYPES = ["csv", "tsv", "txt", "json", "ndjson", "gz", "zip"]
MAX_UNZIPPED_BYTES = 4 * 1024**3  # a zip may not unpack to more than this (zip bombs)
_SKIP = ("__MACOSX", ".DS_Store")


def safe_name(name: str) -> str:
    """The base name of an upload with anything but letters, digits, '.', '_', '-' replaced."""
    base = Path(name or "upload").name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "upload"
    return base[:120]


def _extract_zip(data: bytes, dest: Path, max_bytes: int = MAX_UNZIPPED_BYTES) -> None:
    root = dest.resolve()
    total = 0
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ImportFileError(f"not a readable zip file ({exc})") from exc
    with zf:
        for info in zf.infolist():
            if info.is_dir() or any(part in _SKIP or part.startswith("._") for part in Path(info.filename).parts):
                continue
            target = (root / info.filename).resolve()
            if root not in target.parents:
                raise ImportFileError(f"zip entry {info.filename!r} points outside the archive; nothing imported")
            total += info.file_size
            if total > max_bytes:
                raise ImportFileError(f"zip unpacks to more than {max_bytes // 1024**2} MB; split the export")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def stage_upload(name: str, data: bytes, workdir: Path) -> Path:
    """Write an upload under ``workdir`` and return the file or folder to import.

    A zip becomes a folder named after the zip (or after the one folder inside it, or the
    one file inside it when it holds a single file).
    """
    name = safe_name(name)
    workdir.mkdir(parents=True, exist_ok=True)
    if not name.lower().endswith(".zip"):
        path = workdir / name
        path.write_bytes(data)
        return path
    folder = workdir / (name[:-4] or "upload")
    folder.mkdir()
    _extract_zip(data, folder)
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir():
        folder = entries[0]
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise ImportFileError(f"{name}: the zip is empty")
    if len(entries) == 1 and entries[0].is_file():
        return entries[0]
    return folder


def _head_text(path: Path, n_bytes: int = 64 * 1024) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read(n_bytes)
    for enc in ("utf-8-sig", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _main_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    preferred = ("labevents", "measurement", "observations")  # the results table of MIMIC, OMOP, Synthea

    def rank(p: Path):
        n = p.name.lower()
        return (not n.startswith(preferred), "lab" not in n, n)

    files = sorted((p for p in path.rglob("*") if p.is_file()), key=rank)
    return files[0] if files else None


def preview(path: Path, rows: int = 15) -> tuple[pd.DataFrame | None, str, list[str]]:
    """(table of the first rows or None, raw text head, files in the upload) for display only."""
    listing = [str(p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path.name]
    main = _main_file(path)
    if main is None:
        return None, "", listing
    text = _head_text(main)
    lines = text.splitlines()[: rows + 1]
    head = "\n".join(lines)
    if main.name.lower().endswith((".json", ".ndjson", ".json.gz", ".ndjson.gz")):
        return None, head[:4000], listing
    try:
        dialect = csv.Sniffer().sniff(head, delimiters=",;\t|")
        table = pd.read_csv(io.StringIO(head), sep=dialect.delimiter, dtype=str, keep_default_na=False)
        return table, head, listing
    except (csv.Error, pd.errors.ParserError, ValueError):
        return None, head[:4000], listing


OUTCOME_COLUMNS = ["Outcome", "Reason", "Rows"]
_LOADED_NOTES = (("rows_censored", "censored (< or >), stored with the comparator"),
                 ("rows_text", "text results (e.g. HEMOLYZED, NEG), stored as text"),
                 ("rows_implausible", "implausible values, stored and flagged as possible entry errors"),
                 ("rows_conflicting", "conflicting with another value at the same time, both kept and flagged"),
                 ("rows_unit_missing", "without a unit, stored and kept out of charts' scale and the model"))


def row_outcomes(summary: dict) -> pd.DataFrame:
    """What happened to every row of an import (:data:`OUTCOME_COLUMNS`), from an import summary
    (``ImportSummary.to_dict()`` or a batch row of ``import_batches``).

    One row for the loaded results (then one per kind of loaded result worth knowing:
    censored, text, implausible, conflicting, without a unit: "of which"), one per
    quarantine reason and one per reason rows were skipped (survey rows, vital signs, blank
    values, exact duplicates ...), each with its count; the Rows of Loaded, Quarantined and
    Skipped add up to the rows read.
    """
    rows = [("Loaded", "stored as results", int(summary.get("rows_loaded") or 0))]
    for key, text in _LOADED_NOTES:
        n = int(summary.get(key) or 0)
        if n:
            rows.append(("Loaded, of which", text, n))
    q = _reasons(summary.get("quarantine_reasons"))
    rest = int(summary.get("rows_quarantined") or 0) - sum(q.values())
    if rest > 0:
        q["(reason not recorded)"] = rest
    rows += [("Quarantined", reason, n) for reason, n in sorted(q.items(), key=lambda kv: (-kv[1], kv[0]))]
    sk = _reasons(summary.get("skipped_reasons"))
    rest = int(summary.get("rows_skipped") or 0) - sum(sk.values())
    if rest > 0:
        sk["(reason not recorded)"] = rest
    rows += [("Skipped", reason, n) for reason, n in sorted(sk.items(), key=lambda kv: (-kv[1], kv[0]))]
    return pd.DataFrame(rows, columns=OUTCOME_COLUMNS)


def _reasons(value) -> dict[str, int]:
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return {str(k): int(v) for k, v in (value or {}).items() if v}


def batch_outcomes(batch: dict, quarantine: pd.DataFrame) -> pd.DataFrame:
    """:func:`row_outcomes` of a stored batch (a row of ``queries.batches``), its quarantine reasons counted
    from ``queries.quarantine_rows`` of that batch (a unit problem counted as one reason, as the import does)."""
    reasons = {}
    if len(quarantine):
        why = quarantine["reason"].where(quarantine["column"] != "unit", "unit unknown or not convertible")
        unreadable = quarantine["column"].isna()  # whole lines the reader could not split: one reason
        why = why.where(~unreadable, why.astype(str).str.split(":").str[0])
        reasons = why.value_counts().to_dict()
    return row_outcomes({**batch, "quarantine_reasons": reasons})
