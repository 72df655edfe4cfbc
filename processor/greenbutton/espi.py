"""ESPI (NAESB REQ.21) Atom feeds, streamed: interval readings out, in bounded memory.

The feed is read with lxml ``iterparse`` and every element is dropped as soon as it
has been used, so memory follows the size of one IntervalBlock, not of the file. Most
IntervalReadings never become lxml elements: a prescan takes those that match a strict
grammar from the bytes in bulk, with polars, and lxml sees a marker in their place (see
prescan.py); the rest are read from the tree as before.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from processor.greenbutton.prescan import RAW, RAW_SCHEMA, Part, Prescan

ATOM = "{http://www.w3.org/2005/Atom}"
ESPI = "{http://naesb.org/espi}"
FORMAT = "greenbutton_xml"
_OBJECTS = {
    "UsagePoint", "MeterReading", "ReadingType", "LocalTimeParameters", "UsageSummary",
    "ElectricPowerUsageSummary",
}  # fmt: skip
_BLOCK, _READING, _INTERVAL = ESPI + "IntervalBlock", ESPI + "IntervalReading", ESPI + "interval"
_START, _DURATION = ESPI + "start", ESPI + "duration"
_LINK, _UPDATED = ATOM + "link", ATOM + "updated"
# An entry's links and updated are read from the entry element, not from events of their own:
# fewer events per block (Python handles each one).
_EVENT_TAGS = [ATOM + "entry", _BLOCK, *(ESPI + name for name in sorted(_OBJECTS))]
FEED_BYTES = 1024 * 1024  # a window of the fast path: polars calls per window cost about 1 ms
BATCH_READINGS = 25_000  # readings converted and handed on together (more costs memory, not less time)
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
    text = href.strip()
    if "://" not in text:  # the usual relative href: no regex (two per block add up)
        return text.strip("/")
    return re.sub(r"^[a-z][a-z0-9+.-]*://[^/]*", "", text, flags=re.I).strip("/")


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


def _child_text(element: Any, tag: str) -> str | None:
    """``element.findtext(tag)`` (None without the child, "" without text), for less per call."""
    child = next(element.iterchildren(tag), None)
    return None if child is None else child.text or ""


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


@dataclass
class _Block:
    """One IntervalBlock: its interval and its readings as text, not yet converted.

    Conversion happens in bulk, across blocks, because a polars call per small block
    costs more than the block's readings.
    """

    start: float | None = None
    duration: int | None = None
    parts: list[Part] = field(default_factory=list)  # taken, not yet handed on
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
    # Found by its "!", which is rare, rather than by "<", which is everywhere: 5x faster.
    at = window.find(b"!", 1)
    while at >= 0:
        if window[at - 1] == 0x3C and window[at + 1 : at + 8].upper().startswith((b"DOCTYPE", b"ENTITY")):
            raise Rejected(DTD_NOT_ALLOWED, format_name=FORMAT)
        at = window.find(b"!", at + 1)
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


# One row per handed-on part of a block: what its ``n`` readings share.
_META_SCHEMA: dict[str, pl.DataType] = {
    "usage_point": pl.String(), "reading_type": pl.String(), "service_kind": pl.String(),
    "flow_direction": pl.Int32(), "uom": pl.String(), "multiplier": pl.Int32(), "currency": pl.String(),
    "updated_at": pl.Datetime("us", "UTC"), "block_start": pl.Float64(), "step": pl.Int64(),
    "first_ordinal": pl.Int64(), "first_position": pl.Int64(), "n": pl.Int64(),
}  # fmt: skip


_NS = {"e": "http://naesb.org/espi"}
_FIELD_PATHS = [
    etree.XPath(f"e:IntervalReading/{path}/text()", namespaces=_NS, smart_strings=False)
    for path in ("e:timePeriod/e:start", "e:timePeriod/e:duration", "e:value", "e:cost",
                 "e:ReadingQuality[1]/e:quality")
]  # fmt: skip
# Readings the per-field XPaths would not line up for: a field twice, or its text in two
# pieces around a child element (``<start>1<x/>2</start>``), which counted as two values and
# shifted every later reading's field by one when another reading lacked the field.
_REPEATED_FIELDS = etree.XPath(
    "count(e:IntervalReading[count(e:timePeriod) > 1 or count(e:timePeriod/e:start) > 1 or "
    "count(e:timePeriod/e:duration) > 1 or count(e:value) > 1 or count(e:cost) > 1 or "
    "count(e:ReadingQuality[1]/e:quality) > 1 or count(e:timePeriod/e:start/text()) > 1 or "
    "count(e:timePeriod/e:duration/text()) > 1 or count(e:value/text()) > 1 or count(e:cost/text()) > 1 or "
    "count(e:ReadingQuality[1]/e:quality/text()) > 1])",
    namespaces=_NS,
)


def _reading_fields(
    element: Any,
    count: int,
    complete: bool,
    *,
    partial: bool | None = None,
    others: tuple[int, list[int]] = (0, []),
) -> list[list[str | None]]:
    """The text of the block's readings, one list per field in ``RAW`` order.

    Quick way: one XPath per field, usable when every field is present in every reading
    or in none (the usual case). Otherwise libxslt writes one line per reading with
    empty cells where a field is missing. ``partial`` (default: not ``complete``) leaves
    out the last reading, still being parsed. ``others`` are the number of readings of
    the same block taken by the fast path and how many of them have each field: they
    count in the choice, as if they were still in the tree.
    """
    extra, present = others
    if complete and not _REPEATED_FIELDS(element):
        columns: list[list[str | None]] = [path(element) for path in _FIELD_PATHS]
        total = count + extra
        if all(len(column) + (present[i] if extra else 0) in (total, 0) for i, column in enumerate(columns)):
            return [column or [None] * count for column in columns]
    partial = not complete if partial is None else partial
    lines = str(_READINGS_AS_CSV(element, partial="1" if partial else "0")).split("\n")[:-1]
    cells = [line.split(",") for line in lines]
    return [[row[i] or None for row in cells] for i in range(len(RAW))]


class _Tainted(Exception):
    """The fast path replaced text that a reading's field holds; see ``EspiParser._marked``."""


class EspiParser:
    """Streams one feed; ``sink`` receives interval rows in frames of INTERVAL_SCHEMA + updated_at."""

    def __init__(self, sink: IntervalSink, *, fast: bool = True) -> None:
        """``fast=False`` reads every reading from the lxml tree: the reference the fast path is tested against."""
        self.sink = sink
        self.graph = _Graph()
        self.pending: list[tuple[_Entry, _Block]] = []
        self.result = EspiResult()
        self._ordinal = 0
        # Readings handed on, not yet converted: their text (slices of frames, or the lists
        # here for readings read from the tree), and one _META_SCHEMA row per part.
        self._slices: list[tuple[pl.DataFrame | None, int, int]] = []  # (frame or None: lists, offset, n)
        self._lists: dict[str, list[str | None]] = {name: [] for name in RAW}
        self._meta: list[tuple[Any, ...]] = []
        self._buffered = 0
        self._resolved: dict[tuple[str | None, str | None, bool], _Resolved] = {}
        self._prescan = Prescan()
        self._runs: dict[int, Part] = {}  # fast runs whose marker lxml has not reported yet
        if not fast:
            self._prescan.enabled = False
        self._attached: dict[int, Part] = {}  # fast runs whose marker lxml put in an IntervalBlock
        self._attached_readings = 0
        self._flushed = False  # the sink has had frames

    # -- reading the XML ---------------------------------------------------------------
    def parse(self, stream: IO[bytes]) -> EspiResult:
        """Read the feed; without the fast path again if it turns out not to apply (hostile nesting)."""
        start = stream.tell() if stream.seekable() else None
        try:
            return self._parse(stream)
        except _Tainted:
            if start is None or self._flushed:
                raise Rejected("an IntervalBlock of another namespace inside an IntervalReading: not read",
                               format_name=FORMAT) from None  # fmt: skip
        stream.seek(start)
        self.result = EspiParser(self.sink, fast=False).parse(stream)
        return self.result

    def _parse(self, stream: IO[bytes]) -> EspiResult:
        """Feed the file in pieces; readings are taken out of the open block as they complete."""
        entry: _Entry | None = None
        entry_element: Any = None
        block: _Block | None = None
        block_element: Any = None
        loose = _Entry()  # objects outside any entry (a bare IntervalBlock document)
        started = False
        # Only the tags we act on reach Python; IntervalReadings are read in batches from their block.
        mark = self._prescan.mark
        parser = etree.XMLPullParser(
            events=("start", "end"), tag=[*_EVENT_TAGS, mark], resolve_entities=False, no_network=True,
            load_dtd=False, huge_tree=False, remove_comments=True, remove_pis=True,
        )  # fmt: skip
        carried = b""
        try:
            for chunk, window in self._windows(stream):
                if chunk:
                    carried = _refuse_declarations(carried, chunk)  # before any of its bytes reach lxml
                if window:
                    parser.feed(window)
                if not chunk:
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
                            entry, entry_element = _Entry(), element
                        elif tag == _BLOCK:
                            block, block_element = _Block(), element
                        continue
                    if tag == mark:
                        self._marked(element)
                    elif tag == _BLOCK:
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
                    elif tag == ATOM + "entry" and entry is not None:
                        self._read_links(entry, entry_element)
                        self._finish_entry(entry)
                        entry = entry_element = None
                        self._drop(element)
                if not chunk:
                    break
                if block is not None and (
                    len(block_element) > TAKE_READINGS or self._attached_readings > TAKE_READINGS
                ):
                    self._take_readings(block, block_element, complete=False)
                    if entry is not None:
                        self._read_links(entry, entry_element)  # those before the content
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

    def _windows(self, stream: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Each chunk as read (``b""`` at the end) and the bytes the prescan leaves for lxml.

        The prescan of the next chunk runs in a thread while lxml and Python handle this
        one: polars releases the GIL, so with a second core most of the prescan is hidden.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="espi-prescan") as pool:
            chunk = stream.read(FEED_BYTES)
            scanned = pool.submit(self._prescan.window, chunk)
            while True:
                following = stream.read(FEED_BYTES) if chunk else b""
                ahead = pool.submit(self._prescan.window, following) if chunk else None
                window, runs = scanned.result()
                self._runs.update(runs)
                yield chunk, window
                if ahead is None:
                    return
                chunk, scanned = following, ahead

    @staticmethod
    def _drop(element: Any) -> None:
        element.clear(keep_tail=False)
        parent = element.getparent()
        if parent is not None:
            while element.getprevious() is not None:
                del parent[0]

    @classmethod
    def _read_links(cls, entry: _Entry, element: Any) -> None:
        """The entry's ``link`` and ``updated`` children parsed so far (all of them at its end)."""
        entry.self_href = entry.up_href = entry.updated = None
        entry.related = []
        for child in element:
            tag = child.tag
            if tag == _LINK:
                cls._link(entry, child)
            elif tag == _UPDATED:
                entry.updated = parse_updated(child.text)

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

    def _marked(self, element: Any) -> None:
        """lxml reached a fast-path marker: its readings count if it sits in an IntervalBlock.

        Markers are reported in document order, so runs before it that were never reported
        lay in a comment or were otherwise swallowed, as their readings would have been:
        they are dropped (this also bounds what ``pending`` holds).
        """
        run = int(element.text)
        pending = self._runs
        while pending and (first := next(iter(pending))) < run:
            del pending[first]
        part = pending.pop(run, None)
        reading = element.getparent()
        block = reading.getparent() if reading is not None else None
        if part is not None and reading.tag == _READING and block is not None and block.tag == _BLOCK:
            self._attached[run] = part
            self._attached_readings += part.length
        elif block is not None and any(ancestor.tag == _READING for ancestor in block.iterancestors()):
            # An "IntervalBlock" of another namespace inside a reading: the run's text is part
            # of that reading's field, which the marker changed. Read the file the exact way.
            raise _Tainted

    def _take_readings(self, block: _Block, element: Any, *, complete: bool) -> None:
        """Take the block's finished IntervalReadings as text and free their elements.

        While the block is still being parsed its last child may be incomplete, so it stays.
        """
        if block.start is None:
            interval = next(element.iterchildren(_INTERVAL), None)
            if interval is not None:
                block.start = _float(_child_text(interval, _START))
                block.duration = _int(
                    _child_text(interval, _DURATION), "IntervalBlock interval duration", bits=33
                )
        readings = list(element.iterchildren(_READING))  # as findall(), which costs more per block
        if not complete and readings:
            readings = readings[:-1]
        if not readings:
            return
        if self._attached:
            parts = self._parts(readings, complete)
        else:
            columns = _reading_fields(element, len(readings), complete)
            parts = [Part(len(readings), lists=dict(zip(RAW, columns, strict=True)))]
        taken = sum(part.length for part in parts)
        block.parts += parts
        if not block.count:
            block.first_ordinal = self._ordinal + 1
        block.count += taken
        self._ordinal += taken
        if not complete:  # a finished block is dropped whole by the caller
            for reading in readings:
                if reading.getparent() is element:  # not moved by _parts
                    element.remove(reading)

    def _parts(self, readings: list[Any], complete: bool) -> list[Part]:
        """The readings in document order: fast runs by their markers, the others read from the tree.

        The others are read together, as the block's readings would have been without the
        fast path (which matters for the choice in ``_reading_fields``), then cut up.
        """
        order: list[Part | int] = []  # a fast run, or how many other readings come next
        others: list[Any] = []
        for reading in readings:
            if len(reading) == 1 and reading[0].tag == self._prescan.mark:
                part = self._attached.pop(int(reading[0].text))
                self._attached_readings -= part.length
                order.append(part)
            else:
                others.append(reading)
                if order and isinstance(order[-1], int):
                    order[-1] += 1
                else:
                    order.append(1)
        if not others:
            return [item for item in order if isinstance(item, Part)]
        fast = [item for item in order if isinstance(item, Part)]
        present = [0] * len(RAW)
        for part in fast:
            assert part.frame is not None
            counts = part.frame.slice(part.offset, part.length).select(pl.all().is_not_null().sum()).row(0)
            present = [a + b for a, b in zip(present, counts, strict=True)]
        holder = etree.Element(_BLOCK)
        holder.extend(others)  # moved out of the tree (the caller removes only what is left)
        columns = _reading_fields(holder, len(others), complete, partial=False,
                                  others=(sum(part.length for part in fast), present))  # fmt: skip
        parts: list[Part] = []
        at = 0
        for item in order:
            if isinstance(item, int):
                parts.append(
                    Part(
                        item,
                        lists={
                            name: column[at : at + item] for name, column in zip(RAW, columns, strict=True)
                        },
                    )
                )
                at += item
            else:
                parts.append(item)
        return parts

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
        if resolved is not None and (
            resolved.interval_length or not any(part.has_null_start() for part in block.parts)
        ):
            self._emit(entry, block, final=False)

    def _emit(self, entry: _Entry, block: _Block, *, final: bool) -> bool:
        """Hand a block's readings on once its reading type and usage point are known."""
        resolved = self._resolve(entry, final)
        if resolved is None:
            return False
        interval_length = resolved.interval_length
        step = interval_length or (block.duration // block.count if block.duration and block.count else None)
        n = sum(part.length for part in block.parts)
        if not n:
            return True
        slices, lists = self._slices, self._lists
        for part in block.parts:
            if part.lists is not None:
                frame, offset = None, len(lists["start"])
                for name in RAW:
                    lists[name] += part.lists[name]
            else:
                frame, offset = part.frame, part.offset
            last = slices[-1] if slices else None
            if last is not None and last[0] is frame and last[1] + last[2] == offset:
                slices[-1] = (frame, last[1], last[2] + part.length)  # contiguous: one slice
            else:
                slices.append((frame, offset, part.length))
        self._meta.append((  # in _META_SCHEMA order
            resolved.usage_point, resolved.reading_type, resolved.service_kind, resolved.flow_direction,
            resolved.uom, resolved.multiplier, resolved.currency, entry.updated, block.start, step,
            block.first_ordinal + block.emitted, block.emitted, n,
        ))  # fmt: skip
        block.emitted += n
        block.parts = []
        self.result.readings += n
        self._buffered += n
        if self._buffered >= BATCH_READINGS:
            self._flush()
        return True

    def _flush(self) -> None:
        """Convert the buffered readings in one go and hand them to the sink."""
        if not self._buffered:
            return
        lists = pl.DataFrame(self._lists, schema=RAW_SCHEMA)
        text = pl.concat(
            [(lists if frame is None else frame).slice(offset, n) for frame, offset, n in self._slices]
        )
        # Each part's shared values, repeated for its readings, with their ordinals and positions.
        counter = pl.int_ranges(0, pl.col("n"), dtype=pl.Int64)
        shared = (
            pl.DataFrame(
                dict(zip(_META_SCHEMA, zip(*self._meta, strict=True), strict=True)), schema=_META_SCHEMA
            )
            .with_columns(counter.alias("i"))
            .explode("i")
            .select(
                pl.exclude("first_ordinal", "first_position", "n", "i"),
                ordinal=pl.col("first_ordinal") + pl.col("i"),
                position=pl.col("first_position") + pl.col("i"),
            )
        )
        self._flushed = True
        self._slices, self._lists, self._meta, self._buffered = (
            [],
            {name: [] for name in RAW},
            [],
            0,
        )
        frame = pl.concat([text, shared], how="horizontal")
        raw = frame.select(pl.col(RAW).str.strip_chars())
        # NaN and infinities count as not numbers: they would be stored as readings, or fail a cast.
        typed = raw.select(
            _finite(pl.col("start")),
            _finite(pl.col("duration")).cast(pl.Int64, strict=False),
            _finite(pl.col("value")),
            _finite(pl.col("cost")),
            _finite(pl.col("quality")).cast(pl.Int32, strict=False),
        )
        if raw.null_count().row(0) != typed.null_count().row(0):
            for name in RAW:
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
