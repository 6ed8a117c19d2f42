"""One DuckDB file, several users: a CLI import beside the dashboard, threads reading at once (UI-18)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from data import queries
from data.db import Store, StoreSettings, open_store
from data.importers import run_import


def test_reader_process_and_import_process(tmp_path, cases):
    """While another process imports, a second process keeps reading: it waits, never fails,
    and sees the store either before or after the import, never in between."""
    db = tmp_path / "c.duckdb"
    store = open_store(db)
    run_import(store, cases / "LAB-01.csv")
    big = tmp_path / "big.csv"
    with open(big, "w") as f:
        f.write("patient_id,collected_at,loinc,test_name,value,unit\n")
        for i in range(300_000):
            f.write(f"Q{i % 1000},2024-02-01 00:00:00,2823-3,Potassium,{4 + i % 7 / 10},mmol/L\n".replace(
                "00:00:00", f"{(i // 1000) // 60 % 24:02d}:{(i // 1000) % 60:02d}:00"))
    done = tmp_path / "writer_done"
    reader = subprocess.Popen(
        [sys.executable, "-c", f"""
import pathlib, sys
from data.db import Store, StoreSettings
from data import queries
s = Store(StoreSettings(path={str(db)!r}, busy_timeout_s=600))
counts = []
while True:  # read until the writer has finished, then once more: the state after the import
    last = pathlib.Path({str(done)!r}).exists()
    counts.append(len(queries.patients(s, limit=100000)))
    assert len(queries.timeline(s, 'P0001')) == 2
    if len(counts) == 1:
        print('reading', flush=True)
    if last:
        break
print(sorted(set(counts)), counts[0], counts[-1])
"""],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "reading"  # the reader is in before the writer starts (an event)
    writer = subprocess.run([sys.executable, "-m", "labtrend.cli", "import", str(big), "--db", str(db)],
                            capture_output=True, text=True, timeout=900)
    done.touch()
    out, err = reader.communicate(timeout=900)
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0, err
    seen, first, last = out.strip().rsplit(" ", 2)[0], int(out.split()[-2]), int(out.split()[-1])
    assert set(eval(seen)) <= {2, 1002}  # before (2 patients) or after (+1000), nothing in between
    assert (first, last) == (2, 1002)  # it read before the import and after it
    assert len(queries.patients(Store(StoreSettings(path=str(db))), limit=100000)) == 1002


def test_threads_see_their_own_patient_during_upload(tmp_path, cases):
    """UI-18: A uploads, B reads P0025, C reads another patient, at the same moment."""
    store = open_store(tmp_path / "t.duckdb")
    run_import(store, cases / "LAB-04.csv")
    before = queries.patients(store)["n_results"].sum()
    errors, seen_b, seen_c = [], [], []

    def reader(pid, sink):
        try:
            for _ in range(40):
                df = queries.timeline(store, pid)
                sink.append(set(df["patient_id"]) | {len(df)})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def uploader():
        try:
            run_import(store, cases / "UI-18.csv")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=uploader), threading.Thread(target=reader, args=("P0025", seen_b)),
               threading.Thread(target=reader, args=("P0006", seen_c))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(s == {"P0006", 6} for s in seen_c)
    assert all(s in ({0}, {"P0025", 3}) for s in seen_b)
    assert queries.patients(store)["n_results"].sum() == before + 3


def test_busy_callback_after_wait(tmp_path):
    """A reader blocked by another process's lock is told 'busy' after busy_after_s, then gets in. The other
    process holds the lock until the reader has been told (an event, not a fixed time)."""
    import duckdb

    db = tmp_path / "b.duckdb"
    open_store(db)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import duckdb, sys
c = duckdb.connect({str(db)!r})
print('locked', flush=True)
sys.stdin.readline()
c.close()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    told = []

    def on_busy(waited_s):
        told.append(waited_s)
        if len(told) == 1:
            holder.stdin.write("release\n")
            holder.stdin.flush()

    s = Store(StoreSettings(path=str(db), busy_after_s=0.5, busy_timeout_s=600), on_busy=on_busy)
    t0 = time.time()
    try:
        assert queries.patients(s).empty
    finally:
        if not told:
            holder.stdin.write("release\n")
            holder.stdin.flush()
    assert told and told[0] >= 0.5 and time.time() - t0 >= 0.5
    holder.wait()
    assert isinstance(duckdb.__version__, str)
