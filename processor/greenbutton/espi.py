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
    INTERVAL_SCHEMA,
    QUALITY_NAMES,
    SERVICE_KINDS,
    UOM_SYMBOLS,
)

ATOM = "{http://www.w3.org/2005/Atom}"
ESPI = "{http://naesb.org/espi}"
FORMAT = "greenbutton_xml"
EMIT_ROWS = 100_000
_OBJECTS = {
    "UsagePoint", "MeterReading", "ReadingType", "LocalTimeParameters", "UsageSummary",
    "ElectricPowerUsageSummary",
}  # fmt: skip
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


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return int(float(text))


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
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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
    if not rule:
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
    start: float | None = None
    duration: int | None = None
    readings: list[tuple[float | None, int | None, float | None, float | None, int | None, int]] = field(
        default_factory=list
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


@dataclass
class EspiResult:
    readings: int = 0
    usage_points: list[dict[str, Any]] = field(default_factory=list)
    reading_types: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)


def refuse_dtd(head: bytes) -> None:
    """Reject DTDs and entity declarations before any parser sees them (XXE, entity bombs)."""
    lowered = head.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise Rejected(
            "DTD not allowed: Green Button XML must not declare a DOCTYPE or entities", format_name=FORMAT
        )


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
        kind = _int(category.get("kind")) if isinstance(category, dict) else None
        if kind is not None:
            return SERVICE_KINDS.get(kind, f"kind {kind}")
    if uom in ("Wh", "VArh", "VAh", "W", "VAr", "VA"):
        return "electricity"
    if uom == "therm":
        return "gas"
    return None


class EspiParser:
    """Streams one feed; ``sink`` receives interval rows in frames of INTERVAL_SCHEMA + updated_at."""

    def __init__(self, sink: IntervalSink) -> None:
        self.sink = sink
        self.graph = _Graph()
        self.pending: list[tuple[_Entry, _Block]] = []
        self.result = EspiResult()
        self._rows: dict[str, list[Any]] = {name: [] for name in [*INTERVAL_SCHEMA, "updated_at"]}
        self._ordinal = 0

    # -- reading the XML ---------------------------------------------------------------
    def parse(self, stream: IO[bytes]) -> EspiResult:
        entry: _Entry | None = None
        block: _Block | None = None
        loose = _Entry()  # objects outside any entry (a bare IntervalBlock document)
        started = False
        context = etree.iterparse(
            stream, events=("start", "end"), resolve_entities=False, no_network=True, load_dtd=False,
            huge_tree=False, remove_comments=True, remove_pis=True,
        )  # fmt: skip
        try:
            for event, element in context:
                tag = element.tag
                if not isinstance(tag, str):
                    continue
                if event == "start":
                    if not started:
                        started = True
                        if element.getroottree().docinfo.doctype:
                            raise Rejected(
                                "DTD not allowed: Green Button XML must not declare a DOCTYPE",
                                format_name=FORMAT,
                            )
                    if tag == ATOM + "entry":
                        entry = _Entry()
                    elif tag == ESPI + "IntervalBlock":
                        block = _Block()
                    continue
                if tag == ESPI + "IntervalReading":
                    if block is None:
                        block = _Block()
                    block.readings.append(self._reading(element))
                    self._drop(element)
                elif tag == ESPI + "interval" and block is not None:
                    block.start = _float(element.findtext(ESPI + "start"))
                    block.duration = _int(_strip(element.findtext(ESPI + "duration")))
                elif tag == ESPI + "IntervalBlock":
                    target = entry if entry is not None else loose
                    if block is not None:
                        target.blocks.append(block)
                    block = None
                    self._drop(element)
                elif tag.startswith(ESPI) and _local(tag) in _OBJECTS:
                    (entry if entry is not None else loose).objects.append((_local(tag), _children(element)))
                elif (
                    tag == ATOM + "link"
                    and entry is not None
                    and element.getparent() is not None
                    and (element.getparent().tag == ATOM + "entry")
                ):
                    self._link(entry, element)
                elif (
                    tag == ATOM + "updated"
                    and entry is not None
                    and element.getparent().tag == ATOM + "entry"
                ):
                    entry.updated = parse_updated(element.text)
                elif tag == ATOM + "entry" and entry is not None:
                    self._finish_entry(entry)
                    entry = None
                    self._drop(element)
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

    def _reading(
        self, element: Any
    ) -> tuple[float | None, int | None, float | None, float | None, int | None, int]:
        start = duration = value = cost = quality = None
        for child in element:
            name = _local(child.tag)
            if name == "value":
                value = _float(child.text)
            elif name == "cost":
                cost = _float(child.text)
            elif name == "timePeriod":
                start = _float(child.findtext(ESPI + "start"))
                duration = _int(_strip(child.findtext(ESPI + "duration")))
            elif name == "ReadingQuality" and quality is None:
                quality = _int(_strip(child.findtext(ESPI + "quality")))
        self._ordinal += 1
        return start, duration, value, cost, quality, self._ordinal

    # -- the graph -----------------------------------------------------------------------
    def _finish_entry(self, entry: _Entry) -> None:
        for kind, fields in entry.objects:
            self.graph.add(
                _Node(kind, entry.self_href or "", entry.up_href or "", entry.related, fields, entry.updated)
            )
        for block in entry.blocks:
            if not self._emit(entry, block, final=False):
                self.pending.append((entry, block))

    def _emit(self, entry: _Entry, block: _Block, *, final: bool) -> bool:
        """Turn a block's readings into rows once its reading type and usage point are known."""
        keys = [entry.self_href or "", entry.up_href or ""]
        meter_reading = self.graph.meter_reading(*keys)
        reading_type = self.graph.reading_type(meter_reading, final)
        up_keys = [*keys, meter_reading.self_key, meter_reading.up_key] if meter_reading else keys
        usage_point = self.graph.usage_point(up_keys, final)
        if not final and (reading_type is None or usage_point is None):
            return False
        rt = reading_type.fields if reading_type else {}
        multiplier = _int(rt.get("powerOfTenMultiplier")) or 0
        uom_code = _int(rt.get("uom"))
        uom = UOM_SYMBOLS.get(uom_code, f"uom {uom_code}") if uom_code is not None else None
        currency_code = _int(rt.get("currency"))
        currency = CURRENCIES.get(currency_code, str(currency_code)) if currency_code is not None else None
        flow = _int(rt.get("flowDirection"))
        interval_length = _int(rt.get("intervalLength"))
        usage_point_name = (
            usage_point.self_key if usage_point and usage_point.self_key else _usage_point_name(up_keys)
        ) or "unknown"
        reading_type_name = (
            (reading_type.self_key if reading_type and reading_type.self_key else None)
            or (f"{meter_reading.self_key}#ReadingType" if meter_reading and meter_reading.self_key else None)
            or (
                re.sub(r"/IntervalBlock(/.*)?$", "", entry.self_href or entry.up_href or "") + "#ReadingType"
                if entry.self_href or entry.up_href
                else "unknown"
            )
        )
        service = _service_kind(usage_point, uom)
        scale = 10.0**multiplier
        count = len(block.readings)
        step = interval_length or (block.duration // count if block.duration and count else None)
        rows = self._rows
        for index, (start, duration, value, cost, quality, ordinal) in enumerate(block.readings):
            if start is None and block.start is not None and step is not None:
                start = block.start + index * step
            if duration is None:
                duration = step
            if start is None or duration is None:
                raise Rejected(
                    f"reading {ordinal}: no timePeriod, and its block has no start or interval length",
                    format_name=FORMAT,
                )
            rows["usage_point"].append(usage_point_name)
            rows["reading_type"].append(reading_type_name)
            rows["service_kind"].append(service)
            rows["flow_direction"].append(flow)
            rows["uom"].append(uom)
            rows["interval_start"].append(round(start * 1_000_000))
            rows["duration_s"].append(duration)
            rows["value"].append(None if value is None else value * scale)
            rows["raw_value"].append(value)
            rows["power_of_ten_multiplier"].append(multiplier)
            rows["cost"].append(None if cost is None else cost / 100_000)
            rows["currency"].append(currency if cost is not None or currency else None)
            rows["quality"].append(
                None if quality is None else QUALITY_NAMES.get(quality, f"quality {quality}")
            )
            rows["source_line"].append(ordinal)
            rows["updated_at"].append(entry.updated)
        self.result.readings += count
        if len(rows["source_line"]) >= EMIT_ROWS:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._rows["source_line"]:
            return
        schema = {**INTERVAL_SCHEMA, "interval_start": pl.Int64(), "updated_at": pl.Datetime("us", "UTC")}
        frame = pl.DataFrame(self._rows, schema=schema).with_columns(
            pl.from_epoch("interval_start", time_unit="us").dt.replace_time_zone("UTC")
        )
        self._rows = {name: [] for name in self._rows}
        self.sink(frame)

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
            kind = _int(category.get("kind")) if isinstance(category, dict) else None
            self.result.usage_points.append({
                "usage_point": node.self_key or "unknown",
                "service_kind": SERVICE_KINDS.get(kind, f"kind {kind}") if kind is not None else None,
                "service_kind_code": kind,
                "status": _int(node.fields.get("status")),
                "tz_offset_s": _int(lt.get("tzOffset")),
                "dst_offset_s": _int(lt.get("dstOffset")),
                "dst_start_rule": lt.get("dstStartRule"),
                "dst_end_rule": lt.get("dstEndRule"),
                "dst_start": describe_dst_rule(lt.get("dstStartRule")),
                "dst_end": describe_dst_rule(lt.get("dstEndRule")),
                "updated_at": node.updated,
            })  # fmt: skip
        for node in graph.nodes["ReadingType"]:
            f = node.fields
            uom_code, currency_code = _int(f.get("uom")), _int(f.get("currency"))
            self.result.reading_types.append({
                "reading_type": node.self_key or "unknown",
                "uom_code": uom_code,
                "uom": UOM_SYMBOLS.get(uom_code) if uom_code is not None else None,
                "power_of_ten_multiplier": _int(f.get("powerOfTenMultiplier")),
                "flow_direction": _int(f.get("flowDirection")),
                "accumulation_behaviour": _int(f.get("accumulationBehaviour")),
                "commodity": _int(f.get("commodity")),
                "kind": _int(f.get("kind")),
                "interval_length_s": _int(f.get("intervalLength")),
                "currency_code": currency_code,
                "currency": CURRENCIES.get(currency_code) if currency_code is not None else None,
                "data_qualifier": _int(f.get("dataQualifier")),
                "phase": _int(f.get("phase")),
                "updated_at": node.updated,
            })  # fmt: skip
        for kind in ("UsageSummary", "ElectricPowerUsageSummary"):
            for node in graph.nodes[kind]:
                self.result.summaries.append(self._summary(node))

    def _summary(self, node: _Node) -> dict[str, Any]:
        f = node.fields
        period = f.get("billingPeriod") if isinstance(f.get("billingPeriod"), dict) else {}
        usage_point = self.graph.usage_point([node.self_key, node.up_key], final=True)
        currency_code = _int(f.get("currency"))

        def money(name: str) -> float | None:
            raw = _float(f.get(name)) if isinstance(f.get(name), str) else None
            return None if raw is None else raw / 100_000

        def quantity(name: str) -> tuple[float | None, str | None]:
            q = f.get(name)
            if not isinstance(q, dict):
                return None, None
            value, multiplier, uom = (
                _float(q.get("value")),
                _int(q.get("powerOfTenMultiplier")) or 0,
                _int(q.get("uom")),
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
            "billing_period_start": None if start is None else datetime.fromtimestamp(start, UTC),
            "billing_period_duration_s": _int(period.get("duration")),
            "bill_last_period": money("billLastPeriod"),
            "bill_to_date": money("billToDate"),
            "cost_additional_last_period": money("costAdditionalLastPeriod"),
            "currency": CURRENCIES.get(currency_code) if currency_code is not None else None,
            "consumption_last_period": consumption,
            "consumption_last_period_uom": consumption_uom,
            "current_billing_period_consumption": current,
            "current_billing_period_consumption_uom": current_uom,
            "quality_of_reading": QUALITY_NAMES.get(_int(f.get("qualityOfReading")) or -1),
            "status_timestamp": _epoch(f.get("statusTimeStamp")),
            "updated_at": node.updated,
        }


def _strip(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


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
    return None if value is None else datetime.fromtimestamp(value, UTC)
