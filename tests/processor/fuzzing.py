"""Hostile inputs for every parser, and the oracle that judges how meterdrop handled them.

Shared by the CI property tests (``tests/processor/test_fuzz.py``, hypothesis, small) and
the long sessions (``bench/fuzz_parsers.py``, atheris or hypothesis, ten minutes a parser),
so that both mean the same thing by "a mutated input" and by "handled correctly"; a long
run must never pass what CI would fail, or the other way round.

Inputs start from something a parser accepts (a real sample, a fixture, or a generated
file) and are then mutated the way real files go wrong and the way an attacker would
write them: lines and XML elements dropped, duplicated, reordered; cells and element
texts replaced by bad numbers, bad timestamps, huge values; headers renamed; namespaces
changed; bytes truncated, flipped or inserted (NULs, broken UTF-8, quotes, BOMs); ZIPs
nested, with lying size fields. Every decision goes through ``Choices``, which is either
a seeded ``random.Random`` (atheris' custom mutator, bench) or hypothesis draws (CI, where
failures then shrink to small inputs).

The oracle (``Oracle.check``) is the issue's contract: no exception escapes the Ingester;
every file ends ``ingested``, ``duplicate`` or ``rejected`` (rejected with a reason); the
ledger has exactly one row per file; a rejected file leaves no row in any reading table;
and no input takes longer than ``1 s + 1 s per MB`` (``budget_seconds``).
"""

from __future__ import annotations

import copy
import io
import os
import random
import re
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from lxml import etree

from processor.ingest import Ingester, Outcome
from processor.store import STAGING_PREFIX, Store

T = TypeVar("T")

SHARED = Path(__file__).resolve().parents[3] / "shared"
SAMPLES = SHARED / "samples" / "greenbutton"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "greenbutton_csv"
PARSERS = ("panoramic", "catalog", "utility_csv", "espi_xml", "zip")
READING_TABLES = (
    "panoramic_measurements", "pan42_measurements", "pulse_meter_measurements", "panoramic_catalog",
    "greenbutton_intervals", "greenbutton_usage_points", "greenbutton_reading_types",
    "greenbutton_usage_summaries",
)  # fmt: skip
MB = 1024 * 1024
MAX_INPUT = 2 * MB  # what a mutation may grow an input to


# ----------------------------------------------------------------------------- decisions


class Choices:
    """Where generators and mutators get every decision from.

    With ``rng`` the decisions are a seeded Random (reproducible from the seed); with
    ``draw`` (a hypothesis ``data.draw``) they are hypothesis choices, which shrink towards
    0: the first item of a list, ``False`` for ``chance``, so a failure shrinks to a small,
    lightly mutated file.
    """

    def __init__(self, rng: random.Random | None = None, draw: Callable[[Any], Any] | None = None) -> None:
        assert (rng is None) != (draw is None)
        self.rng = rng
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        if self.draw is not None:
            from hypothesis import strategies as st

            return int(self.draw(st.integers(low, high)))
        assert self.rng is not None
        return self.rng.randint(low, high)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.integer(0, len(items) - 1)]

    def chance(self, percent: int) -> bool:
        """True ``percent`` percent of the time; shrinks to False."""
        return self.integer(0, 99) >= 100 - percent


# ----------------------------------------------------------------------------- value pools

BAD_NUMBERS = [
    "", " ", "N/A", "abc", "1e309", "-1e309", "NaN", "nan", "inf", "-inf", "Infinity", "1.5", "-1", "-0",
    "99999999999999999999999999", "-9223372036854775809", "9223372036854775808", "2147483648",
    "4294967296", "3.0e9", "1e18", "1e-320", "0x1F", "1,000", "1_000", "+5", ".5", "5.", "1e5", "-", "+",
    "\uff11\uff12", "\u0661\u0662\u0663", "\u00a05", "5\u00a0", "true", "null", "\t7", "1.2.3", "--1", "1e", "e5", "9" * 400,
]  # fmt: skip
BAD_TIMES = [
    "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z", "2024-01-01T25:00:00Z", "2024-01-01T00:60:00Z",
    "2024-01-01", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
    "10000-01-01T00:00:00Z", "2024-01-01T00:00:00+99:00", "2024-01-01T00:00:00.123456789Z",
    "2024-01-01T00:00:00.1234567890123Z", "1/1/2024", "12:00 AM", "13:00 PM", "24:00", "00:60", "0:00",
    "23:59:60", "2024-01-01 00:00:00-05:00", "2024-01-01T00:00Z", "-2024-01-01T00:00:00Z",
    "2024-W01-1", "yesterday", "1700000000", "-62135596801", "253402300800", "2025-03-09 02:30",
    "2025-11-02 01:30", "2/29/2023", "1/1/99", "00/00/0000", "2024-1-1 1:1",
]  # fmt: skip
BAD_TEXT = [
    "", "N/A", "n/a", "x", '"', '""', '"a,b"', "a\nb", "é", "\U0001f600", "\u202e", "\ufeff", "\x7f",
    " padded ", "<tag>", "&amp;", "]]>", "DROP TABLE files;--", "'; SELECT 1;--", "\\", "%s%n", "${x}",
    "vendor_id", "a" * 300,
]  # fmt: skip
BAD_VALUES = BAD_NUMBERS + BAD_TIMES + BAD_TEXT
BAD_BYTES = [
    b"\x00", b"\xff", b"\xc3", b"\xe2\x82", b'"', b"\r", b"\n", b",", b"\xef\xbb\xbf", b', "', b"\t",
    b"\x1a", b"\xc3\xa9", b"\r\n", b",,,,", b"<", b"&", b"]]>", b"\xf4\x90\x80\x80", b"\xed\xa0\x80",
]  # fmt: skip


# ----------------------------------------------------------------------------- byte mutations


def mutate_bytes(c: Choices, data: bytes) -> bytes:
    """One byte-level change: truncation, insertion, deletion, duplication or a flipped byte."""
    kind = c.pick(["truncate", "insert", "delete", "duplicate", "flip", "splice"])
    size = len(data)
    at = c.integer(0, size)
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + c.pick(BAD_BYTES) * c.integer(1, 3) + data[at:]
    if kind == "delete":
        return data[:at] + data[at + c.integer(1, 64) :]
    if kind == "duplicate":
        end = min(size, at + c.integer(1, 256))
        return data[:end] + data[at:end] + data[end:]
    if kind == "flip" and size:
        at = min(at, size - 1)
        return data[:at] + bytes([data[at] ^ (1 << c.integer(0, 7))]) + data[at + 1 :]
    end = min(size, at + c.integer(1, 128))
    other = c.integer(0, size)
    return data[:other] + data[at:end] + data[other:]


# ----------------------------------------------------------------------------- CSV inputs

PANORAMIC_HEADERS = {
    "measurements": [
        "device_id", "device_name", "measurement_time(UTC)", "resolution(minutes)", "site_id", "site_name",
        "current(A)", "voltage(V)", "power(W)", "power_factor", "energy(Wh)",
    ],
    "pan42": [
        "device_id", "device_name", "measurement_time(UTC)", "resolution(minutes)", "site_id", "site_name",
        "phase", "current(A)", "voltage(V)", "power(W)", "power_factor", "energy(Wh)", "reactive power(VAR)",
        "consumed active energy(Wh)", "frequency(Hz)",
    ],
    "pulse": [
        "Meter_id", "Meter_type", "Meter_name", "Meter_Unit", "measurement_time(UTC)", "resolution(minutes)",
        "site_id", "site_name", "power(W)", "energy(Wh)", "Flow", "Volume",
    ],
}  # fmt: skip
HEADER_POOL = [
    "device_id", "DEVICE_ID", " device_id ", "measurement_time(UTC)", "MEASUREMENT_TIME(UTC)",
    "measurement_time", "resolution(min)", "RESOLUTION(minutes)", "energy(KWh)", "ENERGY(MWh)", "energy(J)",
    "power(kW)", "power(MW)", "power()", "power((W))", "Meter_id", "phase", "frequency(Hz)", "site_id",
    "id", "entity_id", "type", "name", "entity_kind", "file_id", "source_line", "snapshot_date", "", " ",
    "\ufeffdevice_id", "a,b", '"quoted"', "unknown(column)", "x" * 200, "é(€)", "TYPE", "DATE",
    "START TIME", "END TIME", "USAGE", "USAGE (kWh)", "USAGE (furlongs)", "COST", "NOTES", "UNITS",
    "IMPORT (kWh)", "EXPORT (kWh)", "Meter Number", "Consumption", "Duration",
]  # fmt: skip
_TEXT_OK = ["Sensor 1", "Main, Plant 0", "Plant North", "N/A", "", "R", "S", "T", "Électricité", "kWh", "m3"]
_TIME_FORMATS = [
    "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S+02:00", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%d %H:%M",
]  # fmt: skip


def _kind(header_name: str) -> str:
    name = header_name.lower()
    if "time" in name:
        return "time"
    if "resolution" in name:
        return "int"
    if name.endswith("_id"):
        return "id"
    if "(" in name or name in ("power_factor", "flow", "volume"):
        return "float"
    return "text"


def _cell(c: Choices, kind: str, row: int, start: datetime, step: int) -> str:
    if kind == "id":
        return str(1000 + c.integer(0, 5))
    if kind == "int":
        return str(step)
    if kind == "time":
        moment = start + timedelta(minutes=step * row)
        return moment.strftime(c.pick(_TIME_FORMATS))
    if kind == "float":
        if c.chance(10):
            return c.pick(["N/A", "", '"192000.01"'])
        return f"{c.integer(-1000, 10**6) / 1000:.3f}"
    return c.pick(_TEXT_OK)


def _csv_line(cells: Sequence[str], spaced: bool) -> str:
    quoted = [f'"{cell}"' if ("," in cell or '"' in cell) else cell for cell in cells]
    return (", " if spaced else ",").join(quoted)


def gen_panoramic(c: Choices) -> bytes:
    """A Measurements, PAN-42 or Pulse Meter export as the vendor writes it (spaces, case, units)."""
    header = list(PANORAMIC_HEADERS[c.pick(["measurements", "pan42", "pulse"])])
    if c.chance(20):
        header = [name.upper() for name in header]
    if c.chance(15):
        header = [name.replace("energy(Wh)", c.pick(["energy(KWh)", "ENERGY(MWh)"])) for name in header]
    if c.chance(15):
        header.append(c.pick(["extra(col)", "comment", "firmware"]))
    spaced = c.chance(50)
    start = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(hours=c.integer(0, 24 * 400))
    step = c.pick([1, 5, 15, 30, 60])
    lines = [_csv_line(header, spaced)]
    for row in range(c.integer(0, 12)):
        lines.append(_csv_line([_cell(c, _kind(name), row, start, step) for name in header], spaced))
    text = "\n".join(lines) + ("\n" if c.chance(90) else "")
    return (b"\xef\xbb\xbf" if c.chance(10) else b"") + text.encode()


_CATALOG_IDS = ["id", "entity_id", "device_id", "panel_id", "zone_id", "site_id", "account_id", "parent_id"]
_CATALOG_NAMES = ["name", "site_name", "device_name", "panel_name", "zone_name", "account_name"]
_CATALOG_TYPES = ["type", "device_type", "device_category", "entity_type", "electrical_type"]
_CATALOG_EXTRA = ["description", "firmware", "serial", "installed", "notes", "Unit(kWh)", "entity_kind"]


def gen_catalog(c: Choices) -> bytes:
    """A Catalog snapshot: the layout is not public, so any id/name/type-like columns plus extras."""
    columns = [c.pick(_CATALOG_IDS), c.pick(_CATALOG_NAMES), c.pick(_CATALOG_TYPES)]
    for _ in range(c.integer(0, 4)):
        columns.append(c.pick(_CATALOG_IDS + _CATALOG_NAMES + _CATALOG_EXTRA))
    order = list(range(len(columns)))
    if c.chance(30):
        order.reverse()
    header = [columns[i] for i in order]
    spaced = c.chance(30)
    lines = [_csv_line(header, spaced)]
    for row in range(c.integer(0, 10)):
        cells = []
        for name in header:
            if name.endswith("_id") or name == "id":
                cells.append("" if c.chance(10) else str(100 + row))
            elif "type" in name or "category" in name:
                cells.append(c.pick(["site", "device", "panel", "zone", "Sensor", ""]))
            else:
                cells.append(c.pick(_TEXT_OK))
        lines.append(_csv_line(cells, spaced))
    return ("\n".join(lines) + "\n").encode()


_OPOWER_HEADERS = [
    "TYPE,DATE,START TIME,END TIME,USAGE,UNITS,COST,NOTES",
    "TYPE,DATE,START TIME,END TIME,USAGE (kWh),COST,NOTES",
    "TYPE,DATE,START TIME,END TIME,IMPORT (kWh),EXPORT (kWh),COST,NOTES",
    "TYPE,DATE,USAGE,UNITS,COST,NOTES",
    "TYPE,DATE,USAGE (therms),COST,NOTES",
    "TYPE,DATE,START TIME,END TIME,USAGE (kWh),NOTES",
    "TYPE,DATE,START TIME,END TIME,IMPORT (KWh),EXPORT (KWh),NOTES",
]  # fmt: skip
_PREAMBLES = [
    "",
    'Name,JOHN DOE\nAddress,"123 MAIN ST, SAN JOSE CA 95124"\nAccount Number,1234567890\nService,Service 1\n\n',
    'Name,PAT SMITH\nAddress,"100 MARKET ST, PHILADELPHIA PA 19103"\nAccount Number,5555555555\nService,Service 1\n\n',
    "Name,X\nAccount Number,\nService,\n\n",
]  # fmt: skip


def _utility_samples() -> list[bytes]:
    files = [*sorted(FIXTURES.glob("*.csv")), SAMPLES / "SCE-NEMFILE.csv"]
    return [path.read_bytes() for path in files]


_UTILITY_SAMPLES: list[bytes] = []


def gen_utility_csv(c: Choices) -> bytes:
    """A real utility download (fixtures, the SCE sample) or a generated Opower-family table."""
    if not _UTILITY_SAMPLES:
        _UTILITY_SAMPLES.extend(_utility_samples())
    if c.chance(45):
        sample = c.pick(_UTILITY_SAMPLES)
        if len(sample) > 64 * 1024 and c.chance(70):  # the SCE sample: mostly a cut-down copy
            lines = sample.split(b"\n")
            sample = b"\n".join(lines[: c.integer(20, 400)]) + b"\n"
        return sample
    header = c.pick(_OPOWER_HEADERS)
    names = header.split(",")
    day = c.pick(["2025-03-09", "2025-11-02", "2025-06-01", "7/2/2025", "2024-02-29"])
    step = c.pick([15, 60, 1440])
    lines = [header]
    for row in range(c.integer(0, 12)):
        minutes = (row * step) % 1440
        cells = []
        for name in names:
            if name == "TYPE":
                cells.append(c.pick(["Electric usage", "Natural gas usage", "Water usage"]))
            elif name == "DATE":
                cells.append(day)
            elif name == "START TIME":
                cells.append(f"{minutes // 60:02d}:{minutes % 60:02d}")
            elif name == "END TIME":
                end = minutes + min(step, 1440 - minutes) - 1
                cells.append(f"{end // 60:02d}:{end % 60:02d}")
            elif name == "UNITS":
                cells.append(c.pick(["kWh", "therms", "CCF", "Wh", "gal"]))
            elif name == "COST":
                cells.append(c.pick(["$1.02", "-$0.50", "($0.50)", '"$1,234.50"', ""]))
            elif name == "NOTES":
                cells.append(c.pick(["", "Estimated", "This data was estimated", "actual"]))
            else:
                cells.append(f"{c.integer(0, 5000) / 100:.2f}")
        lines.append(",".join(cells))
    body = c.pick(_PREAMBLES) + "\n".join(lines) + "\n"
    if c.chance(20):
        body = body.replace("\n", "\r\n")
    return (b"\xef\xbb\xbf" if c.chance(20) else b"") + body.encode()


def _header_line(lines: list[bytes]) -> int:
    """Index of the table header (the line a header mutation should hit)."""
    for index, line in enumerate(lines[:200]):
        upper = line.upper()
        if upper.startswith((b"TYPE,", b"METER NUMBER,", b"NAME,ADDRESS,")) or b"TIME PERIOD" in upper:
            return index
    return 0


def mutate_csv(c: Choices, data: bytes) -> bytes:
    """One structural change to a CSV: lines, cells, header names, quoting, line ends, or bytes."""
    kind = c.pick([
        "set_cell", "drop_line", "dup_line", "swap_lines", "add_cell", "drop_cell", "header", "quote",
        "unbalanced_quote", "long_cell", "blank_lines", "spaces", "crlf", "cr_only", "bytes", "bytes",
        "many_lines",
    ])  # fmt: skip
    if kind == "bytes":
        return mutate_bytes(c, data)
    ending = b"\r\n" if b"\r\n" in data[:4096] else b"\n"
    lines = data.split(b"\n")
    if kind == "crlf":
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if kind == "cr_only":
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r")
    i = c.integer(0, max(len(lines) - 1, 0))
    j = c.integer(0, max(len(lines) - 1, 0))
    if kind == "drop_line" and len(lines) > 1:
        del lines[i]
    elif kind == "dup_line":
        lines.insert(i, lines[i])
    elif kind == "swap_lines":
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "blank_lines":
        lines[i:i] = [b""] * c.integer(1, 3)
    elif kind == "many_lines":  # at most about MAX_INPUT more bytes
        lines[i:i] = [lines[i]] * min(c.integer(10, 300), MAX_INPUT // (len(lines[i]) + 1) + 1)
    else:
        if kind == "header":
            i = _header_line(lines)
        cells = lines[i].rstrip(b"\r").split(b",")
        k = c.integer(0, len(cells))
        if kind == "set_cell" and k < len(cells):
            cells[k] = c.pick(BAD_VALUES).encode()
        elif kind == "header" and k < len(cells):
            cells[k] = c.pick(HEADER_POOL).encode()
        elif kind == "add_cell":
            cells.insert(k, c.pick(BAD_VALUES).encode())
        elif kind == "drop_cell" and len(cells) > 1 and k < len(cells):
            del cells[k]
        elif kind == "quote" and k < len(cells):
            cells[k] = b'"' + cells[k].replace(b'"', b'""') + b'"'
        elif kind == "unbalanced_quote" and k < len(cells):
            cells[k] = b'"' + cells[k]
        elif kind == "long_cell" and k < len(cells):
            cells[k] = c.pick([b"9", b"x", b"1,", b'"']) * c.integer(1_000, 200_000)
        elif kind == "spaces":
            cells = [b" " + cell + b" " for cell in cells]
        lines[i] = b",".join(cells) + (b"\r" if lines[i].endswith(b"\r") else b"")
    out = b"\n".join(lines)
    return out if ending == b"\n" else out.replace(b"\r\r\n", b"\r\n")


# ----------------------------------------------------------------------------- ESPI XML inputs

ATOM_NS = "http://www.w3.org/2005/Atom"
ESPI_NS = "http://naesb.org/espi"
WRONG_NAMESPACES = [
    "", "http://naesb.org/espi/", "http://naesb.org/ESPI", "http://www.w3.org/2005/Atom", "urn:x",
    "http://naesb.org/espi",
]  # fmt: skip
ESPI_TAGS = [
    "IntervalBlock", "IntervalReading", "interval", "timePeriod", "start", "duration", "value", "cost",
    "ReadingQuality", "quality", "ReadingType", "uom", "powerOfTenMultiplier", "intervalLength",
    "flowDirection", "currency", "UsagePoint", "ServiceCategory", "kind", "MeterReading",
    "LocalTimeParameters", "tzOffset", "dstStartRule", "ElectricPowerUsageSummary", "billingPeriod",
    "overallConsumptionLastPeriod", "statusTimeStamp", "entry", "link", "updated", "content", "feed",
]  # fmt: skip
HREFS = [
    "/UsagePoint/7", "/UsagePoint/7/MeterReading", "/UsagePoint/7/MeterReading/1", "/ReadingType/9",
    "/UsagePoint/7/MeterReading/1/IntervalBlock", "https://x.example/espi/1_1/resource/UsagePoint/7",
    "", "/", "//", "UsagePoint", "../../etc/passwd", "file:///etc/passwd", "http://169.254.169.254/",
    "/UsagePoint/7/MeterReading/1/IntervalBlock/1", "javascript:alert(1)", "a" * 500,
]  # fmt: skip
DST_RULES = ["360E2000", "B40E2000", "FFFFFFFF", "0", "ZZZZ", "FFFFFFFFFFFFFFFFFF", "-1", "7FFFFFFF"]


def _espi_samples(max_bytes: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(SAMPLES.glob("*.xml")) if p.stat().st_size <= max_bytes]


_ESPI_SAMPLES: dict[int, list[bytes]] = {}


def gen_espi_feed(c: Choices) -> bytes:
    """A generated ESPI feed: any prefixes, optional fields, one usage point, a few blocks."""
    atom = c.pick(["", "atom:", "ns1:"])
    e = c.pick(["espi", "ns", "ns0", "e"])
    default_espi = c.chance(20)
    ep = "" if default_espi else f"{e}:"
    if default_espi and not atom:
        atom, ep = "atom:", ""
    atom_decl = f'xmlns{":" + atom[:-1] if atom else ""}="{ATOM_NS}"'
    espi_decl = f'xmlns="{ESPI_NS}"' if default_espi else f'xmlns:{e}="{ESPI_NS}"'

    def entry(self_href: str, body: str, *, up: str | None = None, related: Sequence[str] = (),
              updated: str | None = None) -> str:  # fmt: skip
        links = f'<{atom}link rel="self" href="{self_href}"/>'
        if up:
            links += f'<{atom}link rel="up" href="{up}"/>'
        links += "".join(f'<{atom}link rel="related" href="{r}"/>' for r in related)
        stamp = f"<{atom}updated>{updated}</{atom}updated>" if updated else ""
        return f"<{atom}entry>{links}{stamp}<{atom}content>{body}</{atom}content></{atom}entry>\n"

    def tag(name: str, value: object) -> str:
        return f"<{ep}{name}>{value}</{ep}{name}>"

    updated = c.pick(["2024-01-01T00:00:00Z", "2024-06-21", None, "2024-03-01T12:00:00+02:00"])
    parts = []
    if c.chance(85):
        kind = tag("ServiceCategory", tag("kind", c.pick([0, 1, 2, 4])))
        parts.append(entry("/UsagePoint/7", tag("UsagePoint", kind), related=["/UsagePoint/7/MeterReading"]))
    if c.chance(85):
        parts.append(entry("/UsagePoint/7/MeterReading/1", f"<{ep}MeterReading/>",
                           up="/UsagePoint/7/MeterReading", related=["/ReadingType/9"]))  # fmt: skip
    if c.chance(85):
        fields = ""
        for name, values in (
            ("flowDirection", [1, 19, 4]), ("intervalLength", [900, 3600, 86400]),
            ("powerOfTenMultiplier", [-3, 0, 3]), ("uom", [72, 169, 38, 119]), ("currency", [840, 124]),
        ):  # fmt: skip
            if c.chance(80):
                fields += tag(name, c.pick(values))
        parts.append(entry("/ReadingType/9", tag("ReadingType", fields), updated=updated))
    if c.chance(30):
        ltp = tag("tzOffset", -28800) + tag("dstOffset", 3600) + tag("dstStartRule", c.pick(DST_RULES))
        parts.append(entry("/LocalTimeParameters/1", tag("LocalTimeParameters", ltp)))
    if c.chance(25):
        summary = (
            tag("billingPeriod", tag("duration", 2592000) + tag("start", 1700000000))
            + tag("billLastPeriod", 5100000)
            + tag("overallConsumptionLastPeriod", tag("powerOfTenMultiplier", 0) + tag("uom", 72) + tag("value", 3))
        )  # fmt: skip
        parts.append(entry("/UsagePoint/7/UsageSummary/1", tag("ElectricPowerUsageSummary", summary),
                           up="/UsagePoint/7/UsageSummary"))  # fmt: skip
    start = 1700000000 + 3600 * c.integer(0, 10000)
    for b in range(c.integer(0, 3)):
        readings = ""
        for r in range(c.integer(0, 8)):
            reading = ""
            if c.chance(70):
                reading += tag("cost", c.integer(0, 10**6))
            if c.chance(30):
                reading += tag("ReadingQuality", tag("quality", c.pick([0, 7, 8, 17, 19])))
            if c.chance(70):
                reading += tag("timePeriod", tag("duration", 900) + tag("start", start + 900 * r))
            reading += tag("value", c.integer(-100, 10**6))
            readings += tag("IntervalReading", reading)
        block = tag("IntervalBlock", tag("interval", tag("duration", 7200) + tag("start", start)) + readings)
        parts.append(entry(f"/UsagePoint/7/MeterReading/1/IntervalBlock/{b}", block,
                           up="/UsagePoint/7/MeterReading/1/IntervalBlock", updated=updated))  # fmt: skip
        start += 7200
    if c.chance(50):
        parts = [parts[i] for i in _shuffled(c, len(parts))]
    feed = f'<?xml version="1.0" encoding="UTF-8"?>\n<{atom}feed {atom_decl} {espi_decl}>\n{"".join(parts)}</{atom}feed>\n'
    return feed.encode()


def _shuffled(c: Choices, n: int) -> list[int]:
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        k = c.integer(0, i)
        order[i], order[k] = order[k], order[i]
    return order


def gen_espi_xml(c: Choices, *, max_sample_bytes: int = 2 * MB) -> bytes:
    """A real ESPI sample (up to ``max_sample_bytes``) or a generated feed."""
    if max_sample_bytes not in _ESPI_SAMPLES:
        _ESPI_SAMPLES[max_sample_bytes] = _espi_samples(max_sample_bytes)
    samples = _ESPI_SAMPLES[max_sample_bytes]
    if samples and c.chance(40):
        return c.pick(samples)
    return gen_espi_feed(c)


_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _espi_value(c: Choices) -> str:
    return c.pick(BAD_NUMBERS + BAD_TIMES[:12] + DST_RULES + ["0", "1", "-1", "3600", "1700000000"])


def mutate_xml(c: Choices, data: bytes) -> bytes:
    """One change to an XML tree (drop, duplicate, move, retag, renamespace, bad text, links),
    or to its bytes (truncation, broken UTF-8, a DOCTYPE) when it does not parse or by chance."""
    if c.chance(20):
        return _mutate_xml_text(c, data)
    try:
        root = etree.fromstring(data, _XML_PARSER)
    except etree.XMLSyntaxError:
        return mutate_bytes(c, data)
    elements = [el for el in root.iter() if isinstance(el.tag, str)]
    if len(elements) > 20_000:  # the largest samples: mutate bytes rather than walking the tree
        return _mutate_xml_text(c, data)
    el = elements[c.integer(0, len(elements) - 1)]
    leaves = [x for x in elements if len(x) == 0] or elements
    kind = c.pick([
        "drop", "duplicate", "move", "reverse", "text", "text", "namespace", "retag", "href", "empty",
        "nest", "tail", "attribute",
    ])  # fmt: skip
    parent = el.getparent()
    if kind == "drop" and parent is not None:
        parent.remove(el)
    elif kind == "duplicate" and parent is not None:
        for _ in range(c.integer(1, 3)):
            parent.insert(parent.index(el) + 1, copy.deepcopy(el))
    elif kind == "move" and parent is not None:
        target = elements[c.integer(0, len(elements) - 1)]
        if el not in target.iterancestors() and target is not el:
            target.insert(c.integer(0, len(target)), el)
    elif kind == "reverse":
        children = list(el)
        for child in children:
            el.remove(child)
        for child in reversed(children):
            el.append(child)
    elif kind == "text":
        leaf = leaves[c.integer(0, len(leaves) - 1)]
        leaf.text = _espi_value(c)
    elif kind == "namespace":
        local = etree.QName(el).localname
        ns = c.pick(WRONG_NAMESPACES)
        el.tag = f"{{{ns}}}{local}" if ns else local
    elif kind == "retag":
        ns = etree.QName(el).namespace
        local = c.pick(ESPI_TAGS)
        el.tag = f"{{{ns}}}{local}" if ns else local
    elif kind == "href":
        links = [x for x in elements if etree.QName(x).localname == "link"] or [el]
        link = links[c.integer(0, len(links) - 1)]
        link.set("href", c.pick(HREFS))
        if c.chance(30):
            link.set("rel", c.pick(["self", "up", "related", "alternate", ""]))
    elif kind == "empty":
        for child in list(el):
            el.remove(child)
        el.text = c.pick(["", " ", "x"])
    elif kind == "nest" and parent is not None:
        host = elements[c.integer(0, len(elements) - 1)]
        if host is not el and el not in host.iterancestors():
            host.append(copy.deepcopy(el))
    elif kind == "tail":
        el.tail = c.pick(["junk", "&", " ", "\n"]) if c.chance(50) else None
    elif kind == "attribute":
        el.set(c.pick(["rel", "href", "{http://www.w3.org/XML/1998/namespace}lang", "x"]), c.pick(BAD_TEXT))
    return etree.tostring(root.getroottree(), xml_declaration=c.chance(70), encoding="UTF-8")


_PROLOG_ATTACKS = [
    b'<!DOCTYPE feed [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    b'<!DOCTYPE feed SYSTEM "http://127.0.0.1:1/evil.dtd">',
    b'<!DOCTYPE feed [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>',
    b"<!-- comment -->", b"<?pi data?>", b"<![CDATA[x]]>", b"&x;", b"&#0;", b"&#x110000;", b"&amp;",
]  # fmt: skip


def _mutate_xml_text(c: Choices, data: bytes) -> bytes:
    """Byte-level changes that an XML tree cannot express: prefixes, declarations, DOCTYPEs, cuts."""
    kind = c.pick(["bytes", "prolog", "namespace_uri", "prefix", "encoding", "bytes"])
    if kind == "prolog":
        at = data.find(b">", data.find(b"<?xml")) + 1 if data.startswith(b"<?xml") else 0
        return data[:at] + c.pick(_PROLOG_ATTACKS) + data[at:]
    if kind == "namespace_uri":
        return data.replace(c.pick([b"http://naesb.org/espi", b"http://www.w3.org/2005/Atom"]),
                            c.pick([b"http://naesb.org/espi2", b"", b"urn:x", b"http://www.w3.org/2005/Atom"]),
                            c.integer(1, 3))  # fmt: skip
    if kind == "prefix":
        match = re.search(rb"<([A-Za-z0-9_]+):", data)
        if match:
            return data.replace(match.group(1) + b":", c.pick([b"zz:", b"", b"espi:"]), c.integer(1, 50))
    if kind == "encoding":
        return re.sub(rb'encoding="[^"]*"', c.pick([b'encoding="UTF-16"', b'encoding="latin-1"',
                                                     b'encoding="bogus"']), data, count=1)  # fmt: skip
    return mutate_bytes(c, data)


# ----------------------------------------------------------------------------- ZIP inputs

_MEMBER_NAMES = [
    "usage.csv", "export.csv", "electric.xml", "gas.xml", "dir/a.csv", "../../escaped.csv", "/etc/abs.csv",
    "C:\\windows\\x.csv", "nested.zip", "x" * 300, "é.csv", "same.csv", "same.csv", "", "dir/",
]  # fmt: skip


def gen_zip(c: Choices, *, depth: int = 0, max_sample_bytes: int = 256 * 1024) -> bytes:
    """A ZIP download: members of any format (each possibly mutated), sometimes nested."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate member names are meant
        for _ in range(c.integer(0, 4)):
            member_kind = c.pick(["panoramic", "catalog", "utility_csv", "espi_xml", "zip", "text"])
            if member_kind == "zip" and depth < 4:
                member = gen_zip(c, depth=depth + 1, max_sample_bytes=max_sample_bytes)
            elif member_kind == "text" or member_kind == "zip":
                member = c.pick([b"", b"hello\n", b"\x00\x01\x02", b"PK\x03\x04"])
            else:
                member = generate(member_kind, c, max_sample_bytes=max_sample_bytes)
                if c.chance(40):
                    member = mutate(member_kind, c, member)
            method = c.pick([zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
            archive.writestr(
                zipfile.ZipInfo(c.pick(_MEMBER_NAMES) or "unnamed"), member, compress_type=method
            )
    return buffer.getvalue()


def _patch_sizes(c: Choices, data: bytes) -> bytes:
    """Lie about a member's sizes in the central directory or local header (zip bombs do)."""
    signature, offset = c.pick([(b"PK\x01\x02", 24), (b"PK\x01\x02", 20), (b"PK\x03\x04", 22)])
    positions = [m.start() for m in re.finditer(re.escape(signature), data)]
    if not positions:
        return mutate_bytes(c, data)
    at = positions[c.integer(0, len(positions) - 1)] + offset
    value = c.pick([0, 1, 100, 2**20, 2**31, 2**32 - 1])
    return data[:at] + value.to_bytes(4, "little") + data[at + 4 :]


def mutate_zip(c: Choices, data: bytes) -> bytes:
    """Change a member (by its own format's mutations), nest the ZIP, or break its structure."""
    kind = c.pick(["member", "member", "nest", "sizes", "bytes", "duplicate_member"])
    if kind == "sizes":
        return _patch_sizes(c, data)
    if kind == "bytes":
        return mutate_bytes(c, data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [(info, archive.read(info)) for info in archive.infolist()]
    except Exception:  # anything unreadable is simply mutated as bytes
        return mutate_bytes(c, data)
    if kind == "nest" or not members:
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(c.pick(_MEMBER_NAMES) or "inner.zip", data)
        return inner.getvalue()
    k = c.integer(0, len(members) - 1)
    info, content = members[k]
    if kind == "duplicate_member":
        members.append((info, content))
    else:
        member_kind = _kind_of(content)
        members[k] = (info, mutate(member_kind, c, content))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate member names are meant
        for member_info, member_data in members:
            archive.writestr(member_info, member_data, compress_type=member_info.compress_type)
    return out.getvalue()


def _kind_of(content: bytes) -> str:
    """Which mutations suit a member: by its content, as the ingester decides too."""
    if content.startswith(b"PK"):
        return "zip"
    if content.lstrip(b"\xef\xbb\xbf \r\n\t").startswith(b"<"):
        return "espi_xml"
    return "panoramic"


# ----------------------------------------------------------------------------- entry points

_GENERATORS: dict[str, Callable[..., bytes]] = {
    "panoramic": lambda c, **kw: gen_panoramic(c),
    "catalog": lambda c, **kw: gen_catalog(c),
    "utility_csv": lambda c, **kw: gen_utility_csv(c),
    "espi_xml": lambda c, max_sample_bytes=2 * MB: gen_espi_xml(c, max_sample_bytes=max_sample_bytes),
    "zip": lambda c, max_sample_bytes=256 * 1024: gen_zip(c, max_sample_bytes=max_sample_bytes),
}
_MUTATORS: dict[str, Callable[[Choices, bytes], bytes]] = {
    "panoramic": mutate_csv,
    "catalog": mutate_csv,
    "utility_csv": mutate_csv,
    "espi_xml": mutate_xml,
    "zip": mutate_zip,
}


def generate(parser: str, c: Choices, *, max_sample_bytes: int = 2 * MB) -> bytes:
    """A base input for ``parser``: something it should accept, before any mutation."""
    return _GENERATORS[parser](c, max_sample_bytes=max_sample_bytes)


def mutate(parser: str, c: Choices, data: bytes, max_size: int = MAX_INPUT) -> bytes:
    """One structural (or byte-level) mutation suited to ``parser``'s format, cut to ``max_size``.

    The cut keeps repeated mutations (a long cell, then many copies of its line) from growing
    an input, and the fuzzer's own memory, without bound.
    """
    return _MUTATORS[parser](c, data)[:max_size]


def hostile_input(
    parser: str, c: Choices, *, max_mutations: int = 6, max_sample_bytes: int = 2 * MB
) -> bytes:
    """A base input followed by up to ``max_mutations`` mutations (zero: the base is checked too)."""
    data = generate(parser, c, max_sample_bytes=max_sample_bytes)
    for _ in range(c.integer(0, max_mutations)):
        data = mutate(parser, c, data)
    return data


def seeds(parser: str, count: int, *, max_sample_bytes: int = 2 * MB) -> Iterator[bytes]:
    """Unmutated base inputs (a fuzzer's starting corpus), reproducible from their index."""
    for index in range(count):
        yield generate(parser, Choices(random.Random(index)), max_sample_bytes=max_sample_bytes)


# ----------------------------------------------------------------------------- the oracle


def budget_seconds(size: int, files: int = 1) -> float:
    """The longest an input may take: 1 s per MB, plus 1 s per file for the fixed per-file work
    (a DuckDB transaction, the ledger) that a tiny file pays as well.

    A ZIP is one input but many files (each member is ledgered and ingested on its own), so
    it gets 1 s for each, and ``size`` is then what it expands to (``work_bytes``).
    """
    return files * 1.0 + size / MB


def work_bytes(data: bytes, depth: int = 0) -> int:
    """Bytes the ingester has to read for ``data``: itself, plus, for a ZIP, what its members
    expand to (nested ZIPs too, as deep as the ingester goes). Best effort: unreadable is 0."""
    if not data.startswith(b"PK") or depth > 3:
        return len(data)
    total = len(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.file_size > 256 * MB or info.is_dir():
                    continue  # refused before extraction by the ingester's limits
                with archive.open(info) as member:
                    total += work_bytes(member.read(), depth + 1)
    except Exception:  # a broken archive is refused early; what was counted stands
        pass
    return total


def _walk(outcome: Outcome) -> Iterator[Outcome]:
    yield outcome
    for member in outcome.members:
        yield from _walk(member)


# Defects the fuzzer found outside the parser modules (processor/ingest.py, processor/store.py),
# all fixed since, each with a regression test in test_hostile_files.py. The labels stay so that
# bench/fuzz_parsers.py names one if it ever returns; the CI tests (test_fuzz.py) excuse none.
KNOWN_DEFECTS = {
    "empty-merge": "an empty frame reaches Store.merge (a utility CSV without readings): pyarrow ValueError",
    "zip-error": "a ZIP member whose name breaks zipfile escapes _ingest_archive (UnicodeDecodeError for a "
    "name flagged UTF-8 that is not, IndexError for an empty name)",
    "zip-partial": "a ZIP rejected part-way keeps the members ingested before the error, outside its outcome",
}


def _known_crash(error: BaseException, trace: str) -> str | None:
    if isinstance(error, ValueError) and "Must pass schema, or at least one RecordBatch" in str(error):
        return "empty-merge"
    if "_ingest_archive" in trace and (
        isinstance(error, UnicodeDecodeError) or (isinstance(error, IndexError) and "is_dir" in trace)
    ):
        return "zip-error"
    return None


class Oracle:
    """Checks one ingest against the contract; an empty list means all of it held."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _one(self, sql: str, params: Sequence[object] = ()) -> Any:
        row = self.store.con.execute(sql, list(params)).fetchone()
        return row[0] if row is not None and len(row) == 1 else row

    def ledger_mark(self) -> tuple[int, int]:
        """(highest id, row count) of the ledger before an ingest."""
        return self._one("SELECT coalesce(max(id), 0), count(*) FROM files")

    def check(self, outcome: Outcome, mark: tuple[int, int]) -> tuple[list[str], str | None]:
        """Problems with this outcome, and which known defect (if any) explains all of them."""
        problems: list[str] = []
        if outcome.status not in ("ingested", "duplicate", "rejected"):
            problems.append(f"top-level status {outcome.status!r} for a new file")
        outcomes = list(_walk(outcome))
        for o in outcomes:
            problems += self._check_outcome(o)
        # One ledger row per file: every row this ingest wrote belongs to an outcome, none is missing.
        before_id, before_rows = mark
        tree_ids = {o.file_id for o in outcomes if o.status != "unchanged" and o.file_id is not None}
        written = dict(
            self.store.con.execute("SELECT id, path FROM files WHERE id > ?", [before_id]).fetchall()
        )
        stray = {i: path for i, path in written.items() if i not in tree_ids}
        known = None
        if stray:
            rejected = [o.path + "!" for o in outcomes if o.status == "rejected"]
            if all(any(path.startswith(r) for r in rejected) for path in stray.values()):
                known = "zip-partial"
            shown = ", ".join(f"#{i} {path}" for i, path in sorted(stray.items())[:3])
            problems.append(f"{len(stray)} ledger row(s) written but in no outcome: {shown}")
        rows = self._one("SELECT count(*) FROM files")
        if rows != before_rows + len(written):
            problems.append(f"ledger went from {before_rows} to {rows} rows, {len(written)} written")
        top_rows = self._one("SELECT count(*) FROM files WHERE path = ?", [outcome.path])
        if top_rows != 1:
            problems.append(f"ledger has {top_rows} rows for {outcome.path}")
        for table in READING_TABLES:
            orphans = self._one(
                f"SELECT count(*) FROM {table} r LEFT JOIN files f ON f.id = r.file_id "
                "WHERE f.id IS NULL OR f.status <> 'ingested' OR f.path <> r.source_path"
            )
            if orphans:
                problems.append(f"{orphans} row(s) in {table} whose file is not an ingested ledger row")
        staging = self._one(
            "SELECT count(*) FROM information_schema.tables WHERE starts_with(table_name, ?)",
            [STAGING_PREFIX],
        )
        if staging:
            problems.append(f"{staging} scratch table(s) left behind")
        # The known defect explains the problems only if the stray rows are all there is.
        if known and len(problems) != 1:
            known = None
        return problems, known

    def _check_outcome(self, o: Outcome) -> list[str]:
        problems = []
        if o.status == "unchanged":  # only a ZIP member repeating an earlier member's name and content
            if o.file_id is None or self._one("SELECT count(*) FROM files WHERE id = ?", [o.file_id]) != 1:
                problems.append(f"{o.path}: unchanged, but its ledger row #{o.file_id} does not exist")
            return problems
        if o.status not in ("ingested", "duplicate", "rejected"):
            return [f"{o.path}: status {o.status!r}"]
        if o.status == "rejected" and not (o.detail and o.detail.strip()):
            problems.append(f"{o.path}: rejected without a reason")
        if o.file_id is None:
            return [*problems, f"{o.path}: {o.status} without a ledger id"]
        row = self.store.con.execute(
            "SELECT path, status, error FROM files WHERE id = ?", [o.file_id]
        ).fetchone()
        if row is None:
            return [*problems, f"{o.path}: no ledger row #{o.file_id}"]
        path, status, error = row
        if (path, status) != (o.path, o.status):
            problems.append(f"ledger row #{o.file_id} is {(path, status)}, outcome says {(o.path, o.status)}")
        if o.status == "rejected":
            if error != o.detail:
                problems.append(f"{o.path}: ledger error {error!r} is not the reason {o.detail!r}")
            # Rows by source_path are covered by the orphan check (every row's file is an ingested
            # ledger row of that path); by id, nothing of a rejected file may remain.
            for table in READING_TABLES:
                left = self._one(f"SELECT count(*) FROM {table} WHERE file_id = ?", [o.file_id])
                if left:
                    problems.append(f"{o.path}: rejected, yet {left} row(s) of it in {table}")
        elif error is not None:
            problems.append(f"{o.path}: {o.status} with an error {error!r}")
        return problems


# ----------------------------------------------------------------------------- one run


@dataclass
class Result:
    """What happened to one input; ``known`` names the KNOWN_DEFECTS entry that explains a failure."""

    status: str  # ingested, duplicate, rejected, crash
    detail: str | None
    seconds: float
    size: int
    problems: list[str] = field(default_factory=list)
    known: str | None = None
    files: int = 1  # the input and, for a ZIP, each member (each is a file of its own)
    work: int = 0  # bytes to read: the input, or what a ZIP expands to

    @property
    def failed(self) -> bool:
        """The contract was broken (crash or oracle problem), whether or not the cause is known."""
        return self.status == "crash" or bool(self.problems)

    @property
    def budget(self) -> float:
        return budget_seconds(max(self.work, self.size), self.files)

    @property
    def over_budget(self) -> bool:
        return self.seconds > self.budget


class Harness:
    """One store and ingester that many inputs go through, each under a fresh file name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.store = Store(directory / "fuzz.duckdb")
        self.ingester = Ingester(self.store)
        self.oracle = Oracle(self.store)
        self.count = 0

    def close(self) -> None:
        self.store.close()

    def run(self, data: bytes, suffix: str = ".csv") -> Result:
        """Ingest ``data`` as a new file and judge the outcome; never raises for the input's sake."""
        self.count += 1
        path = self.directory / f"input-{os.getpid()}-{self.count}{suffix}"
        path.write_bytes(data)
        mark = self.oracle.ledger_mark()
        started = time.perf_counter()
        try:
            try:
                outcome = self.ingester.ingest(path)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # a panic in native code is a BaseException too
                seconds = time.perf_counter() - started
                trace = "".join(traceback.format_exception(error))
                summary = f"{type(error).__name__}: {error}"
                return Result(
                    "crash", summary, seconds, len(data), [trace[-3000:]], _known_crash(error, trace)
                )
            seconds = time.perf_counter() - started
            problems, known = self.oracle.check(outcome, mark)
            files = sum(1 for _ in _walk(outcome))
            work = work_bytes(data) if files > 1 else len(data)
            return Result(outcome.status, outcome.detail, seconds, len(data), problems, known, files, work)
        finally:
            path.unlink(missing_ok=True)

    def confirm_slow(self, data: bytes, suffix: str) -> bool:
        """Whether an input that ran over its budget is really slow, not slowed by a busy machine.

        It is run again on a fresh store and counts as slow when that run spent more CPU time
        than the budget (work that grows too fast), or more than five times the budget in wall
        time (something blocking). On the shared two-core machine these runs share, a 0.3 s
        input has taken over 2 s of wall time at a load average of 17.
        """
        scratch = Harness(self.directory / f"recheck-{self.count}")
        cpu = time.process_time()
        try:
            again = scratch.run(data, suffix)
        finally:
            scratch.close()
        cpu = time.process_time() - cpu
        return cpu > again.budget or again.seconds > 5 * again.budget


def suffix_for(parser: str) -> str:
    """A plausible file name ending; the ingester ignores names, so this is for people reading logs."""
    return {"espi_xml": ".xml", "zip": ".zip"}.get(parser, ".csv")


def reason_kind(detail: str | None) -> str:
    """A rejection reason without its line numbers and quoted values, for tallies."""
    if not detail:
        return "(none)"
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "…", detail)
    text = re.sub(r"\d[\d,._]*", "N", text)
    return text[:90]
