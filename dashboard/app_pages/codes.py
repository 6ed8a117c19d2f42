"""Local test codes (analyst): the laboratory's own codes without a LOINC code, and mapping them.

A mapping is written to the site mapping file (``data.codemap``) and re-keys the stored results
at once, without a re-import; each mapping is checked against the specimen of the target code
and of the test's own names (a blood-gas potassium is never mapped to serum potassium), and
audited (the audit log and the store's re-keying events).
"""

import pandas as pd
import streamlit as st

from dashboard import auth, state
from data import codemap
from data.catalogue import load_catalogue
from data.export import csv_bytes

user = auth.require_page("codes")
st.title("Local test codes")
map_file = codemap.map_path()
st.caption("Results whose source gave no LOINC code are keyed by the laboratory's own code until a mapping says "
           f"which LOINC code it is. Mappings live in the site mapping file `{map_file.name}` with who, when and "
           "the source of each; mapping a code here re-keys its stored results at once (no re-import) and is "
           "audited. Nothing is ever mapped by the test's name.")

db = state.db_path()
store = state.get_store(db)
codes = codemap.local_codes(store)
if codes.empty:
    st.info("No results with a local code and no LOINC code are stored.")
    st.stop()

unmapped = codes[~codes["mapped"]]
m = st.columns(3)
m[0].metric("Local codes without a LOINC code from the source", f"{len(codes):,}")
m[1].metric("Not mapped to LOINC", f"{len(unmapped):,}")
m[2].metric("Results kept under a local code", f"{int(unmapped['n_results'].sum()):,}")
show_all = st.toggle("Show mapped codes too", key="codes_show_all")
table = (codes if show_all else unmapped).fillna({"names": "", "units": ""})
box = st.container(key="codes_table_box")  # keyed: a stable hook for the browser test
box.dataframe(table[["local_code", "names", "units", "n_results", "n_patients", "analyte_code", "first", "last"]],
             hide_index=True, width="stretch", key="codes_table", column_config={
                 "local_code": "Local code", "names": "Names as exported", "units": "Units",
                 "n_results": "Results", "n_patients": "Patients", "analyte_code": "Keyed as now",
                 "first": st.column_config.DatetimeColumn("First", format="YYYY-MM-DD"),
                 "last": st.column_config.DatetimeColumn("Last", format="YYYY-MM-DD")})

st.subheader("Map a local code")
cat = load_catalogue()


def _target_label(code: str) -> str:
    a = cat.get(code)
    spec = codemap.target_specimen(code)
    return f"{code} · {a.name if a else ''}" + (f" ({spec[0]})" if spec else "")


with st.form("codes_map", clear_on_submit=False):
    c1, c2 = st.columns(2)
    choices = list(table["local_code"])
    local = c1.selectbox("Local code", choices, key="codes_local",
                         format_func=lambda c: f"{c} · {codes.set_index('local_code').loc[c, 'names'] or ''}")
    specimen = c2.selectbox("Specimen the laboratory measures it in", codemap.SPECIMENS, key="codes_specimen")
    c3, c4 = st.columns(2)
    known = c3.selectbox("LOINC code from the catalogue", [""] + sorted(a.code for a in cat), key="codes_loinc",
                         format_func=lambda c: _target_label(c) if c else "(none)")
    other = c4.text_input("…or another LOINC code", key="codes_loinc_other", help="Leave both empty to withdraw "
                          "the code's mapping (its results go back to the local code).")
    source = st.text_input("Source of the mapping", key="codes_source",
                           help="Where it comes from: the laboratory's test catalogue entry, the LOINC long name "
                                "you checked, the analyser's documentation.")
    submitted = st.form_submit_button("Map and re-key the results", type="primary", icon=":material/link:")
if submitted:
    loinc = other.strip() or known or None
    try:
        event = codemap.map_code(store, map_file, local, loinc, specimen, source, by=user.username)
    except codemap.CodeMapError as exc:
        st.error(f"Not mapped: {exc}")
    else:
        auth.record("code_map", detail={"local_code": local, "loinc": loinc, "specimen": specimen,
                                        "source": source, "results_moved": int(event.get("results_moved", 0))})
        state.data_version.clear()
        st.success(f"{local} is now keyed as {event.get('new_analyte')}: {int(event.get('results_moved', 0)):,} "
                   "stored results re-keyed.")

st.subheader("Mapping history")
hist = codemap.events(store)
if hist.empty:
    st.caption("No results re-keyed yet.")
else:
    st.dataframe(hist[["logged_at", "username", "local_code", "old_analyte", "new_analyte", "specimen", "source",
                       "results_moved"]], hide_index=True, width="stretch", key="codes_history",
                 column_config={"logged_at": st.column_config.DatetimeColumn("When (UTC)", format="YYYY-MM-DD HH:mm")})
rows = codemap.read_map(map_file)
if rows:
    frame = pd.DataFrame([[r.local_code, r.loinc or "", r.specimen, r.mapped_by, r.mapped_at, r.source] for r in rows],
                         columns=list(codemap.MAP_COLUMNS))
    st.download_button("Download the site mapping file (CSV)", csv_bytes(frame), file_name=map_file.name,
                       mime="text/csv", key="codes_map_csv", icon=":material/download:")
