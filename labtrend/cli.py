"""The ``labtrend`` command.

Subcommands are registered in :data:`COMMANDS`; each has an ``add_<name>_args`` and a
``cmd_<name>`` function. Exit status: 0 success, 2 a file or argument that cannot be used
(the message names it), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from labtrend import settings

EXIT_BAD_INPUT = 2


def _store(args):
    from data.db import open_store

    return open_store(settings.db_path(getattr(args, "db", None)))


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="DuckDB file (default: $LABTREND_DB, else var/labtrend.duckdb)")


# -- import ---------------------------------------------------------------------------------
def add_import_args(p):
    p.add_argument("paths", nargs="+", help="files or folders to import")
    _add_db(p)
    p.add_argument("--format", choices=["csv", "mimic", "fhir", "omop", "synthea"], help="override format detection")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--dayfirst", action="store_true", help="dates like 01.02.2024 are day.month.year")
    order.add_argument("--monthfirst", action="store_true", help="dates like 01/02/2024 are month/day/year")
    p.add_argument("--decimal", choices=[".", ","], help="decimal mark of the value column")


def cmd_import(args) -> int:
    from data.importers import ImportFileError, ImportOptions, run_import, summary_json

    store = _store(args)
    opts = ImportOptions(
        date_order="dayfirst" if args.dayfirst else "monthfirst" if args.monthfirst else None,
        decimal=args.decimal,
    )
    status = 0
    for path in args.paths:
        try:
            summary = run_import(store, path, fmt=args.format, options=opts)
        except ImportFileError as exc:
            print(f"labtrend import: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(summary_json(summary), flush=True)
    return status


# -- patients -------------------------------------------------------------------------------
def add_patients_args(p):
    _add_db(p)
    p.add_argument("--search", help="substring of the patient id")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def _emit(df, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(df.to_json(orient="records", date_format="iso", force_ascii=False))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_columns", 30):
            print(df.to_string(index=False))


def cmd_patients(args) -> int:
    from data import queries

    _emit(queries.patients(_store(args), search=args.search, limit=args.limit), args.format)
    return 0


# -- timeline -------------------------------------------------------------------------------
def add_timeline_args(p):
    p.add_argument("--patient", required=True)
    p.add_argument("--analyte", action="append", help="LOINC or local code (repeatable)")
    p.add_argument("--start", help="ISO date-time, inclusive")
    p.add_argument("--end", help="ISO date-time, inclusive")
    _add_db(p)
    p.add_argument("--format", choices=["csv", "json"], default="csv")


def cmd_timeline(args) -> int:
    import pandas as pd

    from data import queries

    store = _store(args)
    if queries.patient_info(store, args.patient) is None:
        print(f"labtrend timeline: no patient '{args.patient}' in {settings.db_path(args.db)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    start = pd.Timestamp(args.start).to_pydatetime() if args.start else None
    end = pd.Timestamp(args.end).to_pydatetime() if args.end else None
    _emit(queries.timeline(store, args.patient, analytes=args.analyte, start=start, end=end), args.format)
    return 0


# -- quarantine -----------------------------------------------------------------------------
def add_quarantine_args(p):
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--out", required=True, help="CSV file to write")
    _add_db(p)


def cmd_quarantine(args) -> int:
    from data import queries
    from data.export import quarantine_table, write_safe_csv

    df = quarantine_table(queries.quarantine_rows(_store(args), args.batch))
    write_safe_csv(df, Path(args.out))
    print(json.dumps({"batch_id": args.batch, "rows": len(df), "out": args.out}))
    return 0


# -- batches --------------------------------------------------------------------------------
def add_batches_args(p):
    _add_db(p)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def cmd_batches(args) -> int:
    from data import queries

    _emit(queries.batches(_store(args)), args.format)
    return 0


# -- demo ---------------------------------------------------------------------------------
def add_demo_args(p):
    _add_db(p)


def cmd_demo(args) -> int:
    """Build a fresh store from MIMIC-IV demo (or say where to get it) and show it."""
    from data import queries
    from data.db import open_store
    from data.importers import run_import, summary_json

    db = settings.db_path(args.db) if args.db else settings.VAR_DIR / "demo.duckdb"
    src = settings.mimic_demo_dir()
    if src is None:
        print(
            "MIMIC-IV demo data not found. Download the open MIMIC-IV Clinical Database Demo from "
            f"{settings.MIMIC_DEMO_URL} and set LABTREND_DEMO_DATA to its folder.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    for suffix in ("", ".wal"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    store = open_store(db)
    print(summary_json(run_import(store, src)))
    pats = queries.patients(store)
    print(f"\n{len(pats)} patients in {db}")
    _emit(pats.head(10), "table")
    top = queries.top_analytes(store, 20)
    print("\nMost frequent analytes:")
    _emit(top, "table")
    return 0


COMMANDS = {
    "demo": (add_demo_args, cmd_demo, "build the demo store from MIMIC-IV demo and show it"),
    "import": (add_import_args, cmd_import, "import lab exports (CSV, MIMIC-IV, FHIR, OMOP, Synthea)"),
    "patients": (add_patients_args, cmd_patients, "list patients with result counts"),
    "timeline": (add_timeline_args, cmd_timeline, "one patient's results"),
    "quarantine": (add_quarantine_args, cmd_quarantine, "export a batch's quarantined rows to CSV"),
    "batches": (add_batches_args, cmd_batches, "list import batches"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labtrend", description="LabTrend: lab histories, forecasts, expert review.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in {"dashboard", "demo"}:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return COMMANDS[args.command][1](args) or 0


if __name__ == "__main__":
    sys.exit(main())
