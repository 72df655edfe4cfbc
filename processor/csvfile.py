"""Reading a delivered CSV in bounded pieces, with the checks polars leaves to us.

A 1 GB export must not need gigabytes of memory, so a file over ``ONE_PIECE_BYTES`` is cut
into blocks at line ends that lie outside quoted fields and each block is parsed on its own.  Polars
fills a short row with empty strings instead of failing, so every block is also checked
for its field count; only when a check fails is the slow, exact diagnosis run that
names the offending line.

Hostile files are bounded too: a line that has not ended after ``MAX_LINE_BYTES`` (a quote
left open, or a file that is not a CSV export at all) is refused instead of being carried
into ever larger buffers, and anything the ``csv`` module refuses (a field over its size
limit, a stray carriage return in the header) becomes a reason naming the line.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import polars as pl

from processor.errors import Rejected, at_line

HEADER_LIMIT = 64 * 1024
BLOCK_SIZE = 64 * 1024 * 1024
# A file up to this size is parsed, and so merged, in one piece: a 94 MB file of 1M rows took
# 1.2 s instead of 1.8 (its second block's MERGE joined the first's rows), and peaked 100-250
# MiB higher, 1.43 GiB at most (a 124 MB file re-delivered). Larger measurement files are
# appended block by block and settled (``ingest.APPEND_BYTES``; bench/README.md).
ONE_PIECE_BYTES = 128 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024 * 1024  # longer lines are refused: memory stays a few blocks' worth
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Header:
    """The first line of a CSV: its cells and where the data starts."""

    names: list[str]
    data_offset: int


@dataclass(frozen=True)
class Block:
    """Parsed rows of one piece of the file, all columns as stripped strings."""

    frame: pl.DataFrame
    first_line: int  # physical line number of the block's first row


def read_header(head: bytes) -> Header:
    """Split the first line of ``head`` into header cells.

    Raises Rejected with "unrecognised format" when the bytes are not text with a line.
    """
    start = len(BOM) if head.startswith(BOM) else 0
    end = head.find(b"\n", start)
    if end < 0:
        if len(head) >= HEADER_LIMIT:
            raise Rejected(f"unrecognised format: no line break in the first {HEADER_LIMIT} bytes")
        end = len(head)
    line = head[start:end]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("unrecognised format: first line is not UTF-8 text") from None
    try:
        names = next(csv.reader([text.rstrip("\r")]), [])
    except csv.Error as error:  # e.g. a carriage return inside the first line
        raise Rejected(f"unrecognised format: first line is not a CSV header ({error})") from None
    return Header(names=names, data_offset=min(end + 1, len(head)))


def _cut(buffer: bytes) -> int:
    """Index just past the last line end in ``buffer`` that is outside quotes, or 0.

    Walks back from the last line end keeping the quote count up to it, so a quote left
    open near the start costs one pass over the buffer, not one count per line.
    """
    cut = buffer.rfind(b"\n")
    if cut < 0:
        return 0
    if buffer.find(b'"', 0, cut) < 0:  # no quote at all (most exports): finding is quicker than counting
        return cut + 1
    quotes = buffer.count(b'"', 0, cut)
    while quotes % 2:
        previous = buffer.rfind(b"\n", 0, cut)
        if previous < 0:
            return 0
        quotes -= buffer.count(b'"', previous, cut)
        cut = previous
    return cut + 1


def _too_long(line: int) -> Rejected:
    return Rejected(
        at_line(
            line,
            f"line longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB without a line break outside quotes "
            "(a quote left open, or not a CSV export)",
        )
    )


def _refuse_long_lines(piece: bytes, line: int, end: int | None = None) -> None:
    """Refuse a piece (up to ``end``) holding a line longer than ``MAX_LINE_BYTES``.

    Only a piece read whole (``ONE_PIECE_BYTES``) can be longer than that; pieces read in
    blocks are bounded by the carry check. Each step jumps to the last line break within
    ``MAX_LINE_BYTES``, so a piece of 1M short lines costs two or three searches.
    """
    end = len(piece) if end is None else end
    start = 0
    while end - start > MAX_LINE_BYTES:
        last_break = piece.rfind(b"\n", start, start + MAX_LINE_BYTES + 1)
        if last_break < 0:
            raise _too_long(line + piece.count(b"\n", 0, start))
        start = last_break + 1


def _raw_blocks(stream: BinaryIO, block_size: int, first_line: int) -> Iterator[tuple[bytes, int]]:
    """Pieces of the stream that each end at a record boundary (the last one may not), each
    with the physical line it starts on.

    The piece left over after a cut (``carry``) starts a record; it is joined to the next
    read. A record that is still open after ``MAX_LINE_BYTES`` is refused rather than
    carried on: without that, a 4 GB file without a line break would be held whole.
    """
    carry = b""
    line = first_line
    while True:
        chunk = stream.read(block_size)
        if not chunk:
            if carry:
                _refuse_long_lines(carry, line)
                yield carry, line
            return
        if carry:
            # The record that starts the carry runs at least to the next line break.
            first_break = chunk.find(b"\n")
            if len(carry) + (first_break if first_break >= 0 else len(chunk)) > MAX_LINE_BYTES:
                raise _too_long(line)
        buffer = carry + chunk
        cut = _cut(buffer)
        if cut == 0:
            carry = buffer
            continue
        _refuse_long_lines(buffer, line, cut)
        yield buffer[:cut], line
        carry = buffer[cut:]
        if carry or len(chunk) == block_size:  # another piece may follow: it needs its line number
            line += buffer.count(b"\n", 0, cut)


def _diagnose(data: bytes, first_line: int, width: int) -> str | None:
    """Find the first record in ``data`` that is not UTF-8 or whose field count is not ``width``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return at_line(first_line + data.count(b"\n", 0, error.start), "not UTF-8 text")
    reader = csv.reader(io.StringIO(text, newline=""))
    line_start = first_line
    try:
        for record in reader:
            line_end = first_line + reader.line_num - 1
            if record and len(record) != width:
                truncated = not text.endswith("\n") and line_end == first_line + text.count("\n")
                hint = " (the last line is cut off: was the file still being written?)" if truncated else ""
                return at_line(line_start, f"expected {width} fields, found {len(record)}{hint}")
            line_start = line_end + 1
    except csv.Error as error:  # e.g. a field over the csv module's size limit
        return at_line(line_start, f"not CSV: {error}")
    return None


def _parse_spaced_quotes(data: bytes, first_line: int, width: int) -> pl.DataFrame:
    """Rows like ``1, "Plant, North", 2``: a quote after the space opens a quoted field.

    Polars only honours a quote as a field's first byte, so these blocks go through the
    csv module (slower, exact) instead of being altered byte-wise.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(_diagnose(data, first_line, width) or "not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records = []
    line = first_line
    try:
        for record in reader:
            if record:
                if len(record) != width:
                    raise Rejected(_diagnose(data, first_line, width) or at_line(line, "wrong field count"))
                records.append(record)
            line = first_line + reader.line_num
    except csv.Error as error:  # e.g. a field over the csv module's size limit
        raise Rejected(at_line(line, f"not CSV: {error}")) from None
    columns = list(zip(*records, strict=True)) if records else [() for _ in range(width)]
    frame = pl.DataFrame(
        {f"c{i}": list(col) for i, col in enumerate(columns)},
        schema={f"c{i}": pl.String for i in range(width)},
    )
    return frame.select(pl.all().str.strip_chars())


def _spaced_quotes(data: bytes) -> bool:
    return b'"' in data and b', "' in data  # a byte is found far quicker than a pair


def _parse(data: bytes, first_line: int, width: int) -> pl.DataFrame:
    """Polars' parse of a block, checked; blocks with a quote after a space go to the csv module.

    Such a quote is literal text to polars: the field then starts with a space and a quote, or,
    when the quoted text holds a comma or a line break, the row's fields do not count up. Only
    in those cases is the block searched for ``, "`` (a search that took 60 ms per 1M rows).
    """
    names = [f"c{i}" for i in range(width)]
    try:
        frame = pl.read_csv(
            io.BytesIO(data),
            has_header=False,
            new_columns=names,
            schema={name: pl.String for name in names},
            empty_string_is_null=False,
            truncate_ragged_lines=False,
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError as error:
        if _spaced_quotes(data):
            return _parse_spaced_quotes(data, first_line, width)
        raise Rejected(
            _diagnose(data, first_line, width) or f"CSV error near line {first_line}: {error}"
        ) from None
    # Polars pads short rows (and blank lines) with empty strings; the separators tell whether
    # any row was short. Only a row whose last field is empty can be, so most blocks need not
    # be counted (counting took a third of the parse).
    if (frame[names[-1]].str.len_bytes() == 0).any():
        expected = frame.height * (width - 1)
        if b'"' in data:
            expected += frame.select(
                pl.sum_horizontal(pl.all().str.count_matches(",", literal=True).sum())
            ).item()
        if data.count(b",") != expected:
            if _spaced_quotes(data):
                return _parse_spaced_quotes(data, first_line, width)
            raise Rejected(_diagnose(data, first_line, width) or f"line {first_line}: field count mismatch")
    # Panoramic writes "a, b, c": strip only the columns that carry spaces (it is costly).
    padded = frame.select((pl.all().str.starts_with(" ") | pl.all().str.ends_with(" ")).any()).row(0)
    spaced = [n for n, pad in zip(names, padded, strict=True) if pad]
    quote_after_space = pl.any_horizontal(pl.col(spaced).str.starts_with(' "').any())
    if spaced and b'"' in data and frame.select(quote_after_space).item():
        return _parse_spaced_quotes(data, first_line, width)
    return frame.with_columns(pl.col(spaced).str.strip_chars()) if spaced else frame


def read_blocks(path: Path, header: Header, block_size: int | None = None) -> Iterator[Block]:
    """Parse the data rows of a CSV file block by block, every cell a stripped string.

    Without ``block_size``, a file up to ``ONE_PIECE_BYTES`` is one block and a larger one is
    cut into ``BLOCK_SIZE`` blocks.
    """
    width = len(header.names)
    with path.open("rb") as stream:
        stream.seek(header.data_offset)
        rest = os.fstat(stream.fileno()).st_size - header.data_offset
        if block_size is None:
            block_size = rest + 1 if rest < ONE_PIECE_BYTES else BLOCK_SIZE
        # A piece is read at its own size, not into an allocation of the full block size.
        for data, line in _raw_blocks(stream, max(1, min(block_size, rest + 1)), first_line=2):
            frame = _parse(data, line, width)
            yield Block(frame=frame, first_line=line)
