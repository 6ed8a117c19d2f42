"""DuckDB memory limit and spill folder on a shared server (issue 14, point 13).

Every store the product opens (CLI imports, the dashboard's cached store, training data loading
through ``open_store``) runs under ``memory_limit`` (default 2GB, ``$LABTREND_DUCKDB_MEMORY_LIMIT``)
and spills to ``temp_directory`` (``<database>.tmp``, ``$LABTREND_DUCKDB_TEMP_DIR``). The speed cost
and the 30-million-row peak are measured by ``benchmarks/ingest.py``, not here.
"""

from __future__ import annotations

from data.db import Store, StoreSettings, open_store
from data.importers import run_import


def _settings(store) -> tuple[str, str]:
    with store.read() as cur:
        return cur.execute("SELECT current_setting('memory_limit'), current_setting('temp_directory')").fetchone()


def test_every_store_has_a_memory_limit_and_a_spill_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LABTREND_DUCKDB_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("LABTREND_DUCKDB_TEMP_DIR", raising=False)
    db = tmp_path / "lab.duckdb"
    limit, temp = _settings(open_store(db))  # CLI, training (train.py loads its cohort through open_store)
    assert limit == "1.8 GiB"  # DuckDB reports 2GB (10^9 bytes) in GiB
    assert temp == f"{db}.tmp"
    # the dashboard's store (dashboard/state.get_store builds it from StoreSettings(path) alone)
    assert _settings(Store(StoreSettings(path=str(tmp_path / "dash.duckdb")))) == ("1.8 GiB",
                                                                                  f"{tmp_path / 'dash.duckdb'}.tmp")


def test_the_limit_and_folder_are_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("LABTREND_DUCKDB_MEMORY_LIMIT", "512MB")
    monkeypatch.setenv("LABTREND_DUCKDB_TEMP_DIR", str(tmp_path / "spill"))
    assert _settings(open_store(tmp_path / "lab.duckdb")) == ("488.2 MiB", str(tmp_path / "spill"))
    assert _settings(open_store(tmp_path / "b.duckdb", memory_limit="256MB"))[0] == "244.1 MiB"


def test_an_import_larger_than_the_limit_spills_instead_of_failing(tmp_path):
    """200 000 rows (10 MB of CSV, about 3x that once staged and parsed) under a 64 MB limit."""
    from benchmarks.ingest import build_csv

    csv = tmp_path / "big.csv"
    build_csv(csv, 200_000)
    store = open_store(tmp_path / "lab.duckdb", memory_limit="64MB", temp_directory=str(tmp_path / "spill"), threads=2)
    s = run_import(store, csv)
    assert (s.rows_read, s.rows_loaded) == (200_000, 200_000)
