"""Panoramic Power export files: which category a header belongs to, and typed rows.

The vendor does not document file names, so the category comes from the header alone
(formats.md section 1).  Values are turned into typed polars columns here; a value that
does not convert rejects the whole file with the line it sits on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import polars as pl

from processor.errors import Rejected, at_line
from processor.headers import HeaderField

Kind = Literal["text", "int", "float", "time"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind


@dataclass(frozen=True)
class MeasurementFormat:
    """One export category: its table, columns in table order, and its reading key."""

    name: str  # ledger format name
    label: str  # as the vendor calls it
    table: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _cols(spec: str) -> tuple[Column, ...]:
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(Column(name, kind))  # type: ignore[arg-type]
    return tuple(out)


MEASUREMENTS = MeasurementFormat(
    "panoramic_measurements",
    "Measurements",
    "panoramic_measurements",
    _cols(
        "device_id:text device_name:text measurement_time:time resolution_minutes:int "
        "site_id:text site_name:text current_a:float voltage_v:float power_w:float "
        "power_factor:float energy_wh:float"
    ),
    ("device_id", "measurement_time", "resolution_minutes"),
)

PAN42 = MeasurementFormat(
    "pan42_measurements",
    "PAN-42 Measurements",
    "pan42_measurements",
    _cols(
        "device_id:text device_name:text measurement_time:time resolution_minutes:int "
        "site_id:text site_name:text phase:text current_a:float voltage_v:float power_w:float "
        "power_factor:float energy_wh:float reactive_power_var:float "
        "consumed_active_energy_wh:float frequency_hz:float"
    ),
    ("device_id", "measurement_time", "resolution_minutes", "phase"),
)

PULSE_METER = MeasurementFormat(
    "pulse_meter_measurements",
    "Pulse Meter Measurements",
    "pulse_meter_measurements",
    _cols(
        "meter_id:text meter_type:text meter_name:text meter_unit:text measurement_time:time "
        "resolution_minutes:int site_id:text site_name:text power_w:float energy_wh:float "
        "flow:float volume:float"
    ),
    ("meter_id", "measurement_time", "resolution_minutes"),
)

MEASUREMENT_FORMATS = (MEASUREMENTS, PAN42, PULSE_METER)
_PAN42_ONLY = {"phase", "reactive_power_var", "consumed_active_energy_wh", "frequency_hz"}

# Columns that mark a Catalog snapshot; the vendor does not publish its CSV layout.
_CATALOG_ID_PRIORITY = (
    "id", "entity_id", "device_id", "panel_id", "zone_id", "site_id", "account_id",
)  # fmt: skip


def detect(fields: list[HeaderField]) -> MeasurementFormat | Literal["catalog"] | None:
    """The Panoramic category of a header, or None when it is none of them."""
    names = {f.column for f in fields}
    if "measurement_time" in names:
        if "meter_id" in names:
            return PULSE_METER
        if "device_id" in names:
            return PAN42 if names & _PAN42_ONLY else MEASUREMENTS
        return None
    has_id = any(n == "id" or n.endswith("_id") for n in names)
    has_name = any(n == "name" or n.endswith("_name") for n in names)
    has_type = any(n == "type" or n.endswith(("_type", "_category")) for n in names)
    return "catalog" if has_id and has_name and has_type else None


MISSING = ("", "N/A", "n/a", "N/a", "n/A")
# The same as a list expression, built once: ``is_in(MISSING)`` turned the tuple into a Series
# on every call, 26 times a file (about 0.8 ms of a 1 MB file's 25-30 ms, bench/README.md).
MISSING_LIST = pl.lit(pl.Series(MISSING, dtype=pl.String)).implode()


def _null_if_missing(raw: pl.Expr) -> pl.Expr:
    """Empty cells and the vendor's ``N/A`` are missing values."""
    return pl.when(raw.is_in(MISSING_LIST)).then(None).otherwise(raw)


_TIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",  # no offset: the column is documented as UTC
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
)


# What Panoramic writes (``2015-10-25T10:40:00Z``): without a %z directive polars parses it
# on a fast path, five times quicker than the general format above.
_VENDOR_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_VENDOR_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _first_time_format(values: pl.Series) -> str:
    """The format to try first on a column: the vendor's own when its first value has it."""
    head = values.head(1000)
    first = head.filter(~head.is_in(MISSING)).head(1).to_list()
    return _VENDOR_TIME_FORMAT if first and _VENDOR_TIME.fullmatch(first[0]) else _TIME_FORMATS[0]


def _parse_time(raw: pl.Expr, first_try: str | None) -> pl.Expr:
    """Timestamps in ``first_try``'s format only, or (None) in the first of the formats that fits."""
    tries = [first_try] if first_try else [_VENDOR_TIME_FORMAT, *_TIME_FORMATS]
    parsed = [raw.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False) for fmt in tries]
    return parsed[0] if len(parsed) == 1 else pl.coalesce(parsed)


def _typed(column: Column, raw: pl.Expr, factor: float, first_try: str | None, *, quick: bool) -> pl.Expr:
    """A column's values typed; a value that does not convert becomes NULL, as missing ones do.

    ``quick`` is the first attempt: whole numbers cast straight to integers, floats without
    the finiteness filter (together 40% of the typing time of a Measurements file). A value
    that needs the full path (``15.0`` as resolution, ``NaN``) shows up in ``_lost`` and the
    block is typed again without ``quick``.
    """
    if column.kind == "text":
        return _null_if_missing(raw)
    if column.kind == "time":
        return _parse_time(raw, first_try)
    if quick:
        number = raw.cast(pl.Int32 if column.kind == "int" else pl.Float64, strict=False)
        return _scaled(number, factor) if factor != 1.0 and column.kind == "float" else number
    # NaN and infinities ("NaN", "inf", "1e309") are not readings: null here, so they are reported.
    number = raw.cast(pl.Float64, strict=False)
    number = pl.when(number.is_finite()).then(number)
    if column.kind == "int":
        return pl.when(number == number.round()).then(number).otherwise(None).cast(pl.Int32, strict=False)
    return _scaled(number, factor) if factor != 1.0 else number


def _scaled(number: pl.Expr, factor: float) -> pl.Expr:
    """kWh or MWh in Wh, without binary noise: 1.005 kWh is 1005 Wh, not 1004.9999999999999.

    A double holds 15 significant digits exactly, more than any export writes, so rounding
    the product to 15 takes off only the error of the multiplication.
    """
    return (number * factor).round_sig_figs(15)


def _lost(present: list[Column], sources: list[str], raw: pl.DataFrame, typed: pl.DataFrame) -> bool:
    """Whether typing turned a value that is not missing into NULL, or let NaN or infinity through.

    One select over both frames side by side (no copy): on a 1 MB file each select costs
    about a millisecond whatever it computes.
    """
    checks = [
        pl.col(source).is_in(MISSING_LIST).sum() != pl.col(c.name).null_count()
        for c, source in zip(present, sources, strict=True)
        if c.kind != "text"
    ]
    checks += [(~pl.col(c.name).is_finite()).sum() > 0 for c in present if c.kind == "float"]
    if not checks:
        return False
    both = raw.select(sources).hstack(typed.get_columns())
    return bool(both.select(pl.any_horizontal(checks)).item())


def _unknown_columns(fmt: MeasurementFormat, fields: Iterable[HeaderField]) -> list[str]:
    known = set(fmt.column_names())
    return [f.raw.strip() for f in fields if f.column not in known]


def check_header(fmt: MeasurementFormat, fields: list[HeaderField]) -> list[str]:
    """Refuse headers we cannot key; return the names of columns we will not store."""
    seen: dict[str, str] = {}
    for f in fields:
        if f.column in seen:
            raise Rejected(
                f"header names {seen[f.column]!r} and {f.raw.strip()!r} mean the same column",
                format_name=fmt.name,
            )
        seen[f.column] = f.raw.strip()
    missing = [k for k in fmt.key if k not in seen]
    if missing:
        raise Rejected(f"{fmt.label} file without key column(s) {', '.join(missing)}", format_name=fmt.name)
    return _unknown_columns(fmt, fields)


def typed_rows(
    fmt: MeasurementFormat, fields: list[HeaderField], raw: pl.DataFrame, first_line: int
) -> pl.DataFrame:
    """Typed rows in table column order plus ``source_line``, or Rejected naming the line."""
    by_column = {f.column: (f"c{i}", f) for i, f in enumerate(fields)}
    present = [c for c in fmt.columns if c.name in by_column]
    sources = [by_column[c.name][0] for c in present]

    def convert(first_tries: Mapping[str, str], *, quick: bool) -> pl.DataFrame:
        return raw.select(
            _typed(
                c, pl.col(source), by_column[c.name][1].factor, first_tries.get(c.name), quick=quick
            ).alias(c.name)
            for c, source in zip(present, sources, strict=True)
        )

    first_tries = {
        c.name: _first_time_format(raw[s]) for c, s in zip(present, sources, strict=True) if c.kind == "time"
    }
    typed = convert(first_tries, quick=True)
    if _lost(present, sources, raw, typed):
        typed = convert({}, quick=False)
        if _lost(present, sources, raw, typed):
            cleaned = raw.select(
                _null_if_missing(pl.col(s)).alias(c.name) for c, s in zip(present, sources, strict=True)
            )
            _reject_first_bad_value(fmt, present, by_column, cleaned, typed, first_line)
    key_nulls = typed.select(
        pl.any_horizontal(pl.col(k).is_null() for k in fmt.key).arg_true().first()
    ).item()
    if key_nulls is not None:
        row = typed.row(key_nulls, named=True)
        empty = next(k for k in fmt.key if row[k] is None)
        raise Rejected(
            at_line(first_line + key_nulls, f"{by_column[empty][1].raw.strip()} is empty"),
            format_name=fmt.name,
        )
    n = typed.height
    return typed.select(
        *(
            pl.col(c.name) if c.name in by_column else pl.lit(None, _DTYPES[c.kind]).alias(c.name)
            for c in fmt.columns
        ),
        pl.int_range(first_line, first_line + n, dtype=pl.Int64).alias("source_line"),
    )


_DTYPES: dict[str, pl.DataType] = {
    "text": pl.String(),
    "int": pl.Int32(),
    "float": pl.Float64(),
    "time": pl.Datetime("us", "UTC"),
}


def _reject_first_bad_value(
    fmt: MeasurementFormat,
    present: list[Column],
    by_column: dict[str, tuple[str, HeaderField]],
    cleaned: pl.DataFrame,
    typed: pl.DataFrame,
    first_line: int,
) -> None:
    best: tuple[int, Column] | None = None
    for c in present:
        bad = (cleaned[c.name].is_not_null() & typed[c.name].is_null()).arg_true()
        if len(bad) and (best is None or bad[0] < best[0]):
            best = (int(bad[0]), c)
    if best is None:
        return
    index, column = best
    value = cleaned[column.name][index]
    what = {"int": "a whole number", "float": "a number", "time": "a date and time"}[column.kind]
    raise Rejected(
        at_line(first_line + index, f"{by_column[column.name][1].raw.strip()} value {value!r} is not {what}"),
        format_name=fmt.name,
    )
