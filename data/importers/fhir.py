"""FHIR R4 ``Observation`` resources (laboratory results), with ``Patient`` when present.

Accepted input: one Bundle JSON (``resourceType: Bundle``, read from ``entry[].resource``),
one resource JSON, a JSON array of resources, NDJSON (one resource per line, as FHIR Bulk
Data writes it), each optionally ``.gz``; or a folder of such files (``*.json``,
``*.ndjson``, ``*.json.gz``, ``*.ndjson.gz``, read in name order, not recursively).
Element names follow https://hl7.org/fhir/R4/observation.html.

Rows: ``source_row`` is the 1-based position of the resource in its file (Bundle entry
index, NDJSON line number); in a folder, numbering continues across files in name order
(``Staged.options['files']`` records each file's first row). Every resource is one row
read and ends up staged, skipped with a reason, or rejected (quarantined):

* ``Observation`` -> staged, unless ``status`` is entered-in-error / cancelled (skipped
  ``status <status>``), a ``category`` is given and none is ``laboratory`` (skipped
  ``category <code>``), or it only has ``component`` values (skipped ``has components,
  no value``) or is a panel that only groups other Observations (skipped ``panel
  (hasMember), no value``);
* ``Patient`` -> read for sex and birth date, counted as skipped ``resource type Patient``
  like every other resource type (``resource type Encounter`` ...);
* a Bundle entry without ``resource`` -> skipped ``bundle entry without resource``;
* an NDJSON line that is not JSON, not UTF-8, or not a JSON object with ``resourceType``
  -> temp table ``fhir_rejects`` (source_row, reason, line), quarantined by the pipeline.
  A JSON file (not NDJSON) that cannot be parsed, or an NDJSON file in which no line can
  be read, raises :class:`ImportFileError` naming the file and the line.

Observation fields read (values as written: JSON numbers are kept as their literal text):

* ``code.coding``: the code with system http://loinc.org is ``loinc``; the first other
  coding gives ``local_code`` ``<last part of system>:<code>`` (kept beside a LOINC code too,
  and keyed through the site mapping file when there is no LOINC coding); ``test_name`` is
  ``code.text``, else the display of the LOINC coding, else of the first coding;
* ``subject.reference`` ``Patient/<id>``, ``urn:uuid:<id>`` or an absolute URL, resolved
  through the ``Patient`` resources' ``id`` / ``fullUrl`` (else the id after ``Patient/`` or
  ``urn:uuid:``); ``subject.identifier.value`` when there is no reference;
* ``effectiveDateTime``, else ``effectivePeriod.start``, else ``effectiveInstant`` ->
  ``collected_at``; ``issued`` -> ``reported_at``; a time with a UTC offset is written
  ``YYYY-MM-DD HH:MM:SS+HH:MM`` (the pipeline stores UTC and the offset); one without offset
  is a local time of the import's zone; a date alone (``2024-03-05``) is a date with the time
  unknown;
* ``valueQuantity``: ``value`` with ``comparator`` prefixed (``<0.5``); unit is ``code``
  when ``system`` is UCUM, else ``unit``. ``valueString``, ``valueCodeableConcept`` (text,
  else first display, else code), ``valueInteger``, ``valueBoolean``, ``valueRange``
  (``low-high``), ``valueRatio`` (``n/d``), ``valueDateTime``, ``valueTime`` are text;
  ``dataAbsentReason`` -> empty value with ``data absent: <reason>`` in the comment;
* ``referenceRange[0].low.value`` / ``high.value`` -> ``ref_low`` / ``ref_high``;
* ``interpretation[0]``: first coding code (H, L, HH, LL, A, N ...), else text -> ``flag``;
* ``note[].text`` joined with ``; `` -> ``comment`` (with ``status preliminary`` /
  ``status registered`` added for results not yet final);
* ``specimen.reference`` -> ``specimen_id``.

Patient: ``id`` (else the uuid of ``fullUrl``); ``gender`` -> sex; ``birthDate`` ->
birth_date. A partial birth date (``YYYY`` or ``YYYY-MM``) is stored as age 0 at the middle
of that year (1 July) or month (the 15th), the same approximation as MIMIC's anchor age.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from data.importers.base import PATIENT_COLUMNS, STAGING_COLUMNS, ImportFileError, ImportOptions, Staged

FORMAT = "fhir"

SUFFIXES = (".json", ".ndjson", ".json.gz", ".ndjson.gz")
LOINC_SYSTEMS = ("http://loinc.org", "https://loinc.org")
UCUM_SYSTEMS = ("http://unitsofmeasure.org", "https://unitsofmeasure.org")
LAB_CATEGORIES = ("laboratory", "lab")
SKIPPED_STATUSES = ("entered-in-error", "cancelled")
NOTED_STATUSES = ("registered", "preliminary")
CHUNK_ROWS = 50_000  # observations buffered in Python before they are appended to DuckDB
MAX_REJECT_LINE = 4000  # characters of a bad NDJSON line kept in quarantine

# staging columns built in Python; patient_id is resolved in SQL from these two
_OBS_COLUMNS = ("source_row", "subject_ref", "subject_guess") + tuple(
    c for c in STAGING_COLUMNS if c not in ("source_row", "patient_id")
)


@dataclass
class _Entry:
    """One resource slot of a file: the resource, or why it could not be read."""

    index: int  # 1-based position in the file
    resource: dict | None = None
    full_url: str | None = None
    reject: str | None = None  # reason the line cannot be read
    line: str | None = None  # the raw line, for rejects


# -- files ---------------------------------------------------------------------------------


def _is_fhir_name(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SUFFIXES)


def files(path: Path) -> list[Path]:
    """The JSON / NDJSON files of ``path`` (itself, or a folder's files in name order)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = sorted((p for p in path.iterdir() if _is_fhir_name(p)), key=lambda p: p.name)
    if not found:
        raise ImportFileError(f"{path.name}: folder holds no FHIR files (*.json, *.ndjson, optionally .gz)")
    return found


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ImportFileError(f"{path.name}: cannot be read ({exc})") from exc


def _stream_lines(path: Path) -> Iterator[bytes]:
    """The lines of a (possibly gzipped) file, read as a stream."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            yield from fh
    except (OSError, EOFError) as exc:
        raise ImportFileError(f"{path.name}: cannot be read ({exc})") from exc


def _loads(text: str):
    """JSON with every number kept as its literal text (``5.40`` stays ``'5.40'``)."""
    return json.loads(text, parse_float=str, parse_int=str)


# -- reading files into entries ---------------------------------------------------------


def _iter_ndjson(lines: Iterable[bytes], name: str) -> Iterator[_Entry]:
    """One entry per non-blank line; unreadable lines become rejects."""
    n_good = 0
    first_bad: _Entry | None = None
    for i, raw in enumerate(lines, start=1):
        if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        entry = _Entry(index=i)
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            entry.reject, entry.line = "not UTF-8 text", raw.decode("latin-1")[:MAX_REJECT_LINE]
        else:
            try:
                obj = _loads(text)
            except json.JSONDecodeError as exc:
                entry.reject = f"not valid JSON (column {exc.colno}: {exc.msg})"
            else:
                if isinstance(obj, dict) and obj.get("resourceType"):
                    entry.resource = obj
                else:
                    entry.reject = "not a FHIR resource (a JSON object with resourceType)"
            if entry.reject:
                entry.line = text[:MAX_REJECT_LINE]
        if entry.reject is None:
            n_good += 1
        elif first_bad is None:
            first_bad = entry
        yield entry
    if n_good == 0:
        where = f"line {first_bad.index}: {first_bad.reject}" if first_bad else "no resources"
        raise ImportFileError(f"{name}: not NDJSON with FHIR resources ({where})")


def _iter_json(doc, name: str) -> Iterator[_Entry]:
    """Entries of a parsed JSON document: Bundle entries, an array, or one resource."""
    if isinstance(doc, list):
        items = [(r, None) for r in doc]
    elif isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        items = [
            (e.get("resource") if isinstance(e, dict) else None, e.get("fullUrl") if isinstance(e, dict) else None)
            for e in (doc.get("entry") or [])
        ]
    elif isinstance(doc, dict) and doc.get("resourceType"):
        items = [(doc, None)]
    else:
        raise ImportFileError(f"{name}: not a FHIR resource or Bundle (no 'resourceType' at the top level)")
    for i, (res, full_url) in enumerate(items, start=1):
        if isinstance(res, dict) and res.get("resourceType"):
            yield _Entry(index=i, resource=res, full_url=full_url)
        elif res is None:
            yield _Entry(index=i)  # a Bundle entry with no resource (e.g. a request or response only)
        else:
            yield _Entry(index=i, reject="not a FHIR resource (no resourceType)", line=json.dumps(res)[:MAX_REJECT_LINE])


def _looks_like_ndjson(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(_loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_entries(path: Path) -> Iterator[_Entry]:
    """The entries of one file. Raises :class:`ImportFileError` for an unreadable file.

    ``.ndjson`` files are read line by line; a ``.json`` file is parsed whole, and read as
    NDJSON when it holds several JSON objects, one per line.
    """
    name = path.name
    if name.lower().removesuffix(".gz").endswith(".ndjson"):
        yield from _iter_ndjson(_stream_lines(path), name)
        return
    data = _read_bytes(path)
    if not data.strip():
        raise ImportFileError(f"{name}: the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{name}: not UTF-8 text (byte {exc.start}); FHIR JSON must be UTF-8") from exc
    try:
        doc = _loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _looks_like_ndjson(text):
            yield from _iter_ndjson(data.split(b"\n"), name)
            return
        raise ImportFileError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    yield from _iter_json(doc, name)


# -- field helpers ----------------------------------------------------------------------


def _text(x) -> str | None:
    """A JSON scalar as text (numbers are already literal text), None for missing/blank."""
    if x is None:
        return None
    if isinstance(x, bool):
        return "true" if x else "false"
    s = str(x)
    return s if s.strip() else None


def _fhir_time(value) -> str | None:
    """A FHIR date/dateTime/instant as 'YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM]'.

    The offset is kept as written ('Z' -> '+00:00') for the pipeline to store UTC and the
    offset; without one the local time is kept ('T' -> ' '); a date alone stays a date; text
    that is not ISO 8601 is passed through for the pipeline to quarantine.
    """
    s = _text(value)
    if s is None:
        return None
    s = s.strip()
    if len(s) <= 10:
        return s
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return s
    fmt = "%Y-%m-%d %H:%M:%S.%f" if dt.microsecond else "%Y-%m-%d %H:%M:%S"
    text = dt.replace(tzinfo=None).strftime(fmt)
    if dt.tzinfo is not None:
        minutes = int(dt.utcoffset().total_seconds() // 60)
        text += f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return text


def _codings(concept) -> list[dict]:
    if not isinstance(concept, dict):
        return []
    return [c for c in (concept.get("coding") or []) if isinstance(c, dict)]


def _concept_text(concept) -> str | None:
    """CodeableConcept as text: ``text``, else the first display, else the first code."""
    if not isinstance(concept, dict):
        return None
    if _text(concept.get("text")):
        return _text(concept.get("text"))
    for key in ("display", "code"):
        for c in _codings(concept):
            if _text(c.get(key)):
                return _text(c.get(key))
    return None


def _system_tail(system: str | None) -> str:
    """Short name of a code system: the last part of its URL / URN (``urn:oid:1.2`` -> ``1.2``)."""
    if not system:
        return "fhir"
    tail = system.rstrip("/").replace("urn:oid:", "").replace("urn:", "").rsplit("/", 1)[-1]
    return tail or "fhir"


def _codes(code) -> tuple[str | None, str | None, str | None]:
    """(loinc, local_code, test_name) of ``Observation.code``."""
    codings = _codings(code)
    loinc = next((c for c in codings if (c.get("system") or "").rstrip("/") in LOINC_SYSTEMS and _text(c.get("code"))), None)
    first = next((c for c in codings if _text(c.get("code")) and c is not loinc), None)
    local = None if first is None else f"{_system_tail(first.get('system'))}:{_text(first.get('code'))}"
    name = _text(code.get("text")) if isinstance(code, dict) else None
    if name is None:
        name = next((_text(c.get("display")) for c in ([loinc] if loinc else []) + codings if _text(c.get("display"))), None)
    return (_text(loinc.get("code")) if loinc else None), local, name


def _patient_guess(ref: str | None) -> str | None:
    """Patient id from a reference without the Patient resource at hand."""
    if ref is None:
        return None
    if ref.startswith("urn:uuid:"):
        return ref[len("urn:uuid:"):]
    head, sep, rest = ref.partition("Patient/")
    if sep and (head == "" or head.endswith("/")):
        return rest.split("/", 1)[0] or None
    return ref


def _subject(res: dict) -> tuple[str | None, str | None]:
    """(reference as written, guessed patient id) of ``Observation.subject``."""
    subj = res.get("subject")
    if not isinstance(subj, dict):
        return None, None
    ref = _text(subj.get("reference"))
    if ref:
        return ref.strip(), _patient_guess(ref.strip())
    ident = subj.get("identifier")
    value = _text(ident.get("value")) if isinstance(ident, dict) else None
    return None, value


def _quantity(q: dict) -> tuple[str | None, str | None]:
    """(value with comparator prefixed, unit) of a Quantity."""
    value = _text(q.get("value"))
    cmp = _text(q.get("comparator"))
    if value is not None and cmp:
        value = f"{cmp}{value}" if cmp in ("<", "<=", ">", ">=") else f"{cmp} {value}"
    system = (q.get("system") or "").rstrip("/")
    unit = _text(q.get("code")) if system in UCUM_SYSTEMS and _text(q.get("code")) else _text(q.get("unit"))
    return value, unit or _text(q.get("code"))


def _value(res: dict) -> tuple[str | None, str | None, str | None]:
    """(value, unit, note) of ``Observation.value[x]`` / ``dataAbsentReason``."""
    if isinstance(res.get("valueQuantity"), dict):
        v, u = _quantity(res["valueQuantity"])
        return v, u, None
    if "valueString" in res:
        return _text(res["valueString"]), None, None
    if "valueCodeableConcept" in res:
        return _concept_text(res["valueCodeableConcept"]), None, None
    for key in ("valueInteger", "valueBoolean", "valueDateTime", "valueTime"):
        if key in res:
            return _text(res[key]), None, None
    if isinstance(res.get("valueRange"), dict):
        lo, u1 = _quantity(res["valueRange"].get("low") or {})
        hi, u2 = _quantity(res["valueRange"].get("high") or {})
        return f"{lo or ''}-{hi or ''}", u1 or u2, None
    if isinstance(res.get("valueRatio"), dict):
        n, _ = _quantity(res["valueRatio"].get("numerator") or {})
        d, _ = _quantity(res["valueRatio"].get("denominator") or {})
        return f"{n or ''}/{d or ''}", None, None
    other = next((k for k in res if k.startswith("value") and k[5:6].isupper()), None)
    if other:
        return None, None, f"{other} not imported"
    if "dataAbsentReason" in res:
        return None, None, f"data absent: {_concept_text(res['dataAbsentReason']) or 'unknown'}"
    return None, None, None


def _skip_reason(res: dict) -> str | None:
    """Why an Observation is not a lab result to load, or None."""
    status = _text(res.get("status"))
    if status in SKIPPED_STATUSES:
        return f"status {status}"
    cats = [c for c in (res.get("category") or []) if isinstance(c, dict)]
    codes = [_text(c.get("code")) for cat in cats for c in _codings(cat)] or [_text(cat.get("text")) for cat in cats]
    codes = [c for c in codes if c]
    if codes and not any(c.lower() in LAB_CATEGORIES for c in codes):
        return f"category {codes[0]}"
    has_value = any(k.startswith("value") and k[5:6].isupper() for k in res) or "dataAbsentReason" in res
    if res.get("component") and not has_value:
        return "has components, no value"
    if res.get("hasMember") and not has_value:
        return "panel (hasMember), no value"
    return None


def observation_row(res: dict) -> dict | str:
    """The staging row of one Observation (keys of ``_OBS_COLUMNS`` but source_row), or the skip reason."""
    reason = _skip_reason(res)
    if reason:
        return reason
    loinc, local, name = _codes(res.get("code"))
    ref, guess = _subject(res)
    value, unit, value_note = _value(res)
    period = res.get("effectivePeriod") if isinstance(res.get("effectivePeriod"), dict) else {}
    collected = res.get("effectiveDateTime") or period.get("start") or res.get("effectiveInstant")
    rr = next((r for r in (res.get("referenceRange") or []) if isinstance(r, dict)), {})
    notes = [_text(n.get("text")) for n in (res.get("note") or []) if isinstance(n, dict)]
    status = _text(res.get("status"))
    notes += [value_note, f"status {status}" if status in NOTED_STATUSES else None]
    interp = next((i for i in (res.get("interpretation") or []) if isinstance(i, dict)), None)
    flag = next((_text(c.get("code")) for c in _codings(interp) if _text(c.get("code"))), None) or _concept_text(interp)
    specimen = res.get("specimen") if isinstance(res.get("specimen"), dict) else {}
    return {
        "subject_ref": ref,
        "subject_guess": guess,
        "collected_at": _fhir_time(collected),
        "reported_at": _fhir_time(res.get("issued")),
        "specimen_id": _text(specimen.get("reference")),
        "loinc": loinc,
        "local_code": local,
        "test_name": name,
        "value": value,
        "unit": unit,
        "ref_low": _text((rr.get("low") or {}).get("value")),
        "ref_high": _text((rr.get("high") or {}).get("value")),
        "flag": flag,
        "comment": "; ".join(n for n in notes if n) or None,
    }


def patient_row(res: dict, full_url: str | None) -> dict:
    """The ``stg_patients`` row of one Patient (see the module docstring for partial dates)."""
    pid = _text(res.get("id")) or (_patient_guess(full_url) if full_url else None)
    birth = _text(res.get("birthDate"))
    row = {"patient_id": pid, "sex": _text(res.get("gender")), "birth_date": None, "age_at_ref": None, "ref_date": None}
    if birth and len(birth.strip()) == 4:
        row.update(age_at_ref="0", ref_date=f"{birth.strip()}-07-01")
    elif birth and len(birth.strip()) == 7:
        row.update(age_at_ref="0", ref_date=f"{birth.strip()}-15")
    else:
        row["birth_date"] = birth
    return row


# -- staging ----------------------------------------------------------------------------


@dataclass
class _Collector:
    """Accumulates rows of all files and appends observations to DuckDB in chunks."""

    cur: object
    obs: list[dict] = field(default_factory=list)
    patients: list[dict] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # reference spelling -> patient id
    rejects: list[tuple[int, str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def add(self, row_no: int, e: _Entry) -> None:
        if e.reject:
            self.rejects.append((row_no, e.reject, e.line or ""))
            return
        if e.resource is None:
            self.skipped["bundle entry without resource"] += 1
            return
        rtype = str(e.resource.get("resourceType"))
        if rtype == "Patient":
            self._patient(e)
        if rtype != "Observation":
            self.skipped[f"resource type {rtype}"] += 1
            return
        row = observation_row(e.resource)
        if isinstance(row, str):
            self.skipped[row] += 1
            return
        row["source_row"] = row_no
        self.obs.append(row)
        if len(self.obs) >= CHUNK_ROWS:
            self.flush()

    def _patient(self, e: _Entry) -> None:
        row = patient_row(e.resource, e.full_url)
        if not row["patient_id"]:
            return
        self.patients.append(row)
        for spelling in (f"Patient/{row['patient_id']}", e.full_url):
            if spelling:
                self.refs[spelling] = row["patient_id"]

    def flush(self) -> None:
        if not self.obs:
            return
        df = pd.DataFrame(self.obs, columns=list(_OBS_COLUMNS), dtype=object)
        self.obs = []
        cols = ", ".join("source_row::BIGINT" if c == "source_row" else f"{c}::VARCHAR" for c in _OBS_COLUMNS)
        self.cur.register("fhir_chunk_df", df)
        try:
            self.cur.execute(f"INSERT INTO fhir_obs SELECT {cols} FROM fhir_chunk_df")
        finally:
            self.cur.unregister("fhir_chunk_df")


def _table_from_rows(cur, table: str, columns: tuple[str, ...], rows: list, bigint: str | None = None) -> None:
    """Temp ``table`` with VARCHAR ``columns`` (``bigint`` one BIGINT) from Python rows."""
    df = pd.DataFrame(rows, columns=list(columns), dtype=object)
    cols = ", ".join(f"{c}::BIGINT AS {c}" if c == bigint else f"{c}::VARCHAR AS {c}" for c in columns)
    cur.register(f"{table}_df", df)
    try:
        cur.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {cols} FROM {table}_df")
    finally:
        cur.unregister(f"{table}_df")


def stage(cur, path: Path, options: ImportOptions, label: str) -> Staged:
    """Stage the Observations of ``path`` (file or folder) into ``stg``; see the module docstring."""
    paths = files(Path(path))
    cols = ", ".join(("source_row BIGINT",) + tuple(f"{c} VARCHAR" for c in _OBS_COLUMNS[1:]))
    cur.execute(f"CREATE OR REPLACE TEMP TABLE fhir_obs ({cols})")
    acc = _Collector(cur)
    offset, file_info = 0, []
    for p in paths:
        last = 0
        for entry in read_entries(p):
            acc.add(offset + entry.index, entry)
            last = entry.index
        file_info.append({"name": p.name, "first_row": offset + 1, "rows": last})
        offset += last
    acc.flush()
    _table_from_rows(cur, "fhir_refs", ("ref", "patient_id"), list(acc.refs.items()))
    staged_cols = ", ".join(
        "COALESCE(r.patient_id, o.subject_guess) AS patient_id" if c == "patient_id" else f"o.{c}"
        for c in STAGING_COLUMNS
    )
    cur.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE stg AS
        SELECT {staged_cols} FROM fhir_obs o LEFT JOIN fhir_refs r ON r.ref = o.subject_ref
        ORDER BY o.source_row
        """
    )
    cur.execute("DROP TABLE IF EXISTS fhir_obs; DROP TABLE IF EXISTS fhir_refs")
    staged = Staged(format=FORMAT, files=paths, skipped=dict(acc.skipped), date_order="iso")
    staged.options = {"files": file_info}
    if acc.patients:
        _table_from_rows(cur, "stg_patients", PATIENT_COLUMNS, [[r[c] for c in PATIENT_COLUMNS] for r in acc.patients])
        staged.has_patients = True
    if acc.rejects:
        _table_from_rows(cur, "fhir_rejects", ("source_row", "reason", "line"), acc.rejects, bigint="source_row")
        staged.rejects_table = "fhir_rejects"
        staged.rejects_label = "record cannot be read (not valid JSON or not a FHIR resource)"
    return staged
