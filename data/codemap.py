"""Local test codes and the site mapping file that maps them to LOINC.

Every result keeps its source's own test code (``result_keys.local_code``: ``site:K`` for the
canonical CSV's ``local_code`` column, ``mimic:50971``, ``omop:3023103``, ``<system>:<code>``
for FHIR). A result without a LOINC code in the source is keyed by the **site mapping file**
when it maps the local code, else by the local code itself. Nothing is ever mapped by the
test's name: a blood-gas potassium and a serum potassium are both called "Potassium".

**The mapping file** (CSV, UTF-8, header ``local_code,loinc,specimen,mapped_by,mapped_at,source``)
lives at ``$LABTREND_CODE_MAP``, else ``var/local_code_map.csv``; keep it under version control
like ``data/reference/``. It is append-only: the last row of a local code is its mapping, a row
with an empty ``loinc`` withdraws it, and earlier rows are its history. Each row says

* ``specimen`` of the local test: one of :data:`SPECIMENS`;
* who mapped it (``mapped_by``) and when (``mapped_at``, ISO 8601);
* ``source``: where the mapping comes from (the laboratory's test catalogue entry, the LOINC
  long common name read, the analyser's documentation).

**Specimen guard.** A mapping is refused when its specimen differs from the target LOINC code's
(``data/reference/analyte_specimens.csv``, cited per row), or when the test's names as exported
say another specimen (``whole blood``, ``blood gas``, ``ABG``/``VBG``, ``POC``, ``urine`` ...) than
the one stated. So a blood-gas potassium (6298-4, whole blood) is never merged into serum
potassium (2823-3).

**Re-keying** (:func:`rekey`): results whose local code's mapping changed move to the new
analyte code without a re-import, in the caller's transaction; units are converted to the new
analyte's canonical unit, plausibility and conflicts are recomputed, and every move is a row
of ``code_map_events`` (who, when, from, to, the mapping row, how many results).
"""

from __future__ import annotations

import csv
import functools
import getpass
import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

__all__ = ["MAP_COLUMNS", "SPECIMENS", "CodeMapError", "Mapping", "map_path", "read_map", "current_mapping",
           "latest", "file_sha256", "os_user", "target_specimen", "names_specimen", "check_mapping", "append_mapping",
           "rekey", "map_code", "local_codes", "events"]

MAP_COLUMNS = ("local_code", "loinc", "specimen", "mapped_by", "mapped_at", "source")
SPECIMENS = ("serum or plasma", "blood", "urine", "other")


class CodeMapError(ValueError):
    """A mapping file or a mapping that cannot be used; the message names the file, row and column,
    or why the mapping is refused."""


@dataclass(frozen=True)
class Mapping:
    local_code: str
    loinc: str | None  # None: the mapping is withdrawn (results keep their local code)
    specimen: str
    mapped_by: str
    mapped_at: str
    source: str
    row: int = 0  # data row in the file (1-based), 0 when not read from a file


def map_path(explicit: str | os.PathLike | None = None) -> Path:
    """The site mapping file: ``explicit``, else ``$LABTREND_CODE_MAP``, else ``var/local_code_map.csv``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LABTREND_CODE_MAP", "").strip()
    if env:
        return Path(env)
    from data import settings

    return settings.VAR_DIR / "local_code_map.csv"


def _loinc_ok(code: str) -> bool:
    from data.importers.pipeline import loinc_check_digit_ok

    return loinc_check_digit_ok(code)


def read_map(path: Path) -> list[Mapping]:
    """Every row of the mapping file in file order ([] when the file does not exist).

    Raises :class:`CodeMapError` naming the file, row and column for a wrong header, a blank
    local code, a LOINC code that fails its check digit, an unknown specimen, a missing
    ``mapped_by`` / ``mapped_at`` / ``source``, or a ``mapped_at`` that is not an ISO date.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CodeMapError(f"{path.name}: cannot be read as UTF-8 text ({exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if tuple(header) != MAP_COLUMNS:
        raise CodeMapError(f"{path.name}: header must be {','.join(MAP_COLUMNS)} (found {','.join(header) or 'none'})")
    out = []
    for i, row in enumerate(reader, start=1):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(MAP_COLUMNS):
            raise CodeMapError(f"{path.name}: row {i}: {len(row)} fields, expected {len(MAP_COLUMNS)}")
        rec = dict(zip(MAP_COLUMNS, (c.strip() for c in row)))
        m = Mapping(rec["local_code"], rec["loinc"] or None, rec["specimen"].lower(), rec["mapped_by"],
                    rec["mapped_at"], rec["source"], row=i)
        _validate(m, f"{path.name}: row {i}")
        out.append(m)
    return out


def _validate(m: Mapping, where: str) -> None:
    if not m.local_code:
        raise CodeMapError(f"{where}, column 'local_code': blank")
    from data.export import FORMULA_TRIGGERS

    for col in MAP_COLUMNS:
        value = getattr(m, col) or ""
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
            raise CodeMapError(f"{where}, column '{col}': holds a control character or line break")
        if value.startswith(FORMULA_TRIGGERS):
            raise CodeMapError(f"{where}, column '{col}': '{value}' starts with '{value[0]}', which a spreadsheet "
                               "runs as a formula; write it without that first character")
    if m.loinc is not None and not _loinc_ok(m.loinc):
        raise CodeMapError(f"{where}, column 'loinc': '{m.loinc}' is not a LOINC code (check digit)")
    if m.specimen not in SPECIMENS:
        raise CodeMapError(f"{where}, column 'specimen': '{m.specimen}' is not one of {', '.join(SPECIMENS)}")
    for col in ("mapped_by", "mapped_at") + (("source",) if m.loinc else ()):
        if not getattr(m, col):
            raise CodeMapError(f"{where}, column '{col}': blank (every mapping says who, when and on what source)")
    try:
        datetime.fromisoformat(m.mapped_at)
    except ValueError as exc:
        raise CodeMapError(f"{where}, column 'mapped_at': '{m.mapped_at}' is not an ISO 8601 date") from exc


def latest(rows: list[Mapping]) -> dict[str, Mapping]:
    """The mapping in force for each local code: its last row."""
    out: dict[str, Mapping] = {}
    for m in rows:
        out[m.local_code] = m
    return out


def current_mapping(rows: list[Mapping]) -> dict[str, str]:
    """local code -> LOINC code for the mappings in force (withdrawn ones left out)."""
    return {code: m.loinc for code, m in latest(rows).items() if m.loinc}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else ""


def os_user() -> str:
    """The operating-system user running this process (the actor of a CLI import)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


# -- specimen guard -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _specimens() -> dict[str, tuple[str, str]]:
    from data.catalogue import reference_file

    frame = pd.read_csv(reference_file("analyte_specimens.csv"), dtype=str, keep_default_na=False)
    if list(frame.columns) != ["code", "specimen", "loinc_name", "source"]:
        raise ValueError(f"analyte_specimens.csv: columns {list(frame.columns)}")
    return {r.code: (r.specimen, r.loinc_name) for r in frame.itertuples(index=False)}


def target_specimen(loinc: str) -> tuple[str, str] | None:
    """(specimen, LOINC long name) of ``loinc`` from ``analyte_specimens.csv``, or None when not on file."""
    return _specimens().get(loinc)


# Words in a test's exported name that say which specimen it was measured in.
_NAME_SPECIMENS = (
    ("blood", re.compile(r"\b(blood gas|whole blood|wb|abg|vbg|cbg|bga|arterial|venous|capillary|poc|"
                         r"point[- ]of[- ]care|i-?stat|blutgas|vollblut)\b", re.I)),
    ("urine", re.compile(r"\b(urine|urin|ur|harn)\b", re.I)),
    ("serum or plasma", re.compile(r"\b(serum|plasma|ser/plas|ser|plas)\b", re.I)),
)


def names_specimen(names: list[str]) -> tuple[str, str] | None:
    """(specimen, the name that says so) when the exported names of a test name one specimen, else None."""
    found = {}
    for name in names:
        for specimen, pattern in _NAME_SPECIMENS:
            if isinstance(name, str) and pattern.search(name):
                found.setdefault(specimen, name)
    return next(iter(found.items())) if len(found) == 1 else None


def check_mapping(m: Mapping, names: list[str] | None = None) -> None:
    """Refuse a mapping whose specimen contradicts its target or the test's own names.

    Raises :class:`CodeMapError` (the message says which specimen each side has).
    """
    _validate(m, f"mapping of {m.local_code}")
    if m.loinc is None:
        return
    said = names_specimen(list(names or []))
    if said and said[0] != m.specimen:
        raise CodeMapError(
            f"{m.local_code} is exported as '{said[1]}', a {said[0]} test, but the mapping says {m.specimen}: "
            "state the specimen the laboratory measures it in")
    target = target_specimen(m.loinc)
    if target and target[0] != m.specimen:
        raise CodeMapError(
            f"{m.local_code} ({m.specimen}) cannot be mapped to {m.loinc} '{target[1]}' ({target[0]}): a result "
            f"measured in {m.specimen} is not the same test; choose the LOINC code for {m.specimen}")


def append_mapping(path: Path, m: Mapping) -> None:
    """Append one row to the mapping file (created with its header when absent), atomically.

    Written by the product's one CSV writer (:func:`data.export.csv_text`); :func:`_validate`
    has refused any field a spreadsheet would run as a formula, so the row is written as given."""
    from data.export import csv_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text(encoding="utf-8-sig") if path.is_file() else ""
    row = pd.DataFrame([[m.local_code, m.loinc or "", m.specimen, m.mapped_by, m.mapped_at, m.source]],
                       columns=list(MAP_COLUMNS), dtype=object)
    text = csv_text(row, lineterminator="\n")  # fields hold no CR or LF (_validate)
    if old.strip():
        text = ("" if old.endswith("\n") else "\n") + text.split("\n", 1)[1]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(old + text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- re-keying -------------------------------------------------------------------------------
def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def rekey(cur, rows: list[Mapping], by: str, map_file: Path | None = None, strict: bool = False) -> list[dict]:
    """Move results whose local code's mapping changed to the analyte code it now gives.

    Runs in the caller's write transaction ``cur``. A key (one exported analyte, unit and
    local code without a LOINC code of its own) whose analyte code is not the one the mapping
    gives gets a new ``result_keys`` row (factor to the new analyte's canonical unit); its
    results move there, ``implausible`` and ``conflicting`` are recomputed, and one row per
    local code goes to ``code_map_events``. Returns those events as dicts.

    A key whose unit cannot be converted to the target's canonical unit is left where it is
    (``strict``: raises :class:`CodeMapError` instead, writing nothing more).
    """
    from data.importers.pipeline import _unit_map

    current = latest(rows)
    wanted = {code: m.loinc for code, m in current.items()}
    if not wanted:
        return []
    keys = cur.execute(
        "SELECT key_id, analyte_code, analyte_name, unit, unit_canonical, factor, unit_missing, local_code "
        "FROM result_keys WHERE loinc IS NULL AND list_contains(?::VARCHAR[], local_code)",
        [list(wanted)],
    ).df()
    keys["target"] = [wanted[c] or c for c in keys["local_code"]]
    moving = keys[keys["target"] != keys["analyte_code"]]
    if moving.empty:
        return []
    pairs = moving.groupby(["target", "unit"], dropna=False, sort=False).size().reset_index(name="n")
    umap = _unit_map(cur, pairs.rename(columns={"target": "analyte_code"}))
    umap = {(a, u): (f, c, e, miss) for a, u, f, c, e, miss in umap.itertuples(index=False)}
    file_id = f"{Path(map_file).name}@{file_sha256(map_file)[:12]}" if map_file else None
    events = []
    for code, grp in moving.groupby("local_code", sort=True):
        m = current[code]
        moved = 0
        olds = set()
        for k in grp.itertuples(index=False):
            factor, canonical, error, missing = umap[(k.target, k.unit)]
            if error is not None:
                if strict:
                    raise CodeMapError(f"{code} -> {k.target}: {error}; nothing changed")
                continue
            new_id = _key_for(cur, k, k.target, canonical, factor, bool(missing))
            n = cur.execute("SELECT count(*) FROM results WHERE key_id = ?", [int(k.key_id)]).fetchone()[0]
            cur.execute("UPDATE results SET key_id = ? WHERE key_id = ?", [new_id, int(k.key_id)])
            _recheck(cur, new_id, k.analyte_code, k.target)
            cur.execute("DELETE FROM result_keys WHERE key_id = ? AND NOT EXISTS "
                        "(SELECT 1 FROM results WHERE key_id = ?)", [int(k.key_id), int(k.key_id)])
            moved += n
            olds.add(k.analyte_code)
        if not olds:
            continue
        event = dict(logged_at=_now(), username=by, local_code=code, old_analyte=", ".join(sorted(olds)),
                     new_analyte=wanted[code] or code, loinc=m.loinc, specimen=m.specimen, mapped_by=m.mapped_by,
                     mapped_at=m.mapped_at, source=m.source, map_file=file_id, results_moved=int(moved))
        cur.execute(
            "INSERT INTO code_map_events (logged_at, username, local_code, old_analyte, new_analyte, loinc, specimen, "
            "mapped_by, mapped_at, source, map_file, results_moved) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            list(event.values()))
        events.append(event)
    return events


def _key_for(cur, k, analyte: str, canonical, factor, missing: bool) -> int:
    """The result_keys id of ``k`` re-keyed to ``analyte`` (created when new)."""
    same = ("analyte_code = ? AND loinc IS NULL AND analyte_name IS NOT DISTINCT FROM ? AND unit IS NOT DISTINCT FROM ? "
            "AND unit_canonical IS NOT DISTINCT FROM ? AND factor IS NOT DISTINCT FROM ? AND unit_missing = ? "
            "AND local_code = ?")
    f = None if factor is None or pd.isna(factor) else float(factor)
    args = [analyte, _none(k.analyte_name), _none(k.unit), _none(canonical), f, missing, k.local_code]
    row = cur.execute(f"SELECT key_id FROM result_keys WHERE {same}", args).fetchone()
    if row:
        return int(row[0])
    new_id = cur.execute("SELECT COALESCE(max(key_id), 0) + 1 FROM result_keys").fetchone()[0]
    cur.execute(
        "INSERT INTO result_keys (key_id, analyte_code, loinc, analyte_name, unit, unit_canonical, factor, "
        "unit_missing, local_code) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?)",
        [new_id, analyte, _none(k.analyte_name), _none(k.unit), _none(canonical), f, missing, k.local_code])
    return int(new_id)


def _none(v):
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


def _recheck(cur, key_id: int, old_analyte: str, new_analyte: str) -> None:
    """Plausibility of the moved results against the new analyte; conflicts at the times they
    left and joined (the rule of data.importers.pipeline: another value at the same time)."""
    cur.execute(
        """
        UPDATE results SET implausible = COALESCE(results.result_kind IN ('numeric', 'censored')
            AND NOT k.unit_missing AND (results.value_num * k.factor < a.plausible_low
                                        OR results.value_num * k.factor > a.plausible_high), false)
        FROM result_keys k LEFT JOIN analytes a ON a.code = k.analyte_code
        WHERE k.key_id = results.key_id AND results.key_id = ?
        """, [key_id])
    cur.execute(
        """
        CREATE OR REPLACE TEMP TABLE rekey_groups AS
        SELECT DISTINCT l.patient_id, c.code AS analyte_code, l.collected_at
        FROM lab_results l, (SELECT unnest([?, ?]) AS code) c
        WHERE l.result_id IN (SELECT (batch_id::BIGINT << 32) + source_row FROM results WHERE key_id = ?)
        """, [old_analyte, new_analyte, key_id])
    cur.execute(
        """
        UPDATE results SET conflicting = g.n > 1
        FROM (
            SELECT l.batch_id, l.source_row, count(DISTINCT COALESCE(l.comparator || printf('%.9g', l.value_canonical),
                   'as written:' || COALESCE(l.value_text, ''))) OVER (PARTITION BY l.patient_id, l.analyte_code,
                   l.collected_at) AS n
            FROM lab_results l SEMI JOIN rekey_groups r
              ON r.patient_id = l.patient_id AND r.analyte_code = l.analyte_code AND r.collected_at = l.collected_at
        ) g
        WHERE results.batch_id = g.batch_id AND results.source_row = g.source_row
        """)
    cur.execute("DROP TABLE rekey_groups")


def map_code(store, path: Path, local_code: str, loinc: str | None, specimen: str, source: str, by: str) -> dict:
    """Map ``local_code`` to ``loinc`` (None: withdraw the mapping) for the whole store, now.

    Checks the mapping (:func:`check_mapping` against the names the store holds for the code),
    re-keys the store in one transaction (:func:`rekey`, strict: a unit that does not convert
    refuses the mapping), then appends the row to the mapping file. Returns the event
    (``results_moved`` 0 when nothing had to move). Raises :class:`CodeMapError`; on error
    neither the store nor the file changes.
    """
    m = Mapping(local_code=(local_code or "").strip(), loinc=(loinc or "").strip() or None,
                specimen=(specimen or "").strip().lower(), mapped_by=(by or "").strip(),
                mapped_at=_now().strftime("%Y-%m-%dT%H:%M:%SZ").replace("Z", "+00:00"), source=(source or "").strip())
    with store.read() as cur:
        names = [r[0] for r in cur.execute(
            "SELECT DISTINCT analyte_name FROM result_keys WHERE local_code = ? AND analyte_name IS NOT NULL",
            [m.local_code]).fetchall()]
    check_mapping(m, names)
    rows = read_map(path) + [m]
    with store.write() as cur:
        events = rekey(cur, rows, by=m.mapped_by, map_file=None, strict=True)
        append_mapping(path, m)  # inside the transaction: a failed write rolls the re-keying back
    return events[0] if events else {"local_code": m.local_code, "new_analyte": m.loinc or m.local_code,
                                     "results_moved": 0}


def local_codes(store) -> pd.DataFrame:
    """Every local code the store holds results for, without a LOINC code from the source:
    ``local_code, analyte_code (what it is keyed by now), mapped (bool), names, units, n_results,
    n_patients, first, last``; unmapped first, most results first."""
    with store.read() as cur:
        return cur.execute(
            """
            SELECT k.local_code, any_value(k.analyte_code) AS analyte_code,
                   bool_or(k.analyte_code <> k.local_code) AS mapped,
                   string_agg(DISTINCT k.analyte_name, ' | ') AS names,
                   string_agg(DISTINCT k.unit, ' | ') AS units,
                   count(r.key_id) AS n_results, count(DISTINCT r.patient_id) AS n_patients,
                   min(r.collected_at) AS first, max(r.collected_at) AS last
            FROM result_keys k JOIN results r ON r.key_id = k.key_id
            WHERE k.loinc IS NULL AND k.local_code IS NOT NULL
            GROUP BY k.local_code
            ORDER BY mapped, n_results DESC, k.local_code
            """
        ).df()


def events(store, limit: int = 200) -> pd.DataFrame:
    """The latest re-keying events (``code_map_events``), newest first."""
    with store.read() as cur:
        return cur.execute("SELECT * FROM code_map_events ORDER BY event_id DESC LIMIT ?", [limit]).df()
