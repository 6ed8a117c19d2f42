"""The analyte catalogue and the other versioned clinical reference files.

The files live in ``data/reference/`` (see its README for columns, version and the
bibliography); every row carries its citation in a ``source`` column. This module only
reads them: no clinical number is written in code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

__all__ = ["Analyte", "Catalogue", "load_catalogue", "load_serum_indices", "reference_file", "sync_catalogue",
           "CATALOGUE_VERSION"]

CATALOGUE_VERSION = "2026.11-3"


def reference_file(name: str) -> Path:
    """Path of one file in ``data/reference/``."""
    return Path(str(resources.files("data.reference").joinpath(name)))


def _num(x) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


@dataclass(frozen=True)
class Analyte:
    code: str
    name: str
    panel: str
    canonical_unit: str
    molar_mass_g_per_mol: float | None
    valence: int | None
    plausible_low: float | None
    plausible_high: float | None
    skewed: bool
    source: str


class Catalogue:
    """Analytes by LOINC code, read from ``analytes.csv``."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._by_code: dict[str, Analyte] = {}
        for row in frame.itertuples(index=False):
            val = _num(row.valence)
            self._by_code[str(row.code)] = Analyte(
                code=str(row.code),
                name=str(row.name),
                panel=str(row.panel),
                canonical_unit=str(row.canonical_unit),
                molar_mass_g_per_mol=_num(row.molar_mass_g_per_mol),
                valence=int(val) if val is not None else None,
                plausible_low=_num(row.plausible_low),
                plausible_high=_num(row.plausible_high),
                skewed=str(row.skewed).strip().lower() in {"true", "1", "yes"},
                source=str(row.source),
            )

    def __contains__(self, code: str) -> bool:
        return code in self._by_code

    def get(self, code: str) -> Analyte | None:
        return self._by_code.get(code)

    def __iter__(self):
        return iter(self._by_code.values())

    def __len__(self) -> int:
        return len(self._by_code)


@functools.lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    """The analyte catalogue (cached; the file is versioned with the code)."""
    frame = pd.read_csv(reference_file("analytes.csv"), dtype={"code": str}, keep_default_na=True)
    if frame["code"].duplicated().any():
        dups = frame.loc[frame["code"].duplicated(), "code"].tolist()
        raise ValueError(f"analytes.csv: duplicated codes {dups}")
    return Catalogue(frame)


@functools.lru_cache(maxsize=1)
def load_serum_indices() -> dict[tuple[str, str], tuple[float, str]]:
    """``serum_indices.csv`` (analyser serum indices) as ``{(code, parameter): (value, source)}``.

    Values are converted to the catalogue's canonical unit of ``code`` (the haemolysis index
    4635-9: mg/dL free-haemoglobin equivalent); the source is the row's citation. Raises
    ``ValueError`` for other columns, a row without a source, a duplicated (code, parameter), a
    code not in the catalogue or a unit that does not convert. Cached: the file is versioned.
    """
    from data.units import UnitError, conversion_factor

    frame = pd.read_csv(reference_file("serum_indices.csv"), dtype={"code": str, "parameter": str, "unit": str},
                        keep_default_na=False)
    expected = ["code", "parameter", "value", "unit", "source"]
    if list(frame.columns) != expected:
        raise ValueError(f"serum_indices.csv: columns {list(frame.columns)} != {expected}")
    cat = load_catalogue()
    out = {}
    for r in frame.itertuples(index=False):
        key = (str(r.code), str(r.parameter))
        if not str(r.source).strip():
            raise ValueError(f"serum_indices.csv: {key} has no source")
        if key in out:
            raise ValueError(f"serum_indices.csv: duplicated {key}")
        analyte = cat.get(key[0])
        if analyte is None:
            raise ValueError(f"serum_indices.csv: code {key[0]!r} is not in the analyte catalogue")
        try:
            f = conversion_factor(r.unit, analyte)
        except UnitError as exc:
            raise ValueError(f"serum_indices.csv: {key}: {exc}") from None
        out[key] = (float(r.value) * f, " ".join(str(r.source).split()))
    return out


def sync_catalogue(conn) -> None:
    """Write the catalogue into the ``analytes`` table when its version changed."""
    have = conn.execute("SELECT DISTINCT catalogue_version FROM analytes").fetchall()
    if have == [(CATALOGUE_VERSION,)]:
        return
    cat = load_catalogue()
    rows = [
        (a.code, a.name, a.panel, a.canonical_unit, a.molar_mass_g_per_mol, a.valence,
         a.plausible_low, a.plausible_high, a.skewed, a.source, CATALOGUE_VERSION)
        for a in cat
    ]
    conn.execute("DELETE FROM analytes")
    if rows:
        conn.executemany("INSERT INTO analytes VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
