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
