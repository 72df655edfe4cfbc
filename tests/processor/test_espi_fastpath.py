"""The ESPI fast path against the exact one: identical frames, results and reasons.

``EspiParser`` takes the IntervalReadings that match a strict grammar from the bytes, in
bulk, before lxml sees them (``Prescan`` in prescan.py); ``EspiParser(sink, fast=False)`` reads every
reading from the lxml tree, as before. Whatever the input, both must hand on the same
rows and objects, or refuse the file with the same reason. The cases below are the ways
a reading can differ from the common layout; the property test runs the fuzzer's hostile
feeds through both, with windows from 31 bytes to 1 MiB so runs are cut everywhere.
"""

from __future__ import annotations

import contextlib
import io
import random
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from processor.errors import Rejected
from processor.greenbutton import espi
from processor.greenbutton.espi import EspiParser
from tests.processor.fuzzing import Choices, gen_espi_feed, hostile_input

ESPI_NS = "http://naesb.org/espi"


def outcome(data: bytes, *, fast: bool) -> tuple[Any, ...]:
    """What the parser made of ``data``: its rows and objects, or its reason for refusing."""
    frames: list[pl.DataFrame] = []
    parser = EspiParser(frames.append, fast=fast)
    try:
        result = parser.parse(io.BytesIO(data))
    except Rejected as error:
        return ("rejected", error.reason)
    rows = pl.concat(frames) if frames else None
    return (result.readings, result.usage_points, result.reading_types, result.summaries, rows)


def assert_same(data: bytes) -> tuple[Any, ...]:
    fast, exact = outcome(data, fast=True), outcome(data, fast=False)
    assert fast[:-1] == exact[:-1]
    if fast[0] != "rejected":
        assert (fast[-1] is None) == (exact[-1] is None)
        if fast[-1] is not None:
            assert_frame_equal(fast[-1], exact[-1])
    else:
        assert fast == exact
    return fast


def runs_taken(data: bytes) -> int:
    """How many runs of readings the fast path took (0: all were read from the tree)."""
    parser = EspiParser(lambda frame: None)
    with contextlib.suppress(Rejected):
        parser.parse(io.BytesIO(data))
    return parser._prescan.next_id


def feed(blocks: list[str], *, p: str = "espi:", declare: str = f'xmlns:espi="{ESPI_NS}"',
         block_attributes: str = "", interval: str | None = None) -> bytes:  # fmt: skip
    """A feed with one usage point, meter reading and reading type, and these blocks' readings."""
    interval = (
        f"<{p}interval><{p}duration>86400</{p}duration><{p}start>1700000000</{p}start></{p}interval>"
        if interval is None
        else interval
    )
    entries = "".join(
        f'<entry><link rel="self" href="/UsagePoint/7/MeterReading/1/IntervalBlock/{i}"/>'
        '<link rel="up" href="/UsagePoint/7/MeterReading/1/IntervalBlock"/><updated>2024-01-01T00:00:00Z</updated>'
        f"<content><{p}IntervalBlock{block_attributes}>{interval}{readings}</{p}IntervalBlock></content></entry>\n"
        for i, readings in enumerate(blocks)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom" {declare}>\n'
        '<entry><link rel="self" href="/UsagePoint/7"/><link rel="related" href="/UsagePoint/7/MeterReading"/>'
        f"<content><{p}UsagePoint><{p}ServiceCategory><{p}kind>0</{p}kind></{p}ServiceCategory></{p}UsagePoint>"
        "</content></entry>\n"
        '<entry><link rel="self" href="/UsagePoint/7/MeterReading/1"/><link rel="up" href="/UsagePoint/7/MeterReading"/>'
        f'<link rel="related" href="/ReadingType/9"/><content><{p}MeterReading/></content></entry>\n'
        f'<entry><link rel="self" href="/ReadingType/9"/><content><{p}ReadingType><{p}currency>840</{p}currency>'
        f"<{p}intervalLength>3600</{p}intervalLength><{p}powerOfTenMultiplier>-3</{p}powerOfTenMultiplier>"
        f"<{p}uom>72</{p}uom></{p}ReadingType></content></entry>\n{entries}</feed>\n"
    ).encode()


def reading(i: int, *, p: str = "espi:", cost: bool = True, quality: str | None = "0", period: bool = True,
            value: str | None = None, sep: str = "") -> str:  # fmt: skip
    parts = []
    if cost:
        parts.append(f"<{p}cost>{i * 10}</{p}cost>")
    if quality is not None:
        parts.append(f"<{p}ReadingQuality><{p}quality>{quality}</{p}quality></{p}ReadingQuality>")
    if period:
        parts.append(f"<{p}timePeriod>{sep}<{p}duration>3600</{p}duration>{sep}"
                     f"<{p}start>{1700000000 + 3600 * i}</{p}start>{sep}</{p}timePeriod>")  # fmt: skip
    parts.append(f"<{p}value>{i if value is None else value}</{p}value>")
    return f"<{p}IntervalReading>{sep}{sep.join(parts)}{sep}</{p}IntervalReading>{sep}"


def day(n: int = 24, **kwargs: Any) -> str:
    return "".join(reading(i, **kwargs) for i in range(n))


PRETTY = "\n            "
DEFAULT_NS = (
    feed([day(p="")], p="", declare="", block_attributes=f' xmlns="{ESPI_NS}"',
         interval="<interval><duration>86400</duration><start>1700000000</start></interval>")
    .replace(b"<UsagePoint>", f'<UsagePoint xmlns="{ESPI_NS}">'.encode())
    .replace(b"<MeterReading/>", f'<MeterReading xmlns="{ESPI_NS}"/>'.encode())
    .replace(b"<ReadingType>", f'<ReadingType xmlns="{ESPI_NS}">'.encode())
)  # fmt: skip
SECOND_QUALITY = (
    "</espi:ReadingQuality><espi:ReadingQuality><espi:quality>8</espi:quality></espi:ReadingQuality>"
)
MOVED_COST = (
    day()
    .replace("<espi:cost>30</espi:cost>", "", 1)
    .replace("<espi:value>3</espi:value>", "<espi:value>3</espi:value><espi:cost>30</espi:cost>", 1)
)
# The readings' own prefix, bound to another namespace inside a reading's value.
NESTED_FOREIGN_BLOCK = (
    f'<espi:value>6<espi:IntervalBlock xmlns:espi="urn:x">{day(3)}</espi:IntervalBlock></espi:value>'
)
NESTED_BLOCK = f"<espi:value>6<espi:IntervalBlock>{day(3)}</espi:IntervalBlock></espi:value>"
LATIN_1 = (
    feed([day()]).decode().replace('encoding="UTF-8"', 'encoding="ISO-8859-1"')
    .replace("<feed ", "<feed title='\xe9t\xe9' ").encode("latin-1")
)  # fmt: skip


SPLIT_START = "".join(
    reading(i).replace("<espi:start>17", "<espi:start>17<x/>") if i == 12 else reading(i, period=i != 3)
    for i in range(24)
)


def odd_one(change: Any, n: int = 24, at: int = 12) -> str:
    """A day whose reading ``at`` is changed by ``change`` (a str -> str function)."""
    return "".join(change(reading(i)) if i == at else reading(i) for i in range(n))


# (name, feed, whether the fast path must take at least one run)
CASES: list[tuple[str, bytes, bool]] = [
    ("plain", feed([day(), day()]), True),
    ("pretty printed", feed([day(sep=PRETTY)]), True),
    ("crlf", feed([day(sep="\r\n  ")]), True),
    ("no cost", feed([day(cost=False)]), True),
    ("no quality", feed([day(quality=None)]), True),
    ("no time period: starts follow the block's", feed([day(period=False)]), True),
    ("some readings lack cost", feed(["".join(reading(i, cost=i % 3 > 0) for i in range(24))]), True),
    ("one reading lacks a time period", feed(["".join(reading(i, period=i != 5) for i in range(24))]), True),
    ("two qualities", feed([day().replace("</espi:ReadingQuality>", SECOND_QUALITY)]), True),
    ("default namespace on the block", DEFAULT_NS, True),
    ("ns0 prefix", feed([day(p="ns0:")], p="ns0:", declare=f'xmlns:ns0="{ESPI_NS}"'), True),
    ("prefix bound to another namespace", feed([day()], declare='xmlns:espi="urn:not-espi"'), False),
    (
        "NaN, inf and -0",
        feed(["".join(reading(i, value=v) for i, v in enumerate(["NaN", "inf", "1", "-0"]))]),
        False,
    ),
    ("value not a number", feed([odd_one(lambda r: r.replace("<espi:value>12<", "<espi:value>12a<"))]), True),
    (
        "start out of range",
        feed([odd_one(lambda r: r.replace("<espi:start>1700043200<", "<espi:start>1e300<"))]),
        True,
    ),
    (
        "a comment inside one reading",
        feed([odd_one(lambda r: r.replace("</espi:cost>", "</espi:cost><!-- c -->"))]),
        True,
    ),
    ("a comment between readings", feed([day(3) + "<!--x-->" + day(3)]), True),
    ("readings inside a comment", feed([day() + "<!-- " + day(2) + " -->" + day(3)]), True),
    (
        "an attribute on a reading",
        feed([odd_one(lambda r: r.replace("Reading>", 'Reading a="1">', 1))]),
        True,
    ),
    (
        "an entity in a value",
        feed([odd_one(lambda r: r.replace("<espi:value>12<", "<espi:value>&#49;2<"))]),
        True,
    ),
    ("CDATA", feed([odd_one(lambda r: r.replace("<espi:value>12<", "<espi:value><![CDATA[12]]><"))]), False),
    ("child order changed", feed([MOVED_COST]), True),
    (
        "a timezone in timePeriod",
        feed(
            [
                odd_one(
                    lambda r: r.replace(
                        "</espi:timePeriod>", "<espi:timezone>-0500</espi:timezone></espi:timePeriod>"
                    )
                )
            ]
        ),
        True,
    ),
    ("spaces around values", feed([day().replace("<espi:value>", "<espi:value> ")]), True),
    (
        "empty value element",
        feed([odd_one(lambda r: r.replace("<espi:value>12</espi:value>", "<espi:value></espi:value>"))]),
        True,
    ),
    ("a start split by a child element, another reading without", feed([SPLIT_START]), True),
    (
        "a reading nested in a value",
        feed([odd_one(lambda r: r.replace("<espi:value>12<", f"<espi:value>12{reading(99)}<"))]),
        True,
    ),
    (
        "a foreign block nested in a value",
        feed([day().replace("<espi:value>6</espi:value>", NESTED_FOREIGN_BLOCK, 1)]),
        True,
    ),
    ("a block nested in a value", feed([day().replace("<espi:value>6</espi:value>", NESTED_BLOCK, 1)]), True),
    (
        "readings outside any block",
        feed([day()]).replace(
            b"<espi:MeterReading/>", f"<espi:MeterReading>{day(2)}</espi:MeterReading>".encode()
        ),
        True,
    ),
    (
        "not well-formed after the readings",
        feed([day(), day()]).replace(b"</entry>\n</feed>", b"</entry>\n<x></feed>"),
        True,
    ),
    (
        "not well-formed after CRLF readings",
        feed([day(sep="\r\n  "), day(sep="\r\n  ")]).replace(b"</entry>\n</feed>", b"</entry>\n<x></feed>"),
        True,
    ),
    (
        "not well-formed on the readings' line",
        feed([day()]).replace(b"</espi:IntervalBlock>", b"<x></espi:IntervalBlock>"),
        True,
    ),
    (
        "utf-16",
        feed([day()]).decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16"),
        False,
    ),
    ("latin-1 text elsewhere", LATIN_1, True),
]


@pytest.mark.parametrize(
    ("data", "fast_path_used"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_fast_path_gives_what_the_tree_gives(data: bytes, fast_path_used: bool) -> None:
    assert_same(data)
    if fast_path_used:
        assert runs_taken(data) > 0


@pytest.mark.parametrize("window", [31, 64, 257, 4096])
def test_runs_cut_anywhere_by_windows_agree(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    data = feed([day(), day(sep=PRETTY), day(cost=False), day(100)])
    expected = outcome(data, fast=False)
    monkeypatch.setattr(espi, "FEED_BYTES", window)
    assert_same(data)
    assert outcome(data, fast=True)[0] == expected[0] == 24 * 3 + 100


def test_one_huge_block_is_emptied_as_it_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readings of a block still open are handed on in batches, so memory stays bounded."""
    monkeypatch.setattr(espi, "FEED_BYTES", 64 * 1024)
    monkeypatch.setattr(espi, "BATCH_READINGS", 2_000)
    data = feed([day(30_000)])
    sizes: list[int] = []
    parser = EspiParser(lambda frame: sizes.append(frame.height))
    parser.parse(io.BytesIO(data))
    assert sum(sizes) == 30_000 and max(sizes) < 10_000 and len(sizes) > 3
    assert parser._prescan.next_id > 10 and not parser._attached and not parser._runs
    assert_same(data)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.data())
def test_hostile_feeds_read_alike(data: st.DataObject) -> None:
    """The fuzzer's ESPI inputs (samples and generated feeds, mutated) through both paths."""
    c = Choices(draw=data.draw)
    xml = gen_espi_feed(c) if c.chance(30) else hostile_input("espi_xml", c, max_sample_bytes=160 * 1024)
    window = c.pick([1 << 20, 4096, 257, 64, 31])
    original = espi.FEED_BYTES
    espi.FEED_BYTES = window
    try:
        assert_same(xml)
    finally:
        espi.FEED_BYTES = original


def test_a_seeded_batch_of_hostile_feeds_reads_alike() -> None:
    """The same as above from fixed seeds, so a regression shows without hypothesis' luck."""
    for seed in range(120):
        rng = random.Random(seed)
        xml = hostile_input("espi_xml", Choices(rng), max_sample_bytes=160 * 1024)
        assert_same(xml)


def test_a_foreign_block_in_a_reading_after_rows_were_handed_on_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one shape the fast path cannot take back once rows have reached the sink: it says so.

    Before any rows are handed on, the parser reads the file again without the fast path
    (the case "a foreign block nested in a value" above); after, it refuses the file.
    """
    monkeypatch.setattr(espi, "BATCH_READINGS", 10)
    data = feed([day(), day(), day().replace("<espi:value>6</espi:value>", NESTED_FOREIGN_BLOCK, 1)])
    assert outcome(data, fast=True) == (
        "rejected",
        "an IntervalBlock of another namespace inside an IntervalReading: not read",
    )
    assert outcome(data, fast=False)[0] == 72
