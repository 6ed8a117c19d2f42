"""The ``labtrend`` command.

Subcommands are registered in :data:`COMMANDS`; each has an ``add_<name>_args`` and a
``cmd_<name>`` function. Exit status: 0 success, 2 a file or argument that cannot be used
(the message names it), 1 anything unexpected.

Every command that reads or writes patient data or accounts is audited in the store it used
(:mod:`data.audit`), as the operating-system account that ran it: :data:`AUDITED` names the
action of each, ``import`` writes one row per file, ``train`` is audited by ``train.py`` itself
and user changes by :mod:`data.users`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from data import settings

EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the database stayed held by another process past the retry budget


class NoDatabase(Exception):
    """A command that reads the store was pointed at a file that does not exist."""


def _db_path(args, create: bool = False):
    """The database file of ``--db``; only ``import`` (``create=True``) may name one that does
    not exist yet, so a mistyped path is an error instead of a new, empty database.

    Raises :class:`NoDatabase` when the file is missing and ``create`` is False.
    """
    path = settings.db_path(getattr(args, "db", None))
    if not create and str(path) != ":memory:" and not Path(path).is_file():
        raise NoDatabase(f"no database at {path}; import lab results first (labtrend import FILE --db {path})")
    return path


def _store(args, create: bool = False):
    """The store of ``--db`` (:func:`_db_path`), migrated."""
    from data.db import open_store

    return open_store(_db_path(args, create))


def _add_db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="DuckDB file (default: $LABTREND_DB, else var/labtrend.duckdb)")


def _audit_cli(store, action: str, patient_id: str | None = None, detail: dict | None = None) -> None:
    """One audit row for an action of this command, as the OS account that runs it (role 'cli')."""
    from data import audit

    user, who = audit.cli_actor()
    audit.record(store, user, [audit.CLI_ROLE], action, patient_id, {**(detail or {}), **who})


# -- import ---------------------------------------------------------------------------------
def add_import_args(p):
    p.add_argument("paths", nargs="+", help="files or folders to import")
    _add_db(p)
    p.add_argument("--format", choices=["csv", "mimic", "fhir", "omop", "synthea"], help="override format detection")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--dayfirst", action="store_true", help="dates like 01.02.2024 are day.month.year")
    order.add_argument("--monthfirst", action="store_true", help="dates like 01/02/2024 are month/day/year")
    p.add_argument("--decimal", choices=[".", ","], help="decimal mark of the value column")
    p.add_argument("--timezone", help="IANA zone of times written without an offset, e.g. Europe/Berlin "
                                      "(default: $LABTREND_TIMEZONE; without one, times are stored as written)")
    p.add_argument("--shifted-dates", action="store_true",
                   help="the export's dates are shifted for de-identification: times after the import are expected")
    p.add_argument("--code-map", help="site mapping file of local test codes to LOINC "
                                      "(default: $LABTREND_CODE_MAP, else var/local_code_map.csv)")


def cmd_import(args) -> int:
    from data.importers import ImportFileError, ImportOptions, run_import, summary_json

    store = _store(args, create=True)
    opts = ImportOptions(
        date_order="dayfirst" if args.dayfirst else "monthfirst" if args.monthfirst else None,
        decimal=args.decimal, timezone=args.timezone, shifted_dates=args.shifted_dates, code_map=args.code_map,
    )
    status = 0
    for path in args.paths:
        try:
            summary = run_import(store, path, fmt=args.format, options=opts)
        except ImportFileError as exc:
            print(f"labtrend import: {exc}", file=sys.stderr)
            _audit_cli(store, "import", detail={"file": str(path), "status": "rejected", "message": str(exc)})
            status = EXIT_BAD_INPUT
            continue
        _audit_cli(store, "import", detail={
            "file": str(path), "status": "already imported" if summary.already_imported else "complete",
            **{k: getattr(summary, k) for k in ("batch_id", "format", "rows_read", "rows_loaded", "rows_quarantined",
                                                "rows_skipped", "patients")}})
        print(summary_json(summary), flush=True)
    return status


# -- patients -------------------------------------------------------------------------------
def add_patients_args(p):
    _add_db(p)
    p.add_argument("--search", help="substring of the patient id")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def _emit(df, fmt: str) -> None:
    if fmt == "csv":  # the product's one CSV writer: spreadsheet formulas neutralised
        from data.export import write_csv

        write_csv(df, sys.stdout)
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
    from data.export import quarantine_table, write_csv

    store = _store(args)
    known = queries.batches(store)["batch_id"].tolist()
    if args.batch not in known:
        print(f"labtrend quarantine: no import batch {args.batch} in {store.settings.path} "
              f"(batches: {', '.join(map(str, sorted(known))) or 'none'})", file=sys.stderr)
        return 2
    df = quarantine_table(queries.quarantine_rows(store, args.batch))
    write_csv(df, Path(args.out))
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
DEMO_ROLES = ("clinician", "expert", "analyst", "admin")


def add_demo_args(p):
    _add_db(p)
    p.add_argument("--model", help="model folder (default: var/demo-model)")
    p.add_argument("--retrain", action="store_true", help="fine-tune again even if a model exists")
    p.add_argument("--predict-patients", type=int, default=3,
                   help="patients whose outputs are computed and stored for expert review")
    p.add_argument("--holdout", type=int, default=10,
                   help="patients kept out of training (every n-th by id); the review and monitoring patients "
                        "are taken from them, so what the dashboard shows is out of sample")
    p.add_argument("--no-serve", action="store_true", help="prepare everything but do not start the dashboard")
    p.epilog = "Other options are passed to 'streamlit run', e.g. --server.port 8600"


DEMO_CARD = "model_card_mimic"  # benchmarks/results/<this>/: README.md + model_card.json (forecast_quality.py mimic)
DEMO_CARD_LEGACY = "model_card_mimic_fold0"  # benchmarks/results/<this>.json / .md, written before the README cards


def _demo_model_card(model_dir: Path) -> bool:
    """Give the demo model the committed MIMIC-IV demo model card when it has none (``labtrend evaluate``
    takes ~15 CPU minutes); its meta says what it evaluated. The card lands as the folder's
    ``README.md`` (Hugging Face's convention) and ``model_card.json``. True when copied."""
    import json

    results = settings.PROJECT_ROOT / "benchmarks" / "results"
    folder = results / DEMO_CARD
    src, md = (folder / "model_card.json", folder / "README.md") if (folder / "model_card.json").is_file() else (
        results / f"{DEMO_CARD_LEGACY}.json", results / f"{DEMO_CARD_LEGACY}.md")
    if (model_dir / "model_card.json").is_file() or not src.is_file():
        return False
    note = ("Evaluation of the same training recipe (same pretrained checkpoint and settings) on held-out patients of "
            "MIMIC-IV demo (benchmarks/results); the model in this folder was trained on the other patients")
    card = json.loads(src.read_text(encoding="utf-8"))
    measured, own = _card_parameters(card), _model_parameters(model_dir)
    if measured and own and measured != own:  # the committed card predates the current architecture
        note = (f"Evaluation of an EARLIER version of this training recipe ({measured:,} parameters; this model has "
                f"{own:,}) on held-out patients of MIMIC-IV demo (benchmarks/results): its figures are not this "
                "model's; run `labtrend evaluate` to measure this one")
    card.setdefault("meta", {})["note"] = note
    (model_dir / "model_card.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
    if md.is_file():
        text = md.read_text(encoding="utf-8")
        header = ""
        if text.startswith("---\n") and "\n---\n" in text[4:]:  # keep the Hugging Face metadata block first
            end = text.index("\n---\n", 4) + len("\n---\n")
            header, text = text[:end], text[end:]
        (model_dir / "README.md").write_text(f"{header}\n> {note}.\n\n{text.lstrip()}", encoding="utf-8")
    return True


def _card_parameters(card: dict) -> int | None:
    """Parameters of the fine-tuned model a committed card measured (its first training report), or None."""
    reports = (card.get("meta") or {}).get("training_reports") or {}
    for runs in reports.values():
        for r in runs or []:
            if isinstance(r, dict) and r.get("n_parameters"):
                return int(r["n_parameters"])
    return None


def _model_parameters(model_dir: Path) -> int | None:
    """Parameters of the trained model in ``model_dir`` (its ``run.json`` report), or None."""
    import json

    run = model_dir / "run.json"
    n = json.loads(run.read_text()).get("report", {}).get("n_parameters") if run.is_file() else None
    return int(n) if n else None


def _print_training_warnings(model_dir: Path) -> None:
    """Repeat what ``run.json`` says a reader must know (undertrained, trained from scratch, budget overrun)."""
    import json

    run = model_dir / "run.json"
    warnings = json.loads(run.read_text()).get("warnings", []) if run.is_file() else []
    for w in warnings:
        print(f"      WARNING: {w}", flush=True)


def _demo_holdout(patients, n: int) -> list[str]:
    """``n`` patients spread over the id order (every k-th), never used to train the demo model."""
    ids = sorted(patients["patient_id"].astype(str))
    if n <= 0 or not ids:
        return []
    step = max(1, len(ids) // n)
    return ids[step // 2 :: step][:n]


def _model_excludes(model_dir: Path, holdout: list[str]) -> bool:
    """True when ``model_dir`` holds a model trained without exactly these patients."""
    import hashlib
    import json

    f = model_dir / "patients.json"
    if not (model_dir / "config.json").is_file() or not f.is_file():
        return False
    want = hashlib.sha256("\n".join(holdout).encode()).hexdigest() if holdout else None
    return json.loads(f.read_text()).get("excluded_sha256") == want


def _demo_source(work: Path) -> tuple[Path, str]:
    """MIMIC-IV demo when present; otherwise the project's synthetic cohort (and say so)."""
    src = settings.mimic_demo_dir()
    if src is not None:
        return src, "MIMIC-IV Clinical Database Demo v2.2"
    from model.synthetic import generate_cohort, to_canonical_csv

    print(
        "MIMIC-IV demo data not found: download the open MIMIC-IV Clinical Database Demo from "
        f"{settings.MIMIC_DEMO_URL} and set LABTREND_DEMO_DATA to its folder.\n"
        "Falling back to LabTrend's synthetic cohort (simulated patients, not real data).",
        file=sys.stderr,
    )
    history, _ = generate_cohort(100, seed=0)
    path = work / "synthetic_cohort.csv"
    to_canonical_csv(history, path)
    return path, "LabTrend synthetic cohort (simulated)"


def _demo_users(store) -> dict[str, str]:
    """One account per role with a fresh random password, printed once (bcrypt hashes are stored)."""
    import secrets

    from data import users

    existing = {u["username"] for u in users.list_users(store)}
    created = {}
    actor = users.Actor.cli()
    for role in DEMO_ROLES:
        name = f"demo-{role}"
        if name in existing:
            continue
        password = secrets.token_urlsafe(9)
        users.add_user(store, name, f"Demo {role}", role, password, by=actor)
        created[name] = password
    return created


def cmd_demo(args) -> int:
    """Fresh store from MIMIC-IV demo (or the synthetic cohort), a trained model, then the dashboard."""
    import os

    from data.db import open_store
    from data.importers import run_import, summary_json

    settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
    db = settings.db_path(args.db) if args.db else settings.VAR_DIR / "demo.duckdb"
    model_dir = settings.model_dir(args.model) if args.model else settings.VAR_DIR / "demo-model"
    src, label = _demo_source(settings.VAR_DIR)
    for suffix in ("", ".wal"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    store = open_store(db)
    print(f"[1/4] importing {label} into {db}", flush=True)
    summary = run_import(store, src)
    _audit_cli(store, "import", detail={"file": str(src), "status": "complete", "batch_id": summary.batch_id,
                                        "rows_loaded": summary.rows_loaded, "command": "demo"})
    print(summary_json(summary), flush=True)

    from data import queries

    pats = queries.patients(store)
    holdout = _demo_holdout(pats, args.holdout)
    holdout_file = settings.VAR_DIR / "demo-holdout.txt"
    holdout_file.write_text("".join(f"{p}\n" for p in holdout))
    if args.retrain or not _model_excludes(model_dir, holdout):
        print(f"[2/4] fine-tuning the forecaster into {model_dir} from the pretrained checkpoint "
              f"{settings.pretrained_dir()}, {len(holdout)} patients held out (about 5 minutes on 2 CPU cores)",
              flush=True)
        import train

        rc = train.main(["--db", str(db), "--out", str(model_dir), "--exclude-patients", str(holdout_file)])
        if rc != 0:
            print("labtrend demo: training failed; see the messages above", file=sys.stderr)
            return rc
    else:
        print(f"[2/4] using the trained model in {model_dir}", flush=True)
    _print_training_warnings(model_dir)

    import time

    t_outputs = time.perf_counter()
    print(f"[3/4] computing forecasts, anomalies, explanations and recommendations for "
          f"{args.predict_patients} patients (labtrend score; stored for expert review)", flush=True)
    from clinical.predict import replay_forecasts
    from labtrend.scoring import ScoreConfig, run_scoring
    from model.inference import ForecastPipeline

    if label.startswith("MIMIC-IV") and _demo_model_card(model_dir):
        print(f"      model card: the committed evaluation of this training recipe on MIMIC-IV demo "
              f"(benchmarks/results) copied into {model_dir.name}/README.md", flush=True)

    held = pats[pats["patient_id"].isin(holdout)].sort_values(["n_results", "patient_id"], ascending=[False, True])
    review = held["patient_id"].head(args.predict_patients).astype(str).tolist()
    if review:
        # a few patients: in this process (a pool's workers would each import torch and load the model first,
        # which costs more than the second core saves; 23 s against 54 s for these three on a busy 2-core machine)
        summary = run_scoring(ScoreConfig(db_path=str(db), model_dir=str(model_dir)), patients=review,
                              engine="serial" if len(review) <= 4 else "process")
        kinds = summary["by_kind"]
        print(f"      {summary['scored']} patients scored by {summary['workers']} workers: "
              f"{kinds.get('forecast', 0)} forecasts, {kinds.get('anomaly', 0)} anomalies, "
              f"{kinds.get('explanation', 0)} explanations, {kinds.get('recommendation', 0)} recommendations"
              + (f"; failed: {summary['failures']}" if summary["failed"] else ""), flush=True)
    pipe = ForecastPipeline.from_pretrained(model_dir)
    for pid in review:
        _audit_cli(store, "predict", pid, {"model_version": pipe.model_version, "command": "demo"})
    n_replayed = sum(len(replay_forecasts(store, pipe, pid)) for pid in held["patient_id"])
    print(f"      {n_replayed} forecasts replayed at past collection times of the {len(held)} held-out patients "
          "(their targets have arrived: the Model page's monitoring scores them)", flush=True)
    print(f"      outputs computed and stored in {time.perf_counter() - t_outputs:.1f} s", flush=True)

    created = _demo_users(store)
    if created:
        print(f"\nDemo accounts (passwords shown once; bcrypt hashes stored in {db}):")
        for name, password in created.items():
            print(f"    {name:16s} {password}")
    else:
        print(f"\nDemo accounts already exist in {db} (new password: 'labtrend users reset-password').")
    if args.no_serve:
        return 0
    print("[4/4] starting the dashboard (Ctrl+C to stop)", flush=True)
    env = dict(os.environ, LABTREND_DB=str(db.resolve()), LABTREND_MODEL=str(model_dir.resolve()))
    return _serve_dashboard(env, args.extra)


# -- train --------------------------------------------------------------------------------
def add_train_args(p):
    import train

    train.add_arguments(p)


def cmd_train(args) -> int:
    """Pretrain and/or fine-tune the forecaster (``train.py``; same flags)."""
    import train

    return train.main(namespace=args)


# -- dashboard ------------------------------------------------------------------------------
def add_dashboard_args(p):
    _add_db(p)
    p.add_argument("--model", help="model folder (default: $LABTREND_MODEL, else var/model)")
    p.add_argument("--model-url", help="use the model served by 'labtrend serve-model' at this URL instead of "
                                       "running it in-process (default: $LABTREND_MODEL_URL)")
    p.add_argument("--idle-minutes", type=float,
                   help=f"a session ends after this many minutes without activity "
                        f"(default: $LABTREND_SESSION_IDLE_MINUTES, else {settings.SESSION_IDLE_MINUTES:g})")
    p.add_argument("--session-hours", type=float,
                   help=f"a session ends this many hours after the sign-in "
                        f"(default: $LABTREND_SESSION_MAX_HOURS, else {settings.SESSION_MAX_HOURS:g})")
    p.epilog = ("Other options are passed to 'streamlit run', e.g. --server.port 8600. The server listens on "
                "127.0.0.1 only unless --server.address says otherwise (e.g. 0.0.0.0 behind a TLS proxy).")


def streamlit_options(extra: list[str]) -> list[str]:
    """Every setting of the project's ``.streamlit/config.toml`` as ``--section.option=value`` flags for
    ``streamlit run``, except those ``extra`` (the user's own flags, which come after) sets.

    Streamlit reads ``.streamlit/config.toml`` only from the working folder, so without the flags a
    dashboard started from another folder would listen on every interface, show full error details
    and send usage statistics. Raises FileNotFoundError when the project's file is missing.
    """
    import tomllib

    config = tomllib.loads(settings.STREAMLIT_CONFIG.read_text(encoding="utf-8"))
    given = {a[2:].split("=", 1)[0] for a in extra if a.startswith("--")}
    flags = []
    for section, options in config.items():
        for name, value in options.items():
            key = f"{section}.{name}"
            if key in given:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{key}={text}")
    return flags


def dashboard_command(extra: list[str]) -> list[str]:
    """``python -m streamlit run dashboard/server.py`` with :func:`streamlit_options`, then ``extra``."""
    app = settings.PROJECT_ROOT / "dashboard" / "server.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), *streamlit_options(extra), *extra]


def _serve_dashboard(env: dict, extra: list[str]) -> int:
    import subprocess

    try:
        return subprocess.call(dashboard_command(extra), env=env)
    except KeyboardInterrupt:
        return 0


def cmd_dashboard(args) -> int:
    """Serve the dashboard (:func:`dashboard_command`) with the store, model and session policy passed by environment."""
    import os

    from data import users

    env = dict(os.environ)
    db = settings.db_path(args.db)
    env["LABTREND_DB"] = str(db.resolve())
    env["LABTREND_MODEL"] = str(settings.model_dir(args.model).resolve())
    url = settings.model_url(args.model_url)
    if url:  # forecasts and explanations from the model server (else the model runs in the dashboard)
        env["LABTREND_MODEL_URL"] = url
    try:
        if args.idle_minutes is not None:
            env["LABTREND_SESSION_IDLE_MINUTES"] = str(settings.session_idle_minutes(args.idle_minutes))
        if args.session_hours is not None:
            env["LABTREND_SESSION_MAX_HOURS"] = str(settings.session_max_hours(args.session_hours))
    except ValueError as exc:
        print(f"labtrend dashboard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if Path(db).is_file() and not users.has_users(_store(args)):
        legacy = settings.legacy_users_file()
        hint = (f"; the accounts of {legacy} can be copied in with 'labtrend users import --file {legacy}'"
                if legacy.is_file() else "")
        print(f"labtrend dashboard: no user accounts in {db}; create one first with 'labtrend users add "
              f"--username NAME --name \"Full Name\" --role admin'{hint}", file=sys.stderr)
    return _serve_dashboard(env, args.extra)


# -- users --------------------------------------------------------------------------------
def add_users_args(p):
    from data.users import ROLES

    sub = p.add_subparsers(dest="users_command", required=True)

    def command(name: str, help_: str, username: bool = True):
        c = sub.add_parser(name, help=help_, description=help_)
        if username:
            c.add_argument("--username", required=True)
        _add_db(c)
        return c

    add = command("add", "add a user (password stored as a bcrypt hash)")
    add.add_argument("--name", required=True, help="full name, as shown in the audit log")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ls = command("list", "list users, roles and status (never passwords)", username=False)
    ls.add_argument("--format", choices=["table", "json"], default="table")
    command("disable", "disable a user: no more sign-ins, open sessions end now")
    command("enable", "re-enable a disabled user")
    role = command("set-role", "change a user's role (applies at their next click)")
    role.add_argument("--role", required=True, choices=ROLES)
    reset = command("reset-password", "set a temporary password, to be changed at the next sign-in; open sessions end")
    reset.add_argument("--password-stdin", action="store_true",
                       help="read the temporary password from stdin (default: a random one, printed once)")
    imp = command("import", "copy the accounts of a former users file (users.yaml, bcrypt hashes) into the store",
                  username=False)
    imp.add_argument("--file", required=True, help="the users file (e.g. var/users.yaml)")


def _read_password(args, prompt: str = "Password: ") -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass(prompt)
    if getpass.getpass("Repeat: ") != password:
        print("labtrend users: the passwords differ", file=sys.stderr)
        return None
    return password


def cmd_users(args) -> int:
    """Accounts in the store of ``--db``; every change is audited as the OS account running the command."""
    from data import users

    command = args.users_command
    store = _store(args, create=command in ("add", "import"))
    actor = users.Actor.cli()
    db = str(store.settings.path)
    try:
        if command == "list":
            rows = users.list_users(store)
            if args.format == "json":
                print(json.dumps(rows, default=str))
            else:
                for u in rows:
                    print(f"{u['username']}\t{','.join(u['roles'])}\t{u['status']}\t{u['name']}")
            return 0
        if command == "add":
            password = _read_password(args)
            if password is None:
                return EXIT_BAD_INPUT
            user = users.add_user(store, args.username, args.name, args.role, password, by=actor)
            print(json.dumps({"username": user.username, "role": args.role, "db": db}))
        elif command == "disable":
            ended = users.disable_user(store, args.username, by=actor)
            print(json.dumps({"username": args.username.strip().lower(), "status": "disabled",
                              "sessions_ended": ended, "db": db}))
        elif command == "enable":
            users.enable_user(store, args.username, by=actor)
            print(json.dumps({"username": args.username.strip().lower(), "status": "active", "db": db}))
        elif command == "set-role":
            users.set_role(store, args.username, args.role, by=actor)
            print(json.dumps({"username": args.username.strip().lower(), "role": args.role, "db": db}))
        elif command == "reset-password":
            given = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None
            temporary = users.reset_password(store, args.username, by=actor, password=given)
            out = {"username": args.username.strip().lower(), "must_change_password": True, "db": db}
            if given is None:
                out["temporary_password"] = temporary  # shown once; only its hash is stored
            print(json.dumps(out))
        elif command == "import":
            added = users.import_users_file(store, Path(args.file), by=actor)
            print(json.dumps({"imported": added, "db": db}))
    except users.UserError as exc:
        print(f"labtrend users {command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


# -- evaluate / forecast ---------------------------------------------------------------------
def add_evaluate_args(p):
    _add_db(p)
    p.add_argument("--model", help="model directory the card is written into (default: $LABTREND_MODEL or var/model)")
    p.add_argument("--init", help="pretrained checkpoint (default: $LABTREND_PRETRAINED, else var/pretrained when "
                                  "built there, else the shipped model/checkpoints/pretrained-small)")
    p.add_argument("--patients", help="file of test patient ids (one per line) instead of grouped folds")
    p.add_argument("--folds", type=int, default=1, help="how many of the 5 patient-grouped folds to run (1-5)")
    p.add_argument("--modes", default="full,embeddings,lora,scratch", help="fine-tuning modes to compare")
    p.add_argument("--baselines", default="last value,historical mean,linear trend,LightGBM",
                   help="baselines to compare (comma-separated names)")
    p.add_argument("--minutes-per-mode", type=float, default=3.0, help="fine-tuning budget per mode and fold")
    p.add_argument("--config", default="small", choices=["tiny", "small", "base"], help="architecture for 'scratch'")
    p.add_argument("--seed", type=int, default=0)


def cmd_evaluate(args) -> int:
    from labtrend.evaluate import BASELINES, MODES, run_evaluation

    out = settings.model_dir(args.model)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    for flag, given, known in (("--modes", modes, MODES), ("--baselines", baselines, BASELINES)):
        unknown = [g for g in given if g not in known]
        if unknown:  # before anything is read or trained
            print(f"labtrend evaluate: {flag}: unknown {unknown}; choose from {list(known)}", file=sys.stderr)
            return EXIT_BAD_INPUT
    _db_path(args)  # the store must exist: a mistyped --db is an error, not a new, empty database
    try:
        card = run_evaluation(args.db, out, init_dir=args.init, patients_file=args.patients, folds=args.folds,
                              seed=args.seed, modes=modes, minutes_per_mode=args.minutes_per_mode, config=args.config,
                              baselines=baselines, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except FileNotFoundError as exc:
        print(f"labtrend evaluate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"model_card": str(out / "README.md"), "winner": card.get("winner"),
                      "statement": card.get("statement")}))
    return 0


def add_forecast_args(p):
    p.add_argument("--model", help="model directory (default: $LABTREND_MODEL or var/model)")
    _add_db(p)
    p.add_argument("--queries", required=True, help="CSV with columns patient_id,analyte,at")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def cmd_forecast(args) -> int:
    import pandas as pd

    from data import queries
    from data.identifiers import patient_key
    from model.inference import ForecastPipeline

    try:
        q = pd.read_csv(args.queries, dtype={"patient_id": str, "analyte": str})
    except (OSError, ValueError) as exc:
        print(f"labtrend forecast: {args.queries}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    missing = {"patient_id", "analyte", "at"} - set(q.columns)
    if missing:
        print(f"labtrend forecast: {args.queries}: missing column(s) {sorted(missing)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        q["at"] = pd.to_datetime(q["at"])
    except (ValueError, TypeError) as exc:
        print(f"labtrend forecast: {args.queries}: column 'at': {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model_dir = settings.model_dir(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"labtrend forecast: no trained model in {model_dir} (run `labtrend train`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    # ids as the store keeps them (a stray space or invisible character copied along)
    q["patient_id"] = q["patient_id"].map(patient_key)
    if q["patient_id"].isna().any():
        row = int(q.index[q["patient_id"].isna()][0]) + 1
        print(f"labtrend forecast: {args.queries}: data row {row}, column 'patient_id': the id is blank",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    pipe = ForecastPipeline.from_pretrained(model_dir, device=args.device)
    store = _store(args)
    ids = sorted(q["patient_id"].unique())
    history = queries.cohort(store, patients=ids)
    fc = pipe.forecast(history, q.rename(columns={"analyte": "analyte_code"})[["patient_id", "analyte_code", "at"]])
    from data.export import write_csv

    write_csv(fc, Path(args.out))
    print(json.dumps({"queries": len(q), "ok": int((fc["status"] == "ok").sum()), "out": args.out}))
    return 0


# -- serve-model ----------------------------------------------------------------------------
def add_serve_model_args(p):
    host, port = settings.MODEL_SERVER_HOST, settings.MODEL_SERVER_PORT
    p.add_argument("--model", help="ForecastPipeline folder (default: $LABTREND_MODEL, else var/model)")
    p.add_argument("--host", default=host, help=f"address to listen on (default {host}; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA (bf16 autocast) when present, else CPU")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve_model(args) -> int:
    """Forecasts and explanations over HTTP (FastAPI + uvicorn) until Ctrl+C; see labtrend/serve_model.py."""
    from labtrend.serve_model import serve

    model_dir = settings.model_dir(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"labtrend serve-model: no trained model in {model_dir} (run `labtrend train`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        serve(model_dir, host=args.host, port=args.port, device=args.device, log_level=args.log_level)
    except (FileNotFoundError, ValueError) as exc:
        print(f"labtrend serve-model: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 0
    return 0


# -- predict --------------------------------------------------------------------------------
def add_predict_args(p):
    p.add_argument("--model", help="ForecastPipeline folder (default: $LABTREND_MODEL, else var/model)")
    _add_db(p)
    p.add_argument("--patient", required=True)
    p.add_argument("--at", help="forecast time, ISO date-time (default: one day after the patient's last result)")
    p.add_argument("--top", type=int, default=5, help="forecast the patient's N most measured analytes (default 5)")
    p.add_argument("--no-explain", action="store_true", help="skip the SHAP explanations")
    p.add_argument("--pretrained", help="pretraining folder (with vocab.json, scaler.json) for the multivariate check")
    p.add_argument("--critical-values", help="site critical value list (columns as data/reference/critical_values.csv)")
    p.add_argument("--model-window-days", type=float, default=30.0,
                   help="run the model-based anomaly rules on the last N days before --at (default 30)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest for SHAP on a busy machine)")
    p.add_argument("--json", action="store_true", help="print the full JSON (default: a short summary)")


def cmd_predict(args) -> int:
    """Forecasts, anomalies, SHAP explanations and recommendations for one patient, stored as model outputs."""
    import pandas as pd

    from clinical.anomalies import MaskedValuePredictor, load_reference
    from clinical.predict import PatientNotFound, predict_patient
    from model.inference import ForecastPipeline

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_dir = settings.model_dir(args.model)
    try:
        pipeline = ForecastPipeline.from_pretrained(model_dir)
        masked = MaskedValuePredictor.from_pretrained(args.pretrained) if args.pretrained else None
        reference = load_reference(args.critical_values) if args.critical_values else None
        at = pd.Timestamp(args.at) if args.at else None
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"labtrend predict: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = predict_patient(_store(args), pipeline, args.patient, at, top_n=args.top, explain=not args.no_explain,
                                 masked_predictor=masked, reference=reference,
                                 model_window_days=args.model_window_days)
    except (PatientNotFound, ValueError) as exc:
        print(f"labtrend predict: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args.audit_detail = {"model_version": result["model_version"], "at": str(result["at"]),
                         "stored": result.get("stored")}
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0
    print(f"patient {result['patient_id']} at {result['at']} (model {result['model_version']}): "
          f"{len(result['forecasts'])} forecasts, {len(result['anomalies'])} anomalies, "
          f"{len(result['explanations'])} explanations, {len(result['recommendations'])} recommendations; "
          f"stored {result['stored']}")
    for f in result["forecasts"]:
        print(f"  forecast {f['analyte_code']}: median {f['median']} {f['unit'] or ''} ({f['status']}) [{f['output_id']}]")
    for r in result["recommendations"]:
        print(f"  [{r['urgency']}] {r['text']} [{r['output_id']}]")
    for n in result["notes"]:
        print(f"  note: {n}")
    return 0


# -- codes ----------------------------------------------------------------------------------
def add_codes_args(p):
    sub = p.add_subparsers(dest="codes_command", required=True)
    ls = sub.add_parser("list", help="local test codes without a LOINC code from the source, unmapped first")
    _add_db(ls)
    ls.add_argument("--format", choices=["table", "csv", "json"], default="table")
    mp = sub.add_parser("map", help="map a local code to LOINC in the site mapping file and re-key its results")
    _add_db(mp)
    mp.add_argument("local_code", help="as listed, e.g. site:K or mimic:50971")
    mp.add_argument("loinc", nargs="?", help="LOINC code; leave out to withdraw the mapping")
    mp.add_argument("--specimen", required=True, help="specimen the laboratory measures it in (serum or plasma, "
                                                      "blood, urine, other)")
    mp.add_argument("--source", default="", help="where the mapping comes from (required with a LOINC code)")
    mp.add_argument("--code-map", help="site mapping file (default: $LABTREND_CODE_MAP, else var/local_code_map.csv)")


def cmd_codes(args) -> int:
    """``codes list`` and ``codes map`` (data/codemap.py); a mapping is made as the OS user."""
    from data import codemap

    store = _store(args)
    if args.codes_command == "list":
        _emit(codemap.local_codes(store), args.format)
        return 0
    try:
        event = codemap.map_code(store, codemap.map_path(args.code_map), args.local_code, args.loinc, args.specimen,
                                 args.source, by=codemap.os_user())
    except codemap.CodeMapError as exc:
        print(f"labtrend codes map: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({k: event.get(k) for k in ("local_code", "new_analyte", "results_moved")}, default=str))
    return 0


# -- score ------------------------------------------------------------------------------------
def add_score_args(p):
    p.add_argument("--model", help="ForecastPipeline folder (default: $LABTREND_MODEL, else var/model)")
    _add_db(p)
    sel = p.add_argument_group("which patients (default: those with results newer than their stored outputs)")
    sel.add_argument("--all", action="store_true", help="every patient with results, even if up to date")
    sel.add_argument("--patients", metavar="FILE", help="only these patients (one id per line)")
    sel.add_argument("--since", metavar="TIME", help="only patients with a result collected at or after TIME (ISO)")
    p.add_argument("--engine", choices=["process", "dask", "serial"], default="process",
                   help="process: a local process pool (default); dask: Dask distributed "
                        "(pip install 'labtrend[distributed]'); serial: this process")
    p.add_argument("--workers", type=int, help="worker processes (default: the machine's cores)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address, e.g. tcp://10.0.0.5:8786 (implies --engine dask; "
                        "without it the dask engine starts a LocalCluster)")
    p.add_argument("--top", type=int, default=5, help="forecasts per patient: its N most measured analytes (default 5)")
    p.add_argument("--no-explain", action="store_true", help="skip the SHAP explanations")
    p.add_argument("--pretrained", help="pretraining folder for the multivariate check")
    p.add_argument("--critical-values", help="site critical value list (columns as data/reference/critical_values.csv)")
    p.add_argument("--model-window-days", type=float, default=30.0,
                   help="run the model-based anomaly rules on the last N days before the forecast time (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--write-batch", type=int, default=16, help="patients per write transaction (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_score(args) -> int:
    """Compute and store the outputs of every patient with new results (workers compute, one process writes)."""
    import pandas as pd

    from labtrend.scoring import ScoreConfig, read_patient_ids, run_scoring

    db = _db_path(args)
    model_dir = settings.model_dir(args.model)
    try:
        ids = read_patient_ids(args.patients) if args.patients else None
        since = pd.Timestamp(args.since) if args.since else None
    except ValueError as exc:
        print(f"labtrend score: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if ids is not None:
        from data import queries

        store = _store(args)
        known = set(queries.patients(store, limit=10_000_000)["patient_id"].astype(str))
        unknown = [i for i in ids if i not in known]
        if unknown:
            print(f"labtrend score: {args.patients}: {len(unknown)} patient id(s) not in {db}: "
                  f"{', '.join(unknown[:10])}", file=sys.stderr)
            return EXIT_BAD_INPUT
    config = ScoreConfig(db_path=str(db), model_dir=str(model_dir), top_n=args.top, explain=not args.no_explain,
                         model_window_days=args.model_window_days, pretrained=args.pretrained,
                         critical_values=args.critical_values, torch_threads=args.threads, device=args.device)
    engine = "dask" if args.scheduler else args.engine
    try:
        summary = run_scoring(config, engine=engine, workers=args.workers, scheduler=args.scheduler,
                              everyone=args.all, patients=ids, since=since, write_batch=args.write_batch,
                              progress=not args.no_progress)
    except (ValueError, RuntimeError) as exc:
        print(f"labtrend score: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("labtrend score: interrupted; the patients already written are kept, run it again to go on",
              file=sys.stderr)
        return 130
    _audit_cli(_store(args), "score", None, {
        "model_version": summary.get("model_version"), "engine": engine, "scored": summary.get("scored"),
        "failed": summary.get("failed"), "everyone": bool(args.all), "patients_file": args.patients,
        "since": args.since})
    print(json.dumps(summary, default=str), flush=True)
    return 1 if summary["failed"] else 0


# -- annotations ----------------------------------------------------------------------------
def add_annotations_args(p):
    sub = p.add_subparsers(dest="annotations_command", required=True)
    e = sub.add_parser("export", help="write outputs with their expert verdicts to CSV or Parquet")
    _add_db(e)
    e.add_argument("--out", required=True, help="file to write: .csv (formulas neutralised) or .parquet")
    e.add_argument("--all-verdicts", action="store_true", help="every verdict row, not only each expert's current one")
    e.add_argument("--kind", choices=["forecast", "anomaly", "explanation", "recommendation"])
    a = sub.add_parser("agreement", help="agreement between experts per output kind (kappa, AC1)")
    _add_db(a)


def cmd_annotations(args) -> int:
    """``annotations export`` and ``annotations agreement``."""
    from clinical import outputs

    store = _store(args)
    if args.annotations_command == "export":
        try:
            n = outputs.export_annotations(store, args.out, all_verdicts=args.all_verdicts, kind=args.kind)
        except ValueError as exc:
            print(f"labtrend annotations export: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(json.dumps({"rows": n, "out": args.out}))
        return 0
    print(outputs.agreement(store).to_json(orient="records", force_ascii=False))
    return 0


COMMANDS = {
    "demo": (add_demo_args, cmd_demo, "the product on MIMIC-IV demo (or the synthetic cohort): import, train, serve"),
    "import": (add_import_args, cmd_import, "import lab exports (CSV, MIMIC-IV, FHIR, OMOP, Synthea)"),
    "patients": (add_patients_args, cmd_patients, "list patients with result counts"),
    "timeline": (add_timeline_args, cmd_timeline, "one patient's results"),
    "quarantine": (add_quarantine_args, cmd_quarantine, "export a batch's quarantined rows to CSV"),
    "batches": (add_batches_args, cmd_batches, "list import batches"),
    "dashboard": (add_dashboard_args, cmd_dashboard, "run the Streamlit dashboard (extra options go to streamlit)"),
    "users": (add_users_args, cmd_users, "manage dashboard user accounts"),
    "train": (add_train_args, cmd_train, "pretrain and fine-tune the forecaster (same flags as train.py)"),
    "predict": (add_predict_args, cmd_predict, "forecasts, anomalies, SHAP and recommendations for one patient"),
    "score": (add_score_args, cmd_score, "compute and store outputs for every patient with new results (batch job)"),
    "annotations": (add_annotations_args, cmd_annotations, "export expert verdicts; agreement between experts"),
    "codes": (add_codes_args, cmd_codes, "local test codes: list them, map them to LOINC (re-keys stored results)"),
    "evaluate": (add_evaluate_args, cmd_evaluate, "model card: baselines and fine-tuning modes on held-out patients"),
    "forecast": (add_forecast_args, cmd_forecast, "batch forecasts for a CSV of (patient_id, analyte, at)"),
    "serve-model": (add_serve_model_args, cmd_serve_model, "serve forecasts and explanations over HTTP (GPU machine)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labtrend", description="LabTrend: lab histories, forecasts, expert review.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return parser


#: Commands audited by :func:`main` once they ran against an existing store: command -> (action,
#: patient id of the arguments, details of the arguments). ``import`` (one row per file), ``train``
#: (``train.py``) and ``users`` (:mod:`data.users`) write their own rows.
AUDITED = {
    "patients": ("list_patients", None, lambda a: {"search": a.search}),
    "timeline": ("view_patient", "patient", lambda a: {"analytes": a.analyte, "start": a.start, "end": a.end,
                                                       "format": a.format}),
    "quarantine": ("download_quarantine", None, lambda a: {"batch_id": a.batch, "out": a.out}),
    "annotations": ("export", None, lambda a: {"what": f"annotations {a.annotations_command}",
                                               "out": getattr(a, "out", None)}),
    "predict": ("predict", "patient", lambda a: {"model": str(settings.model_dir(a.model))}),
    "forecast": ("forecast", None, lambda a: {"queries": a.queries, "out": a.out,
                                              "model": str(settings.model_dir(a.model))}),
    "evaluate": ("evaluate", None, lambda a: {"model": str(settings.model_dir(a.model)), "patients": a.patients,
                                              "folds": a.folds}),
}


def _audit_command(args, status) -> None:
    """The audit row of an :data:`AUDITED` command that ran against an existing store (none when the store is
    missing: nothing was read). A row that cannot be written is reported, never silently dropped."""
    from data.db import StoreBusyError, open_store

    action, patient_arg, details = AUDITED[args.command]
    path = settings.db_path(getattr(args, "db", None))
    if str(path) == ":memory:" or not Path(path).is_file():
        return
    detail = {"command": args.command, **details(args), "db": str(path), "exit_status": status,
              **getattr(args, "audit_detail", {})}
    try:
        _audit_cli(open_store(path), action, getattr(args, patient_arg) if patient_arg else None, detail)
    except StoreBusyError as exc:
        print(f"labtrend {args.command}: the audit row could not be written ({exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in {"dashboard", "demo"}:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from data.db import StoreBusyError

    status: int | str = "error"
    try:
        status = COMMANDS[args.command][1](args) or 0
        return status
    except StoreBusyError as exc:  # another process kept the database past the retry budget
        print(f"labtrend {args.command}: {exc}; try again when it is done", file=sys.stderr)
        status = EXIT_BUSY
        return status
    except NoDatabase as exc:
        print(f"labtrend {args.command}: {exc}", file=sys.stderr)
        status = EXIT_BAD_INPUT
        return status
    finally:
        if args.command in AUDITED:
            _audit_command(args, status)


if __name__ == "__main__":
    sys.exit(main())
