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

__all__ = ["UPLOAD_TYPES", "safe_name", "stage_upload", "preview"]

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
