"""What every importer hands to the common load pipeline.

An importer reads one export and creates, on the import's transaction cursor, a
temporary table ``stg`` with exactly :data:`STAGING_COLUMNS` (all VARCHAR except
``source_row``), one row per source result row, values as written in the file. It may
also create ``stg_patients`` (:data:`PATIENT_COLUMNS`) and report rows it skipped on
purpose (``skipped``: reason -> count), e.g. Synthea observations that are not labs.
Everything else (value parsing, units, quarantine, duplicates, flags) is the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STAGING_COLUMNS", "PATIENT_COLUMNS", "ImportFileError", "ImportOptions", "Staged"]

STAGING_COLUMNS = (
    "source_row",  # BIGINT, 1-based data row of the source (file line = row + 1 for CSV with header)
    "patient_id",
    "collected_at",  # ISO 'YYYY-MM-DD[ HH:MM[:SS]][+HH:MM|Z]' or the file's own format (see date_order)
    "reported_at",
    "specimen_id",
    "loinc",  # LOINC code when the source gives one
    "local_code",  # the source's own test code as 'source:code' ('site:K', 'mimic:50934'), kept with the result
    "test_name",  # display name as given
    "value",  # the result as given
    "unit",  # as given
    "ref_low",
    "ref_high",
    "flag",
    "comment",
)

PATIENT_COLUMNS = ("patient_id", "sex", "birth_date", "age_at_ref", "ref_date")


class ImportFileError(Exception):
    """A file that cannot be read at all. Nothing is written; the CLI exits with status 2.

    The message names the file and what is missing or wrong.
    """


@dataclass
class ImportOptions:
    # 'dayfirst' | 'monthfirst' | None (decide from the data; stop when ambiguous)
    date_order: str | None = None
    # '.' | ',' | None (decide from the data)
    decimal: str | None = None
    # file encoding; None = UTF-8 (with or without BOM), falling back to cp1252 / latin-1
    encoding: str | None = None
    # IANA zone of local times written without an offset; None = the site's zone
    # (LABTREND_TIMEZONE), and without one the times are stored as written (zone unknown)
    timezone: str | None = None
    # the export's dates are shifted on purpose (de-identified): no after-import flag, no zone
    shifted_dates: bool = False
    # the site mapping file of local codes (data.codemap); None = LABTREND_CODE_MAP / var/local_code_map.csv
    code_map: str | None = None


@dataclass
class Staged:
    format: str
    # reason -> number of source rows deliberately not loaded (not errors)
    skipped: dict[str, int] = field(default_factory=dict)
    # how the file was read (encoding, delimiter, decimal mark, date order), stored with the batch
    options: dict = field(default_factory=dict)
    has_patients: bool = False
    # stg_admissions (patient_id, admission_id, admitted_at, discharged_at, admission_type) was staged
    has_admissions: bool = False
    # order of non-ISO dates in stg: 'dayfirst' / 'monthfirst'; None = decide from the data;
    # 'iso' = the format guarantees ISO 8601 (FHIR), so anything else is an unreadable time
    date_order: str | None = None
    # decimal mark of the value column: '.' or ','; None = decide from the data
    decimal: str | None = "."
    files: list[Path] = field(default_factory=list)
    # temp table of lines/records that could not be read: (source_row, reason, line)
    rejects_table: str | None = None
    # how those rows are summarised in the import summary
    rejects_label: str = "line cannot be read (wrong number of fields or quoting)"
    # the source declares its dates shifted (MIMIC-IV de-identification): they carry no time
    # zone, and a collection time after the import is expected, not flagged
    shifted_dates: bool = False
    # False when the importer has checked the raw bytes and found no control character, so the
    # pipeline's per-row check (CONTROL_CHARACTERS) can be skipped
    control_possible: bool = True
