"""Utility "Download My Data" CSV files, read into the shared Green Button interval table.

Utilities that offer Green Button also offer a CSV download, and every one of them writes
its own layout (formats.md section 3).  The layout is told from the content alone, never
from the file name (downloads get renamed and come out of ZIPs):

``opower``
    PG&E and the other Opower utilities: a ``Name``/``Address``/``Account Number``/
    ``Service`` preamble, then ``TYPE,DATE,START TIME,END TIME,...`` with ``USAGE``
    plus ``UNITS``, ``USAGE (kWh)``, ``IMPORT (kWh),EXPORT (kWh)`` or, for daily gas,
    ``TYPE,DATE,USAGE,...`` without times.  Any header with a ``COST`` column.
``peco_pse``
    PECO and PSE: the same table without ``COST`` (``USAGE (kWh),NOTES``).
``seattle``
    Seattle City Light: ``IMPORT (KWh),EXPORT (KWh)`` without ``COST``.
``avangrid``
    One flat table that repeats name, address, account and service on every row; the
    start and end times carry UTC offsets (``2026-01-01 00:00:00-05:00``).
``sce``
    Southern California Edison: per-day sections, each with an ``Energy Delivered`` or
    ``Energy Received`` table of ``"<start> to <end>","<kWh>","<quality>"`` rows; CRLF
    and no-break spaces (U+00A0) throughout.
``sdge``
    SDG&E: a long ``key,value`` preamble, then ``Meter Number,Date,Start Time,Duration,
    Consumption,Generation,Net`` with 12-hour times and the duration in minutes.

Why the choices below:

* Time zone.  Except for Avangrid, the files write local wall-clock times without a
  zone.  An explicit ``timezone`` wins; PG&E (its name in the preamble, or a California
  address), SCE and SDG&E are California utilities and default to America/Los_Angeles;
  otherwise the caller's ``fallback_timezone`` (the system zone) is used, and without
  any the file is rejected asking for ``--timezone`` rather than guessing, because a
  wrong zone silently shifts every reading.  Rows with UTC offsets use the offsets.
* END TIME is inclusive (``00:00``-``00:59`` is one hour, ``00:00``-``00:14`` is 15
  minutes, gas ``0:00``-``23:59`` is one day).  An end that is already on a 5-minute
  boundary (``00:00``-``01:00``, SCE's ``00:00:00 to 00:15:00``) is taken as exclusive,
  so both conventions give the same intervals.  Rows without times are one local day.
* Daylight saving (shown for America/Los_Angeles; any zone works the same way):

  - Fall back.  PG&E writes 24 rows and sums both 01:00 hours into one ``01:00,01:59``
    row.  A local start that occurs twice on the clock but only once in the file is
    such a sum: it starts at the first occurrence (01:00 PDT = 08:00 UTC) and lasts its
    written length plus the repeated hour (7200 s), so nothing vanishes and nothing
    collides.  (A summed 15-minute row ``01:00``-``01:14`` likewise starts at 08:00 UTC
    and lasts 900 + 3600 s.)  When the file writes the repeated times twice (25 hourly
    rows, as SDG&E does), the first row is the earlier instant (01:00 PDT, 08:00 UTC)
    and the second the later one (01:00 PST, 09:00 UTC), each with its written length
    (3600 s).  "Twice" is counted per series (meter, TYPE, flow) within one file.
  - Spring forward.  A row for the non-existent 02:00 is kept, with its value, as a
    zero-length interval (duration 0) at the instant the clock jumps, 10:00 UTC
    (= 03:00 PDT): daily sums stay right, and it cannot collide with the real 03:00
    row (10:00 UTC, 3600 s).  Non-existent times are read with the offset in force
    before the gap (as ``zoneinfo`` does with fold=0), so a non-existent 02:15 becomes
    10:15 UTC, again with duration 0.
  - A local day lasts 82800 s on the spring day and 90000 s on the fall day, like
    ESPI's daily readings.

* Units.  kWh becomes Wh (value = written * 1000, ``power_of_ten_multiplier`` 3,
  ``raw_value`` as written); therms stay therms (multiplier 0); CCF (hundred cubic
  feet) becomes ft3 with value = written * 100 (multiplier 2), likewise MCF (ft3, 3),
  kgal (gal, 3) and dekatherms (therm, 1).  An unknown unit rejects the file: a value
  whose size is unknown is worse than none.  The service kind comes from TYPE (or
  SDG&E's ``Resource``), else from the unit (Wh: electricity, therm/ft3: gas, gal: water).
* Flows.  ``USAGE``, ``IMPORT``, ``Consumption`` and SCE's *Delivered* are flow 1,
  ``EXPORT``, ``Generation`` and SCE's *Received* are flow 19, SDG&E's ``Net`` is kept
  as flow 4 (net) since it is what the utility bills.  An import/export row becomes one
  row per flow; its ``COST`` is put on the flow-1 row only, so summing cost does not
  count it twice.  An empty value cell is no reading (not zero) and produces no row, so
  it cannot overwrite a reading from another download.
* Identity.  ``usage_point`` must be the same in every download of the same meter so
  newer downloads replace older ones: ``opower:<account number>[:<service>]`` for the
  Opower family (PG&E, PECO, PSE, Seattle: one family, so a header with or without
  ``COST`` does not split an account), ``avangrid:<account number>[:<service>]``,
  ``sdge:<meter number>``, ``sce:<location>``; the bare layout name when the file
  names no account.  ``reading_type`` is ``csv:<service kind>:flow<n>:<uom>:<period>``
  where the period is the written interval length as ISO 8601 (``PT15M``, ``PT1H``,
  ``P1D``), e.g. ``csv:electricity:flow1:Wh:PT1H``; it is taken from the written length,
  not the stored duration, so DST rows stay in their series.
* ``quality`` is ``estimated`` when the notes or SCE's reading quality mention an
  estimate, ``edited``/``validated`` for those words, ``valid`` for "actual", else null.
  ``cost`` is in currency units (``$1,234.50`` -> 1234.5, ``-$0.50`` and ``($0.50)``
  -> -0.5); ``currency`` is USD when the cell has a ``$``, else null.
* ``source_line`` is the physical line (1-based) of the row; rows keep file order.

Bad input (a number, date or time that does not parse, a wrong field count, an unknown
unit or cost) rejects the whole file with ``Rejected("line N: ...")`` naming the earliest
bad line.  Two leniencies, for downloads re-saved by a spreadsheet (not seen in the
samples, but harmless): a row that drops its trailing empty NOTES cell is accepted, and
text that is not UTF-8 is read as cp1252 (everything parsed is ASCII).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from processor.errors import Rejected, at_line
from processor.greenbutton.model import INTERVAL_SCHEMA

FORMAT_NAME = "greenbutton_csv"
LOS_ANGELES = "America/Los_Angeles"
LAYOUTS = ("opower", "peco_pse", "seattle", "avangrid", "sce", "sdge")
BOM = b"\xef\xbb\xbf"
DAY_S = 86400
# Parsed whole, in Python's csv module and then polars: about 36 times the file in memory
# (15 MB took 560 MiB). 32 MiB is over six years of one meter's 15-minute readings; a
# larger file is refused before any of that, so memory stays near 1 GiB.
MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class UtilityCsv:
    """One parsed utility CSV download.

    ``layout`` is one of ``LAYOUTS``; ``timezone`` is the IANA zone used to read local
    times, ``"offset"`` when every row carried its own UTC offset, or ``"none"`` for a
    table without rows (recorded in the ledger so a wrong zone can be spotted later);
    ``intervals`` has exactly ``model.INTERVAL_SCHEMA``.
    """

    layout: str
    timezone: str
    intervals: pl.DataFrame


# --------------------------------------------------------------------------- reading


def _reject(line: int, message: str) -> Rejected:
    return Rejected(at_line(line, message), format_name=FORMAT_NAME)


def _decode(data: bytes) -> str:
    """The file as text with NBSP made plain spaces (SCE writes them inside timestamps).

    Downloads are UTF-8 (PG&E with a BOM); one re-saved by a spreadsheet on Windows may
    be cp1252, which is accepted because every field parsed here is ASCII.
    """
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise _reject(data.count(b"\n", 0, error.start) + 1, "not UTF-8 text") from None
    return text.replace("\u00a0", " ")


@dataclass(frozen=True)
class _Record:
    line: int  # physical line the record starts on
    cells: list[str]


def _records(text: str, *, lenient: bool = False) -> list[_Record]:
    """CSV records with their physical line numbers (CRLF or LF; quoted commas kept)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    reader = csv.reader(line.removesuffix("\r") for line in lines)
    out: list[_Record] = []
    line = 1
    try:
        for cells in reader:
            out.append(_Record(line, cells))
            line = reader.line_num + 1
    except csv.Error as error:
        if lenient:
            return out
        raise _reject(line, f"not CSV: {error}") from None
    return out


def _blank(cells: Sequence[str]) -> bool:
    return all(not cell.strip() for cell in cells)


def _norm(cell: str) -> str:
    """A header cell compared without case, NBSPs or doubled spaces."""
    return " ".join(cell.split()).upper()


# --------------------------------------------------------------------------- headers

_SCE_HEADER = re.compile(r"^ENERGY\b.*\bTIME PERIOD$")
_VALUE_HEADER = re.compile(r"^(USAGE|IMPORT|EXPORT|CONSUMPTION|GENERATION|NET)\s*(?:\((.*)\))?$")
_VALUE_FLOWS = {"USAGE": 1, "IMPORT": 1, "CONSUMPTION": 1, "EXPORT": 19, "GENERATION": 19, "NET": 4}
_ROLES = {
    "TYPE": "type", "DATE": "date", "START TIME": "start", "END TIME": "end", "DURATION": "dur",
    "UNITS": "units", "UNIT": "units", "UOM": "units", "COST": "cost", "COSTS": "cost",
    "NOTES": "notes", "READING QUALITY": "notes", "ACCOUNT NUMBER": "account",
    "SERVICE": "service", "METER NUMBER": "meter",
}  # fmt: skip
_AVANGRID_LEAD = ["NAME", "ADDRESS", "ACCOUNT NUMBER", "SERVICE", "TYPE", "DATE", "START TIME", "END TIME"]
_SDGE_LEAD = ["METER NUMBER", "DATE", "START TIME", "DURATION", "CONSUMPTION"]


@dataclass(frozen=True)
class _ValueColumn:
    index: int
    label: str  # header text, for messages
    flow: int
    unit: str | None  # from the header's parentheses, e.g. "kWh"


@dataclass(frozen=True)
class _Header:
    layout: str
    line: int
    labels: list[str]
    roles: dict[str, int]
    values: tuple[_ValueColumn, ...]


def _header(cells: Sequence[str], line: int = 0) -> _Header | None:
    """The table header ``cells`` stand for, or None if they are not one we know."""
    names = [_norm(cell) for cell in cells]
    if not names:
        return None
    labels = [" ".join(cell.split()) for cell in cells]
    if len(names) >= 2 and _SCE_HEADER.match(names[0]):
        return _Header("sce", line, labels, {}, ())
    roles: dict[str, int] = {}
    values: list[_ValueColumn] = []
    for index, name in enumerate(names):
        match = _VALUE_HEADER.match(name)
        if match:
            unit = re.search(r"\((.*)\)", cells[index])
            values.append(
                _ValueColumn(index, labels[index], _VALUE_FLOWS[match[1]], unit[1].strip() if unit else None)
            )
        elif name in _ROLES:
            roles.setdefault(_ROLES[name], index)
    if not values:
        return None
    if names[: len(_SDGE_LEAD)] == _SDGE_LEAD:
        return _Header("sdge", line, labels, roles, tuple(values))
    if names[: len(_AVANGRID_LEAD)] == _AVANGRID_LEAD:
        return _Header("avangrid", line, labels, roles, tuple(values))
    if names[:2] != ["TYPE", "DATE"]:
        return None
    if "cost" in roles:
        layout = "opower"
    elif any(v.flow == 19 for v in values) or any("(KWh)" in cell for cell in cells):
        layout = "seattle"
    else:
        layout = "peco_pse"
    return _Header(layout, line, labels, roles, tuple(values))


def _find_header(records: Sequence[_Record]) -> tuple[int, _Header] | None:
    for index, record in enumerate(records):
        header = _header(record.cells, record.line)
        if header is not None:
            return index, header
    return None


def detect_utility_csv(head: str) -> str | None:
    """Layout name if the first ~64 KiB of text (BOM already removed) is one of the known
    utility CSV downloads, else None.

    Decided by the table header (and SCE's section tables), which every download of a
    layout shares, so that renamed files and files taken out of ZIPs are still known.
    The head may end mid-line; an incomplete last line is simply not matched.
    """
    found = _find_header(_records(head.replace("\u00a0", " "), lenient=True))
    return found[1].layout if found else None


# --------------------------------------------------------------------------- time zones


def _check_zone(name: str, what: str) -> str:
    """``name`` if both zoneinfo and polars know it (both are used), else reject."""
    try:
        ZoneInfo(name)
        pl.Series([datetime(2000, 1, 1)]).dt.replace_time_zone(name)
    except (ZoneInfoNotFoundError, ValueError, pl.exceptions.PolarsError):
        raise Rejected(
            f"unknown time zone {name!r} ({what}); give an IANA name such as America/New_York",
            format_name=FORMAT_NAME,
        ) from None
    return name


_PGE = re.compile(r"PG&E|PACIFIC GAS", re.IGNORECASE)
_CALIFORNIA = re.compile(r"\bCA\b[\s,]*9\d{4}\b|\bCALIFORNIA\b", re.IGNORECASE)


def _californian(layout: str, preamble: Sequence[_Record]) -> bool:
    """SCE and SDG&E always; the Opower family when the preamble names PG&E or a California
    address (PG&E's downloads do not otherwise name the utility)."""
    if layout in ("sce", "sdge"):
        return True
    text = "\n".join(",".join(record.cells) for record in preamble)
    return bool(_PGE.search(text) or _CALIFORNIA.search(text))


def _choose_zone(explicit: str | None, fallback: str | None, californian: bool) -> str | None:
    if explicit:
        return _check_zone(explicit, "--timezone")
    if californian:
        return LOS_ANGELES
    if fallback:
        return _check_zone(fallback, "system time zone")
    return None


# --------------------------------------------------------------------------- values

_UNITS: dict[str, tuple[str, int]] = {
    "wh": ("Wh", 0), "kwh": ("Wh", 3), "mwh": ("Wh", 6), "kilowatthour": ("Wh", 3),
    "varh": ("VArh", 0), "kvarh": ("VArh", 3),
    "therm": ("therm", 0), "thm": ("therm", 0), "dth": ("therm", 1), "dekatherm": ("therm", 1),
    "cf": ("ft3", 0), "ft3": ("ft3", 0), "cuft": ("ft3", 0), "cubicfeet": ("ft3", 0),
    "cubicfoot": ("ft3", 0), "ccf": ("ft3", 2), "hcf": ("ft3", 2), "mcf": ("ft3", 3),
    "m3": ("m3", 0), "gal": ("gal", 0), "gallon": ("gal", 0), "kgal": ("gal", 3),
    "btu": ("BTU", 0), "kbtu": ("BTU", 3), "mmbtu": ("BTU", 6),
}  # fmt: skip
_UOM_SERVICE = {"Wh": "electricity", "VArh": "electricity", "therm": "gas", "BTU": "gas", "ft3": "gas",
                "m3": "gas", "gal": "water"}  # fmt: skip

# Digits are written [0-9], not \\d: polars' (Rust) \\d matches any Unicode digit ("١٢"), which
# then failed a strict integer cast with a polars error instead of "is not a number".
_NUMBER = r"^[+-]?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_COST = (
    r"^(?P<open>\()?\s*(?P<s1>[+-])?\s*(?P<cur>\$)?\s*(?P<s2>[+-])?\s*"
    r"(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<close>\))?$"
)


def _unit_key(unit: pl.Expr) -> pl.Expr:
    """``kWh``, ``Therms``, ``cubic feet``, ``ft³`` -> keys of ``_UNITS``."""
    return (
        unit.str.to_lowercase()
        .str.replace_all(r"[\s.\-_]", "")
        .str.replace_all("³", "3")
        .str.replace(r"s$", "")
    )


def _service_from_hint(hint: pl.Expr) -> pl.Expr:
    lower = hint.str.to_lowercase()
    return (
        pl.when(lower.str.contains("electric"))
        .then(pl.lit("electricity"))
        .when(lower.str.contains("gas"))
        .then(pl.lit("gas"))
        .when(lower.str.contains("water"))
        .then(pl.lit("water"))
    )


def _quality(notes: pl.Expr) -> pl.Expr:
    """ESPI quality name from free-text notes; null when the text says nothing we know
    (an empty NOTES cell is not a claim that the value is valid)."""
    lower = notes.str.to_lowercase()
    return (
        pl.when(lower.str.contains("estimat"))
        .then(pl.lit("estimated"))
        .when(lower.str.contains(r"\bedit"))
        .then(pl.lit("edited"))
        .when(lower.str.contains(r"\bvalidat"))
        .then(pl.lit("validated"))
        .when(lower.str.contains(r"\bactual\b|^\s*valid\s*$"))
        .then(pl.lit("valid"))
    )


def _period(seconds: pl.Expr) -> pl.Expr:
    """ISO 8601 name of a written interval length, for ``reading_type``."""
    return (
        pl.when(seconds == DAY_S)
        .then(pl.lit("P1D"))
        .when(seconds % 3600 == 0)
        .then(pl.format("PT{}H", seconds // 3600))
        .when(seconds % 60 == 0)
        .then(pl.format("PT{}M", seconds // 60))
        .otherwise(pl.format("PT{}S", seconds))
    )


@dataclass(frozen=True)
class _Check:
    """A vectorised validation: rows where ``bad`` holds are reported with the text of ``cells``."""

    bad: pl.Expr
    cells: tuple[str, ...]
    message: str  # formatted with the cells' texts, e.g. "{} value {!r} is not a date"


_Problem = tuple[int, str]  # (line, message)


def _problems(frame: pl.DataFrame, checks: Sequence[_Check]) -> list[_Problem]:
    """The first failing row of each check, as (line, message)."""
    found: list[_Problem] = []
    for check in checks:
        hit = (
            frame.filter(check.bad.fill_null(False))
            .select(
                pl.col("line").alias("_line"),
                *(pl.col(c).cast(pl.String).alias(f"_{i}") for i, c in enumerate(check.cells)),
            )
            .head(1)
        )
        if hit.height:
            line, *texts = hit.row(0)
            found.append((line, check.message.format(*texts)))
    return found


def _raise_first(problems: Sequence[_Problem]) -> None:
    """Reject naming the earliest bad line, whatever kind of problem it has, so that the
    user is sent to the first thing to fix in the file."""
    if problems:
        line, message = min(problems)
        raise _reject(line, message)


# --------------------------------------------------------------------------- times

_DATE_PART = r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}|[0-9]{1,2}/[0-9]{1,2}/[0-9]{2}(?:[0-9]{2})?"
_TIME_PART = r"[0-9]{1,2}:[0-9]{2}(?::[0-9]{2})?(?:\s*[AaPp]\.?[Mm]\.?)?"
_STAMP = rf"^(?:(?P<d>{_DATE_PART})(?:\s+|T))?(?P<t>{_TIME_PART})\s*(?P<o>Z|[+-][0-9]{{2}}:?[0-9]{{2}})?$"
_CLOCK = r"^(?P<h>[0-9]{1,2}):(?P<m>[0-9]{2})(?::(?P<s>[0-9]{2}))?\s*(?P<p>[AaPp])?"
_OFFSET = r"^(?P<sign>[+-])(?P<h>[0-9]{2}):?(?P<m>[0-9]{2})$"


def _date(text: pl.Expr) -> pl.Expr:
    """ISO, M/D/YYYY or M/D/YY (SDG&E writes both year forms); null if not a real date.

    The form is chosen by the text's shape so that ``3/1/24`` is never read as year 24.
    """
    return (
        pl.when(text.str.contains(r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}$"))
        .then(text.str.strptime(pl.Date, "%Y-%m-%d", strict=False))
        .when(text.str.contains(r"^[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}$"))
        .then(text.str.strptime(pl.Date, "%m/%d/%Y", strict=False))
        .when(text.str.contains(r"^[0-9]{1,2}/[0-9]{1,2}/[0-9]{2}$"))
        .then(text.str.strptime(pl.Date, "%m/%d/%y", strict=False))
    )


def _clock_columns(prefix: str, text: pl.Expr) -> list[pl.Expr]:
    """``<prefix>_sec`` (seconds after midnight, null if invalid) and ``<prefix>_res``
    (1 when seconds are written, else 60: the resolution of an inclusive end)."""
    parts = text.str.extract_groups(_CLOCK)
    hour = parts.struct.field("h").cast(pl.Int64)
    minute = parts.struct.field("m").cast(pl.Int64)
    second = parts.struct.field("s").cast(pl.Int64)
    half = parts.struct.field("p").str.to_uppercase()
    hour24 = pl.when(half.is_null()).then(hour).when(half == "A").then(hour % 12).otherwise(hour % 12 + 12)
    valid = (
        pl.when(half.is_null()).then(hour <= 23).otherwise((hour >= 1) & (hour <= 12))
        & (minute <= 59)
        & (second.fill_null(0) <= 59)
    )
    return [
        pl.when(valid).then(hour24 * 3600 + minute * 60 + second.fill_null(0)).alias(f"{prefix}_sec"),
        pl.when(second.is_null()).then(60).otherwise(1).alias(f"{prefix}_res"),
    ]


def _offset_seconds(text: pl.Expr) -> pl.Expr:
    parts = text.str.extract_groups(_OFFSET)
    size = parts.struct.field("h").cast(pl.Int64) * 3600 + parts.struct.field("m").cast(pl.Int64) * 60
    return (
        pl.when(text == "Z")
        .then(pl.lit(0, pl.Int64))
        .when(parts.struct.field("sign") == "-")
        .then(-size)
        .otherwise(size)
    )


def _inclusive(raw: pl.Expr, resolution: pl.Expr) -> pl.Expr:
    """Length of a row from its written start and (inclusive) end.

    ``00:59`` ends the hour that began at ``00:00``: one resolution step is added unless
    the end is already on a 5-minute boundary, which only an exclusive end can be.
    """
    return (
        pl.when((raw % 300 == 0) & (raw != 0))
        .then(raw)
        .when((raw + 1) % 300 == 0)
        .then(raw + 1)
        .when((raw + 60) % 300 == 0)
        .then(raw + 60)
        .otherwise(raw + resolution)
    )


def _parse_times(
    frame: pl.DataFrame, labels: dict[str, str], duration_unit_s: int
) -> tuple[pl.DataFrame, list[_Problem]]:
    """Add ``_start_local`` (naive wall clock), ``_nominal`` (written length in seconds),
    ``_st_off``/``_en_off`` (UTC offsets in seconds when written).

    Input columns: ``line``, ``date_s``, ``start_s``, ``end_s``, ``dur_s`` (strings or
    null).  ``start_s``/``end_s`` may be a bare time (with ``date_s``) or a full
    timestamp, optionally with an offset.
    """
    f = frame.with_columns(
        pl.col("start_s").str.extract_groups(_STAMP).alias("_st"),
        pl.col("end_s").str.extract_groups(_STAMP).alias("_en"),
        _date(pl.col("date_s")).alias("_date"),
        pl.col("dur_s").str.to_lowercase().alias("_dur_text"),
    ).with_columns(
        _date(pl.col("_st").struct.field("d")).alias("_st_date"),
        _date(pl.col("_en").struct.field("d")).alias("_en_date"),
        *_clock_columns("_st", pl.col("_st").struct.field("t")),
        *_clock_columns("_en", pl.col("_en").struct.field("t")),
        _offset_seconds(pl.col("_st").struct.field("o")).alias("_st_off"),
        _offset_seconds(pl.col("_en").struct.field("o")).alias("_en_off"),
        pl.col("_dur_text").cast(pl.Float64, strict=False).alias("_dur_num"),
    )
    dur = pl.col("_dur_text")
    whole_units = pl.col("_dur_num") * duration_unit_s
    duration = (
        # Up to a year: a longer "length" is not one, and would overflow the integer cast.
        pl.when(
            (pl.col("_dur_num") > 0) & (whole_units <= 366 * DAY_S) & (whole_units == whole_units.round())
        )
        .then(whole_units.round().cast(pl.Int64))
        .when(dur.str.contains(r"^(?:1\s*)?days?$"))
        .then(pl.lit(DAY_S, pl.Int64))
        .when(dur.str.contains(r"^(?:1\s*)?(?:hours?|hrs?)$"))
        .then(pl.lit(3600, pl.Int64))
    )
    f = f.with_columns(pl.coalesce("_st_date", "_date").alias("_row_date"), duration.alias("_dur_sec"))
    problems = _problems(
        f,
        [
            _Check(
                pl.col("date_s").is_not_null() & pl.col("_date").is_null(),
                ("date_s",),
                f"{labels['date']} value {{!r}} is not a date",
            ),
            _Check(
                pl.col("start_s").is_not_null() & pl.col("_st_sec").is_null(),
                ("start_s",),
                f"{labels['start']} value {{!r}} is not a time",
            ),
            _Check(
                pl.col("_st").struct.field("d").is_not_null() & pl.col("_st_date").is_null(),
                ("start_s",),
                f"{labels['start']} value {{!r}} is not a date and time",
            ),
            _Check(
                pl.col("end_s").is_not_null() & pl.col("_en_sec").is_null(),
                ("end_s",),
                f"{labels['end']} value {{!r}} is not a time",
            ),
            _Check(
                pl.col("_en").struct.field("d").is_not_null() & pl.col("_en_date").is_null(),
                ("end_s",),
                f"{labels['end']} value {{!r}} is not a date and time",
            ),
            _Check(
                pl.col("date_s").is_null() & pl.col("_row_date").is_null(),
                (),
                "the row has no date",
            ),
            _Check(
                pl.col("dur_s").is_not_null() & pl.col("_dur_sec").is_null(),
                ("dur_s",),
                f"{labels['dur']} value {{!r}} is not a length",
            ),
        ],
    )
    f = f.with_columns(
        (
            pl.col("_row_date").cast(pl.Datetime("us")) + pl.duration(seconds=pl.col("_st_sec").fill_null(0))
        ).alias("_start_local"),
    )
    end_written = pl.col("_en_date").cast(pl.Datetime("us")) + pl.duration(seconds=pl.col("_en_sec"))
    same_day = pl.col("_en_sec") - pl.col("_st_sec").fill_null(0)
    raw = (
        pl.when(pl.col("_en_date").is_not_null())
        .then((end_written - pl.col("_start_local")).dt.total_seconds())
        .when(same_day < 0)
        .then(same_day + DAY_S)  # an end after midnight, e.g. 23:00-00:00
        .otherwise(same_day)
    )
    f = f.with_columns(
        pl.when(pl.col("end_s").is_not_null())
        .then(_inclusive(raw, pl.col("_en_res")))
        .when(pl.col("dur_s").is_not_null())
        .then(pl.col("_dur_sec"))
        .when(pl.col("start_s").is_null())
        .then(pl.lit(DAY_S, pl.Int64))
        .alias("_nominal")
    )
    return f, problems


def _fill_gaps(frame: pl.DataFrame, local: str, utc: str, zone: str) -> pl.DataFrame:
    """Give wall-clock times that do not exist (spring forward) the instant they would have
    with the offset in force before the gap, as zoneinfo's fold=0 does.

    Only a few rows a year need this, so it is done in Python on the distinct times.
    """
    missing = frame.filter(pl.col(utc).is_null() & pl.col(local).is_not_null()).get_column(local).unique()
    if missing.len() == 0:
        return frame
    tz = ZoneInfo(zone)
    table = pl.DataFrame(
        {
            local: missing.to_list(),
            "_fill": [value.replace(tzinfo=tz).astimezone(UTC) for value in missing.to_list()],
        },
        schema={local: pl.Datetime("us"), "_fill": pl.Datetime("us", "UTC")},
    )
    return (
        frame.join(table, on=local, how="left", maintain_order="left")
        .with_columns(pl.coalesce(utc, "_fill").alias(utc))
        .drop("_fill")
    )


def _localize(frame: pl.DataFrame, zone: str | None) -> tuple[pl.DataFrame, bool]:
    """Add ``interval_start`` (UTC) and ``duration_s``; report whether the zone was used.

    ``group`` names a series within the file (same meter, type and flow), so that a
    repeated local time is recognised as the fall-back hour written twice.
    """
    has_offset = pl.col("_st_off").is_not_null()
    offset_start = (pl.col("_start_local") - pl.duration(seconds=pl.col("_st_off"))).dt.replace_time_zone(
        "UTC"
    )
    offset_duration = pl.col("_nominal") + pl.col("_st_off") - pl.coalesce("_en_off", "_st_off")
    needs_zone = bool(frame.select((~has_offset).any()).item())
    if not needs_zone:
        f = frame.with_columns(
            offset_start.alias("interval_start"),
            offset_duration.alias("duration_s"),
            pl.lit(False).alias("_gap"),
        )
        return _check_durations(f), False
    if zone is None:
        raise Rejected(
            "this download has local times without a time zone and none is known: "
            "pass --timezone with the utility's IANA zone (e.g. --timezone America/New_York)",
            format_name=FORMAT_NAME,
        )

    def local_to_utc(column: str, ambiguous: Literal["earliest", "latest"]) -> pl.Expr:
        return (
            pl.col(column)
            .dt.replace_time_zone(zone, ambiguous=ambiguous, non_existent="null")
            .dt.convert_time_zone("UTC")
        )

    f = frame.with_columns(
        (pl.col("_start_local") + pl.duration(seconds=pl.col("_nominal"))).alias("_end_local")
    ).with_columns(
        local_to_utc("_start_local", "earliest").alias("_se"),
        local_to_utc("_start_local", "latest").alias("_sl"),
        local_to_utc("_end_local", "earliest").alias("_ee"),
    )
    f = f.with_columns(pl.col("_se").is_null().alias("_gap"))
    f = _fill_gaps(f, "_start_local", "_se", zone)
    f = _fill_gaps(f, "_start_local", "_sl", zone)
    f = _fill_gaps(f, "_end_local", "_ee", zone)
    fold = (pl.col("_sl") - pl.col("_se")).dt.total_seconds()
    ambiguous = fold > 0
    keys = ["group", "_start_local"]
    occurrence = pl.int_range(pl.len()).over(keys)
    count = pl.len().over(keys)
    zone_start = pl.when(ambiguous & (occurrence > 0)).then(pl.col("_sl")).otherwise(pl.col("_se"))
    zone_duration = (
        pl.when(pl.col("_gap"))
        .then(pl.lit(0, pl.Int64))
        # written once on the clock's repeated hour: both occurrences summed into one row
        # (or an end written on the other side of the fold, e.g. SCE's "01:45 to 01:00")
        .when(ambiguous & ((count == 1) | (pl.col("_nominal") <= 0)))
        .then(pl.col("_nominal") + fold)
        .when(ambiguous)
        .then(pl.col("_nominal"))
        .otherwise((pl.col("_ee") - pl.col("_se")).dt.total_seconds())
    )
    f = f.with_columns(
        pl.when(has_offset).then(offset_start).otherwise(zone_start).alias("interval_start"),
        pl.when(has_offset).then(offset_duration).otherwise(zone_duration).alias("duration_s"),
        (pl.col("_gap") & ~has_offset).alias("_gap"),
    )
    return _check_durations(f), True


def _check_durations(frame: pl.DataFrame) -> pl.DataFrame:
    """Reject intervals that end before they start; name each row's series period.

    The period (for ``reading_type``) is the written length, or, when the written end lies
    on the other side of a fall-back fold (``01:45 to 01:00``), the real length.
    """
    bad = (pl.col("duration_s") < 0) | ((pl.col("duration_s") == 0) & ~pl.col("_gap"))
    _raise_first(
        _problems(frame, [_Check(bad, ("start_s",), "the interval starting {!r} ends before it starts")])
    )
    return frame.with_columns(
        pl.when(pl.col("_nominal") > 0)
        .then(pl.col("_nominal"))
        .otherwise(pl.col("duration_s"))
        .alias("_period_s")
    )


# --------------------------------------------------------------------------- assembly


@dataclass(frozen=True)
class _Series:
    """One value column of the wide frame and what its numbers are."""

    column: str  # column in the wide frame holding the written value
    label: str
    flow: pl.Expr
    unit: pl.Expr  # unit text, per row or constant
    with_cost: bool


def _values(frame: pl.DataFrame, series: Sequence[_Series]) -> tuple[pl.DataFrame, list[_Problem]]:
    """One row per series and non-empty value of the wide frame, with parsed numbers, units,
    costs and quality; ``_row`` links each back to its wide row for the times."""
    common = ["_row", "line", "usage_point", "service_hint", "notes_s"]
    parts = [
        frame.select(
            *common,
            pl.lit(order, pl.Int32).alias("_order"),
            pl.lit(item.label).alias("_label"),
            item.flow.cast(pl.Int32).alias("flow_direction"),
            pl.col(item.column).alias("raw_s"),
            item.unit.cast(pl.String).alias("unit_s"),
            (pl.col("cost_s") if item.with_cost else pl.lit(None, pl.String)).alias("cost_s"),
        )
        for order, item in enumerate(series)
    ]
    long = (
        pl.concat(parts)
        .filter(pl.col("raw_s").is_not_null() & (pl.col("raw_s") != ""))
        .sort("line", "_order", maintain_order=True)
    )
    unit_key = _unit_key(pl.col("unit_s"))
    cost = pl.col("cost_s").str.extract_groups(_COST)
    long = long.with_columns(
        pl.when(pl.col("raw_s").str.contains(_NUMBER))
        .then(pl.col("raw_s").str.replace_all(",", "").cast(pl.Float64, strict=False))
        .alias("raw_value"),
        unit_key.replace_strict({k: v[0] for k, v in _UNITS.items()}, default=None).alias("uom"),
        unit_key.replace_strict(
            {k: v[1] for k, v in _UNITS.items()}, default=None, return_dtype=pl.Int32
        ).alias("power_of_ten_multiplier"),
        pl.when(pl.col("cost_s").is_not_null() & (pl.col("cost_s") != "")).then(cost).alias("_cost"),
    )
    cost_field = pl.col("_cost").struct.field
    parens = cost_field("open").is_not_null() & cost_field("close").is_not_null()
    unbalanced = cost_field("open").is_not_null() != cost_field("close").is_not_null()
    problems = _problems(
        long,
        [
            _Check(pl.col("raw_value").is_null(), ("_label", "raw_s"), "{} value {!r} is not a number"),
            _Check(
                pl.col("unit_s").is_null(),
                ("_label",),
                "{} has no unit (neither a UNITS column nor a unit in the header)",
            ),
            _Check(
                pl.col("uom").is_null() & pl.col("unit_s").is_not_null(),
                ("_label", "unit_s"),
                "{} unit {!r} is not one this reader knows",
            ),
            _Check(
                pl.col("cost_s").is_not_null()
                & (pl.col("cost_s") != "")
                & (cost_field("num").is_null() | unbalanced),
                ("cost_s",),
                "COST value {!r} is not an amount",
            ),
        ],
    )
    amount = cost_field("num").str.replace_all(",", "").cast(pl.Float64, strict=False)
    negative = (
        (cost_field("s1") == "-").fill_null(False) | (cost_field("s2") == "-").fill_null(False) | parens
    )
    multiplier = pl.col("power_of_ten_multiplier")
    service = pl.coalesce(
        _service_from_hint(pl.col("service_hint")),
        pl.col("uom").replace_strict(_UOM_SERVICE, default=None),
    )
    long = long.with_columns(
        pl.when(multiplier == 0)
        .then(pl.col("raw_value"))
        .otherwise((pl.col("raw_value") * pl.lit(10.0).pow(multiplier)).round(6))
        .alias("value"),
        service.alias("service_kind"),
        pl.when(negative).then(-amount).otherwise(amount).alias("cost"),
        pl.when(cost_field("cur").is_not_null()).then(pl.lit("USD")).alias("currency"),
        _quality(pl.col("notes_s")).alias("quality"),
        pl.col("line").alias("source_line"),
    )
    return long, problems


def _assemble(values: pl.DataFrame, timed: pl.DataFrame) -> pl.DataFrame:
    """Give each value row its row's interval and build ``reading_type``; INTERVAL_SCHEMA out."""
    times = timed.select("_row", "interval_start", "duration_s", "_period_s")
    joined = values.join(times, on="_row", how="left", maintain_order="left")
    joined = joined.with_columns(
        pl.format(
            "csv:{}:flow{}:{}:{}",
            pl.col("service_kind"),
            pl.col("flow_direction"),
            pl.col("uom"),
            _period(pl.col("_period_s")),
        ).alias("reading_type")
    )
    return joined.select(pl.col(name).cast(dtype) for name, dtype in INTERVAL_SCHEMA.items())


# --------------------------------------------------------------------------- layouts


def _preamble(records: Sequence[_Record]) -> dict[str, str]:
    """``Key,Value`` lines before the table (``Name:`` and ``Name`` both), first one wins."""
    meta: dict[str, str] = {}
    for record in records:
        if len(record.cells) >= 2 and record.cells[0].strip():
            meta.setdefault(_norm(record.cells[0]).rstrip(":").strip(), record.cells[1].strip())
    return meta


_WIDE_COLUMNS = (
    "type",
    "date",
    "start",
    "end",
    "dur",
    "units",
    "cost",
    "notes",
    "account",
    "service",
    "meter",
)


@dataclass(frozen=True)
class _Wide:
    """A layout's rows as stripped strings, before times and values are parsed."""

    frame: pl.DataFrame  # line, usage_point, service_hint, group, notes_s, cost_s, date_s, start_s,
    # end_s, dur_s and the value columns named by ``series``
    series: list[_Series]
    labels: dict[str, str]  # the time columns' names, for messages
    duration_unit_s: int  # seconds in one step of a numeric Duration (SDG&E)
    problems: list[_Problem]  # rows that could not be read at all (wrong field count)


def _table(records: Sequence[_Record], index: int, header: _Header) -> tuple[pl.DataFrame, list[_Problem]]:
    """The rows under a ``header``, as stripped strings named ``<role>_s`` and ``v<i>``.

    A row with the wrong field count is left out and reported (the first one only: it is
    the earliest, and the file is rejected anyway).
    """
    width = len(header.labels)
    notes_last = header.roles.get("notes") == width - 1
    wanted = [(f"{role}_s", header.roles.get(role)) for role in _WIDE_COLUMNS]
    wanted += [(f"v{i}", value.index) for i, value in enumerate(header.values)]
    columns: dict[str, list[str | None]] = {name: [] for name, _ in wanted}
    lines: list[int] = []
    problems: list[_Problem] = []
    for record in records[index + 1 :]:
        cells = record.cells
        if _blank(cells):
            continue
        if len(cells) != width:
            # A trailing empty NOTES cell is sometimes dropped by spreadsheets re-saving the file.
            if not (notes_last and len(cells) == width - 1):
                if not problems:
                    problems.append(
                        (record.line, f"expected {width} fields as in the header, found {len(cells)}")
                    )
                continue
            cells = [*cells, ""]
        lines.append(record.line)
        for name, position in wanted:
            columns[name].append(cells[position] if position is not None else None)
    frame = pl.DataFrame(
        {"line": lines, **columns},
        schema={"line": pl.Int64, **{name: pl.String for name, _ in wanted}},
    )
    return frame.with_columns(pl.col(pl.String).str.strip_chars()), problems


def _labels(header: _Header) -> dict[str, str]:
    """The header's own spelling of the time columns, for messages."""
    defaults = {"date": "DATE", "start": "START TIME", "end": "END TIME", "dur": "Duration"}
    return {
        role: header.labels[header.roles[role]] if role in header.roles else default
        for role, default in defaults.items()
    }


def _with_identity(frame: pl.DataFrame, header: _Header, meta: dict[str, str]) -> pl.DataFrame:
    """Add ``usage_point``, ``service_hint`` and ``group`` for the table layouts."""
    layout = header.layout
    if layout == "avangrid":
        account, service = pl.col("account_s"), pl.col("service_s")
        usage_point = (
            pl.when(account.is_null() | (account == ""))
            .then(pl.lit("avangrid"))
            .when(service.is_null() | (service == ""))
            .then(pl.format("avangrid:{}", account))
            .otherwise(pl.format("avangrid:{}:{}", account, service))
        )
        hint = pl.coalesce(
            pl.when(_service_from_hint(pl.col("type_s")).is_not_null()).then(pl.col("type_s")),
            pl.col("service_s"),
        )
    elif layout == "sdge":
        fallback = f"sdge:{meta['METER NUMBER']}" if meta.get("METER NUMBER") else "sdge"
        meter = pl.col("meter_s")
        usage_point = (
            pl.when(meter.is_null() | (meter == "")).then(pl.lit(fallback)).otherwise("sdge:" + meter)
        )
        hint = pl.lit(meta.get("RESOURCE"), pl.String)
    else:
        number = meta.get("ACCOUNT NUMBER") or meta.get("ACCOUNT") or meta.get("ACCOUNT #")
        service_name = meta.get("SERVICE")
        point = f"opower:{number}" + (f":{service_name}" if service_name else "") if number else layout
        usage_point = pl.lit(point)
        hint = pl.coalesce(pl.col("type_s"), pl.lit(service_name, pl.String))
    return frame.with_columns(
        usage_point.alias("usage_point"),
        hint.cast(pl.String).alias("service_hint"),
    ).with_columns(pl.format("{}|{}", pl.col("usage_point"), pl.col("type_s").fill_null("")).alias("group"))


def _sdge_units(meta: dict[str, str]) -> tuple[str, int]:
    """SDG&E's unit (``UOM`` row) and the seconds in one ``Duration`` step (``Interval UOM``)."""
    resource = meta.get("RESOURCE", "").lower()
    unit = meta.get("UOM") or ("therms" if "gas" in resource else "kWh")
    step = meta.get("INTERVAL UOM", "minute").lower()
    seconds = DAY_S if "day" in step else 3600 if "hour" in step else 60
    return unit, seconds


def _parse_table(records: Sequence[_Record], index: int, header: _Header) -> _Wide:
    """Opower family, Avangrid and SDG&E: one header, one row per line, values in columns."""
    meta = _preamble(records[:index])
    if "start" in header.roles and "end" not in header.roles and "dur" not in header.roles:
        raise _reject(header.line, "the table has START TIME but no END TIME or Duration column")
    frame, problems = _table(records, index, header)
    unit_default: str | None = None
    duration_unit = 60
    if header.layout == "sdge":
        unit_default, duration_unit = _sdge_units(meta)
    frame = _with_identity(frame, header, meta)
    series: list[_Series] = []
    cost_taken = False
    for i, value in enumerate(header.values):
        if value.unit is not None:
            unit = pl.lit(value.unit)
        elif "units" in header.roles:
            unit = pl.col("units_s")
        else:
            unit = pl.lit(unit_default, pl.String)
        with_cost = value.flow == 1 and not cost_taken and "cost" in header.roles
        cost_taken = cost_taken or with_cost
        series.append(_Series(f"v{i}", value.label, pl.lit(value.flow), unit, with_cost))
    return _Wide(frame, series, _labels(header), duration_unit, problems)


# SCE ----------------------------------------------------------------------------------

_SCE_PERIOD = r"^(?P<start>.+?)\s+to\s+(?P<end>.+)$"


def _sce_unit(header_text: str) -> str | None:
    lower = header_text.lower()
    if "kilowatt-hour" in lower or "kwh" in lower:
        return "kWh"
    if "watt-hour" in lower:
        return "Wh"
    if "therm" in lower:
        return "therms"
    return None


def _sce_flow(name: str) -> int:
    if "RECEIVED" in name:
        return 19
    if "NET" in name.split():
        return 4
    return 1


def _sce_prose(text: str, location: str, hint: str) -> tuple[str, str]:
    """Update the meter (``For location: X``) and service (``Type of readings: X``) from a
    prose line."""
    key, _, rest = text.partition(":")
    if key.strip().lower() == "for location" and rest.strip():
        return f"sce:{rest.strip()}", hint
    if key.strip().lower() == "type of readings" and rest.strip():
        return location, rest.strip()
    return location, hint


def _parse_sce(records: Sequence[_Record], index: int) -> _Wide:
    """SCE's sections: ``Data for period starting`` lines, table headers and period rows.

    Prose lines (one cell not starting with a digit) are skipped, except ``For location:``
    (names the meter) and ``Type of readings:`` (names the service).
    """
    location, hint = "sce", "electricity"
    for record in records[:index]:
        location, hint = _sce_prose(",".join(record.cells).strip(), location, hint)
    lines: list[int] = []
    flows: list[int] = []
    units: list[str] = []
    points: list[str] = []
    periods: list[str] = []
    values: list[str] = []
    notes: list[str] = []
    problems: list[_Problem] = []
    width = 0
    flow = 1
    unit = "kWh"
    for record in records[index:]:
        cells = record.cells
        if _blank(cells):
            continue
        header = _header(cells, record.line)
        if header is not None and header.layout == "sce":
            width = len(cells)
            flow = _sce_flow(_norm(cells[0]))
            found = _sce_unit(" ".join(cells[1:]))
            if found is None:
                raise _reject(record.line, f"no known unit in the table header {cells[1].strip()!r}")
            unit = found
            continue
        if len(cells) == 1 and not cells[0].strip()[:1].isdigit():
            location, hint = _sce_prose(cells[0].strip(), location, hint)
            continue  # "Data for period starting: ..." and other prose
        if len(cells) != width:
            if not problems:
                problems.append(
                    (record.line, f"expected {width} fields as in the table header, found {len(cells)}")
                )
            continue
        lines.append(record.line)
        flows.append(flow)
        units.append(unit)
        points.append(location)
        periods.append(cells[0].strip())
        values.append(cells[1].strip())
        notes.append(cells[2].strip() if width >= 3 else "")
    frame = pl.DataFrame(
        {
            "line": lines,
            "flow": flows,
            "unit_s": units,
            "usage_point": points,
            "period_s": periods,
            "v0": values,
            "notes_s": notes,
        },
        schema={
            "line": pl.Int64,
            "flow": pl.Int32,
            "unit_s": pl.String,
            "usage_point": pl.String,
            "period_s": pl.String,
            "v0": pl.String,
            "notes_s": pl.String,
        },
    )
    period = pl.col("period_s").str.extract_groups(_SCE_PERIOD)
    frame = frame.with_columns(
        period.struct.field("start").str.strip_chars().alias("start_s"),
        period.struct.field("end").str.strip_chars().alias("end_s"),
        pl.lit(None, pl.String).alias("date_s"),
        pl.lit(None, pl.String).alias("dur_s"),
        pl.lit(None, pl.String).alias("cost_s"),
        pl.lit(hint).alias("service_hint"),
        pl.format("{}|{}", pl.col("usage_point"), pl.col("flow")).alias("group"),
    )
    problems += _problems(
        frame,
        [_Check(pl.col("start_s").is_null(), ("period_s",), "time period {!r} is not '<start> to <end>'")],
    )
    labels = {"date": "date", "start": "time period start", "end": "time period end", "dur": "duration"}
    series = [_Series("v0", "usage", pl.col("flow"), pl.col("unit_s"), False)]
    return _Wide(frame, series, labels, 60, problems)


# --------------------------------------------------------------------------- entry point


def refuse_oversized(size: int) -> None:
    """Refuse a download over ``MAX_BYTES`` (callers can check the file's size before reading it)."""
    if size > MAX_BYTES:
        raise Rejected(
            f"utility CSV download of {size:,} bytes is over the {MAX_BYTES:,} bytes this reader parses "
            "in memory: split the download by date range",
            format_name=FORMAT_NAME,
        )


def parse_utility_csv(
    data: bytes, *, timezone: str | None = None, fallback_timezone: str | None = None
) -> UtilityCsv:
    """Parse a utility CSV download into Green Button interval rows.

    ``timezone`` (the user's ``--timezone``) overrides everything; otherwise California
    utilities use America/Los_Angeles and the rest ``fallback_timezone`` (the system
    zone).  Raise processor.errors.Rejected(reason) with a reason naming the line for bad
    input, and when local times cannot be placed because no zone is known.
    """
    refuse_oversized(len(data))
    text = _decode(data)
    records = _records(text)
    found = _find_header(records)
    if found is None:
        raise Rejected(
            "not a known utility CSV download (no TYPE,DATE,... / Meter Number,Date,... / "
            "SCE Energy ... time period table header found)",
            format_name=FORMAT_NAME,
        )
    index, header = found
    zone = _choose_zone(timezone, fallback_timezone, _californian(header.layout, records[:index]))
    wide = _parse_sce(records, index) if header.layout == "sce" else _parse_table(records, index, header)
    frame = wide.frame.with_row_index("_row")
    values, value_problems = _values(frame, wide.series)
    timed, time_problems = _parse_times(frame, wide.labels, wide.duration_unit_s)
    _raise_first([*wide.problems, *value_problems, *time_problems])
    timed, zone_used = _localize(timed, zone)
    intervals = _assemble(values, timed)
    if zone_used:
        assert zone is not None
        recorded = zone
    elif frame.height:
        recorded = timezone or "offset"
    else:
        recorded = zone or "none"
    return UtilityCsv(layout=header.layout, timezone=recorded, intervals=intervals)
