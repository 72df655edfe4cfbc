"""ESPI (NAESB REQ.21) Atom feeds, streamed: interval readings out, in bounded memory.

The feed is read with lxml ``iterparse`` and every element is dropped as soon as it
has been used, so memory follows the size of one IntervalBlock, not of the file.
Elements are matched by namespace URI, never by prefix (real files use the default
namespace, ``espi:``, ``ns0:``/``ns1:`` and ``ns:``).

The object graph UsagePoint -> MeterReading -> ReadingType / IntervalBlock is rebuilt
from the entries' ``self``, ``up`` and ``related`` links, which are opaque strings:
a related link may name a child's self href or its collection (the child's up href),
may be relative, and some utilities need a prefix match.  A block whose graph is
known when its entry ends is emitted at once; the rest wait for the end of the file,
where what the file has is used (the only ReadingType, the UsagePoint in the href).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import polars as pl
from lxml import etree

from processor.errors import Rejected
from processor.greenbutton.model import (
    CURRENCIES,
    QUALITY_NAMES,
    SERVICE_KINDS,
    UOM_SYMBOLS,
)

ATOM = "{http://www.w3.org/2005/Atom}"
ESPI = "{http://naesb.org/espi}"
FORMAT = "greenbutton_xml"
_OBJECTS = {
    "UsagePoint", "MeterReading", "ReadingType", "LocalTimeParameters", "UsageSummary",
    "ElectricPowerUsageSummary",
}  # fmt: skip
_BLOCK, _READING, _INTERVAL = ESPI + "IntervalBlock", ESPI + "IntervalReading", ESPI + "interval"
_START, _DURATION = ESPI + "start", ESPI + "duration"
_EVENT_TAGS = [
    ATOM + "entry", ATOM + "link", ATOM + "updated", _BLOCK, *(ESPI + name for name in sorted(_OBJECTS)),
]  # fmt: skip
FEED_BYTES = 256 * 1024
BATCH_READINGS = 25_000  # readings converted and handed on together
TAKE_READINGS = 5_000  # parsed readings held in the tree of a block still open
_WEEKDAYS = ["", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["", "January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]  # fmt: skip
_ORDINALS = {2: "1st", 3: "2nd", 4: "3rd", 5: "4th", 6: "5th", 7: "last"}

IntervalSink = Callable[[pl.DataFrame], None]


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _text(element: Any) -> str | None:
    text = element.text
    return text.strip() if text and text.strip() else None


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Epoch seconds of 0001-01-01 and 9999-12-31T23:59:59 UTC: what a TIMESTAMPTZ and datetime can hold.
MIN_EPOCH, MAX_EPOCH = -62_135_596_800, 253_402_300_799
MAX_POWER_OF_TEN = 30  # ESPI's multipliers are -12..12; beyond 30 a scaled double means nothing


def _reject(message: str) -> Rejected:
    return Rejected(message, format_name=FORMAT)


def _int(value: object, what: str = "value", *, bits: int = 32) -> int | None:
    """An ESPI integer field, or None when empty; Rejected (naming ``what``) when it is not
    an integer that fits a signed ``bits``-bit column.

    ``int()`` alone let through ``1_000`` and non-ASCII digits, raised ValueError or
    OverflowError (an escaped crash) for ``abc`` or ``1e400``, and TypeError when the
    element had children; huge values then failed in polars or DuckDB instead.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise _reject(f"{what} has child elements where a number belongs")
    text = value.strip()
    if not text:
        return None
    if not _NUMBER.fullmatch(text):
        raise _reject(f"{what} {text!r} is not a number")
    try:
        number = int(text)
    except ValueError:
        number = int(float(text)) if math.isfinite(float(text)) else 2**bits
    if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
        raise _reject(f"{what} {text!r} is out of range")
    return number


def _multiplier(value: object, what: str) -> int | None:
    power = _int(value, what)
    if power is not None and abs(power) > MAX_POWER_OF_TEN:
        raise _reject(f"{what} {power} is not a power of ten ESPI uses")
    return power


def _string(value: object, what: str) -> str | None:
    """A text field; an element with children where text belongs is refused, not stored as a struct."""
    if value is not None and not isinstance(value, str):
        raise _reject(f"{what} has child elements where text belongs")
    return value


def _timestamp(seconds: float | None, what: str) -> datetime | None:
    """Epoch seconds as a UTC datetime; times outside years 1-9999 are refused, not a crash."""
    if seconds is None:
        return None
    if not MIN_EPOCH <= seconds <= MAX_EPOCH:
        raise _reject(f"{what} {seconds:g} is not a time (outside the years 1-9999)")
    return datetime.fromtimestamp(seconds, UTC)


def _href_key(href: str) -> str:
    """Comparable form of an href: no scheme or host, no leading or trailing slash."""
    return re.sub(r"^[a-z][a-z0-9+.-]*://[^/]*", "", href.strip(), flags=re.I).strip("/")


def _same(a: str, b: str) -> bool:
    """Hrefs name the same thing: equal, or one is a relative tail of the other."""
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def _under(child: str, parent: str) -> bool:
    return child.startswith(parent + "/") or ("/" + parent + "/") in ("/" + child)


def parse_updated(text: str | None) -> datetime | None:
    """Atom ``updated``; some utilities write a bare date (``2024-06-21``)."""
    if not text:
        return None
    value = text.strip().replace("Z", "+00:00")
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:00+14:00 is before year 1 in UTC
        return None


def _children(element: Any) -> dict[str, Any]:
    """An ESPI object's fields; nested elements become dicts."""
    out: dict[str, Any] = {}
    for child in element:
        name = _local(child.tag)
        if not name:
            continue
        out[name] = _children(child) if len(child) else _text(child)
    return out


def describe_dst_rule(rule: str | None) -> str | None:
    """ESPI DstRuleType bitmap as words: ``360E2000`` is '2nd Sunday of March at 02:00'."""
    if not rule or not isinstance(rule, str):
        return None
    try:
        bits = int(rule, 16)
    except ValueError:
        return None
    if bits == 0xFFFFFFFF:
        return "none"
    month, operator = bits >> 28 & 0xF, bits >> 25 & 0x7
    day, weekday = bits >> 20 & 0x1F, bits >> 17 & 0x7
    hour, seconds = bits >> 12 & 0x1F, bits & 0xFFF
    at = f"{hour:02d}:{seconds // 60:02d}"
    if not 1 <= month <= 12 or weekday > 7:
        return None
    if operator == 0:
        return f"{_MONTHS[month]} {day} at {at}"
    if operator == 1:
        return f"first {_WEEKDAYS[weekday]} on or after {_MONTHS[month]} {day} at {at}"
    return f"{_ORDINALS[operator]} {_WEEKDAYS[weekday]} of {_MONTHS[month]} at {at}"


_RAW = ("start", "duration", "value", "cost", "quality")


@dataclass
class _Block:
    """One IntervalBlock: its interval and its readings as CSV text, not yet converted.

    Conversion happens in bulk, across blocks, because a polars call per small block
    costs more than the block's readings.
    """

    start: float | None = None
    duration: int | None = None
    raw: dict[str, list[str | None]] = field(default_factory=lambda: {name: [] for name in _RAW})
    first_ordinal: int = 0
    count: int = 0  # readings taken so far
    emitted: int = 0  # of which already handed on


# One line per IntervalReading when some readings lack a field (so XPath lists would not line
# up). Missing fields stay empty; commas and line breaks inside a value become spaces, so a
# hostile value fails the number check instead of shifting columns.
_READINGS_AS_CSV = etree.XSLT(
    etree.XML(b"""\
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform" xmlns:e="http://naesb.org/espi">
  <xsl:output method="text"/>
  <xsl:param name="partial" select="0"/>
  <xsl:template match="/">
    <xsl:for-each select="*/e:IntervalReading[not($partial) or position() &lt; last()]">
      <xsl:value-of select="translate(e:timePeriod/e:start, ',&#10;&#13;', '   ')"/>,<xsl:value-of
        select="translate(e:timePeriod/e:duration, ',&#10;&#13;', '   ')"/>,<xsl:value-of
        select="translate(e:value, ',&#10;&#13;', '   ')"/>,<xsl:value-of
        select="translate(e:cost, ',&#10;&#13;', '   ')"/>,<xsl:value-of
        select="translate(e:ReadingQuality[1]/e:quality, ',&#10;&#13;', '   ')"/><xsl:text>&#10;</xsl:text>
    </xsl:for-each>
  </xsl:template>
</xsl:stylesheet>""")
)


@dataclass
class _Entry:
    self_href: str | None = None
    up_href: str | None = None
    related: list[str] = field(default_factory=list)
    updated: datetime | None = None
    objects: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)


@dataclass
class _Node:
    """A graph object: its hrefs and its fields."""

    kind: str
    self_key: str
    up_key: str
    related: list[str]
    fields: dict[str, Any]
    updated: datetime | None


@dataclass(frozen=True)
class _Resolved:
    """Where a block's readings belong and how to scale them."""

    usage_point: str
    reading_type: str
    service_kind: str | None
    flow_direction: int | None
    uom: str | None
    multiplier: int
    currency: str | None
    interval_length: int | None


@dataclass
class EspiResult:
    readings: int = 0
    usage_points: list[dict[str, Any]] = field(default_factory=list)
    reading_types: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)


DTD_NOT_ALLOWED = "DTD not allowed: Green Button XML must not declare a DOCTYPE or entities"


def refuse_dtd(head: bytes) -> None:
    """Reject DTDs and entity declarations before any parser sees them (XXE, entity bombs)."""
    lowered = head.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise Rejected(DTD_NOT_ALLOWED, format_name=FORMAT)


def _refuse_declarations(carried: bytes, chunk: bytes) -> bytes:
    """``refuse_dtd`` for every chunk fed to the parser, not only the file's first 64 KiB.

    A long comment can push the DOCTYPE past the head (the fuzzer's ``<!-- 70 KB -->``
    prolog), and then only the parser options stood between the file and its entities.
    ``<!`` followed by DOCTYPE or ENTITY (any case) is refused; it cannot occur in element
    content of a well-formed file, only in a comment or CDATA, where no real feed has it.
    Returns the bytes to carry into the next call, so a declaration split between two
    chunks is still seen.
    """
    window = carried + chunk
    at = window.find(b"<!")
    while at >= 0:
        word = window[at + 2 : at + 9].upper()
        if word.startswith((b"DOCTYPE", b"ENTITY")):
            raise Rejected(DTD_NOT_ALLOWED, format_name=FORMAT)
        at = window.find(b"<!", at + 2)
    return window[-8:]


class _Graph:
    """The objects seen so far, and how a block finds its reading type and usage point."""

    def __init__(self) -> None:
        self.nodes: dict[str, list[_Node]] = {k: [] for k in _OBJECTS}

    def add(self, node: _Node) -> None:
        self.nodes[node.kind].append(node)

    def _linked(self, source: _Node, kind: str) -> _Node | None:
        """A node of ``kind`` that ``source`` relates to, by self or collection href."""
        for related in source.related:
            for node in self.nodes[kind]:
                if node.self_key and (
                    _same(related, node.self_key) or (node.up_key and _same(related, node.up_key))
                ):
                    return node
        return None

    def _parent(self, child_keys: list[str], kind: str) -> _Node | None:
        """A node of ``kind`` that relates to the child, or whose self href is the child's prefix."""
        for node in self.nodes[kind]:
            for related in node.related:
                if any(key and _same(related, key) for key in child_keys):
                    return node
        for node in self.nodes[kind]:
            if node.self_key and any(key and _under(key, node.self_key) for key in child_keys):
                return node
        return None

    def meter_reading(self, block_self: str, block_up: str) -> _Node | None:
        return self._parent([block_self, block_up], "MeterReading")

    def reading_type(self, meter_reading: _Node | None, final: bool) -> _Node | None:
        if meter_reading is not None:
            found = self._linked(meter_reading, "ReadingType")
            if found is not None:
                return found
        if final and len(self.nodes["ReadingType"]) == 1:
            return self.nodes["ReadingType"][0]
        return None

    def usage_point(self, keys: list[str], final: bool) -> _Node | None:
        found = self._parent(keys, "UsagePoint")
        if found is None and final and len(self.nodes["UsagePoint"]) == 1:
            return self.nodes["UsagePoint"][0]
        return found


def _usage_point_name(keys: list[str]) -> str | None:
    for key in keys:
        match = re.search(r"^(.*?/UsagePoint/[^/]+)", key)
        if match:
            return match.group(1)
    return None


def _service_kind(usage_point: _Node | None, uom: str | None) -> str | None:
    if usage_point is not None:
        category = usage_point.fields.get("ServiceCategory")
        kind = (
            _int(category.get("kind"), "UsagePoint ServiceCategory kind")
            if isinstance(category, dict)
            else None
        )
        if kind is not None:
            return SERVICE_KINDS.get(kind, f"kind {kind}")
    if uom in ("Wh", "VArh", "VAh", "W", "VAr", "VA"):
        return "electricity"
    if uom == "therm":
        return "gas"
    return None


_BUFFER_SCHEMA: dict[str, pl.DataType] = {
    **{name: pl.String() for name in _RAW},
    "ordinal": pl.Int64(), "position": pl.Int64(), "usage_point": pl.String(), "reading_type": pl.String(),
    "service_kind": pl.String(), "flow_direction": pl.Int32(), "uom": pl.String(), "multiplier": pl.Int32(),
    "currency": pl.String(), "updated_at": pl.Datetime("us", "UTC"), "block_start": pl.Float64(),
    "step": pl.Int64(),
}  # fmt: skip


def _new_buffer() -> dict[str, list[Any]]:
    return {name: [] for name in _BUFFER_SCHEMA}


_NS = {"e": "http://naesb.org/espi"}
_FIELD_PATHS = [
    etree.XPath(f"e:IntervalReading/{path}/text()", namespaces=_NS, smart_strings=False)
    for path in ("e:timePeriod/e:start", "e:timePeriod/e:duration", "e:value", "e:cost",
                 "e:ReadingQuality[1]/e:quality")
]  # fmt: skip
_REPEATED_FIELDS = etree.XPath(
    "count(e:IntervalReading[count(e:timePeriod) > 1 or count(e:timePeriod/e:start) > 1 or "
    "count(e:timePeriod/e:duration) > 1 or count(e:value) > 1 or count(e:cost) > 1 or "
    "count(e:ReadingQuality[1]/e:quality) > 1])",
    namespaces=_NS,
)


def _reading_fields(element: Any, count: int, complete: bool) -> list[list[str | None]]:
    """The text of the block's readings, one list per field in ``_RAW`` order.

    Fast path: one XPath per field, usable when every field is present in every reading
    or in none (the usual case). Otherwise libxslt writes one line per reading with
    empty cells where a field is missing.
    """
    if complete and not _REPEATED_FIELDS(element):
        columns: list[list[str | None]] = [path(element) for path in _FIELD_PATHS]
        if all(len(column) in (count, 0) for column in columns):
            return [column or [None] * count for column in columns]
    lines = str(_READINGS_AS_CSV(element, partial="0" if complete else "1")).split("\n")[:-1]
    cells = [line.split(",") for line in lines]
    return [[row[i] or None for row in cells] for i in range(len(_RAW))]


class EspiParser:
    """Streams one feed; ``sink`` receives interval rows in frames of INTERVAL_SCHEMA + updated_at."""

    def __init__(self, sink: IntervalSink) -> None:
        self.sink = sink
        self.graph = _Graph()
        self.pending: list[tuple[_Entry, _Block]] = []
        self.result = EspiResult()
        self._ordinal = 0
        self._buffer = _new_buffer()
        self._resolved: dict[tuple[str | None, str | None, bool], _Resolved] = {}

    # -- reading the XML ---------------------------------------------------------------
    def parse(self, stream: IO[bytes]) -> EspiResult:
        """Feed the file in pieces; readings are taken out of the open block as they complete."""
        entry: _Entry | None = None
        block: _Block | None = None
        block_element: Any = None
        loose = _Entry()  # objects outside any entry (a bare IntervalBlock document)
        started = False
        # Only the tags we act on reach Python; IntervalReadings are read in batches from their block.
        parser = etree.XMLPullParser(
            events=("start", "end"), tag=_EVENT_TAGS, resolve_entities=False, no_network=True, load_dtd=False,
            huge_tree=False, remove_comments=True, remove_pis=True,
        )  # fmt: skip
        carried = b""
        try:
            while True:
                chunk = stream.read(FEED_BYTES)
                if chunk:
                    carried = _refuse_declarations(carried, chunk)
                    parser.feed(chunk)
                else:
                    root = parser.close()
                    # A DOCTYPE the byte scan could not see (in UTF-7, say) and no event revealed.
                    if root is not None and root.getroottree().docinfo.doctype:
                        raise Rejected(DTD_NOT_ALLOWED, format_name=FORMAT)
                for event, element in parser.read_events():
                    tag = element.tag
                    if event == "start":
                        if not started:
                            started = True
                            if element.getroottree().docinfo.doctype:
                                raise Rejected("DTD not allowed: Green Button XML must not declare a DOCTYPE",
                                               format_name=FORMAT)  # fmt: skip
                        if tag == ATOM + "entry":
                            entry = _Entry()
                        elif tag == _BLOCK:
                            block, block_element = _Block(), element
                        continue
                    if tag == _BLOCK:
                        if block is None:  # an IntervalBlock whose start we did not see
                            block = _Block()
                        self._take_readings(block, element, complete=True)
                        (entry if entry is not None else loose).blocks.append(block)
                        block = block_element = None
                        self._drop(element)
                    elif tag.startswith(ESPI) and _local(tag) in _OBJECTS:
                        (entry if entry is not None else loose).objects.append(
                            (_local(tag), _children(element))
                        )
                    elif (
                        entry is not None
                        and tag == ATOM + "link"
                        and element.getparent().tag == ATOM + "entry"
                    ):
                        self._link(entry, element)
                    elif (
                        entry is not None
                        and tag == ATOM + "updated"
                        and element.getparent().tag == ATOM + "entry"
                    ):
                        entry.updated = parse_updated(element.text)
                    elif tag == ATOM + "entry" and entry is not None:
                        self._finish_entry(entry)
                        entry = None
                        self._drop(element)
                if not chunk:
                    break
                if block is not None and len(block_element) > TAKE_READINGS:
                    self._take_readings(block, block_element, complete=False)
                    if entry is not None:
                        self._emit_early(entry, block)
        except etree.XMLSyntaxError as error:
            line = getattr(error, "lineno", None) or (error.position[0] if error.position else "?")
            raise Rejected(f"line {line}: XML is not well-formed: {error.msg}", format_name=FORMAT) from None
        if loose.blocks or loose.objects:
            self._finish_entry(loose)
        for pending_entry, pending_block in self.pending:
            self._emit(pending_entry, pending_block, final=True)
        self._flush()
        self._collect_objects()
        return self.result

    @staticmethod
    def _drop(element: Any) -> None:
        element.clear(keep_tail=False)
        parent = element.getparent()
        if parent is not None:
            while element.getprevious() is not None:
                del parent[0]

    @staticmethod
    def _link(entry: _Entry, element: Any) -> None:
        href, rel = element.get("href"), element.get("rel")
        if not href:
            return
        key = _href_key(href)
        if rel == "self":
            entry.self_href = key
        elif rel == "up":
            entry.up_href = key
        elif rel == "related":
            entry.related.append(key)

    def _take_readings(self, block: _Block, element: Any, *, complete: bool) -> None:
        """Copy the block's finished IntervalReadings as CSV text and free their elements.

        While the block is still being parsed its last child may be incomplete, so it stays.
        """
        if block.start is None:
            interval = element.find(_INTERVAL)
            if interval is not None:
                block.start = _float(interval.findtext(_START))
                block.duration = _int(
                    interval.findtext(_DURATION), "IntervalBlock interval duration", bits=33
                )
        readings = element.findall(_READING)
        if not complete and readings:
            readings = readings[:-1]
        if not readings:
            return
        for name, column in zip(_RAW, _reading_fields(element, len(readings), complete), strict=True):
            block.raw[name] += column
        if not block.count:
            block.first_ordinal = self._ordinal + 1
        block.count += len(readings)
        self._ordinal += len(readings)
        if not complete:  # a finished block is dropped whole by the caller
            for reading in readings:
                element.remove(reading)

    # -- the graph -----------------------------------------------------------------------
    def _finish_entry(self, entry: _Entry) -> None:
        if entry.objects:
            self._resolved.clear()  # the graph grows: earlier answers may change
        for kind, fields in entry.objects:
            self.graph.add(
                _Node(kind, entry.self_href or "", entry.up_href or "", entry.related, fields, entry.updated)
            )
        for block in entry.blocks:
            if not self._emit(entry, block, final=False):
                self.pending.append((entry, block))

    def _resolve(self, entry: _Entry, final: bool) -> _Resolved | None:
        """What a block of this entry belongs to; blocks of one collection share the answer."""
        cache_key = (entry.self_href if not entry.up_href else None, entry.up_href, final)
        if cache_key in self._resolved:
            return self._resolved[cache_key]
        keys = [entry.self_href or "", entry.up_href or ""]
        meter_reading = self.graph.meter_reading(*keys)
        reading_type = self.graph.reading_type(meter_reading, final)
        up_keys = [*keys, meter_reading.self_key, meter_reading.up_key] if meter_reading else keys
        usage_point = self.graph.usage_point(up_keys, final)
        if not final and (reading_type is None or usage_point is None):
            return None
        rt = reading_type.fields if reading_type else {}
        uom_code = _int(rt.get("uom"), "ReadingType uom")
        uom = UOM_SYMBOLS.get(uom_code, f"uom {uom_code}") if uom_code is not None else None
        currency_code = _int(rt.get("currency"), "ReadingType currency")
        reading_type_name = (
            (reading_type.self_key if reading_type and reading_type.self_key else None)
            or (f"{meter_reading.self_key}#ReadingType" if meter_reading and meter_reading.self_key else None)
            or (
                re.sub(r"/IntervalBlock(/.*)?$", "", entry.self_href or entry.up_href or "") + "#ReadingType"
                if entry.self_href or entry.up_href
                else "unknown"
            )
        )
        resolved = _Resolved(
            usage_point=(
                usage_point.self_key if usage_point and usage_point.self_key else _usage_point_name(up_keys)
            )
            or "unknown",
            reading_type=reading_type_name,
            service_kind=_service_kind(usage_point, uom),
            flow_direction=_int(rt.get("flowDirection"), "ReadingType flowDirection"),
            uom=uom,
            multiplier=_multiplier(rt.get("powerOfTenMultiplier"), "ReadingType powerOfTenMultiplier") or 0,
            currency=CURRENCIES.get(currency_code, str(currency_code)) if currency_code is not None else None,
            interval_length=_int(rt.get("intervalLength"), "ReadingType intervalLength", bits=33),
        )
        self._resolved[cache_key] = resolved
        return resolved

    def _emit_early(self, entry: _Entry, block: _Block) -> None:
        """Hand on part of a huge block, so memory stays bounded, when nothing about it can change.

        Only when the entry's links and ``updated`` came before its content (the usual order),
        and every reading's start is known without the block's final reading count.
        """
        if entry.self_href is None or entry.updated is None:
            return
        resolved = self._resolve(entry, final=False)
        if resolved is not None and (resolved.interval_length or None not in block.raw["start"]):
            self._emit(entry, block, final=False)

    def _emit(self, entry: _Entry, block: _Block, *, final: bool) -> bool:
        """Turn a block's readings into rows once its reading type and usage point are known."""
        resolved = self._resolve(entry, final)
        if resolved is None:
            return False
        interval_length = resolved.interval_length
        step = interval_length or (block.duration // block.count if block.duration and block.count else None)
        n = len(block.raw["value"])
        buffer = self._buffer
        for name in _RAW:
            buffer[name] += block.raw[name]
        first = block.first_ordinal + block.emitted
        buffer["ordinal"] += range(first, first + n)
        buffer["position"] += range(block.emitted, block.emitted + n)
        block.emitted += n
        for name, value in (
            ("usage_point", resolved.usage_point), ("reading_type", resolved.reading_type),
            ("service_kind", resolved.service_kind), ("flow_direction", resolved.flow_direction),
            ("uom", resolved.uom), ("multiplier", resolved.multiplier), ("currency", resolved.currency),
            ("updated_at", entry.updated), ("block_start", block.start), ("step", step),
        ):  # fmt: skip
            buffer[name] += [value] * n
        self.result.readings += n
        block.raw = {name: [] for name in _RAW}
        if len(buffer["ordinal"]) >= BATCH_READINGS:
            self._flush()
        return True

    def _flush(self) -> None:
        """Convert the buffered readings in one go and hand them to the sink."""
        buffer = self._buffer
        if not buffer["ordinal"]:
            return
        self._buffer = _new_buffer()
        frame = pl.DataFrame(buffer, schema=_BUFFER_SCHEMA)
        raw = frame.select(pl.col(_RAW).str.strip_chars())
        # NaN and infinities count as not numbers: they would be stored as readings, or fail a cast.
        typed = raw.select(
            _finite(pl.col("start")),
            _finite(pl.col("duration")).cast(pl.Int64, strict=False),
            _finite(pl.col("value")),
            _finite(pl.col("cost")),
            _finite(pl.col("quality")).cast(pl.Int32, strict=False),
        )
        if raw.null_count().row(0) != typed.null_count().row(0):
            for name in _RAW:
                bad = (raw[name].is_not_null() & (raw[name] != "") & typed[name].is_null()).arg_true()
                if len(bad):
                    index = int(bad[0])
                    raise Rejected(f"IntervalReading {frame['ordinal'][index]}: {name} {raw[name][index]!r} is not a number",
                                   format_name=FORMAT)  # fmt: skip
        frame = frame.with_columns(typed)
        start = pl.col("start").fill_null(pl.col("block_start") + pl.col("position") * pl.col("step"))
        out_of_range = frame.filter(
            ~start.is_between(MIN_EPOCH, MAX_EPOCH) | (pl.col("duration").abs() >= 2**32)
        ).select("ordinal", start.alias("start"), "duration")
        if out_of_range.height:  # would overflow the microsecond timestamp (a crash in a cast)
            ordinal, first_start, duration = out_of_range.row(0)
            in_range = first_start is None or MIN_EPOCH <= first_start <= MAX_EPOCH
            what = f"duration {duration}" if in_range else f"start {first_start:g}"
            raise _reject(f"IntervalReading {ordinal}: {what} is out of range")
        multiplier = pl.col("multiplier")
        # Divide for negative powers: 37000 / 1000 is exactly 37, 37000 * 0.001 is not.
        # (Costs are whole 1/100,000 units, so rounding to 5 decimals only drops float noise.)
        scaled = (
            pl.when(multiplier < 0)
            .then(pl.col("value") / pl.lit(10.0).pow(-multiplier))
            .otherwise(pl.col("value") * pl.lit(10.0).pow(multiplier))
        )
        rows = frame.select(
            "usage_point", "reading_type", "service_kind", "flow_direction", "uom",
            (start * 1_000_000).round().cast(pl.Int64).alias("interval_start"),
            pl.col("duration").fill_null(pl.col("step")).alias("duration_s"),
            scaled.alias("value"),
            pl.col("value").alias("raw_value"),
            multiplier.alias("power_of_ten_multiplier"),
            (pl.col("cost") / 100_000).round(5).alias("cost"),
            pl.when(pl.col("cost").is_not_null()).then(pl.col("currency")).alias("currency"),
            pl.col("quality").replace_strict(QUALITY_NAMES, default=pl.format("quality {}", pl.col("quality")),
                                             return_dtype=pl.String).alias("quality"),
            pl.col("ordinal").alias("source_line"),
            "updated_at",
        ).with_columns(pl.from_epoch("interval_start", time_unit="us").dt.replace_time_zone("UTC"))  # fmt: skip
        missing = rows["interval_start"].is_null() | rows["duration_s"].is_null()
        if missing.any():
            ordinal = rows["source_line"].filter(missing)[0]
            raise Rejected(f"IntervalReading {ordinal}: no timePeriod, and its block has no start or interval length",
                           format_name=FORMAT)  # fmt: skip
        self.sink(rows)

    # -- the small tables ------------------------------------------------------------------
    def _collect_objects(self) -> None:
        graph = self.graph
        local_times = graph.nodes["LocalTimeParameters"]
        for node in graph.nodes["UsagePoint"]:
            ltp = graph._linked(node, "LocalTimeParameters") or (
                local_times[0] if len(local_times) == 1 else None
            )
            lt = ltp.fields if ltp else {}
            category = node.fields.get("ServiceCategory")
            kind = (
                _int(category.get("kind"), "UsagePoint ServiceCategory kind")
                if isinstance(category, dict)
                else None
            )
            self.result.usage_points.append({
                "usage_point": node.self_key or "unknown",
                "service_kind": SERVICE_KINDS.get(kind, f"kind {kind}") if kind is not None else None,
                "service_kind_code": kind,
                "status": _int(node.fields.get("status"), "UsagePoint status"),
                "tz_offset_s": _int(lt.get("tzOffset"), "LocalTimeParameters tzOffset"),
                "dst_offset_s": _int(lt.get("dstOffset"), "LocalTimeParameters dstOffset"),
                "dst_start_rule": _string(lt.get("dstStartRule"), "LocalTimeParameters dstStartRule"),
                "dst_end_rule": _string(lt.get("dstEndRule"), "LocalTimeParameters dstEndRule"),
                "dst_start": describe_dst_rule(lt.get("dstStartRule")),
                "dst_end": describe_dst_rule(lt.get("dstEndRule")),
                "updated_at": node.updated,
            })  # fmt: skip
        for node in graph.nodes["ReadingType"]:
            f = node.fields
            uom_code, currency_code = (
                _int(f.get("uom"), "ReadingType uom"),
                _int(f.get("currency"), "ReadingType currency"),
            )
            self.result.reading_types.append({
                "reading_type": node.self_key or "unknown",
                "uom_code": uom_code,
                "uom": UOM_SYMBOLS.get(uom_code) if uom_code is not None else None,
                "power_of_ten_multiplier": _multiplier(f.get("powerOfTenMultiplier"), "ReadingType powerOfTenMultiplier"),
                "flow_direction": _int(f.get("flowDirection"), "ReadingType flowDirection"),
                "accumulation_behaviour": _int(f.get("accumulationBehaviour"), "ReadingType accumulationBehaviour"),
                "commodity": _int(f.get("commodity"), "ReadingType commodity"),
                "kind": _int(f.get("kind"), "ReadingType kind"),
                "interval_length_s": _int(f.get("intervalLength"), "ReadingType intervalLength", bits=33),
                "currency_code": currency_code,
                "currency": CURRENCIES.get(currency_code) if currency_code is not None else None,
                "data_qualifier": _int(f.get("dataQualifier"), "ReadingType dataQualifier"),
                "phase": _int(f.get("phase"), "ReadingType phase"),
                "updated_at": node.updated,
            })  # fmt: skip
        for summary_kind in ("UsageSummary", "ElectricPowerUsageSummary"):
            for node in graph.nodes[summary_kind]:
                self.result.summaries.append(self._summary(node))

    def _summary(self, node: _Node) -> dict[str, Any]:
        f = node.fields
        billing = f.get("billingPeriod")
        period: dict[str, Any] = billing if isinstance(billing, dict) else {}
        usage_point = self.graph.usage_point([node.self_key, node.up_key], final=True)
        currency_code = _int(f.get("currency"), "UsageSummary currency")

        def money(name: str) -> float | None:
            raw = _float(f.get(name)) if isinstance(f.get(name), str) else None
            return None if raw is None else raw / 100_000

        def quantity(name: str) -> tuple[float | None, str | None]:
            q = f.get(name)
            if not isinstance(q, dict):
                return None, None
            value, multiplier, uom = (
                _float(q.get("value")),
                _multiplier(q.get("powerOfTenMultiplier"), f"UsageSummary {name} powerOfTenMultiplier") or 0,
                _int(q.get("uom"), f"UsageSummary {name} uom"),
            )
            return (None if value is None else value * 10.0**multiplier), UOM_SYMBOLS.get(
                uom
            ) if uom is not None else None

        consumption, consumption_uom = quantity("overallConsumptionLastPeriod")
        current, current_uom = quantity("currentBillingPeriodOverAllConsumption")
        start = _float(period.get("start"))
        return {
            "usage_point": (
                usage_point.self_key if usage_point else _usage_point_name([node.self_key, node.up_key])
            )
            or "unknown",
            "summary": node.self_key or "unknown",
            "billing_period_start": _timestamp(start, "UsageSummary billingPeriod start"),
            "billing_period_duration_s": _int(
                period.get("duration"), "UsageSummary billingPeriod duration", bits=64
            ),
            "bill_last_period": money("billLastPeriod"),
            "bill_to_date": money("billToDate"),
            "cost_additional_last_period": money("costAdditionalLastPeriod"),
            "currency": CURRENCIES.get(currency_code) if currency_code is not None else None,
            "consumption_last_period": consumption,
            "consumption_last_period_uom": consumption_uom,
            "current_billing_period_consumption": current,
            "current_billing_period_consumption_uom": current_uom,
            "quality_of_reading": QUALITY_NAMES.get(
                _int(f.get("qualityOfReading"), "UsageSummary qualityOfReading") or -1
            ),
            "status_timestamp": _epoch(f.get("statusTimeStamp")),
            "updated_at": node.updated,
        }


def _finite(text: pl.Expr) -> pl.Expr:
    """A text column as floats, null where it is not a finite number."""
    number = text.cast(pl.Float64, strict=False)
    return pl.when(number.is_finite()).then(number)


def _float(text: object) -> float | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise Rejected(f"value {text.strip()!r} is not a number", format_name=FORMAT) from None
    return value if math.isfinite(value) else None


def _epoch(text: object) -> datetime | None:
    value = _float(text) if isinstance(text, str) else None
    return _timestamp(value, "UsageSummary statusTimeStamp")
