"""The lab store: DuckDB schema and migrations, importers for lab exports, and queries.

`data.db` is the one module that opens DuckDB; everything else goes through it.
"""
