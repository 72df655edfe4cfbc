"""The ESPI parser's fast path: IntervalReadings taken from the bytes before lxml sees them.

Building an lxml element per reading field costs about 3.5 s per 1M readings before any
Python runs; XPath per block and Python lists cost more. So each window of the feed is
scanned first: every run of IntervalReadings that matches an exact, strict grammar is read
in bulk by polars (Rust regexes over the window) and replaced by one marker element before
lxml sees the window. ``EspiParser`` (espi.py) decides from where lxml puts each marker
whether its readings count; everything else is lxml's, read by the exact path.
tests/processor/test_espi_fastpath.py checks that both paths give the same rows, objects
and reasons.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import polars as pl

RAW = ("start", "duration", "value", "cost", "quality")  # a reading's fields, as text until converted
RAW_SCHEMA: dict[str, pl.DataType] = {name: pl.String() for name in RAW}


@dataclass
class Part:
    """Consecutive readings of one block as text, in ``RAW`` columns, not yet converted.

    Either Python lists (read from the lxml tree) or a slice of a polars frame (the fast
    path, see ``Prescan``): lists for the few readings the fast path leaves to lxml,
    frames so the bulk never becomes Python strings.
    """

    length: int
    lists: dict[str, list[str | None]] | None = None
    frame: pl.DataFrame | None = None
    offset: int = 0

    def has_null_start(self) -> bool:
        if self.lists is not None:
            return None in self.lists["start"]
        assert self.frame is not None
        return self.frame["start"].slice(self.offset, self.length).null_count() > 0


# -- the fast path: readings taken from the bytes before lxml sees them ----------------------
#
# Building an lxml element per reading field costs about 3.5 s per 1M readings before any
# Python runs; XPath per block and Python lists cost more. So each window of the feed is
# scanned first: every run of IntervalReadings that matches an exact, strict grammar is
# read in bulk by polars (Rust regexes over the window) and replaced by one marker element
# before lxml sees the window. lxml still parses everything else, and the marker keeps the
# run's place in the tree: the marker's IntervalReading resolves its prefix where the
# readings were, so a run counts only where lxml puts it, as direct children of an ESPI
# IntervalBlock, and nowhere else (not in a comment, not with a prefix bound to another
# namespace). Only runs right after a block's start tag and interval (or continuing such a
# run) are replaced, so a marker never stands in for text that lxml still reads (a reading
# nested in another reading's value). Anything the grammar does not describe (attributes,
# comments or entities inside a reading, another field order, CDATA anywhere) is left to
# lxml and read by the exact path; tests/processor/test_espi_fastpath.py checks that both
# paths give the same rows, objects and reasons.
_READING_START = re.compile(rb"<((?:[A-Za-z_][A-Za-z0-9_.\-]*:)?)IntervalReading>")
_VALUE_CHARS = r"[0-9A-Za-z+.\-]+"  # a field's text: no whitespace inside, no '<', '&' or '>'
# translate() deletes all but line breaks: a marker keeps the lines of what it replaced, so
# lxml's line numbers (in "not well-formed" reasons) stay those of the file.
_ALL_BUT_LINE_BREAKS = bytes(b for b in range(256) if b not in b"\r\n")
_ASCII_ENCODINGS = {"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "iso8859-1", "latin-1", "latin1"}
_DECLARED_ENCODING = re.compile(rb"""<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._\-]+)["']""")
_FIELDS = {"cost": "cost", "quality": "quality", "duration": "duration", "start": "start", "value": "value"}
MAX_TEMPLATES = 8  # reading layouts remembered per prefix
MAX_CARRY = 1024 * 1024  # bytes held back so a window ends before a reading, at most


def _ascii_compatible(head: bytes) -> bool:
    """The file's bytes for ``<IntervalReading>`` are those characters (UTF-8, ASCII, Latin-1).

    In UTF-16 or EBCDIC the same bytes mean other text, so the fast path stays off.
    """
    body = head.removeprefix(b"\\xef\\xbb\\xbf")
    stripped = body.lstrip(b" \\t\\r\\n")
    if not stripped.startswith(b"<") or stripped[1:2] == b"\\x00":
        return False
    declared = _DECLARED_ENCODING.match(body) if body.startswith(b"<?xml") else None
    return declared is None or declared.group(1).decode().lower() in _ASCII_ENCODINGS


def _strict_reading(prefix: str) -> re.Pattern[str]:
    """One IntervalReading's content and end tag as the fast path accepts them.

    ESPI's order: ``cost?, ReadingQuality*, timePeriod(duration, start)?, value?``, all in
    the reading's own prefix, no attributes, only whitespace between elements, and texts
    of letters, digits, ``+-.`` (what a number or ``NaN`` needs) with whitespace around.
    """
    p, ws = re.escape(prefix), r"[ \t\r\n]*"
    text = rf"{ws}{_VALUE_CHARS}{ws}"

    def element(name: str, inner: str) -> str:
        return f"<{p}{name}>{inner}</{p}{name}>"

    quality = element("ReadingQuality", ws + element("quality", text) + ws)
    period = element("timePeriod", ws + element("duration", text) + ws + element("start", text) + ws)
    return re.compile(
        f"{ws}(?:{element('cost', text)}{ws})?(?:{quality}{ws})*(?:{period}{ws})?"
        f"(?:{element('value', text)}{ws})?</{p}IntervalReading>"
    )


def _literal(text: str) -> str:
    """``text`` as a regex that Python and Rust (polars) read the same way."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{ord(c):02X}" for c in text)


@dataclass(frozen=True)
class _Template:
    """One layout of a reading (its markup and whitespace), with a hole for each field's text.

    Readings of a feed nearly all share one layout, so matching the pieces of a window
    against it is one anchored regex per piece, in polars.
    """

    pattern: str  # groups f0..fN-1 (the holes), ws (after the end tag), more (what follows)
    fields: tuple[str | None, ...]  # the RAW column of each hole (None: a second quality)
    markup: int  # characters of the reading outside the holes

    @staticmethod
    def of(body: str, prefix: str) -> _Template | None:
        """The layout of ``body``, one reading's content and end tag that the strict grammar accepts."""
        holes = list(re.finditer(rf"({_VALUE_CHARS})[ \t\r\n]*</{re.escape(prefix)}(\w+)>", body))
        if not holes:
            return None
        pattern, fields, at, seen = ["^"], [], 0, set()
        for i, hole in enumerate(holes):
            name = _FIELDS.get(hole.group(2))
            fields.append(None if name in seen else name)
            seen.add(name)
            pattern += [_literal(body[at : hole.start(1)]), f"(?P<f{i}>{_VALUE_CHARS})"]
            at = hole.end(1)
        pattern += [_literal(body[at:]), r"(?P<ws>[ \t\r\n]*)(?P<more>[^ \t\r\n])?"]
        markup = len(body) - sum(len(hole.group(1)) for hole in holes)
        return _Template("".join(pattern), tuple(fields), markup)


class Prescan:
    """Takes the readings of each window that the strict grammar accepts; lxml gets the rest.

    ``window`` returns the bytes to feed lxml: the window with each run of accepted
    readings replaced by a marker, ``<P:IntervalReading><m:r xmlns:m="urn:...">ID</m:r>
    </P:IntervalReading>`` plus the run's line breaks and spaces up to its end column, in
    the prefix of the readings (so lxml's line and column numbers stay the file's). The
    namespace carries a random token, so a file cannot forge a marker. It also returns the
    runs' readings by ID, to wait until lxml reports their marker (``EspiParser``).

    ``window`` keeps state of its own only (it runs in a thread, a window ahead of lxml).
    """

    def __init__(self) -> None:
        self.namespace = f"urn:meterdrop:espi-fast-path:{secrets.token_hex(8)}"
        self.mark = "{" + self.namespace + "}r"
        self.enabled: bool | None = None  # decided by the first bytes
        self.carry = b""
        self.next_id = 0
        self._open_run = False  # the last window ended inside a run taken as a block's content
        self._heads: dict[str, re.Pattern[bytes]] = {}
        self._templates: dict[str, list[_Template]] = {}
        self._grammars: dict[str, re.Pattern[str]] = {}

    def window(self, chunk: bytes) -> tuple[bytes, dict[int, Part]]:
        """The bytes for lxml from ``chunk`` (``b""`` at the end of the file), and the runs taken."""
        if self.enabled is None:
            self.enabled = _ascii_compatible(chunk)
        data, self.carry = self.carry + chunk, b""
        if not self.enabled or not data:
            return data, {}
        if b"<![CDATA[" in data:  # its text could hold reading-like text a marker would change
            self.enabled = False
            return data, {}
        cut = self._cut(data) if chunk else len(data)
        data, self.carry = data[:cut], data[cut:]
        first = _READING_START.search(data)
        if first is None:
            return data, {}
        return self._replace(data, first.group(1).decode("ascii"))

    @staticmethod
    def _cut(data: bytes) -> int:
        """Where to end the window: before the last reading's start tag, so no reading is split."""
        at = len(data)
        for _ in range(4):
            at = data.rfind(b"IntervalReading>", 0, at)
            if at <= 0:
                break
            tag = data.rfind(b"<", max(0, at - 80), at)
            if tag > 0 and _READING_START.fullmatch(data, tag, at + 16):
                return tag if len(data) - tag <= MAX_CARRY else len(data)
            at = tag if tag > 0 else at
        tag = data.rfind(b"<")
        return tag if tag > 0 and len(data) - tag <= MAX_CARRY else len(data)

    def _replace(self, data: bytes, prefix: str) -> tuple[bytes, dict[int, Part]]:
        start_tag = f"<{prefix}IntervalReading>"
        pieces = (
            pl.Series("piece", [data.decode("latin-1")])  # latin-1: one character per byte, lossless
            .str.split(start_tag)
            .explode()
            .to_frame()
            .with_row_index("i")
            .with_columns(length=pl.col("piece").str.len_chars())
            .with_columns(at=pl.col("length").cum_sum() - pl.col("length") + pl.col("i") * len(start_tag))
            .slice(1)  # the text before the first start tag
        )
        taken = self._match(pieces, prefix)
        if taken.height == 0:
            return data, {}
        # A run: readings one after another with only whitespace between them.
        runs = (
            taken.with_columns(
                run=(
                    (pl.col("i") != pl.col("i").shift(1) + 1)
                    | ~pl.col("continues").shift(1, fill_value=False)
                ).cum_sum()
            )
            .group_by("run", maintain_order=True)
            .agg(
                begin=pl.col("at").first() - len(start_tag),
                end=(pl.col("at") + pl.col("taken")).last(),
                n=pl.len(),
            )
        )
        values = taken.select(RAW)
        out, at, offset, found = [], 0, 0, {}
        wrapper = prefix.encode("ascii") + b"IntervalReading>"
        block_open, head = b"<" + prefix.encode("ascii") + b"IntervalBlock", self._block_head(prefix)
        continued, self._open_run = self._open_run, False
        for begin, end, n in runs.select("begin", "end", "n").iter_rows():
            offset += n
            # Only a run that is an IntervalBlock's content: right after the block's start tag
            # and interval, or where the last window's run left off. Elsewhere (inside another
            # reading's value, say) a marker would change text that lxml still reads.
            if not (begin == 0 and continued):
                at_block = data.rfind(block_open, max(0, begin - 1024), begin)
                if at_block < 0 or not head.fullmatch(data, at_block, begin):
                    continue
            marker = (
                b"<" + wrapper + f'<m:r xmlns:m="{self.namespace}">{self.next_id}</m:r></'.encode() + wrapper
            )
            # The run's line breaks, then spaces up to its end column: lxml's line and column
            # numbers after it (in "not well-formed" reasons) stay those of the file.
            region = data[begin:end]
            breaks = region.translate(None, _ALL_BUT_LINE_BREAKS)
            last_line = len(region) - 1 - max(region.rfind(b"\n"), region.rfind(b"\r"))
            pad = last_line if breaks else len(region) - len(marker)
            if pad < 0:  # a short run on one line: left to lxml rather than moving later columns
                continue
            found[self.next_id] = Part(n, frame=values, offset=offset - n)
            out += [data[at:begin], marker, breaks, b" " * pad]
            self.next_id += 1
            at = end
            self._open_run = end == len(data)
        out.append(data[at:])
        return b"".join(out), found

    def _block_head(self, prefix: str) -> re.Pattern[bytes]:
        """An IntervalBlock start tag (namespace declarations only) and its interval, as bytes."""
        if prefix not in self._heads:
            p, ws, text = (
                re.escape(prefix.encode("ascii")),
                rb"[ \t\r\n]*",
                rb"[ \t\r\n]*[0-9A-Za-z+.\-]*[ \t\r\n]*",
            )
            declaration = rb"""[ \t\r\n]+xmlns(?::[A-Za-z_][A-Za-z0-9_.\-]*)?[ \t\r\n]*=[ \t\r\n]*(?:"[^"<&]*"|'[^'<&]*')"""
            interval = (
                b"<" + p + b"interval>" + ws
                + b"(?:<" + p + b"duration>" + text + b"</" + p + b"duration>" + ws + b")?"
                + b"(?:<" + p + b"start>" + text + b"</" + p + b"start>" + ws + b")?"
                + b"</" + p + b"interval>" + ws
            )  # fmt: skip
            self._heads[prefix] = re.compile(b"<" + p + b"IntervalBlock(?:" + declaration + b")*" + ws + b">"
                                             + ws + b"(?:" + interval + b")?")  # fmt: skip
        return self._heads[prefix]

    def _match(self, pieces: pl.DataFrame, prefix: str) -> pl.DataFrame:
        """The pieces that are accepted readings: their fields, and how much of the piece they take."""
        templates = self._templates.setdefault(prefix, [])
        found: list[pl.DataFrame] = []
        left = pieces
        for template in list(templates):
            left = self._apply(template, left, found)
            if left.height == 0:
                break
        tries = 0
        while left.height and tries < 3 and len(templates) < MAX_TEMPLATES:
            tries += 1
            grammar = self._grammars.get(prefix) or self._grammars.setdefault(prefix, _strict_reading(prefix))
            piece = left["piece"][0]
            body = grammar.match(piece)
            learnt = _Template.of(body.group(), prefix) if body else None
            if learnt is None:
                left = left.slice(1)
                continue
            templates.append(learnt)
            left = self._apply(learnt, left, found)
        if not found:
            return pl.DataFrame(schema={"i": pl.UInt32, **RAW_SCHEMA, "at": pl.Int64, "taken": pl.Int64,
                                        "continues": pl.Boolean})  # fmt: skip
        return pl.concat(found).sort("i") if len(found) > 1 else found[0]

    @staticmethod
    def _apply(template: _Template, pieces: pl.DataFrame, found: list[pl.DataFrame]) -> pl.DataFrame:
        """Match ``pieces`` against ``template``: the matches go to ``found``, the rest is returned."""
        holes = [f"f{i}" for i in range(len(template.fields))]
        matched = pieces.with_columns(pl.col("piece").str.extract_groups(template.pattern).alias("m")).unnest(
            "m"
        )
        hit = pl.col("f0").is_not_null()
        columns = {name: pl.lit(None, pl.String) for name in RAW}
        for hole, name in zip(holes, template.fields, strict=True):
            if name is not None:
                columns[name] = pl.col(hole)
        found.append(
            matched.filter(hit).select(
                "i",
                *(expression.alias(name) for name, expression in columns.items()),
                "at",
                taken=pl.sum_horizontal(pl.col([*holes, "ws"]).str.len_chars()).cast(pl.Int64)
                + template.markup,
                continues=pl.col("more").is_null(),
            )
        )
        return matched.filter(~hit).select(pieces.columns)
