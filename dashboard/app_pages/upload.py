"""Upload: import a lab export (CSV, MIMIC-IV, FHIR, OMOP, Synthea) through the common pipeline."""

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import auth, state, uploads
from data import queries, timezones
from data.export import csv_bytes, quarantine_table
from data.importers import FORMATS, ImportFileError, ImportOptions, detect_format, run_import

FORMAT_LABELS = {"csv": "Long CSV (one result per row)", "mimic": "MIMIC-IV hosp", "fhir": "FHIR R4 Observations",
                 "omop": "OMOP CDM MEASUREMENT", "synthea": "Synthea observations"}

user = auth.require_page("upload")
st.title("Upload lab results")
st.caption("One file (.csv, .tsv, .txt, .json, .ndjson, optionally .gz) or a .zip of an export folder "
           "(MIMIC-IV hosp, OMOP, Synthea, FHIR). An import is all-or-nothing; rows that cannot be used are "
           "kept in quarantine with the reason, and the same file imported twice adds nothing.")

db = state.db_path()
store = state.get_store(db)
upload = st.file_uploader("Lab export", type=uploads.UPLOAD_TYPES, key="upload_file")


def _record_download(batch_id: int, n: int) -> None:
    auth.record("download_quarantine", detail={"batch_id": batch_id, "rows": n})


if upload is not None:
    with tempfile.TemporaryDirectory(prefix="labtrend-upload-") as tmp:
        try:
            path = uploads.stage_upload(upload.name, upload.getvalue(), Path(tmp))
            detected = detect_format(path)
        except ImportFileError as exc:
            st.error(f"{upload.name}: {exc}")
            st.stop()
        table, head, listing = uploads.preview(path)
        st.success(f"Detected format: **{FORMAT_LABELS.get(detected, detected)}** "
                   f"({upload.size / 1024**2:.1f} MB{', ' + str(len(listing)) + ' files' if len(listing) > 1 else ''})")
        with st.expander("Preview (first rows as written in the file)", expanded=True):
            if len(listing) > 1:
                st.caption("Files: " + ", ".join(listing[:20]) + (" …" if len(listing) > 20 else ""))
            if table is not None:
                st.dataframe(table, hide_index=True, width="stretch", key="upload_preview")
            else:
                st.code(head or "(empty)", language=None)
        c1, c2, c3 = st.columns(3)
        fmt = c1.selectbox("Format", list(FORMATS), index=list(FORMATS).index(detected), key="upload_format",
                           format_func=lambda f: FORMAT_LABELS.get(f, f))
        order = c2.selectbox("Dates like 01/02/2024", ["decide from the data", "day first", "month first"],
                             key="upload_date_order")
        decimal = c3.selectbox("Decimal mark", ["decide from the data", ".", ","], key="upload_decimal")
        z1, z2 = st.columns([2, 1])
        site = timezones.site_zone()
        no_zone = "none: store times as written (zone unknown)"
        zones = [no_zone] + timezones.zone_names()
        zone = z1.selectbox("Time zone of times written without an offset", zones, key="upload_timezone",
                            index=zones.index(site) if site in zones else 0,
                            help="Times are stored in UTC with this zone's offset; a time in an hour skipped or "
                                 "repeated by a clock change is flagged. An offset written in the file wins.")
        shifted = z2.checkbox("Dates shifted for de-identification", key="upload_shifted",
                              help="Collection times after the import are then expected, not flagged "
                                   "(MIMIC-IV declares this itself).")
        options = ImportOptions(
            date_order={"day first": "dayfirst", "month first": "monthfirst"}.get(order),
            decimal=decimal if decimal in (".", ",") else None,
            timezone="" if zone == no_zone else zone,
            shifted_dates=shifted,
        )
        if st.button("Import", type="primary", icon=":material/upload:", key="upload_import"):
            progress = st.progress(10, text="Reading and checking the file…")
            try:
                with st.spinner(f"Importing {path.name}…"):
                    summary = run_import(store, path, fmt=fmt, options=options)
            except ImportFileError as exc:
                progress.empty()
                auth.record("upload", detail={"file": upload.name, "format": fmt, "status": "rejected",
                                              "message": str(exc)})
                st.error(f"Nothing was imported. {exc}")
                st.stop()
            progress.progress(100, text="Import finished")
            result = summary.to_dict()
            st.session_state["upload_last"] = result
            state.data_version.clear()
            auth.record("upload", detail={"file": upload.name, "status": "already imported" if summary.already_imported
                                          else "complete", **{k: result[k] for k in (
                                              "batch_id", "format", "rows_read", "rows_loaded", "rows_quarantined",
                                              "rows_skipped", "patients")}})



def _outcomes(outcome: pd.DataFrame, batch_id: int, key: str) -> None:
    """The table of what happened to every row, and the download of the rejected (quarantined) rows."""
    st.container(key=f"{key}_outcomes_box").dataframe(outcome, hide_index=True, width="stretch", key=f"{key}_outcomes", column_config={
        "Outcome": st.column_config.TextColumn("Outcome", width="small"),
        "Reason": st.column_config.TextColumn("Reason", width="large"),
        "Rows": st.column_config.NumberColumn("Rows", format="%d")})
    quarantined = int(outcome.loc[outcome["Outcome"] == "Quarantined", "Rows"].sum())
    if quarantined:
        q = quarantine_table(queries.quarantine_rows(store, batch_id))
        st.download_button(
            f"Download the {len(q):,} rejected rows (CSV, with file, row, column and reason)", csv_bytes(q),
            file_name=f"quarantine_batch_{batch_id}.csv", mime="text/csv", key=f"{key}_quarantine_csv",
            on_click=_record_download, args=(batch_id, len(q)), icon=":material/download:")
        with st.expander(f"Rejected rows of batch {batch_id} (first 1,000)"):
            st.dataframe(q.head(1000), hide_index=True, width="stretch", key=f"{key}_quarantine")
    st.caption("Quarantined rows were not loaded: fix them in the source and import the file again (rows already "
               "loaded are not added twice). Skipped rows are not lab results or are exact copies of a row kept.")


last = st.session_state.get("upload_last")
if last:
    st.subheader(f"Import summary: {last['file']} (batch {last['batch_id']})")
    if last["already_imported"]:
        st.info(last["message"])
    else:
        st.write(last["message"])
        m = st.columns(5)
        m[0].metric("Rows read", f"{last['rows_read']:,}")
        m[1].metric("Loaded", f"{last['rows_loaded']:,}")
        m[2].metric("Quarantined", f"{last['rows_quarantined']:,}")
        m[3].metric("Skipped", f"{last['rows_skipped']:,}")
        m[4].metric("Patients", f"{last['patients']:,}")
        if last.get("unmapped_codes"):
            codes = last["unmapped_codes"]
            st.warning(f"{len(codes)} local test code{'s' if len(codes) != 1 else ''} without a LOINC code "
                       f"({', '.join(f'{c} ({n})' for c, n in list(codes.items())[:8])}"
                       f"{' …' if len(codes) > 8 else ''}): their results are kept under the local code. Map them "
                       "on the Local codes page; the results are re-keyed without a new import.")
        st.markdown("**What happened to every row**")
        _outcomes(uploads.row_outcomes(last), last["batch_id"], "upload")

st.subheader("Import history")
hist = state.batches(db, state.data_version(db))
if hist.empty:
    st.caption("No imports yet.")
else:
    st.dataframe(hist[["batch_id", "file_name", "format", "rows_read", "rows_loaded", "rows_quarantined",
                       "rows_skipped", "patients", "finished_at"]], hide_index=True, width="stretch",
                 key="upload_history", column_config={
                     "batch_id": "Batch", "file_name": "File", "format": "Format", "rows_read": "Rows read",
                     "rows_loaded": "Loaded", "rows_quarantined": "Quarantined", "rows_skipped": "Skipped",
                     "patients": "Patients",
                     "finished_at": st.column_config.DatetimeColumn("Finished (UTC)", format="YYYY-MM-DD HH:mm")})
    by_id = {int(b["batch_id"]): b for b in hist.to_dict("records")}
    pick = st.selectbox("What happened to the rows of an earlier import", list(by_id), key="upload_history_batch",
                        index=None, placeholder="Choose a batch to see its reasons and rejected rows",
                        format_func=lambda b: f"Batch {b}: {by_id[b]['file_name']} ({by_id[b]['rows_read']:,} rows read)")
    if pick is not None:
        _outcomes(uploads.batch_outcomes(by_id[pick], queries.quarantine_rows(store, pick)), pick, "history")
