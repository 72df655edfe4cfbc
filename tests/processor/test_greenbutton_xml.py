"""Green Button ESPI XML: the real samples, each quirk, and the rejections.

Expected values are computed in the tests themselves from the files with ElementTree,
independently of the streaming parser.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processor.store import Store
from tests.conftest import SHARED, at, write_delivery

SAMPLES = SHARED / "samples" / "greenbutton"
ESPI = "{http://naesb.org/espi}"
ATOM = "{http://www.w3.org/2005/Atom}"


def readings_of(path: Path) -> list[tuple[float, int, int, int | None]]:
    """(start, duration, value, cost) of every IntervalReading with a timePeriod, in file order."""
    out = []
    for reading in ET.parse(path).getroot().iter(ESPI + "IntervalReading"):
        period = reading.find(ESPI + "timePeriod")
        cost = reading.findtext(ESPI + "cost")
        out.append((
            float(period.findtext(ESPI + "start")), int(period.findtext(ESPI + "duration")),
            int(reading.findtext(ESPI + "value")), int(cost) if cost else None,
        ))  # fmt: skip
    return out


def test_pge_repeated_block_entries_keep_one_row_per_reading_the_later_entry_winning(
    store: Store, ingest
) -> None:
    path = SAMPLES / "PGEIntervalBlock.xml"
    readings = readings_of(path)
    latest: dict[tuple[float, int], int] = {}
    for start, duration, value, _ in readings:  # file order: a later entry overrides
        latest[(start, duration)] = value
    assert (len(readings), len(latest)) == (2556, 2280)

    outcome = ingest(path)
    assert (outcome.status, outcome.format, outcome.rows) == ("ingested", "greenbutton_xml", 2556)
    rows = store.con.execute(
        "SELECT epoch(interval_start), duration_s, raw_value, quality FROM greenbutton_intervals"
    ).fetchall()
    assert len(rows) == 2280
    assert {(start, duration): value for start, duration, value, _ in rows} == latest
    assert {quality for *_, quality in rows} == {"validated"}  # ReadingQuality 17


def test_gas_billing_in_therms_with_costs_in_dollars(store: Store, ingest) -> None:
    path = SAMPLES / "ngma_natural_gas_billing_billing_data_Service_1_1_2021-05-26_to_2024-04-25.xml"
    readings = readings_of(path)
    assert ingest(path).status == "ingested"
    first = store.con.execute(
        "SELECT service_kind, uom, value, raw_value, power_of_ten_multiplier, cost, currency, updated_at "
        "FROM greenbutton_intervals ORDER BY interval_start LIMIT 1"
    ).fetchone()
    # The block's entry has no <updated>: its version is the file's delivery time.
    assert first == ("gas", "therm", 37.0, 37000.0, -3, 51.0, "USD", None)
    total_value, total_cost = store.con.execute(
        "SELECT sum(value), sum(cost) FROM greenbutton_intervals"
    ).fetchone()
    assert total_value == pytest.approx(sum(v for _, _, v, _ in readings) / 1000)
    assert total_cost == pytest.approx(sum(c for *_, c in readings if c) / 100_000)
    assert store.con.execute(
        "SELECT uom, power_of_ten_multiplier, currency FROM greenbutton_reading_types"
    ).fetchall() == [("therm", -3, "USD")]


def test_nist_hourly_sample_local_time_parameters_and_summary(store: Store, ingest) -> None:
    path = SAMPLES / "TestGBDataHourlyNineDaysBinnedDaily.xml"
    readings = readings_of(path)
    assert ingest(path).rows == len(readings) == 216
    value_sum, cost_sum, durations = store.con.execute(
        "SELECT sum(value), sum(cost), list(DISTINCT duration_s) FROM greenbutton_intervals"
    ).fetchone()
    assert value_sum == sum(v for _, _, v, _ in readings)
    assert cost_sum == pytest.approx(sum(c for *_, c in readings) / 100_000)
    assert durations == [3600]
    point = store.con.execute(
        "SELECT service_kind, tz_offset_s, dst_offset_s, dst_start_rule, dst_start, dst_end FROM greenbutton_usage_points"
    ).fetchone()
    assert point == ("electricity", -18000, 3600, "360E2000", "2nd Sunday of March at 02:00",
                     "1st Sunday of November at 02:00")  # fmt: skip
    summary = store.con.execute(
        "SELECT billing_period_start, billing_period_duration_s, bill_last_period, consumption_last_period, "
        "consumption_last_period_uom, currency FROM greenbutton_usage_summaries"
    ).fetchone()
    root = ET.parse(path).getroot()
    element = next(root.iter(ESPI + "ElectricPowerUsageSummary"))
    assert summary == (
        datetime.fromtimestamp(int(element.findtext(f"{ESPI}billingPeriod/{ESPI}start")), UTC),
        int(element.findtext(f"{ESPI}billingPeriod/{ESPI}duration")),
        int(element.findtext(ESPI + "billLastPeriod")) / 100_000,
        float(element.findtext(f"{ESPI}overallConsumptionLastPeriod/{ESPI}value")),
        "Wh",
        "USD",
    )


def test_daily_readings_follow_local_days_across_dst(store: Store, ingest) -> None:
    path = SAMPLES / "TestGBDataOneYearDailyBinnedMonthly.xml"
    expected = sorted({d for _, d, _, _ in readings_of(path)})
    assert expected == [82800, 86400, 90000]
    ingest(path)
    assert (
        store.con.execute(
            "SELECT duration_s, count(*) FROM greenbutton_intervals GROUP BY 1 ORDER BY 1"
        ).fetchall()[0][0]
        == 82800
    )
    assert [d for (d,) in store.con.execute(
        "SELECT DISTINCT duration_s FROM greenbutton_intervals ORDER BY 1").fetchall()] == expected  # fmt: skip


def test_relative_hrefs_two_reading_types_descending_order(store: Store, ingest) -> None:
    path = SAMPLES / "intervals_APUC000000_electric.xml"
    readings = readings_of(path)
    assert readings[0][0] > readings[-1][0]  # the file really is in descending order
    assert ingest(path).rows == 300
    assert store.con.execute(
        "SELECT DISTINCT usage_point, reading_type, uom, flow_direction FROM greenbutton_intervals"
    ).fetchall() == [("User/237422/UsagePoint/1402026", "ReadingType/01", "Wh", 1)]
    assert store.con.execute(
        "SELECT reading_type, uom, power_of_ten_multiplier FROM greenbutton_reading_types ORDER BY 1"
    ).fetchall() == [("ReadingType/01", "Wh", 0), ("ReadingType/02", "therm", 3)]
    first = min(readings)
    assert store.con.execute(
        "SELECT raw_value FROM greenbutton_intervals WHERE epoch(interval_start) = ?", [first[0]]
    ).fetchone() == (first[2],)


def test_quirky_gas_feed_with_empty_kind_and_reading_type(store: Store, ingest) -> None:
    path = SAMPLES / "ngma_gas_provider_2024-07-16.xml"
    readings = readings_of(path)
    outcome = ingest(path)
    assert (outcome.status, outcome.rows) == ("ingested", len(readings))
    distinct = {(s, d) for s, d, _, _ in readings}
    assert store.con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone() == (len(distinct),)
    assert store.con.execute("SELECT DISTINCT uom, service_kind FROM greenbutton_intervals").fetchall() == [
        (None, None)
    ]
    # The fractional start survives to the microsecond.
    assert store.con.execute("SELECT DISTINCT epoch_us(interval_start) FROM greenbutton_intervals").fetchall() == [
        (1721154384661360,)]  # fmt: skip
    assert store.con.execute("SELECT tz_offset_s FROM greenbutton_usage_points").fetchone() == (18000,)


def test_old_pge_download_without_local_time(store: Store, ingest) -> None:
    path = SAMPLES / "pge_electric_interval_data_2011-03-07_to_2012-04-07.xml"
    readings = readings_of(path)
    assert ingest(path).rows == len(readings) == 2015
    assert store.con.execute("SELECT sum(value) FROM greenbutton_intervals").fetchone() == (
        float(sum(v for _, _, v, _ in {(s, d): (s, d, v, c) for s, d, v, c in readings}.values())),)  # fmt: skip


FEED = """<?xml version="1.0"?>
<{p}feed xmlns{colon}{q}="http://www.w3.org/2005/Atom" xmlns:{e}="http://naesb.org/espi">
 <{p}entry><{p}link rel="self" href="/UsagePoint/7"/><{p}link rel="related" href="/UsagePoint/7/MeterReading"/>
  <{p}content><{e}:UsagePoint><{e}:ServiceCategory><{e}:kind>0</{e}:kind></{e}:ServiceCategory></{e}:UsagePoint></{p}content>
 </{p}entry>
 <{p}entry><{p}link rel="self" href="/UsagePoint/7/MeterReading/1"/><{p}link rel="up" href="/UsagePoint/7/MeterReading"/>
  <{p}link rel="related" href="/ReadingType/9"/><{p}content><{e}:MeterReading/></{p}content></{p}entry>
 <{p}entry><{p}link rel="self" href="/ReadingType/9"/><{p}updated>2024-01-01T00:00:00Z</{p}updated>
  <{p}content><{e}:ReadingType><{e}:flowDirection>19</{e}:flowDirection><{e}:intervalLength>900</{e}:intervalLength>
  <{e}:powerOfTenMultiplier>-1</{e}:powerOfTenMultiplier><{e}:uom>72</{e}:uom></{e}:ReadingType></{p}content></{p}entry>
 <{p}entry><{p}link rel="self" href="/UsagePoint/7/MeterReading/1/IntervalBlock/1"/>
  <{p}updated>{updated}</{p}updated>
  <{p}content><{e}:IntervalBlock><{e}:interval><{e}:duration>2700</{e}:duration><{e}:start>1700000000</{e}:start></{e}:interval>
   <{e}:IntervalReading><{e}:value>{first}</{e}:value></{e}:IntervalReading>
   <{e}:IntervalReading><{e}:ReadingQuality><{e}:quality>8</{e}:quality></{e}:ReadingQuality><{e}:value>20</{e}:value></{e}:IntervalReading>
   <{e}:IntervalReading><{e}:value>30</{e}:value></{e}:IntervalReading>
  </{e}:IntervalBlock></{p}content></{p}entry>
</{p}feed>
"""


def feed(prefix: str, espi_prefix: str, *, updated: str = "2024-02-01T00:00:00Z", first: int = 10) -> str:
    atom = f"{prefix}:" if prefix else ""
    return FEED.format(
        p=atom, colon=":" if prefix else "", q=prefix, e=espi_prefix, updated=updated, first=first
    )


@pytest.mark.parametrize(("atom_prefix", "espi_prefix"), [("", "espi"), ("atom", "ns"), ("ns1", "ns0")])
def test_prefixes_do_not_matter_and_readings_without_time_period_follow_each_other(
    tmp_path: Path, store: Store, ingest, atom_prefix: str, espi_prefix: str
) -> None:
    path = write_delivery(tmp_path / "feed.xml", [feed(atom_prefix, espi_prefix)])
    assert ingest(path).rows == 3
    rows = store.con.execute(
        "SELECT usage_point, reading_type, service_kind, flow_direction, epoch(interval_start), duration_s, value, "
        "quality FROM greenbutton_intervals ORDER BY interval_start"
    ).fetchall()
    assert rows == [
        ("UsagePoint/7", "ReadingType/9", "electricity", 19, 1700000000, 900, 1.0, None),
        ("UsagePoint/7", "ReadingType/9", "electricity", 19, 1700000900, 900, 2.0, "estimated"),
        ("UsagePoint/7", "ReadingType/9", "electricity", 19, 1700001800, 900, 3.0, None),
    ]
    exported = store.con.execute(
        "SELECT DISTINCT quantity, unit FROM energy_readings WHERE source = 'greenbutton_intervals'"
    ).fetchall()
    assert exported == [("energy_exported", "Wh")]


def test_newer_updated_wins_whatever_the_delivery_order(tmp_path: Path, store: Store, ingest) -> None:
    newer = write_delivery(tmp_path / "a.xml", [feed("", "espi", updated="2024-03-01", first=99)],
                           at("2024-01-01 00:00"))  # fmt: skip
    older = write_delivery(tmp_path / "b.xml", [feed("", "espi", updated="2024-02-01T00:00:00Z", first=11)],
                           at("2024-06-01 00:00"))  # fmt: skip
    ingest(newer)
    ingest(older)
    assert store.con.execute(
        "SELECT value, updated_at FROM greenbutton_intervals WHERE epoch(interval_start) = 1700000000"
    ).fetchone() == (9.9, at("2024-03-01 00:00"))


def test_billion_laughs_is_refused_fast_as_dtd(tmp_path: Path, store: Store, ingest) -> None:
    entities = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10))
    bomb = f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">{entities}]><feed xmlns="http://www.w3.org/2005/Atom">&lol9;</feed>'
    path = write_delivery(tmp_path / "bomb.xml", [bomb])
    started = time.monotonic()
    outcome = ingest(path)
    assert (outcome.status, outcome.detail) == (
        "rejected", "DTD not allowed: Green Button XML must not declare a DOCTYPE or entities")  # fmt: skip
    assert time.monotonic() - started < 5  # bounded: no expansion happened (generous for slow CI)


def test_external_entity_is_refused(tmp_path: Path, ingest) -> None:
    xxe = ('<?xml version="1.0"?>\n<!DOCTYPE feed [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
           '<feed xmlns="http://www.w3.org/2005/Atom"><title>&x;</title></feed>')  # fmt: skip
    assert ingest(write_delivery(tmp_path / "xxe.xml", [xxe])).detail.startswith("DTD not allowed")


def test_broken_xml_is_rejected_naming_the_line(tmp_path: Path, store: Store, ingest) -> None:
    text = feed("", "espi").replace("</espi:IntervalBlock>", "</espi:IntervalBlok>")
    outcome = ingest(write_delivery(tmp_path / "broken.xml", [text]))
    assert outcome.status == "rejected"
    assert outcome.detail.startswith("line 17: XML is not well-formed: Opening and ending tag mismatch")
    assert store.con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone() == (0,)


def test_xml_without_espi_content_is_rejected(tmp_path: Path, ingest) -> None:
    path = write_delivery(
        tmp_path / "empty.xml", ['<feed xmlns="http://www.w3.org/2005/Atom"><title>x</title></feed>']
    )
    assert ingest(path).detail == (
        "Green Button XML without any UsagePoint, ReadingType, IntervalBlock or UsageSummary"
    )


@pytest.fixture
def large_xml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every feed takes the large-feed path: interval rows appended as parsed, then settled."""
    from processor import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0)


def test_a_large_feed_gives_the_same_rows(store: Store, ingest, large_xml: None) -> None:
    path = SAMPLES / "PGEIntervalBlock.xml"
    latest: dict[tuple[float, int], int] = {}
    for start, duration, value, _ in readings_of(path):
        latest[(start, duration)] = value
    outcome = ingest(path)
    assert (outcome.status, outcome.rows) == ("ingested", 2556)
    rows = store.con.execute(
        "SELECT epoch(interval_start), duration_s, raw_value, file_id FROM greenbutton_intervals"
    )
    got = rows.fetchall()
    assert {(s, d): v for s, d, v, _ in got} == latest and len(got) == 2280
    assert {f for *_, f in got} == {outcome.file_id}


def test_a_broken_large_feed_leaves_nothing(tmp_path: Path, store: Store, ingest, large_xml: None) -> None:
    text = feed("", "espi").replace("</espi:IntervalBlock>", "</espi:IntervalBlok>")
    outcome = ingest(write_delivery(tmp_path / "broken.xml", [text]))
    assert outcome.status == "rejected"
    assert store.con.execute("SELECT count(*) FROM greenbutton_intervals").fetchone() == (0,)
    assert store.con.execute("SELECT count(*) FROM files WHERE status = 'ingested'").fetchone() == (0,)


def test_large_and_small_feed_paths_agree_on_every_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from processor import ingest as ingest_module
    from processor.ingest import Ingester

    tables = {}
    for large in (False, True):
        monkeypatch.setattr(ingest_module, "LARGE_FEED_BYTES", 0 if large else 1 << 40)
        with Store(tmp_path / f"{large}.duckdb") as s:
            ingester = Ingester(s)
            for sample in sorted(SAMPLES.glob("*.xml")):
                assert ingester.ingest(sample).status == "ingested"
            tables[large] = s.con.execute(
                "SELECT * EXCLUDE (file_id, delivered_at, version_at) FROM greenbutton_intervals ORDER BY ALL"
            ).fetchall()
    assert tables[True] == tables[False] and len(tables[True]) > 5000
