"""Hostile input, CI-sized: every parser fed structurally mutated files through the real Ingester.

The generators and the oracle live in ``tests/processor/fuzzing.py`` and are the same ones
``bench/fuzz_parsers.py`` runs for ten minutes a parser; here each parser gets a few
hundred examples so the whole file stays under a minute. The oracle is the issue's
contract: no exception escapes, every file ends ingested / duplicate / rejected (rejected
with a reason), the ledger has one row per file and nothing of a rejected file is left in
any reading table, within 1 s per file plus 1 s per MB (``fuzzing.budget_seconds``).

The inputs the fuzzer found crashing before the parsers were fixed are kept at the end as
plain tests, each with the reason it must now be rejected with.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from tests.conftest import MEASUREMENTS_HEADER
from tests.processor.fuzzing import (
    MB,
    Choices,
    Harness,
    Result,
    budget_seconds,
    hostile_input,
)

SAMPLE_LIMIT = 160 * 1024  # CI: samples up to 160 KB (the two largest XML samples are left to bench/)
WATCHDOG_SECONDS = 60  # a true hang kills the run with every thread's traceback, instead of stalling CI
FUZZ = settings(
    deadline=timedelta(seconds=3),  # per example: generation, ingest and oracle (budget for ~1 s of ingest)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One store for all examples (a fresh database per example would dominate the run time)."""
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.close()


def judge(harness: Harness, data: bytes, suffix: str) -> Result:
    """Run one input under a watchdog and assert the contract, with no excuse: the defects
    once found outside the parsers (``KNOWN_DEFECTS``) are fixed, and a return is a failure."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        result = harness.run(data, suffix)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if currently_in_test_context():
        note(f"{len(data)} bytes -> {result.status}: {result.detail}")
    if result.failed:
        saved = harness.directory / f"failure-{harness.count}{suffix}"
        saved.write_bytes(data)
        pytest.fail(
            f"{result.status}: {result.detail}\n" + "\n".join(result.problems) + f"\ninput saved as {saved}"
        )
    if result.over_budget:
        assert not harness.confirm_slow(data, suffix), (
            f"{result.seconds:.2f} s for {len(data):,} bytes ({result.files} file(s)), over the "
            f"{result.budget:.2f} s budget"
        )
    if result.status == "rejected":
        assert result.detail and result.detail.strip()
    return result


@settings(FUZZ, max_examples=110)
@given(st.data())
def test_panoramic_measurement_csvs(harness: Harness, data: st.DataObject) -> None:
    """Measurements, PAN-42 and Pulse Meter exports, mutated line by line and cell by cell."""
    judge(harness, hostile_input("panoramic", Choices(draw=data.draw)), ".csv")


@settings(FUZZ, max_examples=90)
@given(st.data())
def test_panoramic_catalog_csvs(harness: Harness, data: st.DataObject) -> None:
    judge(harness, hostile_input("catalog", Choices(draw=data.draw)), ".csv")


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_utility_csvs(harness: Harness, data: st.DataObject) -> None:
    """PG&E / Opower, PECO, Seattle, Avangrid, SCE and SDG&E downloads, real and generated."""
    judge(harness, hostile_input("utility_csv", Choices(draw=data.draw)), ".csv")


@settings(FUZZ, max_examples=80)
@given(st.data())
def test_espi_xml(harness: Harness, data: st.DataObject) -> None:
    """Real samples and generated feeds: elements dropped, duplicated, moved, renamed, renamespaced."""
    c = Choices(draw=data.draw)
    judge(harness, hostile_input("espi_xml", c, max_sample_bytes=SAMPLE_LIMIT), ".xml")


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_zips(harness: Harness, data: st.DataObject) -> None:
    """ZIPs of all of the above, nested, with lying size fields and broken bytes."""
    c = Choices(draw=data.draw)
    judge(harness, hostile_input("zip", c, max_sample_bytes=SAMPLE_LIMIT), ".zip")


@settings(FUZZ, max_examples=50)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(harness: Harness, data: bytes) -> None:
    """Anything at all: no structure, so this mostly checks format detection."""
    judge(harness, data, ".csv")


def test_a_mutated_input_is_reproducible_from_its_seed() -> None:
    """bench/fuzz_parsers.py saves seeds: the same seed must give the same bytes again."""
    import random

    for parser in ("panoramic", "utility_csv", "espi_xml", "zip"):
        first = hostile_input(parser, Choices(random.Random(42)), max_sample_bytes=SAMPLE_LIMIT)
        again = hostile_input(parser, Choices(random.Random(42)), max_sample_bytes=SAMPLE_LIMIT)
        assert first == again


# --------------------------------------------------------------------------- what the fuzzer found

ROW = "1,a,2024-01-01T00:00:00Z,60,1,s,1,230,2,1,3"
FEED_HEAD = (
    '<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi">'
    '<entry><link rel="self" href="/ReadingType/9"/><content><espi:ReadingType>'
)
FEED_TAIL = "</espi:ReadingType></content></entry></feed>"


def reading_feed(
    reading: str, interval: str = "<espi:duration>900</espi:duration><espi:start>0</espi:start>"
) -> str:
    return (
        '<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi">'
        '<entry><link rel="self" href="/UsagePoint/1/MeterReading/1/IntervalBlock/1"/><content>'
        f"<espi:IntervalBlock><espi:interval>{interval}</espi:interval>"
        f"<espi:IntervalReading>{reading}</espi:IntervalReading></espi:IntervalBlock>"
        "</content></entry></feed>"
    )


FOUND: list[tuple[str, bytes, str]] = [
    # csv.Error escaped: a carriage return inside the header line.
    ("header with a stray CR", f"device_id\r, x,{MEASUREMENTS_HEADER}\n{ROW}\n".encode(),
     "unrecognised format: first line is not a CSV header"),
    # csv.Error escaped: a field over the csv module's 128 KiB limit, on the spaced-quotes path.
    ("131 KiB field after a spaced quote", f'{MEASUREMENTS_HEADER}\n{ROW}\n1, "{"x" * 140_000}", 2\n'.encode(),
     "line 3: not CSV: field larger than field limit"),
    # Stored as readings before: a non-finite number.
    ("infinite power", f"{MEASUREMENTS_HEADER}\n{ROW.replace(',2,1,3', ',1e309,1,3')}\n".encode(),
     "line 2: power(W) value '1e309' is not a number"),
    ("NaN energy", f"{MEASUREMENTS_HEADER}\n{ROW[:-1]}NaN\n".encode(),
     "line 2: energy(Wh) value 'NaN' is not a number"),
    # ValueError escaped from int(float('x')).
    ("ReadingType uom not a number", (FEED_HEAD + "<espi:uom>x</espi:uom>" + FEED_TAIL).encode(),
     "ReadingType uom 'x' is not a number"),
    # TypeError escaped: int() of the dict that an element with children becomes.
    ("ReadingType uom with children", (FEED_HEAD + "<espi:uom><espi:value>72</espi:value></espi:uom>" + FEED_TAIL).encode(),
     "ReadingType uom has child elements where a number belongs"),
    # OverflowError escaped: int(float('inf')).
    ("intervalLength 1e400", (FEED_HEAD + "<espi:intervalLength>1e400</espi:intervalLength>" + FEED_TAIL).encode(),
     "ReadingType intervalLength '1e400' is out of range"),
    # A polars cast error (a 'cannot parse' reason without the reading) before.
    ("reading start 1e300", reading_feed("<espi:timePeriod><espi:duration>900</espi:duration><espi:start>1e300</espi:start>"
                                         "</espi:timePeriod><espi:value>1</espi:value>").encode(),
     "IntervalReading 1: start 1e+300 is out of range"),
    ("reading value NaN", reading_feed("<espi:value>NaN</espi:value>").encode(),
     "IntervalReading 1: value 'NaN' is not a number"),
    # ValueError escaped from datetime.fromtimestamp.
    ("billing period in the year 10000", (
        b'<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi"><entry>'
        b'<link rel="self" href="/UsagePoint/1/UsageSummary/1"/><content><espi:UsageSummary>'
        b"<espi:billingPeriod><espi:start>253402300800</espi:start></espi:billingPeriod>"
        b"</espi:UsageSummary></content></entry></feed>"),
     "UsageSummary billingPeriod start 2.53402e+11 is not a time"),
    # OverflowError escaped: 10.0 ** 400 in a summary quantity.
    ("summary multiplier 400", (
        b'<feed xmlns="http://www.w3.org/2005/Atom" xmlns:espi="http://naesb.org/espi"><entry>'
        b'<link rel="self" href="/UsagePoint/1/UsageSummary/1"/><content><espi:UsageSummary>'
        b"<espi:overallConsumptionLastPeriod><espi:powerOfTenMultiplier>400</espi:powerOfTenMultiplier>"
        b"<espi:value>1</espi:value></espi:overallConsumptionLastPeriod>"
        b"</espi:UsageSummary></content></entry></feed>"),
     "UsageSummary overallConsumptionLastPeriod powerOfTenMultiplier 400 is not a power of ten ESPI uses"),
    # A polars 'conversion failed' error before: Rust's \d matched Arabic-Indic digits.
    ("utility time in Arabic-Indic digits",
     "TYPE,DATE,START TIME,END TIME,USAGE (kWh),NOTES\nElectric usage,2025-01-15,\u0661:00,01:59,0.84,\n".encode(),
     "line 2: START TIME value '\u0661:00' is not a time"),
    ("utility duration 1e300", (
        b"Meter Number,Date,Start Time,Duration,Consumption,Generation,Net\n"
        b'"1","1/1/2025","12:00 AM","1e300","0.0550","0.0000","0.0550"\n'),
     "line 2: Duration value '1e300' is not a length"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "reason"), [f[1:] for f in FOUND], ids=[f[0] for f in FOUND])
def test_inputs_the_fuzzer_found_are_rejected_with_a_reason(
    harness: Harness, data: bytes, reason: str
) -> None:
    result = judge(harness, data, ".xml" if data.startswith(b"<") else ".csv")
    assert result.status == "rejected"
    assert result.detail is not None and result.detail.startswith(reason), result.detail


def test_updated_before_year_one_in_utc_falls_back_to_the_delivery_time(harness: Harness) -> None:
    """``0001-01-01T00:00:00+14:00`` is before year 1 in UTC: OverflowError escaped before."""
    feed = reading_feed("<espi:value>5</espi:value>").replace(
        "<content>", "<updated>0001-01-01T00:00:00+14:00</updated><content>"
    )
    result = judge(harness, feed.encode(), ".xml")
    assert result.status in ("ingested", "duplicate"), result.detail


def test_an_unclosed_quote_in_a_big_file_is_refused_in_linear_time(harness: Harness) -> None:
    """Finding the last line end outside quotes counted the quotes once per line: 4 MB with a
    quote left open on line 2 took minutes. Now one pass."""
    lines = [MEASUREMENTS_HEADER, '1,"a,' + ROW[4:]] + [ROW] * 90_000
    data = ("\n".join(lines) + "\n").encode()
    assert len(data) > 3.5 * MB
    result = judge(harness, data, ".csv")
    assert result.status == "rejected"
    assert result.seconds < budget_seconds(len(data))
