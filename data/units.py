"""Unit conversion to each analyte's canonical UCUM unit.

Units are parsed as UCUM with ``ucumvert`` (a UCUM grammar that builds ``pint`` units) and
converted with ``pint``. The only numbers this module adds are analyte-specific: the molar
mass (mass <-> substance) and the valence (equivalents <-> moles), both read from the
cited analyte catalogue. Export spellings that are not UCUM (``K/uL``, ``mEq/L``,
``mm Hg``) are mapped to UCUM by ``data/reference/unit_aliases.csv`` before parsing.
"""

from __future__ import annotations

import functools
import re

import pandas as pd

from data.catalogue import Analyte, reference_file

__all__ = ["UnitError", "normalise_unit", "conversion_factor", "is_dimensionless", "parse_ucum"]


class UnitError(ValueError):
    """A unit that cannot be read, or that cannot be converted for this analyte."""


@functools.lru_cache(maxsize=1)
def _registry():
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    frame = pd.read_csv(reference_file("unit_aliases.csv"), dtype=str, keep_default_na=False)
    return {s.strip().lower(): u.strip() for s, u in zip(frame["spelling"], frame["ucum"])}


_SPACES = re.compile(r"\s+")


def normalise_unit(unit: str | None) -> str | None:
    """The UCUM spelling of a unit as written in an export, or None for a blank unit.

    Matching against the alias table ignores case and surrounding spaces; a unit that is
    not in the table is returned stripped, as given (it may already be UCUM).
    """
    if unit is None or (isinstance(unit, float) and unit != unit):
        return None
    text = _SPACES.sub(" ", str(unit).replace("\u00b5", "u").replace("\u03bc", "u")).strip()
    if not text:
        return None
    return _aliases().get(text.lower(), text)


@functools.lru_cache(maxsize=4096)
def parse_ucum(ucum: str):
    """A pint quantity of 1 ``ucum``. Raises :class:`UnitError` when it does not parse."""
    # UCUM annotations ({score}, {cells}, {1.73_m2}) are dimensionless: 1 in the arithmetic
    stripped = re.sub(r"\{[^{}]*\}", "1", ucum)
    if stripped in {"1", "[pH]"}:
        return _registry().Quantity(1, "dimensionless")
    try:
        q = _registry().from_ucum(stripped)
        _ = q.dimensionality  # annotations such as {cells} can parse into tokens
    except Exception as exc:  # ucumvert raises lark / pint errors of several types
        raise UnitError(f"unit '{ucum}' is not a known UCUM unit") from exc
    return q


def is_dimensionless(ucum: str) -> bool:
    return bool(parse_ucum(ucum).dimensionless)


def _uses_equivalents(ucum: str) -> bool:
    return re.search(r"(^|[^a-z])(m|u|n)?eq([^a-z]|$)", ucum) is not None


@functools.lru_cache(maxsize=8192)
def _factor(given: str, canonical: str, molar_mass: float | None, valence: int | None, name: str) -> float:
    q = 1.0 * parse_ucum(given)
    target = 1.0 * parse_ucum(canonical)
    # equivalents -> moles: 1 eq of an ion of charge z is 1/z mol (UCUM defines eq as mol).
    if _uses_equivalents(given) and not _uses_equivalents(canonical):
        if not valence:
            raise UnitError(f"unit '{given}' needs the valence of {name}, which the catalogue lacks")
        q = q / valence
    if _uses_equivalents(canonical) and not _uses_equivalents(given):
        if not valence:
            raise UnitError(f"unit '{canonical}' needs the valence of {name}, which the catalogue lacks")
        q = q * valence
    qd, td = q.dimensionality, target.dimensionality
    if qd != td and molar_mass:
        mm = q._REGISTRY.Quantity(molar_mass, "g/mol")
        if qd.get("[substance]", 0) and not td.get("[substance]", 0):
            q = q * mm
        elif td.get("[substance]", 0) and not qd.get("[substance]", 0):
            q = q / mm
    try:
        return float(q.to(target.units).magnitude / target.magnitude)
    except Exception as exc:
        raise UnitError(f"unit '{given}' cannot be converted to {canonical} for {name}") from exc


def conversion_factor(unit: str | None, analyte: Analyte) -> float:
    """Factor f such that value[canonical] = f * value[unit], for one analyte.

    Parameters
    ----------
    unit : the unit as given in the export (any case; aliases such as ``K/uL`` accepted).
    analyte : the catalogue entry, whose ``canonical_unit``, ``molar_mass_g_per_mol`` and
        ``valence`` are used (cited in ``data/reference/analytes.csv``).

    Raises
    ------
    UnitError
        blank unit for a dimensioned analyte, unit not UCUM, or no conversion to the
        canonical unit (the message names the analyte and both units).
    """
    ucum = normalise_unit(unit)
    if ucum is None:
        if is_dimensionless(analyte.canonical_unit):
            return 1.0
        raise UnitError(f"unit missing for {analyte.name} (expected {analyte.canonical_unit})")
    return _factor(ucum, analyte.canonical_unit, analyte.molar_mass_g_per_mol, analyte.valence, analyte.name)
