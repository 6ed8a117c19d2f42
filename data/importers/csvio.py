"""Reading delimited text files robustly: encoding, delimiter, header names, bad lines.

Used by every CSV-based importer. DuckDB's ``read_csv`` does the bulk reading; this module
decides the dialect first and turns DuckDB's errors into messages that name the file.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb

from data.importers.base import ImportFileError

__all__ = ["CsvDialect", "sniff", "read_csv_varchar", "transcode_to_utf8", "has_control_bytes"]


@dataclass
class CsvDialect:
    path: Path  # the file DuckDB reads (a UTF-8 copy when the original was cp1252/latin-1)
    original: Path
    encoding: str  # encoding of the original file
    delimiter: str
    header: list[str]  # as in the file, BOM stripped


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _first_line(path: Path) -> bytes:
    with _open_bytes(path) as fh:
        return fh.readline(1 << 20)


def _decode(raw: bytes, path: Path) -> tuple[str, str]:
    if raw.startswith(codecs.BOM_UTF8):
        return raw[3:].decode("utf-8", errors="strict"), "utf-8-sig"
    for enc in ("utf-8", "cp1252", "latin-1"):
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise ImportFileError(f"{path.name}: header is not text")  # latin-1 never fails; defensive


def _split_header(line: str, delim: str) -> list[str]:
    import csv

    return next(csv.reader([line], delimiter=delim))


def sniff(path: Path) -> CsvDialect:
    """Encoding of the header, delimiter and header names of a delimited file.

    Raises :class:`ImportFileError` for an empty file or one that is not delimited text.
    """
    try:
        raw = _first_line(path)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ImportFileError(f"{path.name}: cannot be read ({exc})") from exc
    if not raw.strip():
        raise ImportFileError(f"{path.name}: the file is empty (no header line)")
    if b"\x00" in raw:
        raise ImportFileError(f"{path.name}: not a text file (binary content); expected CSV or JSON")
    text, enc = _decode(raw, path)
    text = text.rstrip("\r\n")
    counts = {d: text.count(d) for d in (",", ";", "\t", "|")}
    delim = max(counts, key=counts.get)
    if counts[delim] == 0:
        raise ImportFileError(
            f"{path.name}: no delimiter found in the header line (expected ',', ';' or tab separated columns)"
        )
    header = [h.strip().lstrip("\ufeff") for h in _split_header(text, delim)]
    return CsvDialect(path=path, original=path, encoding=enc, delimiter=delim, header=header)


# C0 controls but tab, LF, VT, FF, CR; DEL (data.importers.pipeline.CONTROL_CHARACTERS, as bytes)
_C0_BYTES = bytes(range(0, 9)) + bytes(range(14, 32)) + b"\x7f"
_C1_UTF8 = re.compile(rb"\xc2[\x80-\x84\x86-\x9f]")


def has_control_bytes(path: Path) -> bool:
    """True when the (possibly gzipped) file may hold a control character the pipeline quarantines.

    A fast byte scan (about 1 GB/s) so that the per-row check runs only on files that need it:
    C0 and DEL bytes, and the UTF-8 encodings of C1 controls.
    """
    tail = b""
    with _open_bytes(path) as fh:
        while chunk := fh.read(1 << 24):
            if len(chunk.translate(None, _C0_BYTES)) != len(chunk):
                return True
            if b"\xc2" in tail + chunk[:1] + chunk and _C1_UTF8.search(tail + chunk):
                return True
            tail = chunk[-1:]
    return False


def _legacy_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: a byte that is not UTF-8 is read as cp1252, else latin-1."""
    bad = err.object[err.start : err.end]
    try:
        return bad.decode("cp1252"), err.end
    except UnicodeDecodeError:
        return bad.decode("latin-1"), err.end


codecs.register_error("labtrend-legacy-byte", _legacy_byte)


def transcode_to_utf8(path: Path, workdir: Path) -> tuple[Path, str]:
    """A UTF-8 copy of a file that is not valid UTF-8; returns (copy, encoding found).

    Every valid UTF-8 sequence is kept as it is, and only the bytes that are not UTF-8 are
    read as cp1252 (Windows lab exports: µ is 0xB5, ä 0xE4), or latin-1 for the five bytes
    cp1252 leaves undefined. A mostly UTF-8 export with one stray cp1252 byte therefore keeps
    its patient ids and units, instead of every ``é`` turning into ``Ã©``. The encoding
    returned is 'cp1252' when the file reads the same as pure cp1252, else
    'utf-8 with cp1252 bytes'.
    """
    with _open_bytes(path) as fh:
        data = fh.read()
    text = data.decode("utf-8", errors="labtrend-legacy-byte")
    try:
        pure = data.decode("cp1252")
    except UnicodeDecodeError:
        pure = data.decode("latin-1")
    enc = "cp1252" if text == pure else "utf-8 with cp1252 bytes"
    out = workdir / (path.name.removesuffix(".gz") + ".utf8.csv")
    out.write_text(text, encoding="utf-8")
    return out, enc


def _is_encoding_error(exc: Exception) -> bool:
    t = str(exc).lower()
    return "utf-8" in t or "unicode" in t or "encoding" in t


def read_csv_varchar(
    cur, dialect: CsvDialect, table: str, select_sql: str, workdir: Path | None = None, as_view: bool = False
) -> str:
    """Create temp ``table`` from the file in one pass, every column VARCHAR.

    ``select_sql`` selects the staged columns from a relation named ``raw``: the file's
    columns (named as in the header) plus ``source_row``, the 1-based data row. Lines
    DuckDB cannot split (wrong number of fields, unclosed quotes) become rows of the temp
    table ``csv_rejects`` (source_row, reason, line), and the rows after them keep their
    own row numbers. Returns the encoding used: UTF-8 (BOM or not), else the file is
    transcoded from cp1252 / latin-1. Raises :class:`ImportFileError` when unreadable.

    With ``as_view`` (``select_sql`` must keep every row, in file order) the rows go to
    ``{table}_file`` and ``table`` is a view adding ``source_row`` from the table's row
    ids: numbering rows with a window over the reader costs as much as reading the file.
    """

    # Row ids follow the file only while DuckDB preserves insertion order (its default).
    as_view = as_view and bool(cur.execute("SELECT current_setting('preserve_insertion_order')").fetchone()[0])
    target = f"{table}_file" if as_view else table
    numbering = "NULL::BIGINT" if as_view else "row_number() OVER ()"

    def attempt(path: Path) -> int:
        cur.execute("DROP TABLE IF EXISTS reject_errors; DROP TABLE IF EXISTS reject_scans")
        cur.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {target} AS
            WITH raw AS (
                SELECT {numbering} AS source_row, *
                FROM read_csv(?, delim = ?, header = true, all_varchar = true, quote = '"', escape = '"',
                              auto_detect = false, columns = {_columns_struct(dialect.header)},
                              store_rejects = true, null_padding = false, strict_mode = true)
            )
            {select_sql}
            """,
            [str(path), dialect.delimiter],
        )
        return cur.execute(
            "SELECT count(*) FROM reject_errors WHERE error_type IN ('INVALID UNICODE', 'INVALID ENCODING')"
        ).fetchone()[0]

    used = dialect.encoding
    try:
        bad_text = attempt(dialect.path)
    except (duckdb.InvalidInputException, duckdb.ConversionException) as exc:
        if not _is_encoding_error(exc):
            raise ImportFileError(f"{dialect.original.name}: cannot be read as CSV ({_short(exc)})") from exc
        bad_text = 1
    if bad_text:
        workdir = workdir or Path(tempfile.mkdtemp(prefix="labtrend-import-"))
        utf8, used = transcode_to_utf8(dialect.original, workdir)
        dialect.path = utf8
        attempt(utf8)
    cur.execute(
        """
        CREATE OR REPLACE TEMP TABLE csv_rejects AS
        SELECT DISTINCT ON (line) line - 1 AS source_row, error_type || ': ' || error_message AS reason, csv_line AS line
        FROM reject_errors ORDER BY line
        """
    )
    n_rejects = cur.execute("SELECT count(*) FROM csv_rejects").fetchone()[0]
    if n_rejects:
        _discount_blank_records(cur, dialect)
    if as_view:
        # Row ids follow the file's order (the CREATE above preserves insertion order) and
        # are contiguous for one bulk append; anything else is numbered by sorting on them.
        lo, hi, n = cur.execute(f"SELECT min(rowid), max(rowid), count(*) FROM {target}").fetchone()
        if n and hi - lo + 1 == n and not n_rejects:
            cur.execute(
                f"CREATE OR REPLACE TEMP VIEW {table} AS "
                f"SELECT rowid - {int(lo)} + 1 AS source_row, * EXCLUDE (source_row) FROM {target}"
            )
        else:  # rare: numbered into a table (renumbered below when lines were rejected)
            cur.execute(
                f"CREATE OR REPLACE TEMP TABLE {table} AS "
                f"SELECT row_number() OVER (ORDER BY rowid) AS source_row, * EXCLUDE (source_row) FROM {target}"
            )
            cur.execute(f"DROP TABLE {target}")
    if n_rejects:
        # the k-th accepted row comes after every rejected row r_i with r_i - i < k
        cur.execute(
            f"""
            UPDATE {table} SET source_row = {table}.source_row + (
                SELECT count(*) FROM (SELECT source_row - row_number() OVER (ORDER BY source_row) AS a FROM csv_rejects) r
                WHERE r.a < {table}.source_row)
            """
        )
    return used


def _blank_records(dialect: CsvDialect) -> list[int]:
    """1-based record numbers (the header is record 1) of the file's empty lines.

    DuckDB's reject line numbers count empty lines, which it skips, while data rows are
    numbered without them. Python's csv module splits records as DuckDB does (a quoted
    field may span lines) and yields an empty record for an empty line. Read only when a
    line was rejected and the file has an empty line.
    """
    with _open_bytes(dialect.path) as fh:
        data = fh.read()
    if not re.search(rb"\n\r?\n", data):  # no empty line at all
        return []
    text = data.decode("utf-8", errors="labtrend-legacy-byte")
    blanks = []
    try:
        for i, record in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter=dialect.delimiter), start=1):
            if not record:
                blanks.append(i)
    except csv.Error:  # an unclosed quote: count physical empty lines up to it instead
        blanks = [i for i, line in enumerate(text.splitlines(), start=1) if not line.strip("\r")]
    return blanks


def _discount_blank_records(cur, dialect: CsvDialect) -> None:
    """Renumber ``csv_rejects`` as data rows: minus the empty lines before each rejected line."""
    blanks = _blank_records(dialect)
    if blanks:
        cur.execute(
            "UPDATE csv_rejects SET source_row = source_row - len(list_filter(?::BIGINT[], lambda b: b < source_row + 1))",
            [blanks],
        )


def _columns_struct(header: list[str]) -> str:
    seen = {}
    parts = []
    for h in header:
        name = h or "column"
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        parts.append("'" + name.replace("'", "''") + "': 'VARCHAR'")
    return "{" + ", ".join(parts) + "}"


def _short(exc: Exception) -> str:
    text = str(exc).split("\n")[0]
    # never pass DuckDB's advice about ignore_errors to users: we handle bad lines ourselves
    return text.replace("ignore_errors", "").strip()
