"""DuckDB memory limit and spill folder on a shared server (issue 14, point 13).

Every store the product opens (CLI imports, the dashboard's cached store, training data loading
through ``open_store``) runs under ``memory_limit`` (default 2GB, ``$LABTREND_DUCKDB_MEMORY_LIMIT``)
and spills to ``temp_directory`` (``<database>.tmp``, ``$LABTREND_DUCKDB_TEMP_DIR``), up to
``$LABTREND_DUCKDB_MAX_TEMP_SIZE``. The speed cost and the 30-million-row peak are measured by
``benchmarks/ingest.py``, not here; here: an import under a small limit spills and keeps every
guarantee, one that cannot fit stops cleanly, and the Python steps read large inputs in pieces.
"""

from __future__ import annotations

import pytest

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


def _spill_when_staged(monkeypatch) -> dict:
    """Records what DuckDB has spilled when the staged file is handed to the pipeline."""
    import data.importers as importers

    seen: dict = {}
    plain = importers.load_staged

    def spy(cur, *args, **kwargs):
        seen["spilled"] = cur.execute("SELECT sum(temporary_storage_bytes) FROM duckdb_memory()").fetchone()[0]
        return plain(cur, *args, **kwargs)

    monkeypatch.setattr(importers, "load_staged", spy)
    return seen


def _table_counts(store) -> tuple:
    with store.read() as cur:
        return cur.execute("SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM quarantine), "
                           "(SELECT count(*) FROM import_batches), (SELECT count(*) FROM patients)").fetchone()


def test_an_import_larger_than_the_limit_spills_and_keeps_every_guarantee(tmp_path, monkeypatch):
    """700 004 rows (37 MB of CSV; about 68 MB once staged, more than the 64 MB limit, so spilling
    is certain) ending with a row without a patient, a unit that does not exist, an exact
    duplicate and a conflicting value: the last rows of patient P000000 make the file ungrouped,
    so the insert also sorts under the limit. The import is still atomic (a failure after the
    bulk insert leaves nothing), every row keeps its number, the bad rows are quarantined with
    row, column and reason, and a second import adds nothing."""
    import csv as csvmod

    from benchmarks.ingest import build_csv
    from data import queries
    from data.importers import pipeline

    path = tmp_path / "big.csv"
    build_csv(path, 700_000)
    with path.open(newline="") as fh:
        head = [row for _, row in zip(range(501), csvmod.reader(fh))][1:]  # rows 1..500: patient P000000
    extra = [
        ["", "2020-01-01 00:00:00", "2823-3", "Potassium", "4.1", "mmol/L"],      # 700001: no patient
        ["P000000", "2020-01-02 09:00:00", "2823-3", "Potassium", "4.1", "furlong"],  # 700002: no such unit
        head[1],                                                                    # 700003: copy of row 2
        head[2][:4] + ["5.55"] + head[2][5:],                                       # 700004: row 3, other value
    ]
    with path.open("a", newline="") as fh:
        csvmod.writer(fh, lineterminator="\n").writerows(extra)
    spill = _spill_when_staged(monkeypatch)
    store = open_store(tmp_path / "lab.duckdb", memory_limit="64MB", temp_directory=str(tmp_path / "spill"), threads=2)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the bulk insert")

    with monkeypatch.context() as m:  # atomic under spilling: nothing of a failed import remains
        m.setattr(pipeline, "_upsert_patients", fail)
        with pytest.raises(RuntimeError, match="simulated"):
            run_import(store, path)
    assert _table_counts(store) == (0, 0, 0, 0) and spill["spilled"] > 0

    spill.clear()
    s = run_import(store, path)
    assert spill["spilled"] > 0  # the staged file did not fit: part of it was on disk
    assert (s.rows_read, s.rows_loaded, s.rows_quarantined, s.rows_duplicate, s.rows_conflicting) == (
        700_004, 700_001, 2, 1, 2)
    q = queries.quarantine_rows(store, s.batch_id)
    assert q["row"].tolist() == [700_001, 700_002] and q["column"].tolist() == ["patient_id", "unit"]
    assert q["file"].unique().tolist() == ["big.csv"] and "furlong" in q["reason"].iloc[1]
    tl = queries.timeline(store, "P000000")
    assert sorted(tl["source_row"]) == list(range(1, 501)) + [700_004]  # row 700003 was a duplicate
    by_row = dict(zip(tl["source_row"], tl["value_text"]))
    assert [by_row[i] for i in range(1, 501)] == [r[4] for r in head] and by_row[700_004] == "5.55"
    assert tl.loc[tl["source_row"].isin([3, 700_004]), "conflicting"].all()
    assert queries.timeline(store, "P000400")["source_row"].tolist() == list(range(200_001, 200_501))

    before = _table_counts(store)
    again = run_import(store, path)
    assert again.already_imported and _table_counts(store) == before


def test_an_import_that_cannot_fit_stops_with_a_clear_message_and_stores_nothing(tmp_path, monkeypatch):
    """Spilling capped at 1 MB ($LABTREND_DUCKDB_MAX_TEMP_SIZE) while the staged file needs several:
    the import stops, names the file and the settings to change, and leaves the store as it was."""
    from benchmarks.ingest import build_csv
    from data.importers import ImportFileError, ImportResourceError

    path = tmp_path / "big.csv"
    build_csv(path, 400_000)
    monkeypatch.setenv("LABTREND_DUCKDB_MAX_TEMP_SIZE", "1MB")
    store = open_store(tmp_path / "lab.duckdb", memory_limit="32MB", temp_directory=str(tmp_path / "spill"), threads=2)
    with store.read() as cur:
        assert cur.execute("SELECT current_setting('max_temp_directory_size')").fetchone()[0] == "976.5 KiB"
    with pytest.raises(ImportResourceError) as err:
        run_import(store, path)
    assert isinstance(err.value, ImportFileError)  # the CLI and the upload page report it like a refused file
    text = str(err.value)
    assert text.startswith("big.csv: not imported, nothing was stored")
    assert "LABTREND_DUCKDB_MEMORY_LIMIT" in text and "LABTREND_DUCKDB_MAX_TEMP_SIZE" in text
    assert _table_counts(store) == (0, 0, 0, 0)


def test_time_zones_read_in_pieces_give_the_same_times(tmp_path, monkeypatch):
    """The distinct local times are read in a zone ZONE_CHUNK at a time (memory stays flat on a
    file where every row has its own time): pieces of 2 give what one piece gives, flags included."""
    from data.importers import ImportOptions, pipeline

    path = tmp_path / "times.csv"
    times = ["2024-03-31 01:30", "2024-03-31 02:30", "2024-03-31 03:30", "2024-10-27 02:30", "2024-10-27 03:30",
             "2024-07-01 12:00", "2024-01-05", "2024-10-27T02:30:00+01:00"]
    path.write_text("patient_id,collected_at,reported_at,loinc,test_name,value,unit\n" + "".join(
        f"P1,{t},2024-10-27 02:{i:02d},2823-3,K,4.{i},mmol/L\n" for i, t in enumerate(times)), encoding="utf-8")

    def rows(chunk: int, name: str):
        monkeypatch.setattr(pipeline, "ZONE_CHUNK", chunk)
        store = open_store(tmp_path / name)
        s = run_import(store, path, options=ImportOptions(timezone="Europe/Berlin"))
        with store.read() as cur:
            return s.rows_dst, cur.execute(
                "SELECT source_row, collected_at, utc_offset_min, time_flag, reported_at FROM lab_results "
                "ORDER BY source_row").fetchall()

    whole, pieces = rows(1_000, "a.duckdb"), rows(2, "b.duckdb")
    assert pieces == whole and len(whole[1]) == len(times)
    assert whole[0] == 2  # the skipped 02:30 and the repeated 02:30 (the one written with +01:00 is not)


def test_files_read_by_python_are_streamed_in_pieces(tmp_path, monkeypatch):
    """Transcoding a file that is not UTF-8 and finding its empty lines read the file a piece
    at a time (csvio._CHUNK); pieces of 3 bytes, which cut UTF-8 sequences and line ends, read
    the same text, encoding and row numbers as one piece."""
    from data import queries
    from data.importers import csvio

    path = tmp_path / "legacy.csv"
    path.write_bytes(
        b"patient_id,collected_at,loinc,test_name,value,unit\r\n"
        + "José,2024-01-01,2160-0,Créatinine,88,µmol/L\r\n\r\n".encode("utf-8")          # row 1, empty line
        + b"Jos\xc3\xa9,2024-01-02,2160-0,Cr\xe9atinine,90,\xb5mol/L\r\n"              # row 2: cp1252 bytes
        + "José,2024-01-03,2160-0,Créatinine,91,µmol/L,EXTRA\r\n".encode("utf-8")        # row 3: too many fields
        + "José,2024-01-04,2160-0,Créatinine,92,µmol/L\r\n".encode("utf-8"))             # row 4

    def imported(chunk: int, name: str):
        monkeypatch.setattr(csvio, "_CHUNK", chunk)
        store = open_store(tmp_path / name)
        s = run_import(store, path)
        tl = queries.timeline(store, "José")
        return (s.rows_read, s.rows_loaded, s.rows_quarantined, queries.batches(store).iloc[0]["options"],
                tl["source_row"].tolist(), tl["unit"].tolist(), tl["analyte_name"].tolist(),
                queries.quarantine_rows(store, s.batch_id)["row"].tolist())

    whole = imported(1 << 24, "a.duckdb")
    assert imported(3, "b.duckdb") == whole
    assert whole[:3] == (4, 3, 1) and '"encoding": "utf-8 with cp1252 bytes"' in whole[3]
    assert whole[4] == [1, 2, 4] and whole[5] == ["µmol/L"] * 3 and whole[7] == [3]
