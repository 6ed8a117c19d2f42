"""Reading a test store back, keyed for exact assertions (shared by the importer tests)."""

from __future__ import annotations


def results_by_row(store) -> dict[int, dict]:
    """lab_results by source_row (single-batch stores)."""
    with store.read() as cur:
        df = cur.execute("SELECT * FROM lab_results ORDER BY source_row").df()
    return {int(r["source_row"]): r for r in df.to_dict("records")}


def patients_by_id(store) -> dict[str, dict]:
    with store.read() as cur:
        df = cur.execute("SELECT * FROM patients").df()
    return {r["patient_id"]: r for r in df.to_dict("records")}


def quarantine_rows(store) -> list[tuple]:
    with store.read() as cur:
        return cur.execute("SELECT source_row, column_name, reason FROM quarantine ORDER BY source_row").fetchall()


def store_at_version(path, version: int):
    """A DuckDB file with migrations 001..``version`` applied and recorded, as an older LabTrend
    left it; returns the open connection (the caller fills and closes it)."""
    import duckdb

    from data.db import _migration_files

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
    for v, name, sql in _migration_files():
        if v <= version:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now()::TIMESTAMP)", [v, name])
    return con
