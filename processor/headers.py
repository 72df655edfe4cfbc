"""Header names as vendors write them, reduced to our column names.

Panoramic writes ``device_id, device_name, measurement_time(UTC)`` with a space after
each comma, its JSON form upper-cases the same names, and receivers in the wild met
``ENERGY(KWh)`` and ``ENERGY(MWh)``.  One normalisation here lets every format
definition speak in plain snake_case with the unit as suffix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME_UNIT = re.compile(r"^(?P<name>[^()]*?)\s*(?:\((?P<unit>[^()]*)\))?$")

# unit as written (lower case) -> (unit suffix of our column, factor to that unit)
_UNITS: dict[str, tuple[str, float]] = {
    "wh": ("wh", 1.0),
    "kwh": ("wh", 1_000.0),
    "mwh": ("wh", 1_000_000.0),
    "w": ("w", 1.0),
    "kw": ("w", 1_000.0),
    "mw": ("w", 1_000_000.0),
    "var": ("var", 1.0),
    "kvar": ("var", 1_000.0),
    "a": ("a", 1.0),
    "v": ("v", 1.0),
    "hz": ("hz", 1.0),
    "utc": ("", 1.0),
    "minutes": ("minutes", 1.0),
    "minute": ("minutes", 1.0),
    "min": ("minutes", 1.0),
}


@dataclass(frozen=True)
class HeaderField:
    """One header cell: what the file said, and the column it feeds."""

    raw: str
    column: str
    factor: float = 1.0


def normalise(raw: str) -> HeaderField:
    """Map one header cell to our column name and the factor that brings it to our unit.

    ``" ENERGY(KWh)"`` becomes ``energy_wh`` with factor 1000; ``"measurement_time(UTC)"``
    becomes ``measurement_time``; an unknown unit is kept as a suffix so nothing collides.
    """
    text = " ".join(raw.replace("\ufeff", "").strip().split()).lower()
    match = _NAME_UNIT.match(text)
    name, unit = (match.group("name"), match.group("unit")) if match else (text, None)
    base = re.sub(r"[^0-9a-z]+", "_", name).strip("_")
    if unit is None:
        return HeaderField(raw, base)
    unit_key = unit.strip().lower()
    suffix, factor = _UNITS.get(unit_key, (re.sub(r"[^0-9a-z]+", "_", unit_key).strip("_"), 1.0))
    column = f"{base}_{suffix}" if suffix else base
    return HeaderField(raw, column, factor)


def normalise_all(raw_names: list[str]) -> list[HeaderField]:
    return [normalise(name) for name in raw_names]
